"""Certificates against attacks and Jacobians, on random and trained weights; CLI and monitors."""

import json
import subprocess
import sys

import pytest
import torch

from lipformer import LipformerConfig, LipformerForCausalLM, certify, spectral
from lipformer.constraints import SpectralProjection
from lipformer.empirical import empirical_lipschitz
from lipformer.monitor import ActivationBoundError, ActivationMonitor
from lipformer.tokenization import char_tokenizer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n")


def tiny(tok, **kw):
    cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, w_max={"head": 4.0})
    return LipformerForCausalLM(LipformerConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained with AdamW + hard cap until its predictions carry real margins."""
    tok = char_tokenizer(TEXT)
    torch.manual_seed(0)
    model = tiny(tok)
    ids = torch.tensor([tok(TEXT)["input_ids"][:64]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    project = SpectralProjection(model, opt)
    first = None
    for _ in range(60):
        loss = model(ids, labels=ids).loss
        first = first or float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        project()
    assert float(loss) < first - 0.5
    folder = tmp_path_factory.mktemp("trained")
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


def random_capped(tok, seed):
    torch.manual_seed(seed)
    model = tiny(tok)
    with torch.no_grad():  # random weights, then put back under their caps
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    SpectralProjection(model)()
    return model.eval()


def attack_target(which: str, trained):
    """The models the attack tests run on: trained, random at the caps, sharp attention, POET."""
    model, tok, _ = trained
    if which.startswith("random"):
        model = random_capped(tok, int(which[-1]))
    elif which == "sharp":  # softmax scale 8: scores 8× larger, the regime where attention can focus
        model = tiny(tok, softmax_scale=8.0)
        model.load_state_dict(random_capped(tok, 2).state_dict())
    elif which == "poet":  # POET layers with non-trivial rotations: the bound sees R·W0·P
        torch.manual_seed(3)
        model = tiny(tok, linear="poet")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".rot_" in name:
                    p.copy_(0.05 * torch.randn_like(p))  # stretches σ up to 1.8× its cap
    return model.eval(), tok


@pytest.mark.parametrize("which", ["trained", "random0", "random1", "sharp", "poet"])
def test_no_attack_breaks_a_certified_radius(which, trained):
    model, tok = attack_target(which, trained)
    m64 = certify.float64_copy(model)
    ids = tok(TEXT)["input_ids"][:64]
    certs = certify.certify_tokens(m64, ids)
    assert all(c.radius >= 0 for c in certs) and any(c.radius > 0 for c in certs)
    result = certify.attack(m64, ids, certs, steps=40, max_positions=16)
    assert result["attacked"] > 0 and result["violations"] == 0
    assert 0 < result["closest"] <= 1


def test_radius_is_tight_enough_to_matter_and_attack_breaks_beyond_it(trained):
    """At many times the certified radius the same attack does flip predictions: it is a real attack."""
    model, tok, _ = trained
    m64 = certify.float64_copy(model)
    ids = tok(TEXT)["input_ids"][:64]
    certs = certify.certify_tokens(m64, ids)
    inflated = [certify.PositionCertificate(c.index, c.token, c.prediction, c.margin, c.radius * 200) for c in certs]
    result = certify.attack(m64, ids, inflated, steps=40, max_positions=16)
    assert result["violations"] > 0
    # `flipped` names exactly the broken positions, among those attacked
    attacked = {c.index for c in inflated if c.radius > 0}
    assert len(result["flipped"]) == result["violations"] and set(result["flipped"]) <= attacked


@pytest.mark.parametrize("which", ["trained", "random0"])
def test_empirical_lipschitz_never_exceeds_the_global_bound(which, trained):
    model, tok, _ = trained
    if which != "trained":
        model = random_capped(tok, 0)
    m64 = certify.float64_copy(model)
    bounds = m64.bounds()
    x = m64.model.embed(torch.tensor([tok(TEXT)["input_ids"][:24]])).detach()
    emp = empirical_lipschitz(lambda e: m64(inputs_embeds=e, use_cache=False).logits, x, None)
    assert emp <= bounds.total * (1 + 1e-9)
    print(f"[{which}] global bound {bounds.total:.4f}, best empirical {emp:.4f}, tightness {bounds.total / emp:.1f}×")


def test_sigma_upper_dominates_the_stored_weights(trained):
    model, _, folder = trained
    from safetensors.torch import load_file
    stored = load_file(str(folder / "model.safetensors"))
    for w in model.bounds().weights:
        if w.name.endswith("embed.weight"):
            continue
        assert w.sigma_upper >= torch.linalg.svdvals(stored[w.name].double()).max()


def test_json_schema_from_the_cli(trained):
    _, tok, folder = trained
    out = subprocess.run([sys.executable, "-m", "lipformer.cli", "certify", str(folder), "--json",
                          "--text", "Before we proceed"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert isinstance(doc["lipschitz"]["total"], float) and isinstance(doc["lipschitz"]["body"], float)
    for layer in doc["lipschitz"]["layers"]:
        assert set(layer) == {"name", "sigma_upper", "w_max", "factor"}
    ids = tok("Before we proceed", add_special_tokens=False)["input_ids"]
    assert [p["index"] for p in doc["positions"]] == list(range(len(ids)))
    assert [p["token"] for p in doc["positions"]] == ids
    for p in doc["positions"]:
        assert set(p) == {"index", "token", "prediction", "margin", "radius", "radius_local", "radius_global",
                          "radius_linear"}
        assert isinstance(p["prediction"], int) and p["radius"] >= 0
        # --method best; this model has content attention, where the linear relaxation does not apply
        assert p["radius_linear"] is None and p["radius"] == max(p["radius_local"], p["radius_global"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["certificate.json", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"])  # certify never writes into the model folder


@pytest.mark.parametrize("argv, message", [
    (["certify", "{folder}", "--text", ""], "text is empty"),
    (["certify", "{folder}", "--text", "Zq~"], "outside the model's vocabulary"),
    (["certify", "{missing}"], "is not a folder"),
    (["certify", "{folder}", "--frobnicate"], "unrecognized arguments"),
    (["generate", "{folder}", "--prompt", "Be", "--max-new-tokens", "0"], "max-new-tokens"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, trained, tmp_path, capsys):
    from lipformer.cli import main
    _, _, folder = trained
    argv = [a.format(folder=folder, missing=tmp_path / "nope") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_inspect_and_generate(trained, capsys):
    from lipformer.cli import main
    _, _, folder = trained
    assert main(["inspect", str(folder)]) == 0
    assert "Lipschitz bound" in capsys.readouterr().out
    assert main(["generate", str(folder), "--prompt", "First", "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("First") and len(out.rstrip("\n")) >= 10


def test_monitor_raise_fires_after_weights_leave_their_caps(trained):
    model, tok, _ = trained
    model = certify.float64_copy(model)
    ids = torch.tensor([tok(TEXT)["input_ids"][:64]])
    monitor = ActivationMonitor(model, policy="raise")
    model(ids)  # within bounds: nothing fires
    assert monitor.stats["model.layers.0"]["max_rms"] <= monitor.limits["model.layers.0"]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.fc_out.weight.mul_(50.0)
    with pytest.raises(ActivationBoundError, match="exceeds its certified bound"):
        model(ids)
    monitor.remove()


def test_monitor_clip_keeps_activations_inside_the_bound(trained):
    model, tok, _ = trained
    model = certify.float64_copy(model)
    ids = torch.tensor([tok(TEXT)["input_ids"][:64]])
    monitor = ActivationMonitor(model, policy="clip")
    limits = dict(monitor.limits)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.fc_out.weight.mul_(50.0)
    seen = []
    hook = model.model.layers[-1].register_forward_hook(lambda m, i, o: seen.append(o))
    model(ids)
    hook.remove()
    monitor.remove()
    # the clip hook runs before this one was registered, so `seen` holds the clipped output
    assert float(seen[0].pow(2).mean(-1).sqrt().max()) <= limits["model.layers.1"] * (1 + 1e-9)


def test_certification_refuses_a_float32_model(trained):
    model, tok, _ = trained
    ids = tok(TEXT)["input_ids"][:16]
    with pytest.raises(ValueError, match="float64 copy"):
        certify.certify_tokens(model, ids)
    m64 = certify.float64_copy(model)
    with pytest.raises(ValueError, match="positions"):  # a float64 allowance for a shorter text
        certify.certify_tokens(m64, ids * 5, m64.bounds())


def test_near_tied_head_rows_get_no_radius_from_rounding():
    # Two head rows 1e3 long that differ by ~1e-13, nearly orthogonal to h: the float64 margin is
    # rounding noise, and dividing it by ‖w_1 − w_2‖ once gave a "radius" of 1e-2 for a prediction
    # the exact function does not make. Every positive radius must come with the right sign of
    # the exact margin, computed in rationals on the float64 hidden state.
    from fractions import Fraction

    cfg = LipformerConfig(vocab_size=2, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                          max_position_embeddings=4, intermediate_size=8)
    torch.manual_seed(0)
    model = certify.float64_copy(LipformerForCausalLM(cfg))
    h = model.model(torch.tensor([[0]])).last_hidden_state[0, 0]
    unit = h / h.norm()
    g = torch.Generator().manual_seed(1)
    K, u = 1e3, 2.0**-53
    certified = 0
    for _ in range(400):
        a, b = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2))
        a, b = (v - (v @ unit) * unit for v in (a, b))
        a, b = a / a.norm(), b / b.norm()
        w1 = K * a
        w2 = w1 + 4 * K * u * b + 0.5 * K * u * unit
        with torch.no_grad():
            model.head.weight.copy_(torch.stack([w1, w2]))
        c = certify.certify_tokens(model, [0])[0]
        if c.radius > 0:
            certified += 1
            z = [sum(Fraction(float(x)) * Fraction(float(y)) for x, y in zip(w.tolist(), h.tolist())) for w in (w1, w2)]
            assert z[c.prediction] > z[1 - c.prediction], (c, z)
    assert certified < 400  # the construction does reach the near-tie regime


def _float32_units(monkeypatch):
    """Evaluate the §6a error bound with float32's unit roundoff instead of float64's."""
    from lipformer import nn as lnn
    from lipformer.spectral import sigma
    monkeypatch.setattr(sigma, "_U64", 2.0**-24)
    monkeypatch.setattr(lnn, "_U64", 2.0**-24)


@pytest.mark.parametrize("which", ["trained", "random0", "over_cap", "sharp"])
def test_float64_error_bound_holds_for_float32(which, trained, monkeypatch):
    # docs/lipschitz.md §6a bounds the float64 evaluation error of the hidden states in terms of
    # the unit roundoff u. The same derivation with u = 2⁻²⁴ must cover what float32 actually does
    # (against the float64 forward of the same weights, 2²⁹× more accurate): a check of the
    # derivation's constants on a format where the errors are large enough to see.
    model, tok, _ = trained
    if which == "random0":
        model = random_capped(tok, 0)
    elif which == "over_cap":  # every matrix 3× its cap: larger scores, larger amplification
        model = random_capped(tok, 0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "embed" not in name:
                    p.mul_(3.0)
    elif which == "sharp":  # softmax scale 16: scores up to 16× larger
        model = tiny(tok, softmax_scale=16.0)
        model.load_state_dict(random_capped(tok, 1).state_dict())
    model = model.float().eval()
    ids = torch.tensor([tok(TEXT)["input_ids"][:64]])
    m64 = certify.float64_copy(model)
    with torch.no_grad():
        h32 = model.model(ids).last_hidden_state[0].double()
        h64 = m64.model(ids).last_hidden_state[0]
    observed = float(((h32 - h64).pow(2).mean(-1).sqrt()).max())
    exact = m64.bounds().hidden_error
    _float32_units(monkeypatch)
    bound = m64.bounds().hidden_error
    print(f"{which}: float32 error {observed:.3g}, bound {bound:.3g}, ratio {bound / observed:.3g}")
    assert observed > 0 and observed <= bound, (observed, bound)
    assert exact < bound * 1e-7  # the float64 figure used by the certificates is 2²⁹× smaller


def test_tiny_head_rows_do_not_inflate_the_radius():
    # Head rows ~1e-162 apart: their squared entries underflow, and a plain norm read ‖w_0 − w_1‖
    # 5.7× too small, certifying radius 1.48 where the formula allows 0.26 (a 250-bit forward showed
    # the prediction flip at rms 1.1). The radius must not exceed the formula with the exact norm.
    d = 64
    cfg = LipformerConfig(vocab_size=2, hidden_size=d, num_hidden_layers=1, num_attention_heads=1,
                          max_position_embeddings=4, intermediate_size=2 * d)
    torch.manual_seed(0)
    model = certify.float64_copy(LipformerForCausalLM(cfg))
    with torch.no_grad():
        h = model.model(torch.tensor([[0]])).last_hidden_state[0, 0]
        D = torch.full((d,), 1.57e-162, dtype=torch.float64)
        D[0] = 2.3e-162
        D = torch.sign(h) * D
        model.head.weight.zero_()
        model.head.weight[0] = D
    c = certify.certify_tokens(model, [0], method="global")[0]
    bounds = model.bounds()
    big = 2.0**600  # exact scaling: the norm and the margin computed where nothing underflows
    norm = float(torch.linalg.vector_norm(D * big)) / big
    margin = float((D * big) @ h) / big
    allowed = margin / (norm * d**0.5 * bounds.body)
    assert c.prediction == 0 and 0 < c.radius <= allowed * (1 + 1e-9), (c.radius, allowed)
    # the local certificate ends in the same head margins (certify.head_margins): it may certify more
    # than the global formula, never past the flip the 250-bit forward found at rms 1.1
    local = certify.certify_tokens(model, [0], method="local")[0]
    assert 0 < local.radius_local < 1.1, local
