"""Muon: momentum → Newton–Schulz orthogonalization → shape-aware scale → decoupled weight decay.

Configured like `torch.optim.Muon` (same lr, weight_decay, momentum, nesterov, ns_coefficients,
ns_steps, eps and adjust_lr_fn=None/"original"/"match_rms_adamw") and with ns_method="standard" this
follows torch's trajectory bit for bit: the momentum uses torch's `lerp` form and
`spectral.orthogonalize` runs the same bf16 fused `addmm` iteration as torch's
`_zeropower_via_newtonschulz`. The default ns_method="auto" runs the same polynomials in Gram space
for matrices with aspect ratio ≳ 3 (fewer flops; equal up to rounding) where the Gram iteration runs
in float16 or float32 (CUDA, or ns_dtype=float32); with the CPU's bf16 plan it stays standard, because
the bf16 Gram output can pass `step_bound` (`spectral.newton_schulz.auto_picks_gram`).

On top of that it knows how large its update can be (`step_bound`), which the soft cap's
coupling needs: the orthogonalized matrix has singular values p_K∘…∘p_1(x) for inputs x ∈ [0, 1]
(the input is divided by its Frobenius norm, which is ≥ σ_max), so lr · scale · max|p_K∘…∘p_1|
bounds σ_max of the update.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..sharding import local_part, mesh_shards, sharded_map
from ..spectral import CLASSIC, Schedule, coefficient_schedule, orthogonalize
from ._common import CompanionOptimizer, check, check_beta, check_common, grads_of, tensors_of

SCALE_RULES = ("rms", "original", "match_rms_adamw")

# Inputs to the polynomial are σ/‖X‖_F ≤ 1 in exact arithmetic; a bf16 norm can round low by
# ~2⁻⁹, so the bound takes the maximum over [0, 1.02] instead.
GAIN_X_MAX = 1.02
# Multiplicative margin for bf16 rounding inside the iteration (each product is rounded to 8 bits
# of mantissa, ~0.4% per step); checked against exact SVDs of real updates in tests/test_optim.py.
GAIN_MARGIN = 1.05


def update_scale(shape: Sequence[int], rule: str | None) -> float:
    """Factor applied to lr for an orthogonalized update of a (rows, cols) matrix.

    "rms" (default): √(rows/cols) = √(d_out/d_in), so a semi-orthogonal update has RMS→RMS norm
    exactly 1 and lr *is* the step in the norm the caps use. "original" / None: Keller Jordan's
    √max(1, rows/cols) (torch's default). "match_rms_adamw": Moonshot's 0.2·√max(rows, cols).
    """
    rows, cols = shape[0], shape[1]
    if rule == "rms":
        return math.sqrt(rows / cols)
    if rule is None or rule == "original":
        return math.sqrt(max(1.0, rows / cols))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown adjust_lr_fn {rule!r}; use one of {SCALE_RULES} (None = 'original')")


@lru_cache(maxsize=256)
def _gain(schedule: tuple[tuple[float, float, float], ...], points: int) -> float:
    x = torch.linspace(0.0, GAIN_X_MAX, points, dtype=torch.float64)
    y, dy = x, torch.ones_like(x)
    for a, b, c in schedule:
        y2 = y * y
        dy = dy * (a + 3.0 * b * y2 + 5.0 * c * y2 * y2)  # chain rule: |p'| bounds the grid gap
        y = y * (a + b * y2 + c * y2 * y2)
    h = GAIN_X_MAX / (points - 1)
    # Between grid points |p| can exceed the sampled maximum by at most sup|p'|·h/2.
    return float(y.abs().max() + dy.abs().max() * h / 2.0) * GAIN_MARGIN


def schedule_gain(coefficients: Schedule, steps: int, points: int = 1 << 17) -> float:
    """Upper bound on every singular value `orthogonalize(·, steps, coefficients)` can output.

    max over x ∈ [0, 1.02] of |p_K∘…∘p_1(x)| on a fine float64 grid, plus sup|p'|·h/2 for what
    the grid can miss, times 1.05 for bf16 rounding. Classic 5 steps: ≈ 1.26.
    """
    schedule = tuple(tuple(float(v) for v in c) for c in coefficient_schedule(coefficients, steps))
    return _gain(schedule, points)


def muon_update(p: Tensor, grad: Tensor, buf: Tensor, *, lr: float, weight_decay: float,
                momentum: float, nesterov: bool, ns_coefficients: Schedule, ns_steps: int,
                eps: float, adjust_lr_fn: str | None, ns_dtype: torch.dtype | None,
                preprocess=None, ns_method: str = "auto") -> None:
    """One Muon step for one matrix, in place. `preprocess` (ROOT) acts on the momentum first."""
    update = muon_momentum(grad, buf, momentum=momentum, nesterov=nesterov)
    update = muon_orthogonalize(update, ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps,
                                ns_dtype=ns_dtype, preprocess=preprocess, ns_method=ns_method)
    muon_apply(p, update, lr=lr, weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn)


# The three stages of `muon_update`, separate so the sharded path (`Muon(distributed=True)`) runs
# the same arithmetic: momentum on every rank, orthogonalization on the owner, apply on every rank.

def muon_momentum(grad: Tensor, buf: Tensor, *, momentum: float, nesterov: bool) -> Tensor:
    """Update the momentum buffer in place; return the matrix to orthogonalize."""
    buf.lerp_(grad, 1.0 - momentum)  # EMA form, as torch; NS is scale-invariant anyway
    return grad.lerp(buf, momentum) if nesterov else buf


def muon_orthogonalize(update: Tensor, *, ns_coefficients: Schedule, ns_steps: int, eps: float,
                       ns_dtype: torch.dtype | None, preprocess=None, ns_method: str = "auto") -> Tensor:
    if preprocess is not None:
        update = preprocess(update)
    return orthogonalize(update, ns_steps, ns_coefficients, dtype=ns_dtype, eps=eps, method=ns_method)


def muon_apply(p: Tensor, update: Tensor, *, lr: float, weight_decay: float, adjust_lr_fn: str | None) -> None:
    p.mul_(1.0 - lr * weight_decay)
    p.add_(update, alpha=-lr * update_scale(p.shape, adjust_lr_fn))


def muon_defaults(lr, weight_decay, momentum, nesterov, ns_coefficients, ns_steps, eps, adjust_lr_fn,
                  ns_dtype, ns_method="auto") -> dict:
    return dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps, adjust_lr_fn=adjust_lr_fn,
                ns_dtype=ns_dtype, ns_method=ns_method)


class Muon(CompanionOptimizer):
    """Muon for 2-D weights, with an AdamW / column-normalized companion for everything else.

    Args:
        params: tensors or param groups. Groups default to ``algorithm="muon"`` (2-D tensors
            only); groups with ``algorithm="adamw"`` or ``"colnorm"`` get the companion update
            (see `lipformer.optim._common`).
        lr: learning rate (default 0.02, Keller Jordan's). With the default "rms" scale this is
            the RMS→RMS norm of the update, up to the orthogonalizer's σ spread.
        weight_decay: decoupled, W ← W(1 − lr·wd) (default 0: the projection step bounds weights).
        momentum: EMA coefficient of the momentum buffer (default 0.95).
        nesterov: use g.lerp(buf, momentum) instead of buf (default True).
        ns_coefficients: "classic", "polar_express", one (a, b, c), or a per-step list
            (default CLASSIC = (3.4445, −4.7750, 2.0315), torch's default).
        ns_steps: Newton–Schulz steps (default 5).
        eps: floor of the Frobenius norm in the normalization (default 1e-7, as torch).
        adjust_lr_fn: update scale rule: "rms" (default, √(d_out/d_in)), "original" or None
            (torch: √max(1, rows/cols)), "match_rms_adamw" (0.2·√max(rows, cols)).
        ns_dtype: dtype of the iteration (default bfloat16, as torch; None = the param's).
        ns_method: "auto" (default: the Gram-space iteration where it takes fewer flops, i.e.
            aspect ratio ≳ 3, unless it would run in bf16, i.e. on CPU), "gram" (opts in there too,
            at the cost of `step_bound`'s guarantee with Polar Express) or "standard" (torch's
            arithmetic: with CLASSIC coefficients the trajectory is torch.optim.Muon's bit for
            bit). See `lipformer.spectral.orthogonalize`.
        distributed: shard the orthogonalization across the ranks of `process_group`. None
            (default): on when a torch.distributed group with more than one rank is initialized at
            step time; True: required (error without a group); False: never. See below.
        process_group: the group to shard across (default: the world). Neither applies to
            DTensor parameters (FSDP2), which always shard over their own device mesh.

    Sharded orthogonalization (DDP): every rank holds the same averaged gradients, so every rank
    updates every momentum buffer identically (the state dict stays complete on each rank). The
    matrices of a group are dealt round-robin to the ranks in their group order; a rank runs
    Newton–Schulz only on its own, and the results are all-gathered (flattened, padded to the
    largest of each round of `world` matrices) so every rank applies the same updates. Each matrix
    sees exactly the arithmetic of the unsharded path, so the result is bit-identical to it; the
    Newton–Schulz work per rank drops by the world size. Every rank must call `step()` (it is a
    collective) with the same gradients present.

    FSDP2 (DTensor parameters, each rank holding a block of rows): Newton–Schulz of a block is not
    the block of Newton–Schulz, so the full matrix is needed. The momentum stays sharded like its
    parameter; the same round-robin runs on each full momentum (`lipformer.sharding.sharded_map`
    gathers it), and every rank applies only its own rows of the update. The update of each matrix
    is the unsharded path's arithmetic on the full matrix.
    """

    algorithm = "muon"
    _fitted_ok = False  # ROOT accepts ns_coefficients="fitted"
    # Class-level defaults so subclasses with their own __init__ (ROOT) shard automatically too.
    # Instance attributes, not param-group keys: a loaded state dict never switches sharding.
    distributed: bool | None = None
    process_group = None

    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: Schedule = CLASSIC, ns_steps: int = 5,
                 eps: float = 1e-7, adjust_lr_fn: str | None = "rms",
                 ns_dtype: torch.dtype | None = torch.bfloat16, distributed: bool | None = None,
                 process_group=None, ns_method: str = "auto") -> None:
        check(distributed in (None, True, False),
              f"{type(self).__name__}: distributed must be None, True or False, got {distributed!r}")
        super().__init__(params, muon_defaults(lr, weight_decay, momentum, nesterov, ns_coefficients,
                                               ns_steps, eps, adjust_lr_fn, ns_dtype, ns_method))
        self.distributed = distributed
        self.process_group = process_group

    def _check_main_group(self, group: dict) -> None:
        name = type(self).__name__
        check_common(name, group["lr"], group["weight_decay"])
        check_beta(name, "momentum", group["momentum"])
        check(isinstance(group["ns_steps"], int) and 1 <= group["ns_steps"] < 100,
              f"{name}: ns_steps must be an integer in [1, 100), got {group['ns_steps']}")
        check(group["eps"] > 0, f"{name}: eps must be > 0, got {group['eps']}")
        check(group.get("ns_method", "auto") in ("auto", "gram", "standard"),
              f"{name}: ns_method must be 'auto', 'gram' or 'standard', got {group.get('ns_method')!r}")
        check(group["adjust_lr_fn"] is None or group["adjust_lr_fn"] in SCALE_RULES,
              f"{name}: adjust_lr_fn must be one of {SCALE_RULES} or None, got {group['adjust_lr_fn']!r}")
        if not (self._fitted_ok and group["ns_coefficients"] == "fitted"):
            coefficient_schedule(group["ns_coefficients"], group["ns_steps"])  # raises if malformed
        for p in tensors_of(group):
            check(p.ndim == 2, f"{name} updates 2-D matrices only, got a parameter of shape "
                               f"{tuple(p.shape)}; put it in a group with algorithm='adamw' or 'colnorm'")

    # Hooks for ROOT: which coefficients a matrix gets, and what happens to the momentum first.
    def _coefficients(self, p: Tensor, group: dict) -> Schedule:
        return group["ns_coefficients"]

    def _preprocess(self, group: dict):
        return None

    def _shards(self, params: list[Tensor]):
        """(rank, world, process group) the orthogonalization is sharded over; None when it is not.

        DTensor parameters (FSDP2) always shard over their device mesh, whatever `distributed` says:
        their full matrices must be gathered anyway, and that is a collective.
        """
        mesh = mesh_shards(params, type(self).__name__)
        if mesh is not None:
            return mesh
        if self.distributed is False:
            return None
        ready = dist.is_available() and dist.is_initialized()
        if not ready:
            if self.distributed:
                raise RuntimeError(f"{type(self).__name__}(distributed=True) needs an initialized "
                                   "torch.distributed process group (torch.distributed.init_process_group)")
            return None
        world = dist.get_world_size(self.process_group)
        return (dist.get_rank(self.process_group), world, self.process_group) if world > 1 else None

    def _main_step(self, group: dict) -> None:
        pre = self._preprocess(group)
        pairs = grads_of(group, type(self).__name__)
        shards = self._shards([p for p, _ in pairs])
        if shards is not None:
            self._sharded_step(group, pairs, pre, *shards)
            return
        for p, g in pairs:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            muon_update(p, g, state["momentum_buffer"], lr=float(group["lr"]),
                        weight_decay=group["weight_decay"], momentum=group["momentum"],
                        nesterov=group["nesterov"], ns_coefficients=self._coefficients(p, group),
                        ns_steps=group["ns_steps"], eps=group["eps"],
                        adjust_lr_fn=group["adjust_lr_fn"], ns_dtype=group["ns_dtype"], preprocess=pre,
                        ns_method=group.get("ns_method", "auto"))

    def _sharded_step(self, group: dict, pairs: list[tuple[Tensor, Tensor]], pre, rank: int, world: int,
                      process_group) -> None:
        """`muon_update` for every pair, with each matrix orthogonalized on rank (index % world) only."""
        inputs = []
        for p, g in pairs:  # every rank: the momentum (DDP: identical everywhere; FSDP2: this rank's rows)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            inputs.append(muon_momentum(g, state["momentum_buffer"], momentum=group["momentum"],
                                        nesterov=group["nesterov"]))

        def orthogonalize_one(i: int, whole: Tensor) -> Tensor:  # on the owner, on the full matrix
            return muon_orthogonalize(whole, ns_coefficients=self._coefficients(pairs[i][0], group),
                                      ns_steps=group["ns_steps"], eps=group["eps"], ns_dtype=group["ns_dtype"],
                                      preprocess=pre, ns_method=group.get("ns_method", "auto"))

        lr = float(group["lr"])
        for i, update in sharded_map(orthogonalize_one, inputs, rank, world, process_group):
            p = pairs[i][0]
            muon_apply(p, local_part(update, p), lr=lr, weight_decay=group["weight_decay"],
                       adjust_lr_fn=group["adjust_lr_fn"])

    def _main_step_bound(self, p: Tensor, group: dict) -> tuple[float, float]:
        lr = float(group["lr"])
        gain = schedule_gain(self._coefficients(p, group), group["ns_steps"])
        return lr * update_scale(p.shape, group["adjust_lr_fn"]) * gain, lr * group["weight_decay"]
