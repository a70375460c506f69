"""The certified-margin training objectives (training/objectives.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lipformer import LipformerConfig, LipformerForCausalLM, certify
from lipformer.training.objectives import Objective, PowerSigma, body_lipschitz, bottom_logit_loss, pair_instability
from lipformer.training.recipe import RecipeError, load_recipe


def model_off_caps(**kw) -> LipformerForCausalLM:
    """Weights *not* at their caps (random scales per matrix), so every σ in the formula matters."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=16, softmax_scale=3.0, residual_alpha=0.3)
    model = LipformerForCausalLM(LipformerConfig(**{**cfg, **kw})).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p)).mul_(0.5 + torch.rand(()))
    return model


def exact_sigma(weight, heads=None):
    W = weight if heads is None else weight.view(heads, -1, weight.size(-1))
    return torch.linalg.matrix_norm(W, ord=2)


@pytest.mark.parametrize("activation", ["gelu", "maxmin"])
def test_body_lipschitz_matches_sound_bound(activation):
    model = model_off_caps(activation=activation)
    sound = model.bounds().body
    mirror = float(body_lipschitz(model, exact_sigma).detach())
    # bounds() uses certified σ upper bounds (≥ exact by ~1e-5 relative per matrix)
    assert mirror <= sound * (1 + 1e-9)
    assert mirror == pytest.approx(sound, rel=2e-3)
    # control: a different residual α changes both, so the match is not a coincidence
    other = model_off_caps(residual_alpha=0.1, activation=activation)
    assert float(body_lipschitz(other, exact_sigma).detach()) != pytest.approx(sound, rel=1e-2)


def test_power_sigma_below_exact_and_gradient_is_top_singular_pair():
    torch.manual_seed(1)
    # a spectral gap σ₂/σ₁ = 0.8, so warm-started power steps converge within the loop below
    U0, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    V0, _ = torch.linalg.qr(torch.randn(20, 12, dtype=torch.float64))
    W = torch.nn.Parameter(U0 @ torch.diag(torch.linspace(2.0, 0.5, 12, dtype=torch.float64).index_put_(
        (torch.tensor([0]),), torch.tensor([2.5], dtype=torch.float64))) @ V0.T)
    ps = PowerSigma(iters=40)
    s = ps.sigma(W)
    U, S, Vh = torch.linalg.svd(W.detach())
    assert float(s.detach()) <= float(S[0]) * (1 + 1e-6)
    assert float(s.detach()) == pytest.approx(float(S[0]), rel=1e-4)
    s.backward()
    assert torch.allclose(W.grad.abs(), torch.outer(U[:, 0], Vh[0]).abs(), atol=1e-3)
    per_head = ps.sigma(W, 3)
    assert (per_head <= exact_sigma(W.detach(), 3) * (1 + 1e-6)).all()  # unit vectors in float32
    assert torch.allclose(per_head, exact_sigma(W.detach(), 3), rtol=1e-2)


def test_bottom_logit_loss_definition():
    torch.manual_seed(2)
    z, W, y = torch.randn(5, 7), torch.randn(7, 4), torch.randint(0, 7, (5,))
    assert torch.allclose(bottom_logit_loss(z, y, W, torch.tensor(0.0)), F.cross_entropy(z, y))
    e = torch.tensor([0.1, 0.0, 0.5, 1.0, 2.0])
    shifted = z.clone()
    for i in range(5):
        for j in range(7):
            if j != y[i]:
                shifted[i, j] += float((W[y[i]] - W[j]).norm()) * float(e[i])
    assert torch.allclose(bottom_logit_loss(z, y, W, e), F.cross_entropy(shifted, y), atol=1e-6)
    assert bottom_logit_loss(z, y, W, e) > F.cross_entropy(z, y)


