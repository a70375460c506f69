"""Caps, orthogonalization and σ bounds against torch.linalg.svd."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from lipformer import spectral
from lipformer.spectral import sigma as sigma_module
from lipformer.spectral.newton_schulz import _gram_quintic


def svals(W):
    return torch.linalg.svdvals(W.double())


def with_spectrum(shape, sigmas, dtype=torch.float32, seed=0):
    """A matrix (stack) of the given shape whose singular values are `sigmas` (broadcast)."""
    g = torch.Generator().manual_seed(seed)
    *lead, m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*lead, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*lead, n, k, generator=g, dtype=torch.float64))
    S = torch.as_tensor(sigmas, dtype=torch.float64).expand(*lead, k)
    return ((U * S[..., None, :]) @ V.mT).to(dtype)


SHAPES = [(64, 64), (96, 32), (32, 96), (3, 48, 24), (2, 16, 40)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("top", [0.3, 1.0, 1.05, 4.0, 100.0])
@pytest.mark.parametrize("w_max", [1.0, 0.25])
def test_hard_cap_svd_and_polar(shape, top, w_max):
    k = min(shape[-2:])
    sig = torch.linspace(0, 1, k, dtype=torch.float64) ** 2 * top  # spread, including ~0 values
    W = with_spectrum(shape, sig)
    want = torch.clamp(svals(W), max=w_max)
    exact = spectral.hard_cap(W, w_max, "svd")
    assert (svals(exact) - want).abs().max() < 1e-5 * max(1.0, w_max)
    polar = spectral.hard_cap(W, w_max, "polar")
    assert polar.dtype == W.dtype and polar.shape == W.shape
    assert (svals(polar) - want).abs().max() <= 1e-3 * w_max
    # the singular vectors are kept: the capped matrix itself equals the SVD reference
    assert (polar.double() - exact.double()).abs().max() <= 1e-3 * w_max
    # eigh is exact to rounding, not to an iteration tolerance
    eigh = spectral.hard_cap(W, w_max, "eigh")
    assert eigh.dtype == W.dtype and eigh.shape == W.shape
    assert (svals(eigh) - want).abs().max() <= 1e-4 * w_max
    assert (eigh.double() - exact.double()).abs().max() <= 1e-4 * w_max


def test_hard_cap_eigh_leaves_directions_inside_the_cap_untouched():
    sig = torch.cat([torch.tensor([3.0, 1.5]), torch.linspace(0.1, 0.9, 30)])
    W = with_spectrum((48, 32), sig)
    inside = with_spectrum((48, 32), torch.linspace(0.1, 0.9, 32))
    assert torch.equal(spectral.hard_cap(inside, 1.0, "eigh"), inside)  # nothing above: same tensor values
    capped = spectral.hard_cap(W, 1.0, "eigh")
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    # the part of W in the sub-cap singular directions is unchanged
    tail = Vh[2:].T @ Vh[2:]
    assert (capped.double() @ tail - W.double() @ tail).abs().max() < 1e-5


def test_hard_cap_auto_is_eigh_on_cpu_and_polar_on_gpus():
    assert spectral.resolve_cap_method("auto", "cpu") == "eigh"
    assert spectral.resolve_cap_method("auto", "cuda") == "polar"
    assert spectral.resolve_cap_method("svd", "cuda") == "svd"
    W = with_spectrum((40, 40), torch.linspace(0.1, 3.0, 40))
    assert torch.equal(spectral.hard_cap(W, 1.0), spectral.hard_cap(W, 1.0, "eigh"))


def test_hard_cap_eigh_far_above_the_cap_switches_to_float64():
    # σ up to 1e4·w_max: float32 eigenvalues near w² would be swamped by u·λ_max
    W = with_spectrum((64, 64), torch.logspace(-2, 4, 64))
    got = svals(spectral.hard_cap(W, 1.0, "eigh"))
    assert (got - torch.clamp(svals(W), max=1.0)).abs().max() < 1e-4


def test_hard_cap_polar_all_singular_values_near_the_cap():
    # Hardest case for the sign iteration: every σ within 1e-3 of w_max, on both sides.
    W = with_spectrum((128, 128), torch.linspace(0.999, 1.001, 128))
    assert (svals(spectral.hard_cap(W, 1.0, "polar")) - torch.clamp(svals(W), max=1.0)).abs().max() < 1e-3


def test_hard_cap_per_matrix_w_max_in_a_stack():
    W = with_spectrum((3, 32, 32), torch.linspace(0.1, 5.0, 32))
    w = torch.tensor([0.5, 1.0, 2.0])
    for method in ("svd", "polar", "eigh"):
        tops = svals(spectral.hard_cap(W, w, method)).amax(-1)
        assert torch.allclose(tops, w.double(), atol=1e-3)


def test_hard_cap_poly_is_the_papers_approximation():
    W = with_spectrum((64, 64), torch.tensor([0.5, 1.0] + [0.2] * 62))
    s = svals(spectral.hard_cap(W, 1.0, "poly"))
    assert abs(s[0] - 0.966) < 0.01 and abs(s[1] - 0.498) < 0.01
    # and it is *not* a cap far above its design range: this is why "polar" exists
    big = spectral.hard_cap(with_spectrum((32, 32), 5.0, torch.float64), 1.0, "poly")
    assert not torch.isfinite(big).all() or svals(big).max() > 1.1


def test_hard_cap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="w_max"):
        spectral.hard_cap(torch.eye(3), 0.0)
    with pytest.raises(ValueError, match="method"):
        spectral.hard_cap(torch.eye(3), 1.0, "nope")


@pytest.mark.parametrize("shape", [(128, 128), (64, 256), (256, 64), (4, 32, 48)])
def test_orthogonalize_matches_polar_factor(shape):
    """Both schedules keep the SVD's singular vectors and move every σ toward 1."""
    W = with_spectrum(shape, torch.logspace(-1, 1, min(shape[-2:])))
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    rel = S / torch.linalg.matrix_norm(W.double(), keepdim=True)[..., 0]  # σ after normalization
    for name, steps, lo, hi in [("classic", 5, 0.6, 1.25), ("polar_express", 5, 0.8, 1.2),
                                ("polar_express", 8, 0.99, 1.01)]:
        # the design range: classic lifts σ ≳ 3e-3 (×3.44 per step), Polar Express σ ≥ 1e-3
        inside = rel >= (3e-3 if name == "classic" else 1e-3)
        dtype = torch.bfloat16 if steps == 5 else torch.float32
        O = spectral.orthogonalize(W, steps=steps, coefficients=name, dtype=dtype).double()
        core = U.mT @ O @ Vh.mT  # = f(Σ) if the singular vectors are the SVD's
        diag = torch.diagonal(core, dim1=-2, dim2=-1)
        off = core - torch.diag_embed(diag)
        assert off.abs().max() < (0.1 if dtype == torch.bfloat16 else 2e-3), name
        assert diag.max() <= hi and diag[inside].min() >= lo, (name, steps, diag[inside].min(), diag.max())
        assert diag.min() >= 0


