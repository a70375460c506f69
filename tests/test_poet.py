"""POETLinear: W = R W0 P with block-stochastic Cayley–Neumann orthogonal factors (DESIGN §4)."""

import math

import pytest
import torch

from lipformer import LipformerConfig, LipformerForCausalLM
from lipformer.nn import CappedLinear
from lipformer.poet import (POETLinear, cayley_neumann, merge_all, poet_modules, poet_side_params,
                            poet_trainable_params, poetize, reset_optimizer_state)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These matrices are tiny: a second thread only helps when the machine is idle, and on a
    # loaded 2-core box OpenMP's spinning threads make the 300-step test several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize_q(layer: POETLinear, std: float) -> None:
    with torch.no_grad():
        for p in layer.q_parameters():
            p.normal_(0.0, std)


def _trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------
# structure

@pytest.mark.parametrize("d_in, d_out, b, expected", [
    (768, 768, 256, 2 * 3 * (256 * 255 // 2)),             # 195 840: three full blocks per side
    (50, 37, 16, (3 * 120 + 1) + (2 * 120 + 10)),          # 50 = 3·16 + 2, 37 = 2·16 + 5
    (20, 30, 1000, 20 * 19 // 2 + 30 * 29 // 2),           # block clamped to each side
    (7, 9, 1, 0),                                          # 1×1 blocks: nothing to train
    (33, 16, 16, (2 * 120 + 0) + 120),                     # remainder of 1: identity, no parameter
])
def test_trainable_parameter_count_matches_formula(d_in, d_out, b, expected):
    layer = POETLinear(d_in, d_out, block_size=b, init="uniform_spectrum")
    assert poet_trainable_params(d_in, d_out, b) == expected
    assert _trainable(layer) == layer.num_trainable() == expected
    assert poet_side_params(d_out, b) + poet_side_params(d_in, b) == expected
    # W0 and the permutations are buffers, never trained
    assert not any(n.endswith(("w0", "perm")) for n, _ in layer.named_parameters())


@pytest.mark.parametrize("d_in, d_out, b", [(50, 37, 16), (20, 30, 1000), (48, 64, 16)])
def test_weight_is_R_W0_P_with_block_stochastic_factors(d_in, d_out, b):
    layer = POETLinear(d_in, d_out, block_size=b)
    _randomize_q(layer, 0.05)
    R, P = layer.orthogonal_factors()
    assert torch.allclose(layer.weight, R @ layer.w0 @ P, atol=1e-6)
    x = torch.randn(5, d_in)
    assert torch.allclose(layer(x), x @ (R @ layer.w0 @ P).T, atol=1e-5)
    for side, G in ((layer.rot_out, R), (layer.rot_in, P)):
        # Π G Πᵀ is block diagonal with blocks of size min(b, n) and a smaller last one
        D = G[side.perm][:, side.perm]
        bb = min(b, side.n)
        mask = torch.zeros_like(D, dtype=torch.bool)
        for start in range(0, side.n, bb):
            mask[start:start + bb, start:start + bb] = True
        assert D[~mask].abs().max() == 0 if (~mask).any() else True
        assert (D[mask] != torch.eye(side.n)[mask]).any()  # the blocks really are trained
        # approximately orthogonal: ‖GᵀG − I‖ ≤ (1 + ‖Q‖^6)² − 1 (module docstring)
        err = torch.linalg.matrix_norm(G.double().T @ G.double() - torch.eye(side.n, dtype=torch.float64), 2)
        assert err <= (1 + side.q_norm_upper() ** 6) ** 2 - 1 + 1e-5


def test_block_size_not_dividing_and_larger_than_dimension():
    layer = POETLinear(50, 37, block_size=16)
    assert (layer.rot_in.full, layer.rot_in.rem, layer.rot_out.full, layer.rot_out.rem) == (3, 2, 2, 5)
    _randomize_q(layer, 0.05)
    x = torch.randn(4, 50, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer(x).shape == (4, 37)
    for p in layer.q_parameters():  # every block, the smaller last ones included, gets a gradient
        assert p.grad is not None and p.grad.abs().sum() > 0
    big = POETLinear(20, 30, block_size=1000)
    assert (big.rot_in.b, big.rot_out.b) == (20, 30)
    assert big.rot_in.q.shape == (1, 190) and big.rot_out.q.shape == (1, 435)


def test_cayley_neumann_converges_to_cayley():
    A = torch.randn(3, 12, 12, dtype=torch.float64) * 0.05
    Q = A - A.mT
    eye = torch.eye(12, dtype=torch.float64)
    exact = (eye + Q) @ torch.linalg.inv(eye - Q)
    assert torch.allclose(cayley_neumann(torch.zeros_like(Q), 5), eye.expand_as(Q), atol=0)
    for k in range(1, 10):  # the evaluation scheme computes exactly the factored polynomial
        factored = (eye + Q) @ sum(torch.linalg.matrix_power(Q, j) for j in range(k + 1))
        assert torch.allclose(cayley_neumann(Q, k), factored, atol=1e-15)
    qn = float(torch.linalg.matrix_norm(Q, 2).max())
    assert qn < 0.6
    errors = [float(torch.linalg.matrix_norm(cayley_neumann(Q, k) - exact, 2).max()) for k in (1, 3, 5, 9)]
    assert errors == sorted(errors, reverse=True)
    for k, err in zip((1, 3, 5, 9), errors):  # C_k − Cay(Q) = −Cay(Q)·Q^{k+1}: error ‖Q‖^{k+1} exactly
        assert err == pytest.approx(qn ** (k + 1), rel=1e-6)
    # identity behind the docstring: C_k = Cay(Q)(I − Q^{k+1})
    assert torch.allclose(cayley_neumann(Q, 5), exact @ (eye - torch.linalg.matrix_power(Q, 6)), atol=1e-14)


@pytest.mark.parametrize("terms", [5, 3])
def test_spectrum_moves_only_within_the_neumann_factor(terms):
    layer = POETLinear(40, 24, block_size=16, neumann_terms=terms, spectrum_tol=None).double()  # the series
    _randomize_q(layer, 0.15)  # ‖Q‖ large enough for a visible drift
    s0 = torch.linalg.svdvals(layer.w0)
    s = torch.linalg.svdvals(layer.weight.detach())
    lo, hi = layer.neumann_spectrum_factor()
    assert hi > 1 + 1e-4
    assert (s <= s0 * hi * (1 + 1e-12)).all() and (s >= s0 * lo * (1 - 1e-12)).all()
    if terms == 5:  # k ≡ 1 mod 4: the factors can only expand
        assert lo == 1.0 and (s >= s0 * (1 - 1e-12)).all()


# ------------------------------------------------------------------------------------------------
# initialization

def test_uniform_spectrum_init_is_at_the_cap():
    layer = POETLinear(96, 32, w_max=2.0, init="uniform_spectrum", block_size=16)
    s = torch.linalg.svdvals(layer.weight.detach().double())
    assert torch.allclose(s, torch.full_like(s, layer.sigma_cap), rtol=1e-6)
    assert layer.sigma_cap == pytest.approx(2.0 / math.sqrt(96 / 32))
    assert layer.norm_upper() <= 2.0 * (1 + 1e-3)


def test_normalized_gaussian_init_rows_equal_and_inside_cap():
    layer = POETLinear(64, 128, w_max=1.5, init="normalized_gaussian")
    rows = torch.linalg.vector_norm(layer.w0.double(), dim=1)
    assert torch.allclose(rows, rows[0].expand_as(rows), rtol=1e-6)   # unit rows, one common scale
    s = torch.linalg.svdvals(layer.w0.double())
    assert s.max() <= layer.sigma_cap * (1 + 1e-6)
    assert s.max() >= 0.99 * layer.sigma_cap          # scaled to the cap, not far below it
    assert s.min() < 0.9 * s.max()                    # and not a uniform spectrum


# ------------------------------------------------------------------------------------------------
# merge and optimizer state

def test_merge_preserves_outputs_and_resets_q_and_optimizer_state():
    torch.manual_seed(1)
    layer = POETLinear(50, 37, block_size=16)
    other = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW(list(layer.parameters()) + [other], lr=1e-2)
    x, target = torch.randn(64, 50), torch.randn(64, 37)
    for _ in range(5):
        loss = (layer(x) - target).square().mean() + other.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.abs().max() > 0 for p in layer.q_parameters())
    assert all(len(opt.state[p]) > 0 for p in layer.q_parameters())
    y = layer(x).detach()
    w0, perms = layer.w0.clone(), (layer.rot_out.perm.clone(), layer.rot_in.perm.clone())
    other_state = opt.state[other]["exp_avg"].clone()

    layer.merge_then_reinitialize(opt)

    assert (layer(x).detach() - y).abs().max() <= 1e-6
    assert not torch.equal(layer.w0, w0)
    assert all(torch.count_nonzero(p) == 0 for p in layer.q_parameters())
    assert all(p not in opt.state or len(opt.state[p]) == 0 for p in layer.q_parameters())
    assert torch.equal(opt.state[other]["exp_avg"], other_state)          # others untouched
    assert not torch.equal(layer.rot_out.perm, perms[0]) and not torch.equal(layer.rot_in.perm, perms[1])
    assert sorted(layer.rot_in.perm.tolist()) == list(range(50))
    # training goes on: fresh state, step count restarts at 1
    loss = (layer(x) - target).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1 for p in layer.q_parameters())


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
])
def test_reset_optimizer_state_any_optimizer(make):
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = make([a, b])
    (a.square().sum() + b.square().sum()).backward()
    opt.step()
    had_b = dict(opt.state[b])
    reset_optimizer_state(opt, [a])
    assert len(opt.state.get(a, {})) == 0 and opt.state[b].keys() == had_b.keys()
    opt.step()  # the optimizer re-creates a's state
    assert reset_optimizer_state(None, [a]) == 0


