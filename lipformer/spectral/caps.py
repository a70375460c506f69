"""Caps: the projection maps that put a weight back under its spectral-norm cap.

hard_cap (exact eigh, matmul-only polar, SVD reference, the MIT polynomial), soft_cap with its
step-coupled α, spectral_normalize, spectral_hammer, spectral_weight_decay. All act on the plain
σ_max; `w_max` may be a float or a tensor broadcastable to the stack shape.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .newton_schulz import CLASSIC, POLAR_EXPRESS, POLISH, Coefficients, _odd_quintic
from .sigma import sigma_upper, top_singular_triplet


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