def test_orthogonalize_equals_torch_muon_newton_schulz():
    from torch.optim._muon import _zeropower_via_newtonschulz

    for shape in [(64, 32), (32, 64), (50, 50)]:
        G = torch.randn(shape)
        ours = spectral.orthogonalize(G, steps=5, coefficients="classic", method="standard")
        ref = _zeropower_via_newtonschulz(G, spectral.CLASSIC, 5, 1e-7)
        assert torch.equal(ours, ref.to(ours.dtype))


def test_schedule_validation():
    assert spectral.coefficient_schedule("polar_express", 7)[5:] == [spectral.POLISH] * 2
    with pytest.raises(ValueError):
        spectral.coefficient_schedule("fast", 5)
    with pytest.raises(ValueError):
        spectral.coefficient_schedule([(1.0, 0.0, 0.0)], 2)


# ---- sound σ upper bound --------------------------------------------------------------------

matrices = st.builds(
    lambda m, n, kind, scale, seed: _make(m, n, kind, scale, seed),
    st.integers(1, 48), st.integers(1, 48),
    st.sampled_from(["gauss", "orthogonal", "rank1", "flat_top", "heavy"]),
    st.floats(1e-20, 1e20), st.integers(0, 10_000),
)


def _make(m, n, kind, scale, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    if kind == "gauss":
        W = torch.randn(m, n, generator=g, dtype=torch.float64)
    elif kind == "orthogonal":
        W = with_spectrum((m, n), 1.0, torch.float64, seed)
    elif kind == "rank1":
        W = torch.randn(m, 1, generator=g, dtype=torch.float64) @ torch.randn(1, n, generator=g, dtype=torch.float64)
    elif kind == "flat_top":  # two nearly equal top singular values
        W = with_spectrum((m, n), torch.tensor([1.0, 1.0 - 1e-9] + [0.5] * (k - 2))[:k], torch.float64, seed)
    else:
        W = torch.randn(m, n, generator=g, dtype=torch.float64) ** 5
    return W * scale


@given(matrices)
def test_sigma_upper_is_never_below_exact(W):
    exact = svals(W).max()
    bound = spectral.sigma_upper(W)
    assert bound >= exact, (float(bound), float(exact))
    if exact > 0:
        assert bound <= exact * 1.001
    gram = spectral.sigma_upper_gram(W)
    assert gram >= exact and (exact == 0 or gram <= exact * 1.01)


@pytest.mark.parametrize("kind", ["gauss", "flat", "decay", "tied"])
@pytest.mark.parametrize("shape", [(300, 300), (600, 150), (150, 600)])
def test_sigma_upper_cholesky_is_tight_on_weight_like_spectra(kind, shape):
    g = torch.Generator().manual_seed(1)
    k = min(shape)
    if kind == "gauss":  # Marchenko–Pastur edge: no gap, where power iteration is slow
        W = torch.randn(*shape, generator=g)
    else:
        top = {"flat": torch.ones(k), "decay": torch.logspace(0, -3, k),
               "tied": torch.cat([torch.tensor([1.0, 1.0 - 1e-7]), torch.linspace(0.9, 0.1, k - 2)])}[kind]
        W = with_spectrum(shape, top)
    exact = svals(W).max()
    bound = spectral.sigma_upper(W)
    assert exact <= bound <= exact * (1 + 2e-4)


def test_sigma_upper_stays_sound_when_every_guess_is_wrong(monkeypatch):
    W = with_spectrum((5, 64, 48), torch.linspace(0.1, 2.0, 48), torch.float64)
    exact = svals(W).amax(-1)
    # an estimate 100× too low: the guesses climb, then bisection makes the bound tight again
    low = sigma_module._top_eigenvalue_estimate
    monkeypatch.setattr(sigma_module, "_top_eigenvalue_estimate", lambda A, k: low(A, k) * 0.01)
    bound = spectral.sigma_upper(W)
    assert (bound >= exact).all() and (bound <= exact * (1 + 2e-4)).all()
    # no factorization ever succeeds: the Gram-iteration certificate takes over
    monkeypatch.setattr(sigma_module, "_cholesky_certify", lambda A, mu: (torch.zeros_like(mu, dtype=torch.bool), mu))
    bound = spectral.sigma_upper(W)
    assert (bound >= exact).all() and torch.allclose(bound, spectral.sigma_upper_gram(W))


@pytest.mark.parametrize("certificate", [spectral.sigma_upper, spectral.sigma_upper_gram])
def test_sigma_upper_rejects_non_finite_and_complex_weights(certificate):
    with pytest.raises(ValueError, match="NaN or Inf"):
        certificate(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="complex"):
        certificate(torch.tensor([[1 + 0j, 0], [0, 5j]]))


def times_pow2(x, k: int):
    return x * 2.0 ** (k // 2) * 2.0 ** (k - k // 2)  # x·2^k in two exact halves: 2^k alone may overflow


@pytest.mark.parametrize("certificate", [spectral.sigma_upper, spectral.sigma_upper_gram])
@pytest.mark.parametrize("k", [-1070, -1040, -1000, -600, 600, 1000, 1015])
def test_sigma_upper_at_the_ends_of_the_float64_range(certificate, k):
    # Subnormal and near-overflow weights: σ(2^k·M) = 2^k·σ(M), so the scaled-back bound must
    # still be above σ(M). (A single 2^±e scale factor overflowed here and the bound came out 0.)
    g = torch.Generator().manual_seed(k % 97)
    M = torch.randn(3, 6, 9, generator=g, dtype=torch.float64)
    M[1, 0] = 0.0  # a zero row: some entries of the product underflow while others do not
    bound = certificate(times_pow2(M, k))
    exact = svals(M).amax(-1)
    back = times_pow2(bound, -k)
    assert torch.isfinite(bound).all() and (bound > 0).all()
    # at the subnormal end the bound keeps only the bits the format has left
    slack = 1e-3 if k > -1000 else 2.0 ** (k + 1080)
    assert (back >= exact).all() and (back <= exact * (1 + slack) + 1e-12).all(), (back / exact)


@pytest.mark.parametrize("certificate", [spectral.sigma_upper, spectral.sigma_upper_gram])
def test_sigma_upper_overflow_subnormal_and_empty_cases(certificate):
    f64 = dict(dtype=torch.float64)
    big = torch.full((2, 2), 1e308, **f64)  # σ = 2e308: beyond float64, so only +inf is an upper bound
    assert certificate(big) == math.inf
    top = torch.eye(2, **f64) * 2.0**1023  # σ = 2^1023: representable, and the bound must be too
    assert 2.0**1023 <= certificate(top) < math.inf
    stack = torch.stack([torch.eye(2, **f64), 1e-310 * torch.eye(2, **f64)])
    bound = certificate(stack)
    assert bound[0] >= 1 and bound[1] >= 1e-310 and bound[1] < 1e-309  # one tiny matrix in a normal stack
    assert certificate(torch.zeros(3, 4)) == 0 and certificate(torch.zeros(0, 3, 4)).shape == (0,)
    assert (certificate(torch.randn(3, 0, 4)) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sigma_upper_on_caps_and_stacks(dtype):
    W = with_spectrum((5, 96, 64), torch.linspace(0.2, 1.0, 64), dtype)
    bound = spectral.sigma_upper(W)
    exact = svals(W.double()).amax(-1)
    assert bound.shape == (5,) and (bound >= exact).all() and (bound <= exact * 1.01).all()
    assert spectral.sigma_upper(torch.zeros(4, 3)) == 0


def test_sigma_estimate_is_a_lower_bound_not_a_certificate():
    W = with_spectrum((64, 64), torch.linspace(0.99, 1.0, 64), torch.float64)
    est = spectral.sigma_estimate(W, iters=3)
    assert est <= svals(W).max() + 1e-12


# ---- soft cap and the other maps ------------------------------------------------------------

@given(st.floats(0.1, 10.0), st.floats(0.0, 0.25), st.floats(0.0, 0.05))
def test_soft_cap_guarantee_for_worst_case_step(w_max, rel_update, wd):
    """σ ≤ w_max before a step of norm η ⇒ σ ≤ w_max after soft_cap with the coupled α."""
    eta = rel_update * w_max
    alpha = spectral.soft_cap_alpha(w_max, eta, wd)
    k = w_max * (1 - wd) + eta
    assert spectral.soft_cap_map(k, alpha) <= w_max * (1 + 1e-12)
    # the worst case, realized: update aligned with the weight's singular vectors
    sig = torch.linspace(0, 1, 32, dtype=torch.float64) * w_max
    W = with_spectrum((32, 32), sig, torch.float64)
    O = with_spectrum((32, 32), 1.0, torch.float64)  # same seed → same singular vectors
    after = spectral.soft_cap((1 - wd) * W + eta * O, alpha)
    assert svals(after).max() <= w_max * (1 + 1e-9)


def test_soft_cap_alpha_refuses_steps_it_cannot_absorb():
    with pytest.raises(ValueError, match="hard cap"):
        spectral.soft_cap_alpha(1.0, 0.5)
    assert spectral.soft_cap_alpha(1.0, 0.0, 0.1) == 0.0


def test_normalize_hammer_and_spectral_weight_decay():
    W = with_spectrum((48, 32), torch.linspace(0.1, 3.0, 32))
    assert svals(spectral.spectral_normalize(W, 1.0)).max() <= 1.0
    assert torch.equal(spectral.spectral_normalize(W, 10.0), W)
    s = svals(spectral.spectral_hammer(W, 1.0, iters=200))
    assert abs(s[0] - 2.9064) < 1e-3 and (s <= 2.91).all()  # top set to 1: the old second is now top
    assert (s - 1.0).abs().min() < 1e-4
    d = svals(spectral.spectral_weight_decay(W, 0.1, iters=200))
    assert abs(d.max() - 3.0 * 0.9) < 1e-3 or abs(d.max() - svals(W)[1]) < 1e-3


@pytest.mark.parametrize("k", [-1060, -1030, -600, 0, 600, 1000])
def test_row_norm_upper_at_any_magnitude(k):
    # A plain norm squares first: rows of ~1e-162 lost their squares to underflow and read 5.7×
    # too small, which made a certified radius too large.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 64, generator=g, dtype=torch.float64)
    X[2] = 0.0
    exact = torch.linalg.vector_norm(X, dim=-1)
    bound = times_pow2(spectral.row_norm_upper(times_pow2(X, k)), -k)
    slack = 1e-12 if k > -1000 else 2.0 ** (k + 1080)
    assert (bound >= exact).all() and (bound <= exact * (1 + slack) + 1e-300).all(), bound / exact
    assert spectral.row_norm_upper(torch.tensor([[1.5e308, 1.5e308]], dtype=torch.float64)) == math.inf


# ---- Gram-space Newton–Schulz ----------------------------------------------------------------

def _with_condition(n, m, cond, seed=0):
    """An n × m float64 matrix with log-spaced singular values from 1 down to 1/cond, and its SVD."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, m)
    U, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    S = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)
    return (U * S) @ V.T, U, S, V


def _errors(O, U, S, V, name, steps=5):
    """(σ error, singular-vector error) of an orthogonalizer's output O against the exact map.

    Exact arithmetic gives O = U f(S) Vᵀ with f the composed scalar quintics applied to
    σ/(safety·‖S‖): compare the sorted SVD of O with f(S), and Uᵀ O V's off-diagonal with 0.
    """
    safety = spectral.POLAR_EXPRESS_SAFETY if name == "polar_express" else 1.0
    f = S / (S.norm() * safety)
    for a, b, c in spectral.coefficient_schedule(name, steps):
        f = a * f + b * f**3 + c * f**5
    O = O.double()
    sigma = (torch.linalg.svdvals(O).sort().values - f.sort().values).abs().max()
    core = U.mT @ O @ V
    return float(sigma), float((core - torch.diag_embed(torch.diagonal(core))).abs().max())


@pytest.mark.parametrize("shape", [(96, 384), (384, 96)])
@pytest.mark.parametrize("cond", [1.0 + 1e-9, 10.0, 1e3, 1e6])
@pytest.mark.parametrize("plan", ["float32", "bf16-cpu", "fp16-cuda"])
@pytest.mark.parametrize("name", ["classic", "polar_express"])
def test_gram_iteration_matches_svd(shape, cond, plan, name):
    """Gram-space NS outputs the σ and singular vectors the exact map predicts (SVD of input and
    output), from flat spectra to condition number 1e6, against the standard iteration in the same
    working precision. "fp16-cuda" is the CUDA plan (float16, one restart) run on CPU."""
    G, U, S, V = _with_condition(*shape, cond)
    dtype = torch.float32 if plan == "float32" else torch.bfloat16
    device = torch.device("cuda" if plan == "fp16-cuda" else "cpu")
    gram_dtype, restarts = spectral.gram_plan(dtype, device, 5, name)
    X = G.float() / (G.norm() * (spectral.POLAR_EXPRESS_SAFETY if name == "polar_express" else 1.0))
    wide = X.mT if shape[0] > shape[1] else X
    O = _gram_quintic(wide.to(gram_dtype), spectral.coefficient_schedule(name, 5), restarts)
    gram = _errors(O.mT if shape[0] > shape[1] else O, U, S, V, name)
    standard = _errors(spectral.orthogonalize(G.float(), 5, name, dtype=dtype, method="standard"), U, S, V, name)
    if plan == "float32":
        assert max(gram) < 2e-3, (gram, standard)
    else:  # the standard bf16 iteration itself is off by up to ~0.15 in σ at cond 1e6
        slack, floor = (1.5, 0.03) if plan == "fp16-cuda" else (3.0, 0.08)  # bf16 Gram: documented as looser
        for g, s in zip(gram, standard):
            assert g <= max(slack * s, floor), (gram, standard)


@pytest.mark.parametrize("plan", ["bf16-cpu", "fp16-cuda"])
@pytest.mark.parametrize("name", ["classic", "polar_express"])
def test_gram_restart_plans_hold_in_half_precision(plan, name):
    """The restart plans of `gram_plan` (bf16 on CPU, float16 on CUDA, run here on CPU) and the
    control that proves the tests above can fail: without a restart the same inputs break."""
    dtype, device = (torch.bfloat16, "cpu") if plan == "bf16-cpu" else (torch.float16, "cuda")
    gram_dtype, restarts = spectral.gram_plan(dtype, torch.device(device), 5, name)
    assert gram_dtype == dtype and restarts
    G, U, S, V = _with_condition(64, 256, 1e4)
    X = G.float() / (G.norm() * (spectral.POLAR_EXPRESS_SAFETY if name == "polar_express" else 1.0))
    sched = spectral.coefficient_schedule(name, 5)
    good = _errors(_gram_quintic(X.to(dtype), sched, restarts), U, S, V, name)
    bad = _errors(_gram_quintic(X.to(dtype), sched, ()), U, S, V, name)
    assert max(good) < 0.15 and max(bad) > 0.3 and max(bad) > 10 * max(good), (name, good, bad)


@pytest.mark.parametrize("steps", [4, 5, 6, 7])
@pytest.mark.parametrize("name", ["classic", "polar_express"])
def test_bf16_restarts_keep_segment_growth_and_accuracy(steps, name):
    """`gain_restarts` splits the schedule where P would outgrow `BF16_SEGMENT_GAIN`, and the plan
    it gives holds at every step count, not only the 5 it was fitted at (cond 1e2 is the hardest:
    just above bf16's Gram floor)."""
    sched = spectral.coefficient_schedule(name, steps)
    restarts = spectral.gram_plan(torch.bfloat16, torch.device("cpu"), steps, name)[1]
    bounds = [0, *restarts, steps]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        growth = math.prod(abs(a) for a, _, _ in sched[lo:hi])
        cap = spectral.BF16_SEGMENT_GAIN[min(i, 1)]
        assert growth <= cap and (hi == steps or growth * abs(sched[hi][0]) > cap)
    for cond in (1e2, 1e4):
        G, U, S, V = _with_condition(96, 384, cond)
        X = G.float() / (G.norm() * (spectral.POLAR_EXPRESS_SAFETY if name == "polar_express" else 1.0))
        gram = _errors(_gram_quintic(X.bfloat16(), sched, restarts), U, S, V, name, steps)
        standard = _errors(spectral.orthogonalize(G.float(), steps, name, method="standard"), U, S, V, name, steps)
        assert all(g <= max(3.0 * s, 0.08) for g, s in zip(gram, standard)), (cond, gram, standard)


def test_gram_scale_and_symmetric_gram():
    """orthogonalize's Gram path folds 1/‖G‖ into R_0 and the first P instead of scaling G: the same
    map as scaling first (to bf16 rounding), at any magnitude; `_sym_gram` is exactly symmetric."""
    from lipformer.spectral.newton_schulz import _sym_gram
    X = torch.randn(96, 300, dtype=torch.float64)
    R = _sym_gram(X.bfloat16())
    assert torch.equal(R, R.mT) and torch.allclose(R.double(), X.bfloat16().double() @ X.bfloat16().double().T, rtol=1e-2, atol=0.1)
    for magnitude in (1e-14, 1e-6, 1.0, 1e15):  # the outer two are outside the folding range
        G = (X * magnitude).float()
        folded = spectral.orthogonalize(G, method="gram", dtype=torch.float32, eps=1e-30)
        first = _gram_quintic(G / G.norm(), spectral.coefficient_schedule("classic", 5))
        assert torch.allclose(folded, first, atol=1e-4), (magnitude, (folded - first).abs().max())
    stack = torch.randn(2, 3, 40, 130) * torch.tensor([1e-3, 1e3]).view(2, 1, 1, 1)
    one = torch.stack([torch.stack([spectral.orthogonalize(g, method="gram") for g in gg]) for gg in stack])
    assert torch.equal(spectral.orthogonalize(stack, method="gram"), one)


def test_gram_result_never_overwrites_the_callers_matrix():
    """After a restart the Gram path writes its result into its own working copy of G (no fresh n × m
    buffer); G itself must stay untouched when it already has the working dtype (then there is no copy),
    and the result must be the same map either way, wide or tall, single or stacked."""
    from lipformer.spectral.newton_schulz import _gram_quintic
    for shape in [(40, 130), (130, 40), (2, 40, 130), (2, 130, 40)]:
        G = torch.randn(*shape).bfloat16()
        keep = G.clone()
        O = spectral.orthogonalize(G, method="gram", restarts=(3,))
        assert torch.equal(G, keep) and O.data_ptr() != G.data_ptr()
        X = G.mT if shape[-2] > shape[-1] else G
        X = (X.float() / torch.linalg.matrix_norm(X.float(), keepdim=True)).bfloat16()
        ref = _gram_quintic(X.clone(), spectral.coefficient_schedule("classic", 5), (3,))
        ref = ref.mT if shape[-2] > shape[-1] else ref
        assert torch.allclose(O.float(), ref.float(), atol=0.05), (shape, (O.float() - ref.float()).abs().max())
        # from float32 the working copy is ours and takes the result: the same bits as a fresh buffer
        assert torch.equal(spectral.orthogonalize(G.float(), method="gram", restarts=(3,), out_dtype=torch.bfloat16), O)


def test_gram_on_stacks_and_method_selection():
    G = torch.randn(3, 2, 32, 128)
    per = torch.stack([torch.stack([spectral.orthogonalize(g, method="gram", dtype=torch.float32) for g in gg])
                       for gg in G])
    assert torch.allclose(spectral.orthogonalize(G, method="gram", dtype=torch.float32), per, atol=1e-5)
    # auto: Gram for long rectangles, the standard iteration for (near-)square ones
    assert spectral.gram_is_cheaper(768, 3072, 5, ()) and spectral.gram_is_cheaper(3072, 768, 5, (2,))
    assert not spectral.gram_is_cheaper(768, 768, 5, ()) and not spectral.gram_is_cheaper(64, 96, 5, ())
    for shape, dtype in [((40, 400), torch.float32), ((50, 60), torch.float32), ((40, 400), torch.bfloat16)]:
        W = torch.randn(shape)
        gram_dtype, restarts = spectral.gram_plan(dtype, W.device, 5, "classic")
        pick = "gram" if spectral.auto_picks_gram(*shape, 5, gram_dtype, restarts) else "standard"
        assert torch.equal(spectral.orthogonalize(W, dtype=dtype), spectral.orthogonalize(W, dtype=dtype, method=pick))
        # cheaper by flops in all but the near-square case, but never in bf16 (the step bound, test_optim)
        assert (pick == "gram") == (shape == (40, 400) and dtype == torch.float32)
    assert spectral.gram_plan(torch.bfloat16, torch.device("cuda"), 5) == (torch.float16, (2,))
    with pytest.raises(ValueError, match="method"):
        spectral.orthogonalize(W, method="fast")
