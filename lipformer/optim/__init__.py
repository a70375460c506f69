"""Optimizers for Lipschitz transformers, all behind the `torch.optim.Optimizer` interface.

Muon, ROOT, LPSGD/LPSGDM and Lamb carry a companion for parameters their algorithm is not meant
for (param groups with ``algorithm="adamw"`` or ``"colnorm"``), so one object — one state dict,
one LR scheduler — trains the whole model. `EAdaptor` wraps any optimizer; `ALTO` is E on Lamb.
`step_bound(p)` tells the projection step how far a weight can move in one step.

`build_optimizer(model, name, ...)` sets the groups up for a lipformer model; its `allocation`
gives each weight kind its own step size (`allocation.py`: a preset such as "modula", or a
mapping kind → scale).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ._common import COMPANION_DEFAULTS, COMPANIONS, CompanionOptimizer
from .allocation import ALLOCATIONS, kind_of, resolve_allocation
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


def _kinds(model: nn.Module) -> dict[int, str]:
    """id(weight) → weight kind, for every module that declares one (capped matrices, embedding)."""
    kinds = {id(m.weight): kind_of(m) for m in model.modules()
             if kind_of(m) is not None and isinstance(getattr(m, "weight", None), nn.Parameter)}
    kinds.update({id(m.position_bias): "position" for m in model.modules()
                  if isinstance(getattr(m, "position_bias", None), nn.Parameter)})
    return kinds


def _split_by_kind(params: list[torch.Tensor], kinds: dict[int, str], base_lr: float | None,
                   scales: dict[str, float], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One group per kind (in first-seen order) with lr = scale·base_lr; unkinded tensors scale 1."""
    by_kind: dict[str | None, list[torch.Tensor]] = {}
    for p in params:
        by_kind.setdefault(kinds.get(id(p)), []).append(p)
    groups = []
    for kind, members in by_kind.items():
        group = {"params": members, **extra}
        if base_lr is not None:
            group["lr"] = base_lr * scales.get(kind, 1.0)
        groups.append(group)
    return groups


def param_groups(model: nn.Module, companion: str = "adamw", companion_lr: float | None = None,
                 companion_options: dict[str, Any] | None = None, *, allocation=None,
                 lr: float | None = None) -> list[dict[str, Any]]:
    """[matrix group, companion group]: CappedLinear weights first, every other trainable tensor
    (the embedding, anything else) in a group with ``algorithm=companion``. Empty groups are dropped.

    With an `allocation` (see `allocation.py`) each of the two is split into one group per weight
    kind, with lr = scale · `lr` for matrices and scale · companion lr for the companion's tensors.
    """
    if companion not in COMPANIONS:
        raise ValueError(f"unknown companion {companion!r}; use one of {list(COMPANIONS)}")
    matrices = _matrices(model)
    ids = {id(p) for p in matrices}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    extra = dict(companion_options or {})
    if companion_lr is not None:
        extra["lr"] = companion_lr
    if allocation is not None:
        scales, kinds = resolve_allocation(allocation), _kinds(model)
        base = extra.pop("lr", COMPANION_DEFAULTS[companion]["lr"])
        return (_split_by_kind(matrices, kinds, lr, scales, {})
                + _split_by_kind(others, kinds, base, scales, {"algorithm": companion, **extra}))
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
                    allocation=None, **kw: Any) -> torch.optim.Optimizer:
    """The named optimizer for a lipformer model.

    "adamw": `torch.optim.AdamW` on all parameters (`lr`, `**kw` passed through). Otherwise every
    `CappedLinear.weight` (q, k, v, o, MLP and head matrices) gets the named algorithm and every
    other trainable tensor (the embedding, ...) the companion ("adamw" or "colnorm", with its own
    `companion_lr` — default from `COMPANION_DEFAULTS` — and `companion_options`), all inside one
    optimizer object. `lr=None` keeps the optimizer's documented default; `**kw` go to its
    constructor (e.g. `weight_decay`, `ns_coefficients`, `total_steps`, `preset`).

    `allocation` (a preset name from `ALLOCATIONS` or a mapping kind → scale; None = one lr for
    all) runs each weight kind in its own group at scale · lr (scale · companion lr for the
    embedding), for every optimizer. Decoupled weight decay, being lr·λ, scales with it.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    if allocation is not None and lr is None:  # the scales need a number to multiply
        lr = inspect.signature(optimizer_class(name).__init__).parameters["lr"].default
    if lr is not None:
        kw["lr"] = lr
    if name == "adamw":
        if allocation is None:
            return torch.optim.AdamW(model.parameters(), **kw)
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(_split_by_kind(params, _kinds(model), lr, resolve_allocation(allocation), {}), **kw)
    groups = param_groups(model, companion, companion_lr, companion_options, allocation=allocation, lr=lr)
    return _CLASSES[name](groups, **kw)


__all__ = [
    "ALLOCATIONS", "ALTO", "COMPANIONS", "COMPANION_DEFAULTS", "CompanionOptimizer", "EAdaptor", "E_PRESETS", "LPSGD",
    "LPSGDM", "Lamb", "Muon", "OPTIMIZERS", "ROOT", "ROOT_COEFFICIENTS", "annealed_p", "build_optimizer",
    "fit_coefficients", "kind_of", "lp_direction", "optimizer_class", "param_groups", "resolve_allocation", "root_coefficients", "schedule_gain",
    "suppress_outliers", "update_scale",
]
