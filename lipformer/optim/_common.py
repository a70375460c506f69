"""Shared machinery: argument checks and the companion algorithms for non-matrix parameters.

Every lipformer optimizer is one `torch.optim.Optimizer` whose param groups carry an
`algorithm` key. Groups with the optimizer's own algorithm (e.g. "muon") get its update; groups
with a *companion* algorithm get one of the updates below. Keeping both inside one object means
one `state_dict`, one `zero_grad`, and one LR scheduler drive the whole model.

Companions:

* ``"adamw"``: AdamW exactly as `torch.optim.AdamW` computes it (single-tensor path, same
  operation order, so the two agree bit for bit). Defaults: lr 1e-3, betas (0.9, 0.999),
  eps 1e-8, weight_decay 0.
* ``"colnorm"``: modula's update for embeddings. Each token vector (last dimension) of the
  momentum is normalized to unit RMS and the parameter moves by lr times that, so every token seen
  moves by exactly `lr` in RMS, regardless of how often it occurs. Tokens whose momentum is zero do
  not move. Defaults: lr 1e-2, momentum 0.9 (EMA), eps 1e-8, weight_decay 0.

A companion group without its own `lr` takes the companion's default, not the main algorithm's:
matrix learning rates (Muon's 0.02) are on a different scale from AdamW's.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

COMPANION_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "colnorm": {"lr": 1e-2, "momentum": 0.9, "eps": 1e-8, "weight_decay": 0.0},
}
COMPANIONS = tuple(COMPANION_DEFAULTS)


def check(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless ok: keeps argument validation one line per rule."""
    if not ok:
        raise ValueError(message)


def check_common(name: str, lr: float, weight_decay: float) -> None:
    check(not isinstance(lr, Tensor) or lr.numel() == 1, f"{name}: a tensor lr must have one element")
    check(math.isfinite(float(lr)) and float(lr) >= 0.0, f"{name}: lr must be a finite number >= 0, got {lr}")
    check(math.isfinite(weight_decay) and weight_decay >= 0.0,
          f"{name}: weight_decay must be a finite number >= 0, got {weight_decay}")


def check_beta(name: str, what: str, beta: float) -> None:
    check(0.0 <= beta < 1.0, f"{name}: {what} must be in [0, 1), got {beta}")


def _check_companion_group(group: dict) -> None:
    alg = group["algorithm"]
    check_common(alg, group["lr"], group["weight_decay"])
    check(group["eps"] >= 0.0, f"{alg}: eps must be >= 0, got {group['eps']}")
    if alg == "adamw":
        betas = group["betas"]
        check(len(betas) == 2, f"adamw: betas must be a pair, got {betas}")
        check_beta("adamw", "betas[0]", betas[0])
        check_beta("adamw", "betas[1]", betas[1])
    else:
        check_beta("colnorm", "momentum", group["momentum"])


# ---------------------------------------------------------------------------------------------
# Functional companion updates (one tensor at a time; state is the optimizer's per-param dict)

def adam_moments(p: Tensor, grad: Tensor, state: dict, betas: tuple[float, float]) -> int:
    """Update Adam's first and second moments in place (torch's operation order); returns the step."""
    beta1, beta2 = betas
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    state["exp_avg"].lerp_(grad, 1.0 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    return state["step"]


def adamw_update(p: Tensor, grad: Tensor, state: dict, *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float) -> None:
    """One AdamW step, in torch.optim.AdamW's single-tensor operation order (bit parity)."""
    beta1, beta2 = betas
    p.mul_(1.0 - lr * weight_decay)  # decoupled: the decay never enters the moments
    step = adam_moments(p, grad, state, betas)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    step_size = lr / (1.0 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)


def colnorm_update(p: Tensor, grad: Tensor, state: dict, *, lr: float, momentum: float,
                   eps: float, weight_decay: float) -> None:
    """Move every token vector (last dim) by lr in RMS along its normalized momentum."""
    if momentum > 0.0:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1.0 - momentum)
        direction = buf
    else:
        direction = grad
    rows = direction.reshape(1, -1) if direction.ndim < 2 else direction
    rms = rows.pow(2).mean(-1, keepdim=True).sqrt()
    # An untouched row has rms 0 and stays 0 after the clamp: unseen tokens do not move.
    floor = eps if eps > 0 else torch.finfo(rows.dtype).tiny
    update = (rows / rms.clamp(min=floor)).reshape(p.shape)
    p.mul_(1.0 - lr * weight_decay)
    p.add_(update, alpha=-lr)


