"""Matrix functions for spectrally constrained weights.

Everything here acts on the last two dimensions of a tensor, so a stack of matrices (heads,
layers) is handled in one call, and every function that caps takes its own `w_max`.

Two families live side by side and must not be confused:

* **Approximate, fast** maps used inside training: `orthogonalize` (odd-quintic Newton–Schulz,
  bf16 by default), the caps (`hard_cap`, `soft_cap`, `spectral_normalize`, `spectral_hammer`,
  `spectral_weight_decay`) and `sigma_estimate` (power iteration, a *lower* bound — logging only).
* **Sound** upper bounds used by certificates: `sigma_upper` (a float64 Cholesky certificate of
  μI − WᵀW with every rounding term bounded) and `sigma_upper_gram` (Gram iteration in float64 with
  an explicit rounding margin). Nothing that enters a certificate may come from the first family.

All `w_max` here are in units of the plain largest singular value σ_max; callers that constrain
the RMS→RMS norm `sqrt(d_in/d_out)·σ_max` convert first (see `lipformer.nn.CappedLinear`).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

Coefficients = tuple[float, float, float]

# Keller Jordan's fixed quintic, the default of torch.optim.Muon. Singular values end in ~[0.68, 1.2].
CLASSIC: Coefficients = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al., arXiv 2505.16932): per-step minimax quintics for σ ∈ [1e-3, 1],
# with the input normalized by 1.01·‖X‖_F. Steps beyond these use the polishing quintic below.
POLAR_EXPRESS: tuple[Coefficients, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.01

# The degree-5 Newton–Schulz polynomial (15x - 10x³ + 3x⁵)/8: fixed point 1 with p'(1) = p''(1) = 0,
# so it polishes values already near 1 to working precision in a few steps.
POLISH: Coefficients = (15 / 8, -10 / 8, 3 / 8)

Schedule = Union[str, Coefficients, Sequence[Coefficients]]


def coefficient_schedule(coefficients: Schedule, steps: int) -> list[Coefficients]:
    """Per-step (a, b, c) for `steps` iterations from a name or explicit coefficients.

    "classic": the fixed quintic every step. "polar_express": the published 5-step schedule,
    then the polishing quintic. A single (a, b, c) repeats; a sequence is used as given (it must
    have at least `steps` entries).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(coefficients, str):
        if coefficients == "classic":
            return [CLASSIC] * steps
        if coefficients == "polar_express":
            return list(POLAR_EXPRESS[:steps]) + [POLISH] * max(0, steps - len(POLAR_EXPRESS))
        raise ValueError(f"unknown coefficient schedule {coefficients!r}; use 'classic', 'polar_express' "
                         "or explicit (a, b, c) tuples")
    coefficients = tuple(coefficients)
    if len(coefficients) == 3 and all(isinstance(v, (int, float)) for v in coefficients):
        return [tuple(float(v) for v in coefficients)] * steps  # type: ignore[list-item]
    if len(coefficients) < steps:
        raise ValueError(f"schedule has {len(coefficients)} steps, {steps} requested")
    return [tuple(float(v) for v in c) for c in coefficients[:steps]]  # type: ignore[misc]


def _odd_quintic(X: Tensor, schedule: Sequence[Coefficients]) -> Tensor:
    """X ← aX + (b·XXᵀ + c·(XXᵀ)²)X for each (a, b, c); X must be wide or square (rows ≤ cols).

    The 2-D path uses the same fused addmm calls as torch.optim.Muon so that the two agree to
    the last bit in bf16; stacks go through baddbmm.
    """
    if X.ndim == 2:
        for a, b, c in schedule:
            gram = X @ X.T
            update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            X = torch.addmm(X, update, X, beta=a)
        return X
    lead = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])
    for a, b, c in schedule:
        gram = X @ X.mT
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        X = torch.baddbmm(X, update, X, beta=a)
    return X.reshape(*lead, *X.shape[-2:])


