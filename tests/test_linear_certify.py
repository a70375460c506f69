"""The linear-relaxation certificate (docs/lipschitz.md §10) against attacks on random and trained
position-only maxmin models.

Every margin lower bound must lie below the smallest margin PGD and random corners of the ball
find; no attack may flip a prediction inside a linear radius; a control that freezes the maxmin
pattern (the unsound "linearize everything" bound) must be caught by the same attack.
"""

import math

import pytest
import torch
from conftest import fit_capped

from lipformer import LipformerConfig, LipformerForCausalLM, certify
from lipformer import linear_certify as lc
from lipformer.constraints import SpectralProjection
from test_local_certify import IDS, VOCAB   # the same text as the module-wise local certificates


def tiny(**kw):
    """Position-only attention (sharp offsets learnable) and maxmin: what the relaxation covers."""
    cfg = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, w_max={"head": 8.0}, softmax_scale=0.0, position_bias=6,
               activation="maxmin", residual_alpha=0.5)
    return LipformerForCausalLM(LipformerConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def trained():
    """Position-only maxmin, trained with AdamW + hard cap until it clearly uses context."""
    torch.manual_seed(0)
    model = tiny()
    first, last = fit_capped(model, torch.tensor([IDS[:64]]), steps=60)
    assert last < first - 1.0
    return certify.float64_copy(model)


def random_model():
    torch.manual_seed(1)
    model = tiny()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (4 if name.endswith("position_bias") else 1))
        SpectralProjection(model)()
    return certify.float64_copy(model)


def margin_fn(model, t, y, j):
    W = model.head.weight
    return lambda z: model.model(inputs_embeds=z, use_cache=False).last_hidden_state[:, t] @ (W[y] - W[j])


def pair_fn(model, t, j, block=-1):
    """z ↦ block `block`'s maxmin pair difference δ_j = z_a − z_b at position t."""
    mlp = model.model.layers[block].mlp
    half = mlp.fc_in.weight.size(0) // 2
    c = mlp.fc_in.weight[j] - mlp.fc_in.weight[half + j]

    def f(z):
        seen = []
        hook = mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            model.model(inputs_embeds=z, use_cache=False)
        finally:
            hook.remove()
        return seen[0][:, t] @ c
    return f


def smallest_margin(model, ids, t, y, j, eps, steps=40, corners=64, seed=0, f=None):
    """The smallest z_y − z_j at position t (or of f) that PGD (several starts) and random corners of
    the ball {max_s ‖δ_s‖₂ ≤ ε√d} find."""
    g = torch.Generator().manual_seed(seed)
    x0 = model.model.embed(torch.tensor([ids])).detach()
    r = eps * math.sqrt(x0.size(-1))
    f = f or margin_fn(model, t, y, j)

    def project(d):
        return d * torch.clamp(r / d.norm(dim=-1, keepdim=True).clamp(min=1e-300), max=1.0)

    def sphere(n):
        d = torch.randn((n, *x0.shape[1:]), generator=g, dtype=x0.dtype)
        return d * (r / d.norm(dim=-1, keepdim=True))

    with torch.no_grad():
        best = float(f(x0 + sphere(corners)).min())
    delta = sphere(4)
    for i in range(steps):
        delta.requires_grad_(True)
        m = f(x0 + delta)
        (grad,) = torch.autograd.grad(m.sum(), delta)
        best = min(best, float(m.detach().min()))
        step = r * (0.5 if i < steps // 2 else 0.1)
        delta = project(delta.detach() - step * grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-300))
    with torch.no_grad():
        return min(best, float(f(x0 + delta).min()))


@pytest.mark.parametrize("which", ["trained", "random"])
def test_margin_lower_bound_is_below_every_attack(which, trained):
    model = trained if which == "trained" else random_model()
    ids = IDS[:24]
    state = lc.prepare(model, torch.tensor([ids]))
    pred = state["pred"]
    cases = []
    for t in (5, 14, 23):
        runner = torch.topk(state["m_low"][t] / state["dist"][t].clamp(min=1e-30), 3, largest=False).indices
        cases += [(t, int(j)) for j in runner if int(j) != int(pred[t])][:2]
    targets, classes = torch.tensor([c[0] for c in cases]), torch.tensor([c[1] for c in cases])
    zero = lc.margin_lower_bounds(model, state, targets, classes, torch.zeros(len(cases), dtype=torch.float64))
    clean = torch.tensor([float(margin_fn(model, t, pred[t], j)(model.model.embed(torch.tensor([ids])))[0])
                          for t, j in cases], dtype=torch.float64)
    assert torch.all(zero <= clean) and torch.allclose(zero, clean, atol=1e-9), (zero, clean)
    previous = zero
    for eps in (1e-3, 1e-2, 5e-2):
        lb = lc.margin_lower_bounds(model, state, targets, classes, torch.full((len(cases),), eps, dtype=torch.float64))
        assert torch.all(lb <= previous + 1e-12)          # a bigger ball never raises the bound
        for (t, j), bound in zip(cases, lb.tolist()):
            found = smallest_margin(model, ids, t, int(pred[t]), j, eps)
            assert bound <= found, (which, eps, t, j, bound, found)
        previous = lb


