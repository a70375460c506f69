"""Optimizers for Lipschitz transformers, all behind the `torch.optim.Optimizer` interface.

Muon, ROOT, LPSGD/LPSGDM and Lamb carry a companion for parameters their algorithm is not meant
for (param groups with ``algorithm="adamw"`` or ``"colnorm"``), so one object — one state dict,
one LR scheduler — trains the whole model. `EAdaptor` wraps any optimizer; `ALTO` is E on Lamb.
`step_bound(p)` tells the projection step how far a weight can move in one step.

`build_optimizer(model, name, ...)` sets the groups up for a lipformer model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._common import COMPANION_DEFAULTS, COMPANIONS, CompanionOptimizer
from .alto import ALTO, E_PRESETS, EAdaptor, Lamb
from .lpsgd import LPSGD, LPSGDM, annealed_p, lp_direction
from .muon import Muon, schedule_gain, update_scale
from .root import ROOT, ROOT_COEFFICIENTS, fit_coefficients, root_coefficients, suppress_outliers

OPTIMIZERS = ("adamw", "muon", "root", "lpsgd", "lpsgdm", "lamb", "alto")
_CLASSES = {"muon": Muon, "root": ROOT, "lpsgd": LPSGD, "lpsgdm": LPSGDM, "lamb": Lamb, "alto": ALTO}


def _matrices(model: nn.Module) -> list[torch.Tensor]:
    """Every CappedLinear weight (the capped matrices, head included), in module order."""
    from ..nn import CappedLinear  # late import: lipformer.nn does not need the optimizers

    out, seen = [], set()
    for module in model.modules():
        if isinstance(module, CappedLinear) and module.weight.requires_grad and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out.append(module.weight)
    return out


def param_groups(model: nn.Module, companion: str = "adamw", companion_lr: float | None = None,
                 companion_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """[matrix group, companion group]: CappedLinear weights first, every other trainable tensor
    (the embedding, anything else) in a group with ``algorithm=companion``. Empty groups are dropped."""
    if companion not in COMPANIONS:
        raise ValueError(f"unknown companion {companion!r}; use one of {list(COMPANIONS)}")
    matrices = _matrices(model)
    ids = {id(p) for p in matrices}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    extra = dict(companion_options or {})
    if companion_lr is not None:
        extra["lr"] = companion_lr
    groups = []
    if matrices:
        groups.append({"params": matrices})
    if others:
        groups.append({"params": others, "algorithm": companion, **extra})
    return groups


def optimizer_class(name: str) -> type:
    """The class `build_optimizer(model, name)` constructs (torch.optim.AdamW for "adamw")."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    return torch.optim.AdamW if name == "adamw" else _CLASSES[name]


def build_optimizer(model: nn.Module, name: str, lr: float | None = None, *, companion: str = "adamw",
                    companion_lr: float | None = None, companion_options: dict[str, Any] | None = None,
                    **kw: Any) -> torch.optim.Optimizer:
    """The named optimizer for a lipformer model.

    "adamw": `torch.optim.AdamW` on all parameters (`lr`, `**kw` passed through). Otherwise every
    `CappedLinear.weight` (q, k, v, o, MLP and head matrices) gets the named algorithm and every
    other trainable tensor (the embedding, ...) the companion ("adamw" or "colnorm", with its own
    `companion_lr` — default from `COMPANION_DEFAULTS` — and `companion_options`), all inside one
    optimizer object. `lr=None` keeps the optimizer's documented default; `**kw` go to its
    constructor (e.g. `weight_decay`, `ns_coefficients`, `total_steps`, `preset`).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    if lr is not None:
        kw["lr"] = lr
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **kw)
    groups = param_groups(model, companion, companion_lr, companion_options)
    return _CLASSES[name](groups, **kw)


__all__ = [
    "ALTO", "COMPANIONS", "COMPANION_DEFAULTS", "CompanionOptimizer", "EAdaptor", "E_PRESETS", "LPSGD",
    "LPSGDM", "Lamb", "Muon", "OPTIMIZERS", "ROOT", "ROOT_COEFFICIENTS", "annealed_p", "build_optimizer",
    "fit_coefficients", "lp_direction", "optimizer_class", "param_groups", "root_coefficients", "schedule_gain",
    "suppress_outliers", "update_scale",
]