def orthogonalize(
    G: Tensor,
    steps: int = 5,
    coefficients: Schedule = "classic",
    dtype: torch.dtype | None = torch.bfloat16,
    eps: float = 1e-7,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Approximate polar factor U Vᵀ of G = U Σ Vᵀ by an odd-quintic Newton–Schulz iteration.

    G is first scaled by its Frobenius norm (times 1.01 for Polar Express) so every σ ≤ 1; the
    iteration then pushes each σ toward 1. With "classic" the result is only roughly orthogonal
    (σ ∈ ~[0.7, 1.2]) — good enough for Muon, not for a cap. Returns a tensor of `out_dtype`
    (default: G's dtype; pass the working dtype to skip the cast, as torch.optim.Muon does).
    """
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix (or a stack of them), got shape {tuple(G.shape)}")
    schedule = coefficient_schedule(coefficients, steps)
    safety = POLAR_EXPRESS_SAFETY if coefficients == "polar_express" else 1.0
    X = G.to(dtype) if dtype is not None else G
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    norm = torch.linalg.matrix_norm(X, keepdim=True) if X.ndim > 2 else X.norm()
    X = X / (norm * safety).clamp(min=eps) if safety != 1.0 else X / norm.clamp(min=eps)
    X = _odd_quintic(X, schedule)
    if tall:
        X = X.mT
    return X.to(out_dtype or G.dtype)


# ---------------------------------------------------------------------------------------------
# Sound upper bounds (certificates) and cheap estimates (logs)

# (Σ σ_i^{2^{k+1}})^{1/2^{k+1}} ≤ σ_max · rank^{1/2^{k+1}}. A weight just hard-capped or
# orthogonalized has a flat top spectrum (the worst case); k = 14 keeps the bound within 1.0003×
# of σ_max for rank ≤ 3072, so "σ̄ ≤ cap·(1 + 1e-3)" is checkable right after a cap.
GRAM_ITERS = 14


def _rounding_margin(m: int, n: int) -> float:
    """Relative margin covering float64 rounding in the Gram iteration (docs/lipschitz.md §1).

    Each product of a Frobenius-normalized G loses at most γ_m·rank ≤ m·n·2⁻⁵³ of its top singular
    value; the 2^k-th root divides that; normalizations add O(2⁻⁵³). 1e-6 covers m·n ≤ 1e9 with
    room to spare; beyond that the margin grows with the size.
    """
    return max(1e-6, 8.0 * m * n * 2.0**-53)


# The Cholesky certificate tries μ = ρ(1 + δ) for these δ in turn (ρ: a Lanczos estimate of
# λ_max(WᵀW) from below) until μI − WᵀW factors, then bisects between the last μ that failed and
# the first that factored until they are within BISECT_TOL: bound/exact ≤ √(1 + BISECT_TOL)
# (a failure is only evidence that μ < λ_max, so this is a tightness estimate, not a requirement).
CHOLESKY_DELTAS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 1e2, 1e3, 1e4)
BISECT_TOL = 2e-4
LANCZOS_STEPS = 24
_U64 = 2.0**-53


def _gamma(n: int) -> float:
    """γ_n = n·u/(1 − n·u): the relative error bound of an n-term float64 dot product (Higham §3.1)."""
    return n * _U64 / (1.0 - n * _U64)


def _top_eigenvalue_estimate(A: Tensor, steps: int) -> Tensor:
    """Largest Ritz value of A on a `steps`-dimensional Krylov space (Lanczos, full reorthogonalization).

    Only a guess for where to try a certificate: with Q orthonormal, λ_max(QᵀAQ) ≤ λ_max(A), and
    for the edge-of-spectrum shapes of trained and random weights 24 steps land within ~1e-4 of
    λ_max where power iteration would still be percents away. The projection QᵀAQ is formed
    explicitly rather than from the three-term recurrence, which rounding breaks once the Krylov
    space stops growing (A = cI, say).
    """
    b, n, _ = A.shape
    k = min(steps, n)
    gen = torch.Generator(device=A.device).manual_seed(0)
    q = torch.randn(b, n, 1, generator=gen, dtype=A.dtype, device=A.device)
    q = q / torch.linalg.vector_norm(q, dim=-2, keepdim=True)
    Q = torch.zeros(b, n, k, dtype=A.dtype, device=A.device)
    for j in range(k):
        Q[:, :, j:j + 1] = q
        w = A @ q
        scale = torch.linalg.vector_norm(w, dim=-2, keepdim=True)
        for _ in range(2):  # Gram–Schmidt twice against every earlier vector ("twice is enough")
            w = w - Q[:, :, :j + 1] @ (Q[:, :, :j + 1].mT @ w)
        beta = torch.linalg.vector_norm(w, dim=-2, keepdim=True)
        # an invariant subspace (β at rounding level): stop growing rather than add noise
        q = torch.where(beta > 1e-10 * scale, w / beta.clamp(min=1e-300), torch.zeros_like(w))
    T = Q.mT @ (A @ Q)
    return torch.linalg.eigvalsh(0.5 * (T + T.mT))[:, -1].clamp(min=0)


def _cholesky_certify(A: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """(ok, λ̄) per matrix: where μI − A factors, λ_max(A) ≤ λ̄ = μ + the rounding terms (lipschitz.md §1)."""
    n = A.size(-1)
    B = mu[:, None, None] * torch.eye(n, dtype=A.dtype, device=A.device) - A
    R, info = torch.linalg.cholesky_ex(B)
    ok = (info == 0) & torch.isfinite(R).all(dim=(-2, -1))
    # RᵀR = B + ΔB with |ΔB| ≤ γ_{n+1}|Rᵀ||R| (Higham Thm 10.3), so λ_min(B) ≥ −γ_{n+1}‖R‖_F²; forming
    # B rounded its diagonal by ≤ u·|B_ii|. ×4 on the factorization term covers blocked orderings.
    err = 4 * _gamma(n + 1) * R.square().sum(dim=(-2, -1)) + 2 * _U64 * B.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
    return ok, mu + err


def _times_pow2(x: Tensor, e: Tensor) -> Tensor:
    """x·2^e (e per matrix, broadcast over the trailing dims), exact in the normal range.

    Applied in two halves because 2^e alone is not a float64 for |e| > 1023, which subnormal
    inputs (peak < 2⁻¹⁰²²) and near-overflow ones (peak ≥ 2¹⁰²³) need.
    """
    half = torch.div(e, 2, rounding_mode="floor")
    shape = (-1,) + (1,) * (x.ndim - e.ndim)
    one = torch.ones_like(e, dtype=x.dtype)
    return x * torch.ldexp(one, half).view(shape) * torch.ldexp(one, e - half).view(shape)


def _scale_to_unit_peak(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(G, e, zero): W as float64 tall (b, m, n) stack scaled by 2⁻ᵉ so each max|G_ij| ∈ [0.5, 1)."""
    if W.is_complex():
        raise ValueError("sigma_upper: complex matrices are not supported")
    G = W.detach().to(torch.float64, copy=True)
    if G.size(-2) < G.size(-1):
        G = G.mT  # tall: the Gram matrix GᵀG is the smaller (min(m, n))² one
    G = G.reshape(math.prod(G.shape[:-2]), *G.shape[-2:])
    peak = G.abs().amax(dim=(-2, -1)) if G.numel() else G.new_zeros(G.size(0))
    if not torch.isfinite(peak).all():
        raise ValueError("sigma_upper: the matrix has NaN or Inf entries")
    zero = peak == 0
    _, exponent = torch.frexp(torch.where(zero, torch.ones_like(peak), peak))
    return _times_pow2(G, -exponent), exponent, zero


def _rescale_up(bound: Tensor, exponent: Tensor) -> Tensor:
    """bound·2^e rounded upwards: exact unless the product is subnormal (≤ ½ ulp off) or overflows
    (round-to-nearest may return DBL_MAX); one step towards +inf covers both, and inf is sound."""
    return torch.nextafter(_times_pow2(bound, exponent), torch.full_like(bound, math.inf))


def row_norm_upper(X: Tensor) -> Tensor:
    """Guaranteed upper bound on the ℓ2 norm of each row of a float64 X, at any magnitude.

    A plain norm squares the entries first: below ~1e-162 the squares underflow and the norm
    comes out too small, above ~1e154 it overflows. Each row is scaled by a power of two to a
    peak in [½, 1) (exact), its norm rounded up by 1 + 2γ_{n+2}, and scaled back rounding up.
    """
    peak = X.abs().amax(-1) if X.size(-1) else X.new_zeros(X.shape[:-1])
    if not torch.isfinite(peak).all():
        return torch.where(torch.isfinite(peak), row_norm_upper(torch.nan_to_num(X, 0.0, 0.0, 0.0)),
                           torch.full_like(peak, math.inf))  # a row with NaN or inf has no finite bound
    _, e = torch.frexp(torch.where(peak == 0, torch.ones_like(peak), peak))
    flat, lead = X.reshape(-1, X.size(-1)), X.shape[:-1]
    scaled = _times_pow2(flat, -e.reshape(-1))
    # entries that underflow in the scaling lose ≤ 2⁻¹⁰⁷⁴ each: ≤ √n·2⁻¹⁰⁷⁴ against a row norm ≥ ½,
    # far inside the 2γ_{n+2} margin
    norm = torch.linalg.vector_norm(scaled, dim=-1) * (1 + 2 * _gamma(X.size(-1) + 2))
    return torch.where(peak == 0, torch.zeros_like(peak), _rescale_up(norm, e.reshape(-1)).reshape(lead))


@torch.no_grad()
def sigma_upper(W: Tensor) -> Tensor:
    """Guaranteed upper bound on σ_max of W (or of each matrix in a stack), in float64.

    A Cholesky certificate (docs/lipschitz.md §1): λ_max(WᵀW) ≤ μ exactly when μI − WᵀW is
    positive semidefinite, and a float64 Cholesky factorization that runs to completion proves
    that up to a rounding term with a known constant (Higham, Thm 10.3). μ is guessed above a
    Lanczos estimate and refined by bisection between guesses that fail and that factor.
    Whatever the guesses, the returned √(μ + rounding terms) is never below the exact σ_max; with
    the bisection it is within √(1 + 2e-4) of it. Cost: one Gram product and a few (n³/3)
    factorizations — several times cheaper than an SVD or the 14 Gram-iteration products.
    Matrices where no guess factors (none seen) fall back to `sigma_upper_gram`.
    """
    if W.ndim < 2:
        raise ValueError(f"sigma_upper needs a matrix, got shape {tuple(W.shape)}")
    if W.shape[-1] == 0 or W.shape[-2] == 0:
        return torch.zeros(W.shape[:-2], dtype=torch.float64, device=W.device)  # σ of an empty matrix
    lead = W.shape[:-2]
    # Every matrix scaled by an exact power of two so its largest entry is in [0.5, 1): the Gram
    # entries then neither overflow nor lose the top of the spectrum to underflow.
    G, exponent, zero = _scale_to_unit_peak(W)
    m, n = G.shape[-2:]
    A = G.mT @ G
    A = 0.5 * (A + A.mT)
    # |fl(GᵀG) − GᵀG| ≤ γ_m|G|ᵀ|G| entrywise and ‖ |G|ᵀ|G| ‖₂ ≤ ‖G‖_F² ≤ trace(A)/(1 − γ_m); the
    # symmetrizing average adds ≤ u·max|A_ij| = u·max A_ii per entry, ≤ n·u·max A_ii in norm.
    diag = A.diagonal(dim1=-2, dim2=-1)
    gram_err = 2 * _gamma(m + n) * diag.sum(-1) + 2 * n * _U64 * diag.amax(-1)

    rho = _top_eigenvalue_estimate(A, LANCZOS_STEPS)

    lo = rho.clone()                               # largest μ seen to fail (a guess, not a bound)
    hi = torch.full_like(rho, math.inf)            # smallest μ that factored
    lam = torch.full_like(rho, math.inf)           # the certified λ̄ for that μ
    live = ~zero & (rho > 0)
    for delta in CHOLESKY_DELTAS:
        idx = (live & ~torch.isfinite(hi)).nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        mu = rho[idx] * (1.0 + delta)
        ok, bound = _cholesky_certify(A[idx], mu)
        hi[idx[ok]], lam[idx[ok]] = mu[ok], bound[ok]
        lo[idx[~ok]] = mu[~ok]
    for _ in range(20):
        idx = (live & torch.isfinite(hi) & (hi > lo * (1 + BISECT_TOL))).nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        mu = torch.sqrt(lo[idx] * hi[idx])
        ok, bound = _cholesky_certify(A[idx], mu)
        hi[idx[ok]], lam[idx[ok]] = mu[ok], bound[ok]
        lo[idx[~ok]] = mu[~ok]
    lam = lam + gram_err
    # (1 + 1e-12): the few float64 operations on non-negative numbers that form the result, and the
    # values that underflowed on the way (< 1e-300 in all, against λ̄ ≥ max A_ii ≥ 1/4)
    bound = _rescale_up(torch.sqrt(lam) * (1.0 + 1e-12), exponent)
    bound = torch.where(zero, torch.zeros_like(bound), bound)
    fallback = ~zero & ~torch.isfinite(lam)
    if fallback.any():  # nothing factored (or ρ = 0 on a nonzero matrix): the matmul-only certificate
        flat = W.detach().reshape(-1, *W.shape[-2:])
        bound[fallback] = sigma_upper_gram(flat[fallback])
    return bound.reshape(lead)


@torch.no_grad()
def sigma_upper_gram(W: Tensor, iters: int = GRAM_ITERS) -> Tensor:
    """Guaranteed upper bound on σ_max of W (or of each matrix in a stack) by Gram iteration, float64.

    The matmul-only certificate (the fallback of `sigma_upper` and its cross-check in tests).
    Gram iteration (Delattre et al., ICML 2023): with T_0 = W, T_{i+1} = T_iᵀT_i one has
    σ_max(W) = σ_max(T_k)^{1/2^k} ≤ ‖T_k‖_F^{1/2^k}. Each iterate is rescaled to unit Frobenius
    norm (the scale is carried in log space) so nothing overflows; the result is inflated by a
    rounding margin so it stays above σ_max despite float64 arithmetic. Never below the exact
    value; at the default 14 iterations at most rank^{1/32768} above it (1.0003× at rank 3072).
    """
    if W.ndim < 2:
        raise ValueError(f"sigma_upper_gram needs a matrix, got shape {tuple(W.shape)}")
    if W.shape[-1] == 0 or W.shape[-2] == 0:
        return torch.zeros(W.shape[:-2], dtype=torch.float64, device=W.device)  # σ of an empty matrix
    lead = W.shape[:-2]
    G, exponent, zero = _scale_to_unit_peak(W)  # the first norm must not over- or underflow either
    m, n = G.shape[-2:]
    log_scale = torch.zeros(G.shape[:-2], dtype=torch.float64, device=G.device)
    for _ in range(iters):
        f = torch.linalg.matrix_norm(G)
        f = torch.where(zero, torch.ones_like(f), f)
        G = G / f[..., None, None]
        log_scale = 2.0 * (log_scale + torch.log(f))
        G = G.mT @ G
    f = torch.linalg.matrix_norm(G)
    bound = torch.exp((log_scale + torch.log(f)) / 2.0**iters) * (1.0 + _rounding_margin(m, n))
    bound = torch.where(zero, torch.zeros_like(bound), _rescale_up(bound, exponent))
    return bound.reshape(lead)


@torch.no_grad()
def top_singular_triplet(W: Tensor, iters: int = 30) -> tuple[Tensor, Tensor, Tensor]:
    """(σ₁, u₁, v₁) by power iteration on WᵀW: σ₁ is a *lower* bound on σ_max, never for certificates."""
    Wf = W.detach().float() if W.dtype in (torch.bfloat16, torch.float16) else W.detach()
    gen = torch.Generator(device=W.device).manual_seed(0)  # deterministic start
    v = torch.randn(*Wf.shape[:-2], Wf.size(-1), 1, generator=gen, device=W.device, dtype=Wf.dtype)
    v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True)
    for _ in range(iters):
        v = Wf.mT @ (Wf @ v)
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp(min=1e-30)
    u = Wf @ v
    sigma = torch.linalg.vector_norm(u, dim=-2, keepdim=True)
    u = u / sigma.clamp(min=1e-30)
    return sigma[..., 0, 0], u, v


def sigma_estimate(W: Tensor, iters: int = 30) -> Tensor:
    """Cheap power-iteration estimate of σ_max (a lower bound): for logs and monitors only."""
    return top_singular_triplet(W, iters)[0]


# ---------------------------------------------------------------------------------------------
# Caps (projection maps). `w_max` may be a float or a tensor broadcastable to the stack shape.

def _as_stack_scalar(w_max: float | Tensor, W: Tensor) -> Tensor:
    w = torch.as_tensor(w_max, dtype=W.dtype, device=W.device)
    if (w <= 0).any():
        raise ValueError(f"w_max must be positive, got {w_max}")
    return w.reshape(*w.shape, 1, 1) if w.ndim else w


# The MIT paper's 4-step hard-cap polynomial M ← M(aI + bMᵀM + c(MᵀM)²) on M = W / w_max.
MIT_HARD_CAP: tuple[Coefficients, ...] = (
    (0.805032, 0.206361, -0.019763),
    (0.649867, 0.162935, -0.011150),
    (1.810259, -0.200265, 0.008251),
    (1.004384, -0.183490, 0.014413),
)

# Iteration used for exact caps: Polar Express pulls σ ∈ [1e-3, 1] near 1; the classic quintic
# lifts anything left below (×3.44 per step); the polishing quintic then converges to working
# precision. Valid for any input scaled to σ ≤ 1.
CAP_SCHEDULE: tuple[Coefficients, ...] = POLAR_EXPRESS + (CLASSIC,) * 3 + (POLISH,) * 4
# The common case right after an optimizer step: every σ ≤ 2·w_max (see _hard_cap_polar).
CAP_SCHEDULE_MILD_O: tuple[Coefficients, ...] = (POLISH,) * 5
CAP_SCHEDULE_MILD_S: tuple[Coefficients, ...] = POLAR_EXPRESS + (POLISH,) * 3


def _cheap_upper(M: Tensor) -> Tensor:
    """An upper bound on σ_max good enough to *normalize* by (3 Gram steps, 2% slack for rounding).

    Not used for certificates: only to keep Newton–Schulz inputs inside its convergence region.
    """
    G = M.double() if M.dtype == torch.float64 else M.float()
    log_scale = torch.zeros(G.shape[:-2], dtype=G.dtype, device=G.device)
    for _ in range(3):
        f = torch.linalg.matrix_norm(G).clamp(min=1e-30)
        G = G / f[..., None, None]
        log_scale = 2.0 * (log_scale + torch.log(f))
        G = G.mT @ G
    f = torch.linalg.matrix_norm(G).clamp(min=1e-30)
    return torch.exp((log_scale + torch.log(f)) / 8.0) * 1.02


def _hard_cap_polar(W: Tensor, w: Tensor) -> Tensor:
    """min(σ, w) for every singular value, from two polar factors (docs/lipschitz.md §2).

    With M = W/w = UΣVᵀ, O = UVᵀ and |M| = OᵀM = VΣVᵀ, S = sign(I − |M|) = V sign(1 − Σ) Vᵀ:
        ½[(M + O) + (M − O) S] = U · ½[(Σ + 1) − |Σ − 1|] · Vᵀ = U min(Σ, 1) Vᵀ.
    Both O and S are polar factors (S of a symmetric matrix), computed by Newton–Schulz after
    scaling by an upper bound, so any σ — however large — is handled. Where σ is close to 1 the
    sign converges slowly, but there the error is at most |σ − 1|/2 by construction.
    """
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    M = W.to(work) / w.to(work)
    tall = M.size(-2) >= M.size(-1)
    if not tall:
        M = M.mT
    s = _cheap_upper(M)[..., None, None]
    needs = (s > 1.0).reshape(-1)
    if not needs.any():
        return W
    # O only matters where σ > 1 (elsewhere sign(1 − σ) = +1 and the formula returns σ whatever O
    # is). After an optimizer step s ≤ 2 typically, so those σ sit at x = σ/s ≥ 1/2, where the
    # polishing quintic alone converges in 5 steps; S still needs the full range of Polar Express.
    mild = bool((s <= 2.0).all())
    O = _odd_quintic((M / s).mT, CAP_SCHEDULE_MILD_O if mild else CAP_SCHEDULE).mT  # n×n Gram side
    A = O.mT @ M
    A = 0.5 * (A + A.mT)
    eye = torch.eye(A.size(-1), dtype=work, device=A.device)
    scale = torch.clamp(s - 1.0, min=1.0) * 1.02  # ‖I − |M|‖₂ ≤ max(1, σ_max − 1)
    S = _odd_quintic((eye - A) / scale, CAP_SCHEDULE_MILD_S if mild else CAP_SCHEDULE)
    S = 0.5 * (S + S.mT)
    C = 0.5 * ((M + O) + (M - O) @ S)
    C = torch.where((s > 1.0), C, M)  # matrices already inside the cap are returned untouched
    if not tall:
        C = C.mT
    return (C * w.to(work)).to(W.dtype)


def _hard_cap_eigh(W: Tensor, w: Tensor) -> Tensor:
    """min(σ, w) from one symmetric eigendecomposition of the small Gram matrix (docs/lipschitz.md §2).

    With MᵀM = V Λ Vᵀ (M tall, so the Gram matrix is min(m, n)²) and h(λ) = min(1, w/√λ),
    M·V h(Λ) Vᵀ = U min(Σ, w) Vᵀ. Written as M + (M V_k)(h_k − 1)V_kᵀ over the k eigenpairs with
    √λ > w only, so directions already inside the cap are left exactly as they were, and the
    correction costs 2·m·n·k. On CPU LAPACK's `eigh` beats the ~40 matmuls of the polar method by
    about 5×; on GPUs eigh is slow, hence `auto`.
    """
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    M = W.to(work)
    tall = M.size(-2) >= M.size(-1)
    if not tall:
        M = M.mT
    w2 = (w.to(work) ** 2).reshape(*w.shape[:-2], 1)
    A = M.mT @ M
    lam, V = torch.linalg.eigh(0.5 * (A + A.mT))
    if work == torch.float32 and bool((lam[..., -1:] > 1e3 * w2).any()):
        # far above the cap the float32 eigenvalues near w² carry u·λ_max of error: redo in float64
        return _hard_cap_eigh(W.double(), w.double()).to(W.dtype)
    k = int((lam > w2).sum(-1).max())
    if k == 0:
        return W
    lam, V = lam[..., -k:], V[..., -k:]  # eigh sorts ascending: the top k
    shrink = torch.where(lam > w2, torch.sqrt(w2 / lam.clamp(min=torch.finfo(work).tiny)) - 1.0,
                         torch.zeros_like(lam))
    C = M + ((M @ V) * shrink[..., None, :]) @ V.mT
    if not tall:
        C = C.mT
    return C.to(W.dtype)


def resolve_cap_method(method: str, device: torch.device | str) -> str:
    """`auto` → "eigh" on CPU (LAPACK is fast there), "polar" on accelerators (matmuls only)."""
    if method != "auto":
        return method
    return "eigh" if torch.device(device).type == "cpu" else "polar"


def hard_cap(W: Tensor, w_max: float | Tensor, method: str = "auto") -> Tensor:
    """Cap every singular value at w_max: σ ↦ min(σ, w_max), keeping the singular vectors.

    method="svd": exact (float64 SVD; a reference for small matrices).
    method="eigh": exact to rounding, from an eigendecomposition of the min(m, n)² Gram matrix;
    the fastest exact cap on CPU.
    method="polar": exact to iteration tolerance for any σ, matmuls only (GPU-friendly).
    method="auto" (default): eigh on CPU, polar elsewhere.
    method="poly": the MIT paper's 4-step polynomial — approximate (σ=1 → 0.966, peak 1.011 near
    σ≈1.19) and wrong above σ≈4; kept for comparison, never a guarantee.
    """
    w = _as_stack_scalar(w_max, W)
    method = resolve_cap_method(method, W.device)
    if method == "eigh":
        return _hard_cap_eigh(W, w)
    if method == "svd":
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        S = torch.minimum(S, w.double().squeeze(-1))
        return ((U * S[..., None, :]) @ Vh).to(W.dtype)
    if method == "polar":
        return _hard_cap_polar(W, w)
    if method == "poly":
        work = torch.float64 if W.dtype == torch.float64 else torch.float32
        M = W.to(work) / w.to(work)
        for a, b, c in MIT_HARD_CAP:
            A = M.mT @ M
            M = M @ (a * torch.eye(A.size(-1), dtype=work, device=A.device) + b * A + c * (A @ A))
        return (M * w.to(work)).to(W.dtype)
    raise ValueError(f"unknown hard_cap method {method!r}; use 'auto', 'eigh', 'polar', 'svd' or 'poly'")


def soft_cap(W: Tensor, alpha: float) -> Tensor:
    """W ← W(I − αWᵀW), then W ← W(I + αWᵀW): σ ↦ σ − 3α²σ⁵ + 3α³σ⁷ − α⁴σ⁹ (raw σ units)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if alpha == 0:
        return W
    X = W.float() if W.dtype in (torch.bfloat16, torch.float16) else W
    X = X - alpha * (X @ (X.mT @ X))
    X = X + alpha * (X @ (X.mT @ X))
    return X.to(W.dtype)


def soft_cap_map(sigma: float, alpha: float) -> float:
    """The scalar map soft_cap applies to each singular value."""
    u = alpha * sigma * sigma
    return sigma * (1.0 - 3.0 * u * u + 3.0 * u**3 - u**4)


# f(σ)/σ = g(u), u = ασ², g(u) = 1 − 3u² + 3u³ − u⁴. d f/dσ = 1 − 15u² + 21u³ − 9u⁴ vanishes at
# this u, so f is increasing on σ² ≤ U_MONOTONE/α and the cap guarantee needs k inside it.
U_MONOTONE = 0.3374158203840862


def soft_cap_alpha(w_max: float, max_update_norm: float, weight_decay: float = 0.0) -> float:
    """Smallest α ≥ 0 such that soft_cap keeps σ ≤ w_max after any step of the given size.

    If σ ≤ w_max before the step W ← (1 − wd)·W + U with σ_max(U) ≤ max_update_norm, then after it
    σ ≤ k = w_max(1 − wd) + max_update_norm. Choosing α with f(k) = w_max, and f increasing on
    [0, k], gives f(σ) ≤ f(k) = w_max for every singular value. Raises if no such α exists
    (k > w_max / g(U_MONOTONE) ≈ 1.30·w_max): take a smaller step or use the hard cap.
    """
    if w_max <= 0 or max_update_norm < 0 or not 0 <= weight_decay < 1:
        raise ValueError("need w_max > 0, max_update_norm >= 0 and 0 <= weight_decay < 1")
    k = w_max * (1.0 - weight_decay) + max_update_norm
    if k <= w_max:
        return 0.0
    target = w_max / k

    def g(u: float) -> float:
        return 1.0 - 3.0 * u * u + 3.0 * u**3 - u**4

    if g(U_MONOTONE) > target:
        raise ValueError(
            f"soft cap cannot absorb a step to σ={k:.4g} with w_max={w_max:.4g} (max ratio "
            f"{1 / g(U_MONOTONE):.3f}); lower the learning rate or use the hard cap")
    lo, hi = 0.0, U_MONOTONE  # g decreases on [0, U_MONOTONE]: g(lo) > target >= g(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if g(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi / (k * k)  # the upper end: f(k) <= w_max, never above


def spectral_normalize(W: Tensor, w_max: float | Tensor, sigma: Tensor | None = None) -> Tensor:
    """W / max(1, σ/w_max) with σ a *sound* upper bound, so the result is guaranteed inside the cap."""
    w = _as_stack_scalar(w_max, W)
    s = sigma_upper(W) if sigma is None else sigma
    factor = torch.clamp(s.to(W.dtype).reshape(*s.shape, 1, 1) / w, min=1.0)
    return W / factor


def spectral_hammer(W: Tensor, w_max: float | Tensor, iters: int = 30) -> Tensor:
    """Set the top singular value to w_max: W + (w_max − σ₁)u₁v₁ᵀ (σ₁ by power iteration).

    Only the top direction moves: the second σ may still exceed w_max. Not a guarantee.
    """
    w = _as_stack_scalar(w_max, W)
    sigma, u, v = top_singular_triplet(W, iters)
    delta = (w.to(u.dtype) - sigma.reshape(*sigma.shape, 1, 1)) * (u @ v.mT)
    return W + delta.to(W.dtype)


def spectral_weight_decay(W: Tensor, lam: float, iters: int = 30) -> Tensor:
    """Shrink only the top singular value: W − λσ₁u₁v₁ᵀ."""
    sigma, u, v = top_singular_triplet(W, iters)
    return W - (lam * sigma.reshape(*sigma.shape, 1, 1) * (u @ v.mT)).to(W.dtype)
