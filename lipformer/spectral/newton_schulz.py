"""Newton–Schulz polar iterations: the odd quintics behind Muon, ROOT and the matmul-only caps.

Approximate and fast (bf16 by default): nothing computed here may enter a certificate. The
coefficient schedules are named as in their papers (REFERENCES.md).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

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