def test_freezing_the_maxmin_pattern_is_caught(trained, monkeypatch):
    """The control: without the relaxation (every pair kept in its clean order) the bound is the
    first-order one, which is not sound; the attack of the test above must find a margin below it."""
    ids = IDS[:24]
    real = lc._pair_relaxation
    monkeypatch.setattr(lc, "_pair_relaxation", lambda delta, down, up, rad0: real(delta, 0 * down, 0 * up, 0 * rad0))
    state = lc.prepare(trained, torch.tensor([ids]))
    pred = state["pred"]
    broken = 0
    for t in (5, 14, 23):
        j = int(torch.topk(state["m_low"][t] / state["dist"][t].clamp(min=1e-30), 2, largest=False).indices[1])
        lb = lc.margin_lower_bounds(trained, state, torch.tensor([t]), torch.tensor([j]),
                                    torch.tensor([0.2], dtype=torch.float64))
        broken += float(lb) > smallest_margin(trained, ids, t, int(pred[t]), j, 0.2)
    assert broken > 0


@pytest.mark.parametrize("which,block", [("trained", 1), ("trained", 0), ("random", 1)])
def test_pair_intervals_hold_under_attack_and_are_tighter(which, block, trained):
    """§10d: every refined pair interval (block 1 uses refined block-0 intervals, as
    `refine_intervals` does) contains what PGD and random corners push the pair difference to,
    from both sides; and it is narrower than the module-wise one."""
    model = trained if which == "trained" else random_model()
    ids, eps = IDS[:24], torch.tensor(0.05, dtype=torch.float64)
    state = lc.prepare(model, torch.tensor([ids]))
    targets = torch.tensor([7, 16, 23])
    refined = {0: lc.pair_intervals(model, state, 0, torch.arange(24), eps)} if block == 1 else {}
    down, up = lc.pair_intervals(model, state, block, targets, eps, refined)
    B = state["blocks"][block]
    e_in, _, _, _ = lc._radii(model, state, eps.reshape(1))
    rad = B["pair_w"] * e_in[2 * block + 1][0, targets][:, None]          # the module-wise half-width
    refined_here = torch.isfinite(down[targets])
    assert refined_here.sum() >= 10, refined_here.sum()                   # the test must exercise pairs
    narrower = ((down + up)[targets][refined_here] < 2 * rad[refined_here]).float().mean()
    assert narrower > 0.9, narrower
    checked = 0
    for i, t in enumerate(targets.tolist()):
        for j in refined_here[i].nonzero()[:, 0][:2].tolist():
            delta = float(B["delta"][t, j])
            f = pair_fn(model, t, j, block)
            low = smallest_margin(model, ids, t, 0, 0, float(eps), f=f)
            high = -smallest_margin(model, ids, t, 0, 0, float(eps), f=lambda z, g=f: -g(z))
            assert delta - float(down[t, j]) <= low and high <= delta + float(up[t, j]), (t, j, low, high)
            checked += 1
    assert checked >= 5


def test_refined_certificates_survive_attack_and_only_add(trained):
    """certified_at(refine=lc.REFINE_PAIRS) certifies a superset, and PGD flips none of the positions it adds."""
    ids = IDS[:48]
    state = lc.prepare(trained, torch.tensor([ids]))
    certs = certify.certify_tokens(trained, ids, method="global")
    gained = 0
    for eps in (0.15, 0.3):
        e = torch.tensor(eps, dtype=torch.float64)
        plain = lc.certified_at(trained, state, e)
        better = lc.certified_at(trained, state, e, refine=lc.REFINE_PAIRS)
        assert bool((better | ~plain).all())                              # a superset
        new = (better & ~plain).nonzero()[:, 0].tolist()
        gained += len(new)
        cert = [certify.PositionCertificate(c.index, c.token, c.prediction, c.margin, eps if c.index in new else 0.0)
                for c in certs]
        assert certify.attack(trained, ids, cert, steps=40, max_positions=16)["violations"] == 0
    assert gained > 0


def test_no_attack_breaks_a_linear_radius_and_the_radii_beat_the_module_bounds(trained):
    ids = IDS[:48]
    certs = certify.certify_tokens(trained, ids, method="best")
    assert all(c.radius == max(c.radius_local, c.radius_global, c.radius_linear) for c in certs)
    assert all(c.radius_linear >= max(c.radius_local, c.radius_global) for c in certs)
    gain = [c.radius_linear / max(c.radius_local, c.radius_global) for c in certs if c.radius_global > 0]
    assert sum(g > 1.15 for g in gain) >= len(gain) // 6, sorted(gain)   # the search steps by 2^(1/4)
    linear = [certify.PositionCertificate(c.index, c.token, c.prediction, c.margin, c.radius_linear) for c in certs]
    result = certify.attack(trained, ids, linear, steps=40, max_positions=16)
    assert result["attacked"] >= 12 and result["violations"] == 0, result
    inflated = [certify.PositionCertificate(c.index, c.token, c.prediction, c.margin, c.radius * 30) for c in linear]
    assert certify.attack(trained, ids, inflated, steps=30, max_positions=16)["violations"] > 0


