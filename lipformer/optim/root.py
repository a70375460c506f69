"""ROOT (robust orthogonalized optimizer): Muon with shape-fitted Newton–Schulz coefficients and
outlier suppression of the momentum.

Two changes to Muon:

1. **Shape-fitted coefficients.** The quintic (a, b, c) is fitted to each matrix shape: Adam on
   (a, b, c), from CLASSIC, through the unrolled 5-step iteration, minimizing the mean (σ_out − 1)²
   over Frobenius-normalized random Gaussian matrices of that shape. The iteration acts on each
   singular value separately (X = UΣVᵀ ⇒ p(X) = U p(Σ) Vᵀ), so the fit runs the scalar iteration
   on the matrices' singular values — the same function, without the matmuls. Above 256 on the
   short side a same-aspect-ratio proxy supplies the spectrum, rescaled by √(proxy_min/min_dim)
   (normalized Gaussian σ's scale as 1/√min_dim at fixed aspect ratio, Marchenko–Pastur).
   Fits are cached per (min_dim, max_dim) in `ROOT_COEFFICIENTS`, pre-seeded with ROOT's
   published table. Fitting is seeded and never touches the global RNG.
2. **Soft-threshold outlier suppression.** Before orthogonalizing, the momentum M is split as
   M = B + S with S = soft_threshold(M, ε), ε = the `quantile` of |M| per matrix (default 0.9),
   and only B = clamp(M, −ε, ε) is orthogonalized, so a few huge entries cannot dominate the
   Frobenius normalization and the direction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..spectral import CLASSIC, Coefficients, Schedule
from ._common import CompanionOptimizer, check
from .muon import Muon, muon_defaults

# ROOT's published table: (min dim, max dim) → (a, b, c), 5 steps. Keys with a third entry are
# fits for other step counts.
ROOT_COEFFICIENTS: dict[tuple[int, ...], Coefficients] = {
    (2048, 2048): (3.4916, -4.8224, 2.1095),
    (2048, 3072): (3.4509, -4.5790, 1.9325),
    (2048, 8192): (2.9794, -3.6674, 1.6207),
    (2048, 16384): (3.1943, -3.8221, 1.5322),
}


def _normalized_singular_values(m: int, n: int, proxy_min_dim: int, samples: int,
                                generator: torch.Generator) -> Tensor:
    """Singular values of Frobenius-normalized m×n Gaussian matrices (m ≤ n), as NS sees them."""
    mm = min(m, proxy_min_dim)
    nn_ = max(mm, round(n * mm / m))
    k = max(1, math.ceil(samples / mm))
    G = torch.randn(k, mm, nn_, generator=generator, dtype=torch.float32)
    s = torch.linalg.svdvals(G) / torch.linalg.matrix_norm(G)[:, None]
    return (s * math.sqrt(mm / m)).flatten()


def _iterate(c: Tensor, s: Tensor, steps: int) -> Tensor:
    y = s
    for _ in range(steps):
        y2 = y * y
        y = y * (c[0] + c[1] * y2 + c[2] * y2 * y2)
    return y


def polar_error(coefficients: Coefficients, s: Tensor, steps: int = 5) -> float:
    """Mean (σ_out − 1)² of the repeated quintic on normalized singular values s."""
    return float(((_iterate(torch.as_tensor(coefficients, dtype=s.dtype), s, steps) - 1) ** 2).mean())


def fit_coefficients(shape: tuple[int, int], steps: int = 5, iters: int = 500, lr: float = 1e-2,
                     seed: int = 0, proxy_min_dim: int = 256, samples: int = 1024,
                     init: Coefficients = CLASSIC) -> Coefficients:
    """Fit one (a, b, c) for `steps` repeated quintic steps to matrices of this shape.

    Returns the best iterate (lowest loss, `init` included), so the fit is never worse than
    `init` on its sample. Deterministic for a given seed. About 0.4 s on a 2-core CPU.
    """
    check(len(shape) == 2 and min(shape) >= 1, f"fit_coefficients needs a 2-D shape, got {shape}")
    m, n = sorted(int(d) for d in shape)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():  # the optimizer's step runs under no_grad
        s = _normalized_singular_values(m, n, proxy_min_dim, samples, gen)
        c = torch.tensor(init, dtype=torch.float32, requires_grad=True)
        fitter = torch.optim.Adam([c], lr=lr)
        best_loss, best = polar_error(init, s, steps), tuple(float(v) for v in init)
        for _ in range(iters):
            loss = ((_iterate(c, s, steps) - 1.0) ** 2).mean()
            if not torch.isfinite(loss):
                break  # diverged: keep the best finite iterate
            if loss.item() < best_loss:
                best_loss, best = loss.item(), tuple(float(v) for v in c.detach())
            fitter.zero_grad()
            loss.backward()
            fitter.step()
    return best  # type: ignore[return-value]


def root_coefficients(shape: tuple[int, ...], steps: int = 5) -> Coefficients:
    """Cached fitted coefficients for a matrix shape (the published table where it has one)."""
    m, n = sorted(int(d) for d in shape[-2:])
    key = (m, n) if steps == 5 else (m, n, steps)
    if key not in ROOT_COEFFICIENTS:
        ROOT_COEFFICIENTS[key] = fit_coefficients((m, n), steps=steps)
    return ROOT_COEFFICIENTS[key]


def suppress_outliers(M: Tensor, quantile: float | None) -> Tensor:
    """B = M − soft_threshold(M, ε) = clamp(M, −ε, ε), ε = the quantile of |M| (per matrix).

    ε is the ⌈q·n⌉-th smallest |M| (kthvalue: no size limit, unlike torch.quantile).
    """
    if quantile is None or quantile >= 1.0:
        return M
    flat = M.detach().abs().flatten()
    k = max(1, math.ceil(quantile * flat.numel()))
    eps = flat.kthvalue(k).values
    return M.clamp(-eps, eps)


class ROOT(Muon):
    """Muon with per-shape fitted coefficients and momentum outlier suppression.

    Args: as `Muon`, except
        ns_coefficients: "fitted" (default: `root_coefficients(p.shape, ns_steps)` per matrix,
            fitted once and cached), or any Muon schedule to use fixed coefficients.
        quantile: per-matrix quantile of |M| where the momentum is clipped (default 0.9;
            None or 1.0 turns suppression off).
    """

    algorithm = "root"
    _fitted_ok = True

    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: Schedule | str = "fitted", ns_steps: int = 5,
                 eps: float = 1e-7, adjust_lr_fn: str | None = "rms",
                 ns_dtype: torch.dtype | None = torch.bfloat16, quantile: float | None = 0.9,
                 ns_method: str = "auto") -> None:
        defaults = muon_defaults(lr, weight_decay, momentum, nesterov, ns_coefficients, ns_steps, eps,
                                 adjust_lr_fn, ns_dtype, ns_method)
        CompanionOptimizer.__init__(self, params, dict(defaults, quantile=quantile))

    def _check_main_group(self, group: dict) -> None:
        super()._check_main_group(group)
        q = group["quantile"]
        check(q is None or 0.0 < q <= 1.0, f"ROOT: quantile must be in (0, 1] or None, got {q}")

    def _coefficients(self, p: Tensor, group: dict) -> Schedule:
        c = group["ns_coefficients"]
        if isinstance(c, str) and c == "fitted":
            return root_coefficients(tuple(p.shape), group["ns_steps"])
        return c

    def _preprocess(self, group: dict):
        q = group["quantile"]
        return None if q is None or q >= 1.0 else (lambda M: suppress_outliers(M, q))