def test_bottom_logits_win_exactly_where_the_global_certificate_holds():
    """argmax z̃ = y with e = √d·L_body·ε  ⇔  certified (radius ≥ ε) and correct, up to rounding."""
    model = model_off_caps()
    m64 = certify.float64_copy(model)
    bounds = m64.bounds()
    ids = torch.randint(0, 24, (4, 16))
    hidden = m64.model(ids, use_cache=False).last_hidden_state.reshape(-1, 32)
    z = m64.head(hidden)
    y = z.argmax(-1)  # certify the model's own predictions
    _, _, radius = certify.radii_from_hidden(hidden, m64.head.weight, bounds)
    eps = float(radius.median())
    assert eps > 0
    e = math.sqrt(32) * bounds.body * eps
    dist = torch.cdist(m64.head.weight, m64.head.weight)
    zt = z + dist[y] * e
    zt[torch.arange(len(y)), y] = z[torch.arange(len(y)), y]
    wins = (zt.argmax(-1) == y) & ((zt - zt.gather(1, y[:, None])).topk(2, dim=-1).values[:, 1] < 0)
    near = (radius - eps).abs() < 1e-6 * eps
    assert ((wins == (radius >= eps)) | near).all()
    assert 0 < int(wins.sum()) < len(y)  # both outcomes occur: the test can fail


def test_margin_objective_gradient_flows_through_the_bound():
    model = model_off_caps().float()
    ids = torch.randint(0, 24, (2, 16))
    grads = {}
    for eps in (0.0, 0.05):
        model.zero_grad()
        logits = model(ids).logits
        Objective("margin_global", eps)(model, logits, ids).backward()
        grads[eps] = model.model.layers[0].attn.q.weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[0.05])
    ce = Objective("ce")(model, logits, ids)
    assert torch.allclose(ce, F.cross_entropy(logits.reshape(-1, 24), ids.reshape(-1)))


def test_margin_on_correct_takes_the_margin_loss_only_where_the_prediction_is_right():
    """margin_on="correct": per position the bottom-logit loss where argmax z = y, CE elsewhere."""
    model = model_off_caps().float()
    ids = torch.randint(0, 24, (2, 16))
    logits = model(ids).logits
    z = logits.reshape(-1, 24)
    y = z.argmax(-1).clone()
    y[::3] = (y[::3] + 1) % 24                  # a third of the targets wrong, the rest right
    targets = y.view(2, 16)
    e = math.sqrt(32) * body_lipschitz(model, PowerSigma().sigma) * 0.05
    right = z.argmax(-1) == y
    assert 0 < int(right.sum()) < y.numel()      # both kinds of position: the mask matters
    per_margin = bottom_logit_loss(z, y, model.head.weight, e, reduction="none")
    per_ce = F.cross_entropy(z, y, reduction="none")
    expect = torch.where(right, per_margin, per_ce).mean()
    got = Objective("margin_global", 0.05, margin_on="correct")(model, logits, targets)
    assert torch.allclose(got, expect, rtol=1e-5)
    # control: over all positions the loss is larger (the margin loss is > CE wherever e > 0)
    assert Objective("margin_global", 0.05)(model, logits, targets) > got + 1e-3
    mixed = Objective("margin_global", 0.05, weight=0.5, margin_on="correct")(model, logits, targets)
    assert torch.allclose(mixed, 0.5 * per_ce.mean() + 0.5 * expect, rtol=1e-5)
    with pytest.raises(ValueError, match="margin_on"):
        Objective("margin_global", 0.05, margin_on="wrong")
    with pytest.raises(RecipeError, match="margin_on"):
        load_recipe(preset="tiny", overrides=["train.margin_on=some"])


def test_recipe_objective_checks():
    r = load_recipe(preset="tiny", overrides=["train.objective=margin_global", "train.eps=0.01"])
    assert r.train.objective == "margin_global" and r.train.eps == 0.01
    for bad in (["train.objective=hinge"], ["train.eps=-1"]):
        with pytest.raises(RecipeError):
            load_recipe(preset="tiny", overrides=bad)
    r = load_recipe(preset="tiny", overrides=["train.objective=margin_local", "train.eps=0.01", "train.eps_warmup=50"])
    assert r.train.objective == "margin_local" and r.train.eps_warmup == 50
    with pytest.raises(RecipeError):
        load_recipe(preset="tiny", overrides=["train.eps_warmup=-1"])
    with pytest.raises(RecipeError):
        load_recipe(preset="tiny", overrides=["train.margin_weight=2"])


