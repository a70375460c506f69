"""The E adaptor, Lamb, and ALTO = E on Lamb (Zhao et al., "Exploring Landscapes for Better
Minima along Valleys", NeurIPS 2025, arXiv 2510.27153).

E adds to each gradient an EMA of its recent *changes*,
    a_k = β₁·a_{k−1} + (1 − β₁)·(g_k − g_{k−1}),   a_1 = 0,      g̃_k = g_k + α·a_k,
and hands g̃_k to any base optimizer. Near a minimum g_k shrinks but its changes keep pointing
along the valley, so the adapted optimizer keeps exploring it. Presets (`E_PRESETS`):
    "large_batch": α = −5,  β₁ = 0.99  (ALTO's default)
    "small_batch": α = 0.5, β₁ = 0.01  (EAdaptor's default: a mild gradient extrapolation)
With α = 0 the base optimizer sees exactly its own gradients (bit-identical trajectory).

Lamb (You et al., 2019; torch has none): Adam moments with bias correction, the update
r = m̂/(√v̂ + eps) + wd·w (decay decoupled from the moments, inside the trust ratio), and a
layerwise trust ratio ‖w‖/‖r‖, so every tensor moves by lr·‖w‖ (relative step lr):
    w ← w − lr·min(‖w‖/‖r‖, max_trust)·r     (ratio 1 where ‖w‖ or ‖r‖ is 0).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..sharding import full
from ._common import CompanionOptimizer, adam_moments, check, check_beta, check_common, grads_of

E_PRESETS: dict[str, dict[str, float]] = {
    "large_batch": {"alpha": -5.0, "beta1": 0.99},
    "small_batch": {"alpha": 0.5, "beta1": 0.01},
}


def _check_e(alpha: float, beta1: float) -> None:
    check(math.isfinite(alpha), f"EAdaptor: alpha must be finite, got {alpha}")
    check_beta("EAdaptor", "beta1", beta1)


class EAdaptor(Optimizer):
    """Wrap any optimizer: each step adds α·EMA_β₁(g_k − g_{k−1}) to the gradients first.

    The wrapper shares the base optimizer's param groups (the same dicts), so an LR scheduler on
    the wrapper drives the base; α and β₁ live in the groups as ``e_alpha`` / ``e_beta1`` (per
    group if wanted). `state_dict()` holds the E state and the base's full state dict. After
    `step()` each `.grad` holds the raw gradient again (the adapted one is only seen by the base).

    Args:
        base: the optimizer to adapt (any `torch.optim.Optimizer`).
        alpha: weight of the gradient-change EMA (default 0.5, the small-batch preset).
        beta1: EMA coefficient (default 0.01, the small-batch preset).
    """

    def __init__(self, base: Optimizer, alpha: float = 0.5, beta1: float = 0.01) -> None:
        if not isinstance(base, Optimizer):
            raise ValueError(f"EAdaptor: base must be a torch.optim.Optimizer, got {type(base).__name__}")
        _check_e(alpha, beta1)
        self.base = base
        self._shared = False
        super().__init__(list(base.param_groups), {"e_alpha": alpha, "e_beta1": beta1})
        self.param_groups = base.param_groups  # the same list: groups added later stay shared
        self._shared = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        _check_e(param_group["e_alpha"], param_group["e_beta1"])
        if self._shared:
            self.base.add_param_group(param_group)  # appends to the shared list
        else:
            super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        touched = []
        for group in self.param_groups:
            alpha, beta1 = group["e_alpha"], group["e_beta1"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if "prev_grad" not in state:
                    # No g_0: the first difference is taken as 0.
                    state["prev_grad"] = g.detach().clone(memory_format=torch.preserve_format)
                    state["diff_avg"] = torch.zeros_like(g, memory_format=torch.preserve_format)
                else:
                    state["diff_avg"].lerp_(g - state["prev_grad"], 1.0 - beta1)
                    state["prev_grad"].copy_(g)
                if alpha != 0.0:  # α = 0 leaves the gradient untouched, bit for bit
                    g.add_(state["diff_avg"], alpha=alpha)
                    touched.append((g, state["prev_grad"]))
        self.base.step()
        for g, raw in touched:
            g.copy_(raw)
        return loss

    def step_bound(self, p: Tensor) -> tuple[float, float]:
        """The base optimizer's bound: E changes only the gradient, never the update's form."""
        if not hasattr(self.base, "step_bound"):
            return math.inf, 0.0
        return self.base.step_bound(p)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["base"] = self.base.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base_sd = state_dict.pop("base")
        super().load_state_dict(state_dict)
        self.base.load_state_dict(base_sd)
        self.param_groups = self.base.param_groups  # loading made fresh dicts: share again


def lamb_update(p: Tensor, grad: Tensor, state: dict, *, lr: float, betas: tuple[float, float],
                eps: float, weight_decay: float, max_trust: float | None) -> None:
    beta1, beta2 = betas
    step = adam_moments(p, grad, state, betas)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    m_hat = exp_avg / (1.0 - beta1**step)
    v_hat = exp_avg_sq / (1.0 - beta2**step)
    r = m_hat / (v_hat.sqrt() + eps)
    if weight_decay != 0.0:
        r.add_(p, alpha=weight_decay)
    # On DTensors (FSDP2) these norms come out global — DTensor reduces them over the shards — so
    # the trust ratio is the whole tensor's, as on one process.
    w_norm, r_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(r)
    # Tensor ops, no .item(): no host sync on GPU.
    ratio = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, torch.ones_like(w_norm))
    if max_trust is not None:
        ratio = ratio.clamp(max=max_trust)
    p.add_(r * ratio, alpha=-lr)


class Lamb(CompanionOptimizer):
    """Lamb; companion groups (``algorithm="adamw"``/``"colnorm"``) as in Muon.

    Args:
        lr: learning rate = relative step size per tensor (default 1e-3).
        betas: Adam moment coefficients (default (0.9, 0.999)).
        eps: added to √v̂ (default 1e-6, Lamb's).
        weight_decay: added to the update inside the trust ratio (default 0.01).
        max_trust: clamp of the trust ratio (default 10; None = no clamp).
    """

    algorithm = "lamb"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, max_trust: float | None = 10.0) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_trust=max_trust)
        super().__init__(params, defaults)

    def _check_main_group(self, group: dict) -> None:
        check_common("Lamb", group["lr"], group["weight_decay"])
        check(len(group["betas"]) == 2, f"Lamb: betas must be a pair, got {group['betas']}")
        check_beta("Lamb", "betas[0]", group["betas"][0])
        check_beta("Lamb", "betas[1]", group["betas"][1])
        check(group["eps"] >= 0.0, f"Lamb: eps must be >= 0, got {group['eps']}")
        mt = group["max_trust"]
        check(mt is None or mt > 0, f"Lamb: max_trust must be > 0 or None, got {mt}")

    def _main_step(self, group: dict) -> None:
        kw = dict(lr=float(group["lr"]), betas=group["betas"], eps=group["eps"],
                  weight_decay=group["weight_decay"], max_trust=group["max_trust"])
        for p, g in grads_of(group, "Lamb"):
            lamb_update(p, g, self.state[p], **kw)

    def _main_step_bound(self, p: Tensor, group: dict) -> tuple[float, float]:
        # ratio ≤ ‖w‖/‖r‖ ⇒ ‖U‖_F = lr·ratio·‖r‖ ≤ lr·‖w‖_F ≥ σ_max(U). The decay is inside r.
        # With w = 0 the ratio is 1 and nothing bounds r.
        # full(): float() of a DTensor's norm would give this rank's shard alone; the whole norm is a collective
        w = float(full(torch.linalg.vector_norm(p.detach().double())))
        return (float(group["lr"]) * w * (1 + 1e-6) if w > 0 else math.inf), 0.0


class ALTO(EAdaptor):
    """ALTO = E on Lamb. `preset` picks (alpha, beta1); explicit alpha/beta1 override it.

    Args: Lamb's (params, lr, betas, eps, weight_decay, max_trust), plus
        preset: "large_batch" (default: alpha −5, beta1 0.99) or "small_batch" (0.5, 0.01).
        alpha, beta1: the E parameters (default: from the preset).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, max_trust: float | None = 10.0,
                 preset: str = "large_batch", alpha: float | None = None, beta1: float | None = None) -> None:
        if preset not in E_PRESETS:
            raise ValueError(f"ALTO: unknown preset {preset!r}; use one of {sorted(E_PRESETS)}")
        e = E_PRESETS[preset]
        base = Lamb(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_trust=max_trust)
        super().__init__(base, alpha=e["alpha"] if alpha is None else alpha,
                         beta1=e["beta1"] if beta1 is None else beta1)
