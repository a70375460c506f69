"""Local certificates against attacks, Jacobians and the softmax-box lemma.

Every local bound must be ≥ what PGD achieves and ≥ the autograd ‖JΔ‖ inside the same ball, and no
attack may flip a prediction inside a local radius — for softmax scales 1…60, weights at, under
and 3× over their caps, POET layers, padding, and an exact tie of two top scores.
"""

import math

import pytest
import torch
from conftest import fit_capped
from torch.nn.attention import SDPBackend, sdpa_kernel

from lipformer import LipformerConfig, LipformerForCausalLM, certify
from lipformer.constraints import SpectralProjection
from lipformer.local_bounds import GELU_CURVATURE_MAX, GELU_SLOPE_MAX_UP, gelu_slope, softmax_box
from lipformer.local_certify import clean_pass, final_radii, local_radii
from lipformer.nn import Attention

SLACK = 1 + 1e-9
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n")
VOCAB = sorted(set(TEXT))
IDS = [VOCAB.index(ch) for ch in TEXT]


def tiny(**kw):
    cfg = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, w_max={"head": 4.0})
    return LipformerForCausalLM(LipformerConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def trained():
    """Sharp attention (c = 8), trained with AdamW + hard cap until the loss has clearly dropped."""
    torch.manual_seed(0)
    model = tiny(softmax_scale=8.0)
    first, last = fit_capped(model, torch.tensor([IDS[:64]]), steps=40)
    assert last < first - 0.5
    return certify.float64_copy(model)


def target(which: str, trained) -> LipformerForCausalLM:
    """trained; random Gaussian weights put under their caps; at the caps (init); 3× over the caps;
    POET with non-trivial rotations; softmax scales 1, 20, 60."""
    if which == "trained":
        return trained
    torch.manual_seed(1)
    scale = {"c1": 1.0, "c20": 20.0, "c60": 60.0, "position": 0.0}.get(which.removesuffix("-mm"), 8.0)
    bias = dict(position_bias=6) if which.startswith("position") else {}
    if which.endswith("-mm"):
        bias["activation"] = "maxmin"
    model = tiny(softmax_scale=scale, linear="poet" if which == "poet" else "dense", **bias)
    with torch.no_grad():
        if which.startswith("position"):   # random weights under their caps, sharp random offsets
            for name, p in model.named_parameters():
                p.copy_(torch.randn_like(p) * (4 if name.endswith("position_bias") else 1))
            SpectralProjection(model)()
        elif which in ("random", "c1", "c20", "c60"):
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
            SpectralProjection(model)()
        elif which == "over3":
            for name, p in model.named_parameters():
                if p.ndim == 2 and "embed" not in name:
                    p.mul_(3.0)
        elif which == "poet":
            for name, p in model.named_parameters():
                if ".rot_" in name:
                    p.copy_(0.05 * torch.randn_like(p))
    return certify.float64_copy(model)


def pgd_deviation(f, x0, radii, t, steps=40, seed=0):
    """Largest ‖f(x0 + δ)_t − f(x0)_t‖₂ found by projected gradient ascent with ‖δ_s‖₂ ≤ radii_s,
    and the Jacobian norm ‖J_t δ‖ at the best direction found (scaled back to the boundary)."""
    g = torch.Generator().manual_seed(seed)
    base = f(x0).detach()[..., t, :]
    r = radii[:, None]

    def project(d):
        return d * torch.clamp(r / d.norm(dim=-1, keepdim=True).clamp(min=1e-300), max=1.0)

    delta = project(torch.randn(x0.shape, generator=g, dtype=x0.dtype) * r)
    best, best_delta = 0.0, delta
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        for i in range(steps):
            delta.requires_grad_(True)
            dev = (f(x0 + delta)[..., t, :] - base).norm()
            (grad,) = torch.autograd.grad(dev, delta)
            if float(dev.detach()) > best:
                best, best_delta = float(dev.detach()), delta.detach()
            step = r * (0.5 if i < steps // 2 else 0.1)
            delta = project(delta.detach() + step * grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-300))
        d = best_delta * (r / best_delta.norm(dim=-1, keepdim=True).clamp(min=1e-300))
        _, jd = torch.autograd.functional.jvp(lambda z: f(z)[..., t, :], x0, d)
    return best, float(jd.norm())


# --- the lemma and the GELU slope -------------------------------------------------------------

def test_softmax_box_contains_every_perturbed_softmax_and_is_attained():
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 3.0, 40.0):
        for beta_scale in (1e-9, 1e-3, 0.3, 5.0):
            N, T = 64, 12
            a = torch.randn(N, T, generator=g, dtype=torch.float64) * scale
            allowed = torch.rand(N, T, generator=g) < 0.7
            allowed[:, 0] = True
            beta = torch.rand(N, T, generator=g, dtype=torch.float64) * beta_scale
            center = torch.where(allowed, a, torch.tensor(-math.inf, dtype=torch.float64))
            low, up, eta = softmax_box(center, beta)
            for _ in range(30):
                move = (2 * torch.rand(N, T, generator=g, dtype=torch.float64) - 1) * beta
                move = torch.where(torch.rand(N, T, generator=g) < 0.5, beta * move.sign(), move)  # corners too
                p = torch.softmax(torch.where(allowed, a + move, center), -1)
                assert (p <= up * (1 + eta) + 1e-300).all() and (p >= low * (1 - eta)).all()
            # attained: s up by β_s, every other score down by β_r
            s = 0
            worst = torch.where(allowed, a - beta, center)
            worst[:, s] = a[:, s] + beta[:, s]
            torch.testing.assert_close(torch.softmax(worst, -1)[:, s], up[:, s], rtol=1e-9, atol=1e-300)


