"""Certificates for a language model: global bounds, per-position certified radii, and attacks.

A position t with prediction y = argmax z_t is certified at radius ε when no perturbation Δ of
`inputs_embeds` with max_t′ rms(Δ_t′) ≤ ε can change the argmax (docs/lipschitz.md §6):

    radius_t = min_{j≠y} (z_y − z_j) / (‖w_y − w_j‖₂ · √d · L_body).

Margins are computed in float64 as (w_y − w_j)·h from the hidden state h, and lowered by bounds on
the rounding of that product and on the float64 evaluation error of h itself (docs/lipschitz.md
§6a), so the radius is a guarantee about the exact function, not only about one floating-point
evaluation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from . import linear_certify
from .local_certify import local_radii
from .margins import float64_copy, head_margins, radii_from_hidden, require_float64  # noqa: F401 (public here)
from .modeling import LipformerForCausalLM
from .nn import ModelBound, project_to_ball

DEFAULT_RADII = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class PositionCertificate:
    index: int          # position in the token sequence
    token: int          # the input token at this position
    prediction: int     # argmax of the logits here (the predicted next token)
    margin: float       # z_y − max_{j≠y} z_j
    radius: float       # certified radius in max-rms units of inputs_embeds (the best sound one)
    radius_local: float | None = None    # from the local bound (docs/lipschitz.md §9); None: not computed
    radius_global: float | None = None   # from the global bound L_body (§6)
    radius_linear: float | None = None   # from the linear relaxation (§10; position-only maxmin models)


METHODS = ("best", "local", "global", "linear")


@torch.no_grad()
def certify_tokens(model: LipformerForCausalLM, ids: list[int], bounds: ModelBound | None = None,
                   method: str = "best") -> list[PositionCertificate]:
    """Certify every position of a token sequence, from one forward pass over the whole of it.

    The predictions are exactly those of `model(ids)`: no windows, whatever the length (the model
    has no position limit). `model` must be the float64 copy (see `float64_copy`); `bounds` its
    bounds for at least len(ids) positions (default: computed for this length, §6a). `method`:
    "global" (the radius from L_body), "local" (from the local bound around this input,
    docs/lipschitz.md §9), "linear" (the linear relaxation, §10: position-only maxmin models only;
    it starts from the global radius) or "best" (the largest of those that apply: all are sound).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    require_float64(model)
    bounds = bounds or model.bounds(positions=len(ids))
    if bounds.positions < len(ids):
        raise ValueError(f"the bounds cover {bounds.positions} positions, the text has {len(ids)}: "
                         "pass model.bounds(positions=len(ids))")
    ids_t = torch.tensor([ids])
    hidden = model.model(ids_t, use_cache=False).last_hidden_state[0]
    pred, margin, glob = radii_from_hidden(hidden, model.head.weight, bounds)
    local = _local_radii(model, ids_t, bounds, pred) if method in ("best", "local") else [None] * len(ids)
    lin = [None] * len(ids)
    if method == "linear" or (method == "best" and linear_certify.unsupported(model) is None):
        start = glob if method == "linear" else torch.maximum(glob, torch.as_tensor(local, dtype=torch.float64))
        lin_pred, radius = linear_certify.linear_radii(model, ids_t, start)
        lin = torch.where(lin_pred == pred, radius, torch.zeros_like(radius))   # same forward: a bug otherwise
    out: list[PositionCertificate] = []
    for i in range(len(ids)):
        g, l = float(glob[i]), None if local[i] is None else float(local[i])
        r = None if lin[i] is None else float(lin[i])
        best = {"global": g, "local": l, "linear": r, "best": max(v for v in (g, l, r) if v is not None)}[method]
        out.append(PositionCertificate(i, ids[i], int(pred[i]), float(margin[i]), best, l, g, r))
    return out


def _local_radii(model, piece: Tensor, bounds: ModelBound, pred: Tensor) -> Tensor:
    local_pred, _, radius = local_radii(model, piece, bounds)
    # both come from the same forward; a differing argmax would be a bug, and is no claim at all
    return torch.where(local_pred == pred, radius, torch.zeros_like(radius))


def certified_fractions(certs: list[PositionCertificate], radii=DEFAULT_RADII,
                        targets: list[int] | None = None) -> dict[str, float]:
    """Fraction of positions certified at each radius; with `targets`, certified *and* correct."""
    n = max(1, len(certs))
    result = {}
    for r in radii:
        ok = [c.radius >= r and (targets is None or c.prediction == targets[k]) for k, c in enumerate(certs)]
        result[f"{r:g}"] = sum(ok) / n
    return result


def attack(model: LipformerForCausalLM, ids: list[int], certs: list[PositionCertificate],
           steps: int = 40, max_positions: int = 16, seed: int = 0) -> dict:
    """Projected-gradient attack on inputs_embeds inside each position's certified radius.

    One copy of the sequence per attacked position, each with its own radius; the attack
    maximizes the best wrong logit minus the predicted one at that position. A certificate that
    holds has zero violations; `closest` is the smallest margin left, relative to the original;
    `flipped` lists the attacked positions whose prediction the attack changed (or tied).
    """
    # the model is causal: the first `chunk` positions' logits are those of the whole text
    chunk = model.config.max_position_embeddings
    targets = [c for c in certs if c.radius > 0 and c.index < chunk][:max_positions]
    if not targets:
        return {"attacked": 0, "violations": 0, "closest": None, "flipped": []}
    g = torch.Generator().manual_seed(seed)
    base = model.model.embed(torch.tensor([ids[:chunk]])).detach()
    P = len(targets)
    x0 = base.expand(P, -1, -1).clone()
    eps = torch.tensor([c.radius for c in targets], dtype=x0.dtype)[:, None, None]
    rows, pos = torch.arange(P), torch.tensor([c.index for c in targets])
    pred = torch.tensor([c.prediction for c in targets])

    def project(delta: Tensor) -> Tensor:  # onto {max_t rms(δ_t) ≤ ε}
        return project_to_ball(delta, eps)

    def worst_gap(delta: Tensor) -> Tensor:  # max_{j≠y} z_j − z_y at each attacked position
        z = model(inputs_embeds=x0 + delta, use_cache=False).logits[rows, pos]
        top = z.gather(-1, pred[:, None])[:, 0]
        return z.scatter(-1, pred[:, None], -math.inf).amax(-1) - top

    delta = project(torch.randn(x0.shape, generator=g, dtype=x0.dtype) * eps)
    initial = -worst_gap(torch.zeros_like(x0)).detach()
    best = worst_gap(delta).detach()
    step = eps / 4
    with torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            gap = worst_gap(delta)
            (grad,) = torch.autograd.grad(gap.sum(), delta)
            best = torch.maximum(best, gap.detach())
            direction = grad / grad.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-30)
            delta = project(delta.detach() + step * direction)  # steepest ascent in max-rms
    best = torch.maximum(best, worst_gap(delta).detach())
    return {"attacked": P, "violations": int((best >= 0).sum()),
            "closest": float((-best / initial.clamp(min=1e-30)).min()), "flipped": pos[best >= 0].tolist()}


def certificate_json(bounds: ModelBound, certs: list[PositionCertificate] | None = None,
                     radii=DEFAULT_RADII) -> dict:
    out = bounds.to_json()
    if certs is not None:
        out["positions"] = [asdict(c) for c in certs]
        out["certified_fraction"] = certified_fractions(certs, radii)
    return out