def test_every_reported_radius_passed_the_check_and_the_search_is_tight(trained):
    ids = IDS[:32]
    start = torch.tensor([c.radius for c in certify.certify_tokens(trained, ids, method="global")])
    pred, radius = lc.linear_radii(trained, torch.tensor([ids]), start)
    state = lc.prepare(trained, torch.tensor([ids]))
    assert torch.equal(pred, state["pred"])
    grown = radius > start
    assert grown.sum() >= 8 and bool(lc.certified_at(trained, state, radius, grown)[grown].all())
    # below the top (16× the start) the search ends within 2^(1/4) of a value that failed
    inside = (radius > start) & (radius < start * 15.9)
    assert inside.sum() >= 4
    assert not bool(lc.certified_at(trained, state, radius * 2 ** 0.25 * 1.001, inside).any())


@pytest.mark.parametrize("kw", [dict(softmax_scale=2.0), dict(activation="gelu")])
def test_other_models_are_refused_and_best_skips_them(kw):
    model = certify.float64_copy(tiny(**kw))
    assert lc.unsupported(model)
    with pytest.raises(ValueError, match="linear"):
        lc.linear_radii(model, torch.tensor([IDS[:8]]), torch.zeros(8, dtype=torch.float64))
    certs = certify.certify_tokens(model, IDS[:8], method="best")
    assert all(c.radius_linear is None for c in certs)


class OneBatch:
    """The val loader interface `certified_accuracy` reads: one fixed batch of the test text."""

    def __init__(self, rows: int, T: int):
        data = torch.tensor(IDS)
        self.x = torch.stack([data[i:i + T] for i in range(rows)])
        self.y = torch.stack([data[i + 1:i + T + 1] for i in range(rows)])

    def next_batch(self):
        return self.x, self.y

    def reset(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_training_certified_accuracy_counts_the_relaxation(trained):
    from lipformer.training.evaluation import certified_accuracy

    radii = [0.03, 0.1, 0.2, 0.4]   # this model knows its text: its radii are large
    out = certified_accuracy(trained, OneBatch(2, 48), radii, batches=1, local_sequences=2)
    best, module = out["certified_accuracy"], out["certified_accuracy_module"]
    assert out["local_positions"] == 96
    for k in best:
        assert module[k] <= best[k] <= out["accuracy"]
        assert module[k] >= max(out["certified_accuracy_local"][k], out["certified_accuracy_global"][k])
    assert any(best[k] > module[k] for k in best), (best, module)
    assert [best[k] for k in sorted(best, key=float)] == sorted(best.values(), reverse=True)
    # recount from scratch: a position counts at ε when some sound method certifies it at ε or at a
    # larger radius of the list (a ball inside a certified ball is certified); nothing else counts
    data = OneBatch(2, 48)
    for eps in ("0.1", "0.2"):
        count = 0
        for row in range(2):
            state = lc.prepare(trained, data.x[row:row + 1])
            right = state["pred"] == data.y[row]
            glob = torch.tensor([c.radius for c in certify.certify_tokens(trained, data.x[row].tolist(), method="local")])
            ok = glob >= float(eps)
            for r in (r for r in radii if r >= float(eps)):
                ok |= lc.certified_at(trained, state, torch.tensor(r, dtype=torch.float64), right)
            count += int((right & ok).sum())
        assert count == round(best[eps] * 96), (eps, count, best[eps])


def test_nan_weights_or_margins_certify_nothing(trained):
    import copy

    broken = copy.deepcopy(trained)
    with torch.no_grad():
        broken.model.layers[1].mlp.fc_out.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):      # no sound σ: no claim at all
        lc.prepare(broken, torch.tensor([IDS[:16]]))
    state = lc.prepare(trained, torch.tensor([IDS[:16]]))
    assert bool(lc.certified_at(trained, state, torch.tensor(1e-3, dtype=torch.float64))[3:6].all())
    state["m_low"][3:6] = float("nan")                # a NaN margin is never read as "ruled out"
    assert not bool(lc.certified_at(trained, state, torch.tensor(1e-3, dtype=torch.float64))[3:6].any())


def test_a_float32_radius_is_refused(trained):
    """float32(0.01) < 0.01: a check at it would be counted as a certificate at a larger radius."""
    state = lc.prepare(trained, torch.tensor([IDS[:8]]))
    with pytest.raises(ValueError, match="float64"):
        lc.certified_at(trained, state, torch.tensor(0.01))