def test_pair_instability_is_the_share_of_reach_a_pair_lacks():
    """relu(1 − |δ|/r) per maxmin pair, r = ‖w_a − w_b‖·√d·L_l·ε with L_l the bound up to that MLP: checked
    against a direct computation with exact σ's, 0 at ε → 0, 1 for a pair that is exactly tied."""
    model = model_off_caps(activation="maxmin", softmax_scale=0.0, position_bias=4)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    inputs = [x, 0.5 * x]
    preacts = [xi @ layer.mlp.fc_in.weight.T for xi, layer in zip(inputs, model.model.layers)]
    reach = []
    body_lipschitz(model, exact_sigma, reach)
    want = 0.0
    for xi, L, layer in zip(inputs, reach, model.model.layers):
        W = layer.mlp.fc_in.weight
        h = W.size(0) // 2
        z = xi @ W.T
        r = (W[:h] - W[h:]).norm(dim=-1) * math.sqrt(32) * 0.01 * L
        want = want + torch.clamp(1 - (z[..., :h] - z[..., h:]).abs() / r, min=0).mean()
    got = pair_instability(model, preacts, 0.01, exact_sigma, position_stride=1)
    assert torch.allclose(got, want / 2) and 0 < float(got) < 1
    assert float(pair_instability(model, preacts, 1e-12, exact_sigma)) == 0.0
    strided = [p[:, ::4] for p in preacts]   # the default takes every 4th position of an 8-long window
    assert torch.allclose(pair_instability(model, preacts, 0.01, exact_sigma), pair_instability(model, strided, 0.01, exact_sigma, position_stride=1))
    with torch.no_grad():   # a tied pair: unit 0 and unit h of the first block read the same row
        W = model.model.layers[0].mlp.fc_in.weight
        W[W.size(0) // 2] = W[0]
    z0 = x[:, :1, :] @ W.T
    tied = pair_instability(model, [z0, z0], 0.01, exact_sigma)
    assert float(tied) >= 0.5 / W.size(0)   # that pair contributes 1 to the first block's mean


def test_stability_term_reads_the_forwards_own_preactivations():
    """The objective's stability term is pair_instability of fc_in applied to each MLP's input in the
    same forward (recorded by hooks, not recomputed), and its gradient reaches fc_in's weight through
    that forward. Control: the same objective without the term differs by exactly that amount."""
    from lipformer.local_certify import recording

    model = model_off_caps(activation="maxmin", softmax_scale=0.0, position_bias=4)
    ids = torch.randint(0, 24, (2, 8))
    with_term, without = Objective("margin_global", 0.05, stability=1.0), Objective("margin_global", 0.05)
    with with_term.recording(model), recording(model) as seen:
        logits = model(ids).logits
    loss = with_term(model, logits, ids)
    base = without(model, logits, ids)
    preacts = [layer.mlp.fc_in(m[0]) for m, layer in zip(seen.mlp, model.model.layers)]
    term = pair_instability(model, preacts, 0.05, with_term.power.sigma)
    assert float(term) > 0
    assert torch.allclose(loss, base + term)
    W = model.model.layers[0].mlp.fc_in.weight
    g_with, = torch.autograd.grad(loss, W, retain_graph=True)
    g_without, = torch.autograd.grad(base, W)
    assert not torch.allclose(g_with, g_without)


def test_stability_eps_moves_the_reach_and_not_the_margin():
    """stability_eps gives the stability term its own radius: the loss is the margin loss at ε_train plus
    the term at stability_eps, both ramped by the same warm-up. Control: left at 0 the term is taken at
    ε_train, which differs."""
    model = model_off_caps(activation="maxmin", softmax_scale=0.0, position_bias=4)
    ids = torch.randint(0, 24, (2, 8))
    apart = Objective("margin_global", 0.01, eps_warmup=10, stability=1.0, stability_eps=0.05)
    together = Objective("margin_global", 0.01, eps_warmup=10, stability=1.0)
    margin_only = Objective("margin_global", 0.01, eps_warmup=10)
    losses = []
    for objective in (apart, together):
        with objective.recording(model):
            logits = model(ids).logits
        preacts = [p.detach() for p in objective._preacts]
        losses.append(objective(model, logits, ids, step=4))
    base = margin_only(model, logits, ids, step=4)
    ramp = 5 / 10
    term = pair_instability(model, preacts, 0.05 * ramp, apart.power.sigma)
    assert torch.allclose(losses[0], base + term)
    assert torch.allclose(losses[1], base + pair_instability(model, preacts, 0.01 * ramp, apart.power.sigma))
    assert not torch.allclose(losses[0], losses[1])
    ce_only = Objective("margin_global", 0.0, stability=1.0, stability_eps=0.05)   # ε_train 0: CE + the term
    want = F.cross_entropy(logits.reshape(-1, 24), ids.reshape(-1)) + pair_instability(model, preacts, 0.05, apart.power.sigma)
    ce_only._preacts = preacts
    assert torch.allclose(ce_only(model, logits, ids), want)
    with pytest.raises(RecipeError, match="stability_eps"):
        load_recipe(preset="shakespeare-char", overrides=["train.stability=0", "train.stability_eps=0.01"])
    with pytest.raises(RecipeError, match="stability_eps"):
        load_recipe(preset="shakespeare-char", overrides=["train.stability_eps=-1"])
    assert load_recipe(preset="shakespeare-char", overrides=["train.stability_eps=0.01"]).train.stability_eps == 0.01


def test_stability_needs_a_margin_objective_and_maxmin(tmp_path):
    with pytest.raises(RecipeError, match="stability"):
        load_recipe(preset="tiny", overrides=["train.stability=1"])
    with pytest.raises(RecipeError, match="stability"):
        load_recipe(preset="tiny", overrides=["train.objective=margin_global", "train.stability=-1"])
    objective = Objective("margin_global", 0.01, stability=1.0)
    model = model_off_caps().float()   # GELU
    ids = torch.randint(0, 24, (1, 8))
    with objective.recording(model):
        logits = model(ids).logits
    with pytest.raises(ValueError, match="maxmin"):
        objective(model, logits, ids)


def test_stability_trains_through_the_loop(tmp_path):
    from lipformer.training.train import run

    _loop_recipe(tmp_path, 4)   # builds the corpus in tmp_path/char
    recipe = load_recipe("tiny", None, [
        "data.dataset=char_dir", f"data.path={tmp_path / 'char'}", "train.max_steps=4", "train.eval_every=4",
        "train.checkpoint_every=4", "train.objective=margin_global", "train.eps=0.01", "train.stability=1.0",
        "model.activation=maxmin", "model.softmax_scale=0", "model.position_bias=4"])
    result = run(recipe, tmp_path / "run", progress=False, log=lambda *a: None)
    assert math.isfinite(result["val_loss"]) and "certified_accuracy_module" in result


def _loop_recipe(tmp_path, steps):
    from lipformer.training.data import build_char_corpus

    folder = tmp_path / "char"
    if not folder.exists():
        build_char_corpus(["First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40], folder)
    return load_recipe("tiny", None, ["data.dataset=char_dir", f"data.path={folder}", f"train.max_steps={steps}",
                                      "train.eval_every=4", "train.checkpoint_every=4", "train.objective=margin_global",
                                      "train.eps=0.01", "train.allocation=modula", "model.zero_init=true"])


def test_margin_training_runs_through_the_loop(tmp_path):
    """margin_global + modula allocation + zero init through `run`: trains and certifies."""
    from lipformer.training.train import run

    result = run(_loop_recipe(tmp_path, 4), tmp_path / "run", progress=False, log=lambda *a: None)
    assert "certified_accuracy" in result and math.isfinite(result["lipschitz_total"])


@pytest.mark.slow
def test_margin_training_resumes_bit_identically(tmp_path):
    """A margin_global run stopped at step 5 and resumed ends with exactly the weights of an
    uninterrupted one (the power-iteration σ estimate carries no state between steps)."""
    from safetensors.torch import load_file

    from lipformer.training.train import run

    r = _loop_recipe(tmp_path, 8)
    quiet = {"progress": False, "log": lambda *a: None}
    run(r, tmp_path / "straight", **quiet)
    run(r, tmp_path / "split", max_steps=5, **quiet)
    run(r, tmp_path / "split", resume=True, **quiet)
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- margin_local: the differentiable surrogate of the local deviation bound ----------------------

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n")
VOCAB = sorted(set(TEXT))
IDS = [VOCAB.index(ch) for ch in TEXT]


def trained_sharp(**kw):
    """A small model whose attention is sharp (c = 8), trained 40 AdamW steps with the hard cap: the
    regime where local and global bounds differ by orders of magnitude."""
    from lipformer.constraints import SpectralProjection

    torch.manual_seed(0)
    model = LipformerForCausalLM(LipformerConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=64,
                                                 softmax_scale=8.0, w_max={"head": 4.0}, **kw))
    ids = torch.tensor([IDS[:64]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    project = SpectralProjection(model, opt)
    for _ in range(40):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        project()
    return certify.float64_copy(model)


@pytest.fixture(scope="module")
def sharp():
    return trained_sharp()


@pytest.fixture(scope="module")
def sharp_position():
    """The same with learned position offsets on the scores (position_bias)."""
    return trained_sharp(position_bias=8)


def surrogate(model, ids, eps, sigma=exact_sigma, **kw):
    from lipformer.training.local_surrogate import local_deviation, recording

    with recording(model) as seen:
        model(ids, use_cache=False, **kw)
    return local_deviation(model, seen, eps, sigma)


@pytest.fixture(scope="module")
def sharp_maxmin():
    """The same with offsets and the norm-preserving maxmin activation."""
    return trained_sharp(position_bias=8, activation="maxmin")


@pytest.mark.parametrize("which", ["sharp", "sharp_position", "sharp_maxmin"])
def test_local_surrogate_equals_the_sound_local_bound_with_exact_sigmas(which, request):
    """Same recursion as local_certify.final_radii: with exact σ's in float64 the two differ only by
    the sound one's rounding allowances and σ upper bounds (≤ 1e-3 relative), from below."""
    from lipformer.local_certify import clean_pass, final_radii

    sharp = request.getfixturevalue(which)

    ids = torch.tensor([IDS[:40], IDS[40:80]])
    global_e = None
    for eps in (1e-4, 1e-2, 1e-1):
        e = surrogate(sharp, ids, eps).detach()
        for b in range(2):
            sound = final_radii(sharp, clean_pass(sharp, ids[b:b + 1]), torch.tensor([eps], dtype=torch.float64))[0]
            assert (e[b] <= sound * (1 + 1e-9)).all()
            assert torch.allclose(e[b], sound, rtol=1e-3, atol=0)
        global_e = math.sqrt(32) * sharp.bounds().body * eps
    assert float(e.median()) < global_e / 3   # the local bound is the point: far below √d·L·ε


def test_local_surrogate_covers_padding_like_the_sound_bound(sharp):
    from lipformer.local_certify import clean_pass, final_radii

    ids = torch.tensor([IDS[:24]])
    mask = torch.ones(1, 24, dtype=torch.long)
    mask[0, :5] = 0
    e = surrogate(sharp, ids, 1e-2, attention_mask=mask).detach()[0]
    sound = final_radii(sharp, clean_pass(sharp, ids, mask), torch.tensor([1e-2], dtype=torch.float64))[0]
    assert torch.allclose(e[5:], sound[5:], rtol=1e-3, atol=0)


def _pgd(f, x0, radius, t, steps=15, seed=0):
    """Largest ‖f(x0 + δ)_t − f(x0)_t‖₂ found by projected gradient ascent, ‖δ_s‖₂ ≤ radius."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(seed)
    base = f(x0).detach()[t]
    project = lambda d: d * torch.clamp(radius / d.norm(dim=-1, keepdim=True).clamp(min=1e-300), max=1.0)  # noqa: E731
    delta, best = project(torch.randn(x0.shape, generator=g, dtype=x0.dtype)), 0.0
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        for i in range(steps):
            delta.requires_grad_(True)
            dev = (f(x0 + delta)[t] - base).norm()
            (grad,) = torch.autograd.grad(dev, delta)
            best = max(best, float(dev.detach()))
            step = radius * (0.5 if i < steps // 2 else 0.1)
            delta = project(delta.detach() + step * grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-300))
    return best


@pytest.mark.parametrize("which", ["sharp", "c20-at-caps"])
def test_local_surrogate_dominates_attacks(which, sharp):
    """Sanity: no perturbation PGD finds moves a final hidden state further than the surrogate says."""
    model = sharp
    if which == "c20-at-caps":
        torch.manual_seed(3)
        model = LipformerForCausalLM(LipformerConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, max_position_embeddings=64,
                                                     softmax_scale=20.0)).double()
    ids = torch.tensor([IDS[:20]])
    x0 = model.model.embed(ids)[0].detach()
    f = lambda z: model.model(inputs_embeds=z[None], use_cache=False).last_hidden_state[0]  # noqa: E731
    for eps in (1e-3, 3e-2):
        e = surrogate(model, ids, eps).detach()[0]
        for t in (6, 19):
            dev = _pgd(f, x0, eps * math.sqrt(32), t)
            assert 0 < dev <= float(e[t]), (which, eps, t, dev, float(e[t]))


def test_margin_local_gradient_reaches_every_kind_of_weight(sharp):
    model = certify.float64_copy(sharp).float()
    ids = torch.tensor([IDS[:32], IDS[32:64]])
    obj, grads = Objective("margin_local", 0.01), {}
    for name in ("ce", "margin_local"):
        model.zero_grad()
        o = Objective(name, 0.01) if name == "ce" else obj
        with o.recording(model):
            logits = model(ids).logits
        loss = o(model, logits, ids)
        assert torch.isfinite(loss)
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    layer = "model.layers.0."
    for kind in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc_in", "mlp.fc_out"):
        g = grads["margin_local"][layer + kind + ".weight"]
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        assert not torch.allclose(g, grads["ce"][layer + kind + ".weight"])
    # the loss is above cross-entropy (every competitor is raised) and equals it at ε = 0
    with obj.recording(model):
        logits = model(ids).logits
    assert obj(model, logits, ids) > Objective("ce")(model, logits, ids)
    assert torch.allclose(Objective("margin_local", 0.0)(model, logits, ids), Objective("ce")(model, logits, ids))


def test_margin_local_needs_the_recorded_forward_and_ramps_eps(sharp):
    model = certify.float64_copy(sharp).float()
    ids = torch.tensor([IDS[:16]])
    obj = Objective("margin_local", 0.02, eps_warmup=10)
    with pytest.raises(RuntimeError, match="recording"):
        obj(model, model(ids).logits, ids)
    assert [obj.eps_at(s) for s in (0, 4, 9, 50)] == pytest.approx([0.002, 0.01, 0.02, 0.02])
    assert obj.eps_at(None) == 0.02 and Objective("margin_local", 0.02).eps_at(0) == 0.02
    # a ramped step is the unramped objective at the smaller ε
    with obj.recording(model):
        logits = model(ids).logits
    ramped = obj(model, logits, ids, step=4)
    plain = Objective("margin_local", 0.01)
    with plain.recording(model):
        logits = model(ids).logits
    assert torch.allclose(ramped, plain(model, logits, ids))
    # margin_weight w mixes (1 − w)·CE + w·margin
    half = Objective("margin_local", 0.01, weight=0.5)
    with half.recording(model):
        logits = model(ids).logits
    with plain.recording(model):
        model(ids)
    mixed = 0.5 * Objective("ce")(model, logits, ids) + 0.5 * plain(model, logits, ids)
    assert torch.allclose(half(model, logits, ids), mixed)
    with pytest.raises(ValueError):
        Objective("margin_local", 0.01, weight=1.5)


def test_margin_local_trains_through_the_loop(tmp_path):
    from lipformer.training.train import run

    r = _loop_recipe(tmp_path, 4)
    r.train.objective, r.train.eps_warmup = "margin_local", 2
    result = run(r, tmp_path / "run", progress=False, log=lambda *a: None)
    assert "certified_accuracy" in result and math.isfinite(result["lipschitz_total"])


def test_distillation_loss_is_tempered_kl_to_the_teacher():
    """T²·KL(p_teacher,T ‖ p_student,T), averaged over positions; 0 exactly at the teacher."""
    from lipformer.training.objectives import Distillation, distillation_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    for T in (1.0, 2.0):
        p = F.softmax(t / T, -1)
        manual = (p * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
        assert torch.allclose(distillation_loss(s, t, T), manual, atol=1e-6)
    assert distillation_loss(t, t).abs() < 1e-6 and distillation_loss(s, t) > 0.1
    # the mix: β = 0 is the task loss, β = 1 the distillation loss alone; the teacher is frozen
    teacher = torch.nn.Linear(3, 3)
    task = torch.tensor(2.5)
    assert Distillation(teacher, 0.0)(task, s, t) == task
    assert torch.allclose(Distillation(teacher, 1.0)(task, s, t), distillation_loss(s, t))
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="weight"):
        Distillation(teacher, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        Distillation(teacher, 0.5, temperature=0.0)
