"""Per-kind step-size allocation: one learning-rate multiplier per weight kind.

A lipformer model has eight weight kinds (`lipformer.config.WEIGHT_KINDS`): embed, q, k, v, o,
mlp_in, mlp_out, head; and, when `position_bias` is on, the attention's position offsets ("position",
a companion tensor with no cap). An *allocation* maps kinds to a scale s_kind; the optimizer then runs each
kind in its own param group with lr_kind = s_kind · base lr, where the base is `lr` for the capped
matrices and `companion_lr` for the companion's tensors (the embedding). Kinds left out keep 1.
Because the scale lives in the group's "lr", every optimizer, the LR scheduler (which scales each
group's initial lr) and `step_bound` (which reads the group's lr) see the allocated step.

Named presets:

- "uniform": every kind 1 (the default behaviour).
- "modula": the per-step moves of modula's mass allocation as used for the MIT Lipschitz-transformer
  Shakespeare runs (jxbz/modula `CompositeModule.dualize`: a child's target norm is the parent's
  times its share of the mass, divided by the sensitivity of what follows; GPT built with
  blocks_mass 32, embed and head mass 1, 3 blocks), as worked out from that code in
  ../shared/REFERENCES.md ("Their recipe"): per unit of lr, in the RMS→RMS norm, q, k, v 0.94;
  attention-out and both MLP matrices 0.31; head and embedding 0.029. The numbers are for 3 blocks;
  other depths get the same ratios (a depth-aware version would redo modula's mass arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..config import WEIGHT_KINDS

KINDS = (*WEIGHT_KINDS, "position")   # what an allocation may scale
ALLOCATIONS: dict[str, dict[str, float]] = {
    "uniform": {kind: 1.0 for kind in KINDS},
    "modula": {"q": 0.94, "k": 0.94, "v": 0.94, "o": 0.31, "mlp_in": 0.31, "mlp_out": 0.31,
               "head": 0.029, "embed": 0.029},
}


def resolve_allocation(allocation: str | Mapping[str, float] | None) -> dict[str, float]:
    """The full kind → scale table for a preset name, a partial mapping, or None (uniform).

    Raises ValueError naming the problem for an unknown preset or kind, or a scale that is not a
    positive finite number.
    """
    if allocation is None:
        return dict(ALLOCATIONS["uniform"])
    if isinstance(allocation, str):
        if allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {allocation!r}; presets: {', '.join(ALLOCATIONS)}")
        return dict(ALLOCATIONS[allocation])
    if not isinstance(allocation, Mapping):
        raise ValueError(f"allocation must be a preset name or a mapping kind -> scale, got {allocation!r}")
    unknown = sorted(set(allocation) - set(KINDS), key=str)
    if unknown:
        raise ValueError(f"allocation has unknown kinds {unknown}; kinds: {', '.join(KINDS)}")
    table = dict(ALLOCATIONS["uniform"])
    for kind, scale in allocation.items():
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"allocation[{kind!r}] must be a positive finite number, got {scale!r}")
        table[kind] = float(scale)
    return table


def kind_of(module) -> str | None:
    """The weight kind a module's `weight` belongs to (None for modules without one)."""
    return getattr(module, "kind", None) if getattr(module, "kind", None) in WEIGHT_KINDS else None


__all__ = ["ALLOCATIONS", "KINDS", "kind_of", "resolve_allocation"]
