"""Sound upper bounds on σ_max (certificates) and cheap power-iteration estimates (logs only).

`sigma_upper` is a float64 Cholesky certificate of μI − WᵀW with every rounding term bounded;
`sigma_upper_gram` is Gram iteration in float64 with an explicit rounding margin
(docs/lipschitz.md §1). `sigma_estimate` / `top_singular_triplet` are power iteration: *lower*
bounds, never for certificates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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


def gamma(n: int) -> float:
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
    err = 4 * gamma(n + 1) * R.square().sum(dim=(-2, -1)) + 2 * _U64 * B.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
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
    norm = torch.linalg.vector_norm(scaled, dim=-1) * (1 + 2 * gamma(X.size(-1) + 2))
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
    gram_err = 2 * gamma(m + n) * diag.sum(-1) + 2 * n * _U64 * diag.amax(-1)

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