def _train_with_merges(lr, spectrum_tol, steps=300, merge_every=50, check_every=25):
    """AdamW on a regression whose teacher has W0's spectrum; (drift / σ_max, last/first loss)."""
    torch.manual_seed(0)
    layer = POETLinear(64, 48, block_size=16, spectrum_tol=spectrum_tol)
    with torch.no_grad():  # a teacher with W0's spectrum: reachable by rotations only
        teacher = torch.linalg.qr(torch.randn(48, 48))[0] @ layer.w0 @ torch.linalg.qr(torch.randn(64, 64))[0]
    x = torch.randn(512, 64)
    y = x @ teacher.T
    s0 = torch.linalg.svdvals(layer.weight.detach().double())
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.0)
    losses, drift = [], 0.0
    for step in range(1, steps + 1):
        loss = (layer(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % merge_every == 0:
            layer.merge_then_reinitialize(opt)
        if step % check_every == 0:
            s = torch.linalg.svdvals(layer.weight.detach().double())
            drift = max(drift, float((s - s0).abs().max() / s0.max()))
    return drift, losses[-1] / losses[0]


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_spectrum_kept_at_any_learning_rate(lr):
    """300 AdamW steps, merge every 50: with the default spectrum_tol σ's drift < 1e-3 of σ_max
    and the loss falls as much as with the plain series; the plain series (the control) drifts
    at lr 1e-2."""
    drift, ratio = _train_with_merges(lr, 1e-6)
    old_drift, old_ratio = _train_with_merges(lr, None)
    assert drift < 1e-3, drift
    assert ratio <= 1.05 * old_ratio + 0.01, (ratio, old_ratio)  # learns as much (or more)
    assert ratio < 0.6
    if lr >= 1e-2:
        assert old_drift > 1e-2, old_drift


def test_neumann_deviation_bound_is_sound_and_picks_the_path():
    from lipformer.poet import neumann_deviation_bound

    torch.manual_seed(1)
    layer = POETLinear(40, 24, block_size=8)
    for std in (1e-3, 3e-2, 0.2):
        _randomize_q(layer, std)
        for side in (layer.rot_out, layer.rot_in):
            Q = side.skew_blocks()[0].double()
            # the bound on |σ − 1| of the series holds against the SVD of each block's series
            dev = (torch.linalg.svdvals(cayley_neumann(Q, side.terms)) - 1).abs().max()
            assert dev <= neumann_deviation_bound(side.q.reshape(-1, side.q.size(-1)), side.terms) + 1e-12
            G = side.matrix()
            sv = torch.linalg.svdvals(G.double())
            if side.uses_exact():  # exact Cayley: orthogonal to float32 rounding
                assert (sv - 1).abs().max() < 1e-5
            else:
                assert (sv - 1).abs().max() <= side.spectrum_tol + 1e-5
        assert layer.rot_out.uses_exact() == (std > 1e-3)
    with pytest.raises(ValueError, match="spectrum_tol"):
        POETLinear(8, 8, spectrum_tol=-1.0)


# ------------------------------------------------------------------------------------------------
# bounds

def test_bounds_use_sound_sigma_of_the_effective_weight():
    layer = POETLinear(40, 24, w_max=1.0, block_size=16, init="uniform_spectrum", spectrum_tol=None)
    _randomize_q(layer, 0.15)  # Neumann drift makes σ(W) visibly larger than σ(W0) = sigma_cap
    exact = float(torch.linalg.svdvals(layer.weight.detach().double()).max())
    assert exact > layer.sigma_cap * (1 + 1e-4)
    wb = layer.weight_bound("x.weight")
    assert wb.sigma_upper >= exact
    assert wb.sigma_upper <= exact * 1.01
    assert wb.factor == pytest.approx(layer.rms_scale * wb.sigma_upper)
    assert wb.w_max == 1.0 and wb.name == "x.weight"
    assert layer.norm_upper() == pytest.approx(wb.factor)
    b = layer.bound(2.0)
    assert b.lipschitz == pytest.approx(wb.factor) and b.output == pytest.approx(2.0 * wb.factor)


def test_state_dict_round_trip_reproduces_the_function():
    a = POETLinear(30, 20, block_size=8, seed=1)
    _randomize_q(a, 0.05)
    a.merge_then_reinitialize()
    _randomize_q(a, 0.05)
    b = POETLinear(30, 20, block_size=8, seed=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 30)
    assert torch.equal(a(x), b(x))
    a.merge_then_reinitialize()
    b.merge_then_reinitialize()  # the seed and merge count travel too: same next permutations
    assert torch.equal(a.rot_in.perm, b.rot_in.perm) and torch.equal(a.rot_out.perm, b.rot_out.perm)


# ------------------------------------------------------------------------------------------------
# in a model

def _tiny():
    return LipformerForCausalLM(LipformerConfig(vocab_size=11, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=16))


def test_poetize_copy_keeps_the_function():
    m = _tiny().eval()
    ids = torch.randint(0, 11, (2, 9))
    before = m(ids).logits
    names = poetize(m, init="copy")
    assert len(names) == 2 * 6 and all("head" not in n for n in names)
    assert torch.allclose(m(ids).logits, before, atol=1e-6)


def test_poet_lipschitz_transformer_trains_without_projection():
    torch.manual_seed(0)
    m = _tiny()
    names = poetize(m)
    layers = poet_modules(m)
    assert [n for n, _ in layers] == names and len(layers) == 12
    assert isinstance(m.head, CappedLinear) and not isinstance(m.head, POETLinear)
    for _, layer in layers:
        assert layer.norm_upper() <= layer.w_max * (1 + 1e-3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)  # with merges every 5 steps ‖Q‖ stays small
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(1, 31):
        # random sequences with a learnable rule: each token is the previous one + 1 (mod 11)
        start = torch.randint(0, 11, (16, 1), generator=gen)
        ids = (start + torch.arange(16)) % 11
        logits = m(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()  # no projection step
        losses.append(loss.item())
        if step % 5 == 0:
            assert merge_all(m, opt) == 12
    assert sum(losses[-5:]) < sum(losses[:5])
    for _, layer in layers:
        sigma = layer.weight_bound("w").sigma_upper
        assert sigma <= layer.sigma_cap * (1 + 1e-3)
        assert sigma >= float(torch.linalg.svdvals(layer.weight.detach().double()).max())
    bound = m.bounds()
    assert math.isfinite(bound.total) and math.isfinite(bound.body) and bound.total > 0
    table = {w.name: w for w in bound.weights}
    for name, layer in layers:  # the certificate's weight table measures the POET layers too
        assert table[name + ".weight"].sigma_upper == pytest.approx(layer.weight_bound("w").sigma_upper)