def test_softmax_box_has_no_cancellation_when_one_key_dominates():
    # p_s ≈ 1 − 1e-30: log(Σ_r e^{a_r} − e^{a_s}) would read −∞ or garbage for the others' sum
    a = torch.tensor([[80.0, 10.0, 11.0]], dtype=torch.float64)
    low, up, _ = softmax_box(a, torch.full_like(a, 1e-3))
    exact_other = math.exp(11.0 + 1e-3 - 80.0 + 1e-3) / (1 + math.exp(10.0 + 1e-3 - 80.0 + 1e-3) + math.exp(11.0 + 1e-3 - 80.0 + 1e-3))
    assert up[0, 2] >= exact_other * (1 - 1e-12) and up[0, 2] < 1e-29


def test_gelu_slope_and_curvature_constants():
    # the MLP's local bound: |GELU′(ξ)| ≤ |GELU′(z)| + max|GELU″|·|ξ − z|, capped by the largest slope
    z = torch.linspace(-8, 8, 400_001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(torch.nn.functional.gelu(z).sum(), z, create_graph=True)
    (curve,) = torch.autograd.grad(slope.sum(), z)
    torch.testing.assert_close(gelu_slope(z.detach()), slope.detach())
    assert curve.abs().max() <= GELU_CURVATURE_MAX and slope.max() <= GELU_SLOPE_MAX_UP
    assert curve.abs().max() > 0.79  # the constant is not loose by much


# --- the attention sublayer ---------------------------------------------------------------------

def attention_case(scale, mode, T=8, d=32, seed=0):
    cfg = LipformerConfig(vocab_size=11, hidden_size=d, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=16, softmax_scale=scale)
    torch.manual_seed(seed)
    attn = Attention(cfg).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.parameters():
            if mode == "random":
                w = torch.randn(p.shape, generator=g, dtype=p.dtype)
                p.copy_(w / torch.linalg.matrix_norm(w, 2) * float(torch.empty(1).uniform_(0.3, 1.0, generator=g)))
            elif mode == "over3":
                p.mul_(3.0)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()          # every token at rms 1
    return attn, x


def rope_for(T, dh, identity=False):
    from lipformer.nn import rope_tables
    cos, sin = rope_tables(torch.arange(T), dh, 10000.0, torch.float64)
    if identity:
        cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
    return cos, sin


def check_attention(attn, x, eps, rope, positions, steps=40, small=1e-4):
    """The local bound at ε against PGD; at a small ε (where the deviation is linear up to
    O(ε²)), also against ‖J_t δ‖ in the worst direction PGD found."""
    T, d = x.shape
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    B = float(x.pow(2).mean(-1).sqrt().max()) * SLACK + eps
    e = torch.full((2, T), math.sqrt(d), dtype=torch.float64) * torch.tensor([[eps], [small]], dtype=torch.float64)
    bound, bound_small = attn.local_bound(x, e, rope, allowed, input_bound=B, lam=1e-13)
    f = lambda z: attn(z[None], (rope[0][None, None], rope[1][None, None]))[0]  # noqa: E731
    for t in positions:
        dev, jac = pgd_deviation(f, x, e[0], t, steps=steps)
        assert dev <= bound[t] * SLACK, (t, dev, float(bound[t]))
        assert jac * small / eps <= bound_small[t] * (1 + 1e-3), (t, jac * small / eps, float(bound_small[t]))
    glob = attn.bound(B).lipschitz * e[0]
    assert (bound <= glob * SLACK).all()
    return bound


FAST_ATTENTION = {(1.0, "random"), (8.0, "cap"), (20.0, "over3"), (60.0, "cap"), (60.0, "over3")}


@pytest.mark.parametrize("scale, mode", [
    pytest.param(c, m, marks=() if (c, m) in FAST_ATTENTION else pytest.mark.slow)
    for c in (1.0, 8.0, 20.0, 60.0) for m in ("cap", "random", "over3")])
def test_attention_local_bound_dominates_pgd_and_jacobian(scale, mode):
    attn, x = attention_case(scale, mode)
    for eps in (1e-3, 3e-2):
        check_attention(attn, x, eps, rope_for(8, 8), positions=[3, 7], steps=25)


def test_attention_local_bound_at_an_exact_tie_of_two_top_scores():
    # Tokens 2 and 5 give query 7 the same top score in every head (RoPE switched off; they differ
    # only in directions every head's key map sends to ⟂ q_7) but different values, so the smallest
    # perturbation can move half the attention from one value to the other. The local bound must
    # cover that and grow towards the worst case, while moving token 5 away from the top shrinks it.
    attn, x = attention_case(60.0, "cap", seed=3)
    rope = rope_for(8, 8, identity=True)
    H, dh = attn.heads, attn.head_dim
    with torch.no_grad():
        q7 = attn.q(x[7]).view(H, dh)
        key_dir = torch.linalg.lstsq(attn.k.weight, attn.q(x[7])[:, None]).solution[:, 0]
        top = key_dir / key_dir.pow(2).mean().sqrt()
        constraints = torch.stack([attn.k.weight.view(H, dh, -1)[h].T @ q7[h] for h in range(H)])  # (H, d)
        basis = torch.linalg.svd(constraints, full_matrices=True).Vh[H:]       # ⟂ every head's q·K
        z = basis.T @ torch.randn(basis.size(0), dtype=torch.float64)
        z = 0.5 * z / z.pow(2).mean().sqrt()
        tied = x.clone()
        tied[2], tied[5] = top, top + z
        apart = tied.clone()
        apart[5] = -top + z
    scores = attn.q(tied[7]).view(H, dh) * attn.k(tied[[2, 5]]).view(2, H, dh)
    torch.testing.assert_close(scores[0].sum(-1), scores[1].sum(-1), rtol=1e-12, atol=1e-12)
    bound_tie = check_attention(attn, tied, 1e-4, rope, positions=[7], steps=40, small=1e-6)
    bound_apart = check_attention(attn, apart, 1e-4, rope, positions=[7], steps=40, small=1e-6)
    glob = attn.bound(float(tied.pow(2).mean(-1).sqrt().max())).lipschitz * 1e-4 * math.sqrt(32)
    print(f"tie: local {float(bound_tie[7]):.3g}, tie broken: {float(bound_apart[7]):.3g}, global {glob:.3g}")
    assert bound_tie[7] > 3 * bound_apart[7]


# --- the whole model ----------------------------------------------------------------------------

FAST_MODELS = ("trained", "c60", "over3", "poet", "position", "position-c8", "position-c8-mm")
MODELS = [pytest.param(w, marks=() if w in FAST_MODELS else pytest.mark.slow)
          for w in ("trained", "random", "c1", "c20", "c60", "over3", "poet", "position", "position-c8",
                    "position-c8-mm")]


@pytest.mark.parametrize("which", MODELS)
def test_final_radius_dominates_pgd_and_jacobian(which, trained):
    model = target(which, trained)
    ids = torch.tensor([IDS[:20]])
    clean = clean_pass(model, ids)
    x0 = model.model.embed(ids)[0].detach()
    f = lambda z: model.model(inputs_embeds=z[None], use_cache=False).last_hidden_state[0]  # noqa: E731
    eps, small = 1e-2, 1e-5
    e, e_small = final_radii(model, clean, torch.tensor([eps, small], dtype=torch.float64))
    radii = torch.full((20,), eps * math.sqrt(32), dtype=torch.float64)
    for t in (9, 19):
        dev, jac = pgd_deviation(f, x0, radii, t, steps=8 if which == "poet" else 15)
        assert dev <= e[t] * SLACK, (which, t, dev, float(e[t]))
        assert jac * small / eps <= e_small[t] * (1 + 1e-3), (which, t, jac * small / eps, float(e_small[t]))


@pytest.mark.parametrize("which", ["trained", "position-c8", "position-c8-mm"]
                         + [pytest.param(w, marks=pytest.mark.slow) for w in ("c20", "over3", "poet", "position")])
def test_no_attack_breaks_a_local_radius_and_beyond_it_attacks_do(which, trained):
    model = target(which, trained)
    ids = IDS[:40]
    certs = certify.certify_tokens(model, ids, method="best")
    assert all(c.radius == max(c.radius_local, c.radius_global) for c in certs)
    local = [certify.PositionCertificate(c.index, c.token, c.prediction, c.margin, c.radius_local) for c in certs]
    assert sum(c.radius > 0 for c in local) >= 10
    result = certify.attack(model, ids, local, steps=30, max_positions=12)
    assert result["attacked"] > 0 and result["violations"] == 0, result
    if which == "trained":   # a control: the same attack at 30× the local radii does flip
        inflated = [certify.PositionCertificate(c.index, c.token, c.prediction, c.margin, c.radius * 30) for c in local]
        assert certify.attack(model, ids, inflated, steps=30, max_positions=12)["violations"] > 0


def test_local_radius_beats_global_on_sharp_attention(trained):
    pred, _, local = local_radii(trained, IDS[:64])
    m = trained
    h = m.model(torch.tensor([IDS[:64]]), use_cache=False).last_hidden_state[0]
    pred_g, _, glob = certify.radii_from_hidden(h, m.head.weight, m.bounds())
    assert torch.equal(pred, pred_g)
    ok = glob > 0
    gain = float((local[ok] / glob[ok]).median())
    print(f"trained c=8: median local/global {gain:.1f}×")
    assert gain > 3


def test_padding_is_covered(trained):
    # Left padding: the padded keys leave the allowed set and positions count from the first real
    # token. The deviation bound must hold for perturbations of every real token's embedding.
    model = trained
    real = IDS[:18]
    ids = torch.tensor([[0] * 6 + real])
    mask = torch.tensor([[0] * 6 + [1] * len(real)])
    clean = clean_pass(model, ids, mask)
    assert not clean.allowed[10, :6].any()
    e, e_small = final_radii(model, clean, torch.tensor([1e-2, 1e-5], dtype=torch.float64))
    x0 = model.model.embed(ids)[0].detach()
    f = lambda z: model.model(inputs_embeds=z[None], attention_mask=mask, use_cache=False).last_hidden_state[0]  # noqa: E731
    radii = torch.full((24,), 1e-2 * math.sqrt(32), dtype=torch.float64)
    for t in (12, 23):
        dev, jac = pgd_deviation(f, x0, radii, t, steps=15)
        assert dev <= e[t] * SLACK and jac * 1e-3 <= e_small[t] * (1 + 1e-3)
    # the real positions see what the unpadded sequence sees: the same radii up to rounding
    plain = final_radii(model, clean_pass(model, torch.tensor([real])), torch.tensor([1e-2], dtype=torch.float64))[0]
    torch.testing.assert_close(e[6:], plain, rtol=1e-6, atol=0)


# --- the search and the cached, chunked evaluation ------------------------------------------

def test_search_finds_the_largest_passing_radius_within_tolerance(trained):
    # Every reported radius must itself pass (that is what makes it sound), and 1 + tolerance above
    # it must fail: the batched k-ary search shares trial values across positions, and a bug in how
    # verdicts update the brackets would show up as radii that are far too small (or unverified).
    ids = torch.tensor([IDS[:48]])
    tol = 0.1
    _, _, radius = local_radii(trained, ids, tolerance=tol)
    clean = clean_pass(trained, ids)
    _, _, distance = certify.head_margins(clean.hidden, trained.head.weight)
    t = (radius > 0).nonzero()[:, 0]
    assert t.numel() >= 20
    for k in range(t.numel()):
        e = final_radii(trained, clean, torch.stack([radius[t[k]], radius[t[k]] * (1 + tol) * (1 + 1e-6)]))
        assert e[0, t[k]] < distance[t[k]], "a reported radius that does not verify"
        assert e[1, t[k]] >= distance[t[k]], "a radius more than the tolerance below the largest that verifies"


def test_cached_and_chunked_attention_bound_equals_the_direct_one(trained):
    attn = trained.model.layers[1].attn
    clean = clean_pass(trained, torch.tensor([IDS[:40]]))
    x = clean.inputs[1][0]
    e = torch.rand(3, 40, dtype=torch.float64) * 1e-2
    args = (x, e, clean.rope, clean.allowed, 4.0, 1e-13)
    direct = attn.local_bound(*args, budget=1 << 30)                 # one chunk, recomputed
    whole = attn.local_prepare(x, clean.rope, clean.allowed, 1e-13, rows=40)
    assert torch.equal(attn.local_bound(*args, prepared=whole), direct)
    # chunks differ only in the rounding allowance η (it grows with the keys a chunk spans)
    for rows, keep in ((1, True), (7, True), (7, False)):
        prepared = attn.local_prepare(x, clean.rope, clean.allowed, 1e-13, rows=rows, keep=keep)
        torch.testing.assert_close(attn.local_bound(*args, prepared=prepared), direct, rtol=1e-9, atol=0)
    torch.testing.assert_close(attn.local_bound(*args, budget=1), direct, rtol=1e-9, atol=0)


def test_uncached_certification_gives_the_same_radii(trained, monkeypatch):
    # Long texts of large models do not keep the per-text tensors (CACHE_BYTES): same radii.
    import lipformer.local_certify as lc
    ids = torch.tensor([IDS[:32]])
    cached = local_radii(trained, ids)[2]
    monkeypatch.setattr(lc, "CACHE_BYTES", 0)
    clean = clean_pass(trained, ids)
    assert isinstance(lc._prepared(trained, clean)[0]["steps"][0][3]["chunks"][0], tuple)
    assert torch.equal(local_radii(trained, ids)[2], cached)


def test_eager_attention_masks_are_read_as_masks(trained):
    # Eager attention receives an additive mask (0: attend, min: masked), sdpa a boolean one. Read
    # with .bool(), the additive mask flips: every query would "see" exactly the keys it cannot,
    # and the local bound would describe another function. Both must give the same allowed set,
    # the same bound, and the bound must still dominate PGD on the eager model.
    import copy
    eager = copy.deepcopy(trained)
    eager.config._attn_implementation = "eager"
    real = IDS[:18]
    ids = torch.tensor([[0] * 6 + real])
    mask = torch.tensor([[0] * 6 + [1] * len(real)])
    clean_e, clean_s = clean_pass(eager, ids, mask), clean_pass(trained, ids, mask)
    assert torch.equal(clean_e.allowed, clean_s.allowed)
    eps = torch.tensor([1e-2], dtype=torch.float64)
    torch.testing.assert_close(final_radii(eager, clean_e, eps), final_radii(trained, clean_s, eps), rtol=1e-6, atol=0)
    x0 = eager.model.embed(ids)[0].detach()
    f = lambda z: eager.model(inputs_embeds=z[None], attention_mask=mask, use_cache=False).last_hidden_state[0]  # noqa: E731
    e = final_radii(eager, clean_e, eps)[0]
    dev, _ = pgd_deviation(f, x0, torch.full((24,), 1e-2 * math.sqrt(32), dtype=torch.float64), 20, steps=15)
    assert dev <= e[20] * SLACK
