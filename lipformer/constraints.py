"""The projection step: after every `optimizer.step()`, put each constrained weight back under its cap.

    project = SpectralProjection(model, optimizer)    # reads model.config.constraint / cap_method
    loss.backward(); optimizer.step(); project()

Each constrained module projects itself (`module.project(cap)`, modula's idea): a dense matrix
applies the cap to its weight at its own `sigma_cap`, the embedding clips its rows, a POET layer caps
W0 right after a merge. This step only chooses the cap (the constraint) and supplies it, so a
per-kind `w_max` is honoured everywhere and no module needs a flag. The certificate never trusts
this step: it measures the weights afterwards (`sigma_upper`).
Weights sharded by FSDP2 (DTensors) are capped as whole matrices: each on one rank, every rank
keeping its own rows (`lipformer.sharding`); the call is then a collective.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from . import sharding, spectral
from .config import CAP_METHODS, CONSTRAINTS
from .nn import CappedLinear, MaxRMSEmbedding, SpectralLinear


class SpectralProjection:
    """Applies one constraint to every capped weight of a model.

    constraint: "hard_cap" (σ ↦ min(σ, cap) by `method` auto/eigh/polar/svd/poly), "soft_cap" (α coupled to
    the step so σ ≤ cap is guaranteed), "normalize" (W / max(1, σ̄/cap), σ̄ sound), "hammer" (top σ
    set to the cap), "spectral_wd" (W − λσ₁u₁v₁ᵀ), or "none". Defaults come from model.config.

    For the soft cap the step size comes from `optimizer.step_bound(p) -> (max_update_norm, decay)`
    when the optimizer knows it (Muon, ROOT, Lamb, ALTO). Otherwise (no step_bound, or an
    infinite one as for AdamW and LPSGD) the weight's *measured* sound σ
    after the step is used as k — also a guarantee, at the cost of one σ bound per step. If the
    step is too large for any soft cap (k > 1.30·cap) that weight is hard-capped instead.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 constraint: str | None = None, method: str | None = None, spectral_wd: float = 0.1):
        config = getattr(model, "config", None)
        self.constraint = constraint or getattr(config, "constraint", "hard_cap")
        self.method = method or getattr(config, "cap_method", "auto")
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {self.constraint!r}")
        if self.method not in CAP_METHODS:
            raise ValueError(f"cap method must be one of {CAP_METHODS}, got {self.method!r}")
        if not 0 <= spectral_wd < 1:
            raise ValueError(f"spectral_wd must be in [0, 1), got {spectral_wd}")
        self.optimizer = optimizer
        self.spectral_wd = spectral_wd
        self.modules = [m for m in model.modules() if isinstance(m, (SpectralLinear, MaxRMSEmbedding))]
        self._warned = False

    @torch.no_grad()
    def __call__(self) -> None:
        if self.constraint == "none":
            return
        dense = [m for m in self.modules if isinstance(m, CappedLinear)]
        # FSDP2: a cap of a block of rows is not the block of the capped matrix. Each full matrix is
        # capped on one rank (round-robin), every rank receives every result, and each dense module
        # then projects itself with the precomputed matrix (keeping its own rows of it).
        shards = sharding.mesh_shards([m.weight for m in dense], "SpectralProjection")
        if shards is None:
            for module in self.modules:
                module.project(self.cap)
            return
        # Every rank asks for the soft cap's step bounds before any work is dealt out: for a DTensor a
        # bound may be a collective (Lamb's weight norm).
        steps = [self._step_bound(m.weight) for m in dense]
        capped = {}
        for i, W in sharding.sharded_map(lambda i, whole: self._project(whole, dense[i].sigma_cap, steps[i]),
                                         [m.weight for m in dense], *shards):
            capped[id(dense[i].weight)] = W
        for module in self.modules:
            module.project(lambda W, cap: sharding.local_part(capped[id(W)], W) if id(W) in capped
                           else self.cap(W, cap))

    def cap(self, W: torch.Tensor, sigma_cap: float) -> torch.Tensor:
        """W under σ_max ≤ sigma_cap by this step's constraint (what each module's `project` applies)."""
        return self._project(W, sigma_cap, self._step_bound(W))

    def _step_bound(self, W: torch.Tensor) -> tuple[float, float]:
        """(max_update_norm, decay) of the optimizer's next step on W, for the soft cap's α."""
        step_bound = getattr(self.optimizer, "step_bound", None)
        if self.constraint != "soft_cap" or step_bound is None or not isinstance(W, nn.Parameter):
            return math.inf, 0.0  # (a POET W0 is a buffer: the optimizer never stepped it)
        return step_bound(W)

    def _project(self, W: torch.Tensor, cap: float, step: tuple[float, float]) -> torch.Tensor:
        if self.constraint == "hard_cap":
            return spectral.hard_cap(W, cap, self.method)
        if self.constraint == "normalize":
            return spectral.spectral_normalize(W, cap)
        if self.constraint == "hammer":
            return spectral.spectral_hammer(W, cap)
        if self.constraint == "spectral_wd":
            return spectral.spectral_weight_decay(W, self.spectral_wd)
        return self._soft_cap(W, cap, step)

    def _soft_cap(self, W: torch.Tensor, cap: float, step: tuple[float, float]) -> torch.Tensor:
        eta, decay = step
        try:
            if math.isfinite(eta):
                alpha = spectral.soft_cap_alpha(cap, eta, decay)
            else:  # the optimizer cannot bound its step (AdamW, LPSGD): measure where W landed
                alpha = spectral.soft_cap_alpha(cap, max(0.0, float(spectral.sigma_upper(W)) - cap))
        except ValueError as exc:
            if not self._warned:
                warnings.warn(f"soft cap: {exc}; hard-capping such weights instead", stacklevel=3)
                self._warned = True
            return spectral.hard_cap(W, cap, self.method)
        return spectral.soft_cap(W, alpha)
