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


def gelu_slope(z: Tensor) -> Tensor:
    """GELU′(z) = Φ(z) + z·φ(z)."""
    return 0.5 * (1.0 + torch.erf(z / _SQRT2)) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def gelu_slope_bound(lo: Tensor, hi: Tensor) -> Tensor:
    """Upper bound on max |GELU′| over each interval [lo, hi].

    GELU″(z) = φ(z)(2 − z²): GELU′ rises on [−√2, √2] to its maximum 1.1289… at √2 and falls outside,
    with its minimum 1 − 1.1289… at −√2 (GELU′(−z) = 1 − GELU′(z)). So the largest |GELU′| on an
    interval is at an endpoint or at ±√2 when the interval contains it. Evaluations carry an absolute
    allowance of 10⁻¹³ (erf and exp within a few ulp), and nothing exceeds the global maximum.
    """
    best = torch.maximum(gelu_slope(lo).abs(), gelu_slope(hi).abs())
    best = torch.where((lo <= _SQRT2) & (hi >= _SQRT2), torch.full_like(best, GELU_SLOPE_MAX), best)
    best = torch.where((lo <= -_SQRT2) & (hi >= -_SQRT2), torch.maximum(best, torch.full_like(best, GELU_SLOPE_MAX - 1)), best)
    return torch.clamp(best + 1e-13, max=GELU_SLOPE_MAX * (1 + 1e-12))


def exclusive_logsumexp(a: Tensor) -> Tensor:
    """log Σ_{r≠s} e^{a_r} for every s along the last dimension, without subtracting anything.

    `log(Σ_r e^{a_r} − e^{a_s})` cancels catastrophically when s dominates (exactly the confident rows
    local certificates are for); the sum over the others is the sum of a prefix and a suffix, both
    sums of positive terms. −∞ entries (masked keys) contribute nothing.
    """
    inf = torch.full_like(a[..., :1], -math.inf)
    prefix = torch.cat([inf, torch.logcumsumexp(a, -1)[..., :-1]], -1)
    suffix = torch.cat([torch.logcumsumexp(a.flip(-1), -1).flip(-1)[..., 1:], inf], -1)
    return torch.logaddexp(prefix, suffix)


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
    # every exponent is off by ≤ u·|value| per rounding (the sums ĉ ± r, the running log-sum-exp of
    # ≤ T terms: ≤ (T + 4)·u·(1 + |largest|) in the log, plus exp/log/sigmoid within 4 ulp each)
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
