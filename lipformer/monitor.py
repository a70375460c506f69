"""Activation monitors: forward hooks that compare what the model computes with what it certified.

    monitor = ActivationMonitor(model, policy="raise")   # bounds taken from the weights now
    model(ids)                                           # raises if a block exceeds its bound
    monitor.stats                                        # {module: {"max_rms", "max_abs"}}

Policies: "raise" (ActivationBoundError), "warn" (a warning, once per module), "clip" (project the
block's output tokens back into the certified rms ball — enforcement, e.g. after weights were
edited outside the projection step). `|entry| ≤ √d · rms` bounds the largest entry.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .nn import project_to_ball

POLICIES = ("raise", "warn", "clip")


class ActivationBoundError(RuntimeError):
    pass


class ActivationMonitor:
    def __init__(self, model, policy: str = "warn", bounds=None, rtol: float = 1e-6):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.model, self.policy, self.rtol = model, policy, rtol
        self.stats: dict[str, dict[str, float]] = {}
        self._warned: set[str] = set()
        self._hooks = []
        self.recertify(bounds)

    def recertify(self, bounds=None) -> None:
        """Take the limits from `bounds` (default: the model's bounds for its current weights)."""
        bounds = bounds or self.model.bounds()
        self.remove()
        self.limits: dict[str, float] = {}
        for i, layer in enumerate(self.model.model.layers):
            a = bounds.activations[i]
            self._watch(f"model.layers.{i}.attn", layer.attn, None)   # recorded, bounded via the block
            self._watch(f"model.layers.{i}", layer, a["mlp_output"])
        self._watch("head", self.model.head, bounds.logits_bound)

    def _watch(self, name: str, module, limit: float | None) -> None:
        if limit is not None:
            self.limits[name] = limit
        self._hooks.append(module.register_forward_hook(lambda m, i, out: self._check(name, out)))

    @torch.no_grad()
    def _check(self, name: str, out: Tensor) -> Tensor | None:
        rms = out.detach().to(torch.promote_types(out.dtype, torch.float32)).pow(2).mean(-1).sqrt()
        stat = self.stats.setdefault(name, {"max_rms": 0.0, "max_abs": 0.0})
        stat["max_rms"] = max(stat["max_rms"], float(rms.max()))
        stat["max_abs"] = max(stat["max_abs"], float(out.detach().abs().max()))
        limit = self.limits.get(name)
        if limit is None or float(rms.max()) <= limit * (1 + self.rtol):
            return None
        message = (f"{name}: activation rms {float(rms.max()):.6g} exceeds its certified bound {limit:.6g}; "
                   "were weights changed outside the projection step?")
        if self.policy == "raise":
            raise ActivationBoundError(message)
        if self.policy == "warn":
            if name not in self._warned:
                warnings.warn(message, stacklevel=2)
                self._warned.add(name)
            return None
        # shrink slightly inside the ball so rounding in the product cannot land just outside it
        return project_to_ball(out, limit * (1 - 1e-6))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
