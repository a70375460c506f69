"""Building blocks of the *local* bounds (docs/lipschitz.md §9), evaluated soundly in float64.

A local bound answers: the input of a module lies within ℓ2 radius e_s of the computed clean
activation x̂_s at every token s; how far can each output token be from the exact output at x̂?
The modules in `lipformer.nn` own those bounds (`local_bound` methods); this file holds the pieces
they share and that need care in floating point: the softmax box (no cancellation in the sums over
the other keys), GELU's largest slope over an interval, and distances without cancellation error.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

U = 2.0**-53                 # float64 unit roundoff
# One relative margin for every chain of float64 operations on non-negative numbers in a local bound
# (sums of ≤ 10⁵ terms, a few products and roots: relative error < 10⁵·2u ≈ 2·10⁻¹¹).
ROUND_UP = 1.0 + 1e-10

_SQRT2 = math.sqrt(2.0)
GELU_SLOPE_MAX = 0.5 * (1.0 + math.erf(1.0)) + _SQRT2 * math.exp(-1.0) / math.sqrt(2.0 * math.pi)
GELU_SLOPE_MAX_UP = GELU_SLOPE_MAX * (1 + 1e-12)
# |GELU″(z)| = φ(z)|2 − z²| is largest at z = 0: 2φ(0) = 0.7979 (elsewhere ≤ 0.11 beyond √2)
GELU_CURVATURE_MAX = 0.8


def gelu_slope(z: Tensor) -> Tensor:
    """GELU′(z) = Φ(z) + z·φ(z)."""
    return 0.5 * (1.0 + torch.erf(z / _SQRT2)) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def exclusive_logsumexp(a: Tensor) -> Tensor:
    """log Σ_{r≠s} e^{a_r} for every s along the last dimension, without catastrophic cancellation.

    `log(Σ_r e^{a_r} − e^{a_s})` cancels when s dominates (exactly the confident rows local
    certificates are for). With M the row maximum at s*, for s ≠ s* the others include e^{a_s* − M} = 1
    ≥ e^{a_s − M}, so the difference is at least half the total and keeps the sum's relative accuracy;
    for s* itself the others are summed directly with s* left out. −∞ entries (masked keys) add 0.
    """
    top, where = a.max(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    x = torch.exp(a - top)
    total = x.sum(-1, keepdim=True)
    others = (total - x).clamp(min=0)
    without_top = x.scatter(-1, where, torch.zeros_like(where, dtype=x.dtype)).sum(-1, keepdim=True)
    others = others.scatter(-1, where, without_top)
    return torch.log(others) + top


def softmax_box(center: Tensor, radius: Tensor) -> tuple[Tensor, Tensor, float]:
    """The softmax-box lemma (docs/lipschitz.md §9a): if every score moves by at most `radius`,
    |ã_s − center_s| ≤ radius_s, then softmax(ã)_s ∈ [low_s, up_s] with

        up_s  = σ(center_s + radius_s − log Σ_{r≠s} e^{center_r − radius_r}),
        low_s = σ(center_s − radius_s − log Σ_{r≠s} e^{center_r + radius_r})      (σ the logistic),

    because softmax(ã)_s = 1/(1 + Σ_{r≠s} e^{ã_r − ã_s}) rises with ã_s and falls with every other
    score. Masked keys are −∞ in `center` (their bounds are 0). Returns (low, up, eta): the computed
    values are within a relative eta of the exact ones (docs/lipschitz.md §9d), which callers add.
    """
    hi, lo = center + radius, center - radius
    up = torch.sigmoid(hi - exclusive_logsumexp(lo))
    low = torch.sigmoid(lo - exclusive_logsumexp(hi))
    # every exponent is off by ≤ u·|value| per rounding (the sums ĉ ± r, the shift by the row maximum),
    # the sum of ≤ T exponentials by a relative 2γ_T (×2 where one term is taken off, see above), and
    # exp/log/sigmoid by 4 ulp each: all within eta relative on up and low
    finite = torch.isfinite(center)
    top = float(torch.where(finite, center.abs() + radius, torch.zeros_like(center)).max()) if center.numel() else 0.0
    eta = 4.0 * (center.size(-1) + 32) * U * (2.0 + top)
    return low, up, eta


def distance_upper(x: Tensor, y: Tensor) -> Tensor:
    """Upper bounds on ‖x_i − y_j‖₂ for all pairs (x: (..., I, n), y: (..., J, n)), via the Gram
    expansion ‖x‖² − 2x·y + ‖y‖² with its rounding (≤ 2γ_{n+4}(‖x‖ + ‖y‖)²) added before the root."""
    n = x.size(-1)
    xx = x.pow(2).sum(-1)[..., :, None]
    yy = y.pow(2).sum(-1)[..., None, :]
    d2 = xx - 2.0 * (x @ y.mT) + yy
    gamma = (n + 4) * U / (1 - (n + 4) * U)
    slack = 2.0 * gamma * (xx.sqrt() + yy.sqrt()).pow(2) + 1e-300
    return (d2.clamp(min=0) + slack).sqrt() * ROUND_UP


def masked_max(values: Tensor, allowed: Tensor) -> Tensor:
    """max over the last dimension of the allowed entries (0 where none is allowed)."""
    return torch.where(allowed, values, torch.zeros_like(values)).amax(-1)