_COMPANION_UPDATES: dict[str, Callable[..., None]] = {"adamw": adamw_update, "colnorm": colnorm_update}
_COMPANION_KEYS = {"adamw": ("lr", "betas", "eps", "weight_decay"),
                   "colnorm": ("lr", "momentum", "eps", "weight_decay")}


def tensors_of(group: dict) -> list[Tensor]:
    """The group's tensors, also when params were given as (name, tensor) pairs."""
    return [p[1] if isinstance(p, tuple) else p for p in group["params"]]


def grads_of(group: dict, name: str) -> list[tuple[Tensor, Tensor]]:
    """(param, grad) pairs of a group, skipping params without a gradient; rejects sparse/complex."""
    out = []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if torch.is_complex(p):
            raise RuntimeError(f"{name} does not support complex parameters")
        out.append((p, p.grad))
    return out


class CompanionOptimizer(Optimizer):
    """Base class: routes each param group to the main algorithm or to a companion.

    Subclasses set `algorithm` (the name their groups carry), implement `_main_step(group)` and,
    where they can bound their update, `_main_step_bound(p, group)`.
    """

    algorithm: str = ""

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        defaults = dict(defaults, algorithm=self.algorithm)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        alg = param_group.setdefault("algorithm", self.algorithm)
        if alg not in COMPANIONS and alg != self.algorithm:
            raise ValueError(f"{type(self).__name__}: param group algorithm {alg!r} is not one of "
                             f"{[self.algorithm, *COMPANIONS]}")
        params = param_group["params"]
        if isinstance(params, Tensor):
            param_group["params"] = [params]
        elif not isinstance(params, set):  # torch's own check rejects sets below
            param_group["params"] = list(params)
        # Companion defaults first, so the main algorithm's lr/eps/decay do not leak into them;
        # then everything is filled and validated *before* the group is registered.
        for key, value in COMPANION_DEFAULTS.get(alg, {}).items():
            param_group.setdefault(key, value)
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        if alg in COMPANIONS:
            _check_companion_group(param_group)
        else:
            self._check_main_group(param_group)
        super().add_param_group(param_group)

    def _check_main_group(self, group: dict) -> None:
        """Validate a main-algorithm group after defaults are filled in (subclasses extend)."""

    def _main_step(self, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):  # type: ignore[override]
        """Perform one optimization step on every group; returns closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            alg = group["algorithm"]
            if alg in COMPANIONS:
                update = _COMPANION_UPDATES[alg]
                kw = {k: group[k] for k in _COMPANION_KEYS[alg]}
                kw["lr"] = float(kw["lr"])
                for p, g in grads_of(group, alg):
                    update(p, g, self.state[p], **kw)
            else:
                self._main_step(group)
        return loss

    def group_of(self, p: Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("step_bound: the tensor is not a parameter of this optimizer")

    def step_bound(self, p: Tensor) -> tuple[float, float]:
        """(max_update_norm, decay) with W_new = (1 − decay)·W_old + U and σ_max(U) ≤ max_update_norm.

        Raw σ units of p, for the *next* step at the groups' current lr. `math.inf` means the
        algorithm has no a-priori bound on its update (AdamW, l_p descent). For a DTensor p (FSDP2)
        it is the whole matrix's bound, and every rank must ask (Lamb's gathers a norm).
        """
        group = self.group_of(p)
        lr = float(group["lr"])
        if group["algorithm"] == "colnorm":
            # every row moves by ≤ lr in RMS, so ‖U‖_F ≤ lr·√numel bounds σ_max(U)
            return lr * math.sqrt(p.numel()), lr * group["weight_decay"]
        if group["algorithm"] == "adamw":
            return math.inf, lr * group["weight_decay"]
        return self._main_step_bound(p, group)

    def _main_step_bound(self, p: Tensor, group: dict) -> tuple[float, float]:
        return math.inf, float(group["lr"]) * group.get("weight_decay", 0.0)
