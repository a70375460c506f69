"""The global certificate's arithmetic: the float64 copy, head margins and the radius from L_body.

For a prediction y = argmax z_t, any exact hidden state within ℓ2 distance
min_{j≠y} (w_y − w_j)·h / ‖w_y − w_j‖₂ of h still predicts y; dividing by √d·L_body turns that into
a radius on inputs_embeds (docs/lipschitz.md §6). Margins are computed in float64 from head-row
differences and lowered by bounds on their own rounding and on the float64 evaluation error of h
(§6a). Both the global and the local certificate (`local_certify`) end here.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from . import spectral
from .modeling import LipformerForCausalLM
from .nn import ModelBound


def float64_copy(model: LipformerForCausalLM) -> LipformerForCausalLM:
    """Certification runs on a float64 copy: margins and bounds are not limited by bf16/fp32."""
    return copy.deepcopy(model).to(torch.float64).eval()


def require_float64(model: LipformerForCausalLM) -> None:
    """Radii are only sound on a float64 evaluation (the rounding bounds of §6a are float64's)."""
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float64})
    if bad:
        raise ValueError(f"certification needs the float64 copy of the model (it has {', '.join(bad)} "
                         "weights): pass certify.float64_copy(model)")


@torch.no_grad()
def head_margins(hidden: Tensor, head_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(prediction, margin, distance) per row of the float64 final hidden states (T, d).

    distance = min_{j≠y} [(w_y − w_j)·ĥ − rounding] / ‖w_y − w_j‖ is a guaranteed lower bound on the
    ℓ2 distance from ĥ to the nearest hidden state where class j could beat y (docs/lipschitz.md §6):
    any exact h with ‖h − ĥ‖₂ < distance predicts y. Margins are formed from the difference of head
    rows, so nearly equal rows cannot turn the rounding of two large logits into a large distance.
    """
    if hidden.dtype != torch.float64 or head_weight.dtype != torch.float64:
        raise ValueError("radii_from_hidden needs float64 hidden states and head weights")
    h, W = hidden.reshape(-1, hidden.size(-1)), head_weight
    d = W.size(1)
    gamma = spectral.gamma(d + 4)
    # products that underflow lose ≤ 2⁻¹⁰⁷⁵ each (sums of subnormals are exact): an absolute term
    underflow = 2.0 * (d + 2) * 2.0**-1074
    pred = (h @ W.mT).argmax(-1)
    h_norm = spectral.row_norm_upper(h)                     # norms that neither under- nor overflow
    margin = torch.empty(h.size(0), dtype=torch.float64)
    distance = torch.empty(h.size(0), dtype=torch.float64)
    for y in pred.unique():                                  # one table of w_y − w_j per prediction
        rows = (pred == y).nonzero()[:, 0]
        D = W[y] - W                                         # (V, d); each entry within u of exact
        dist = spectral.row_norm_upper(D) * (1 + 2 * gamma)  # ≥ ‖w_y − w_j‖₂ (D̂ within u of exact)
        m = h[rows] @ D.mT                                   # (rows, V): z_y − z_j
        # |fl(D·h) − (w_y − w_j)·h| ≤ (γ_d + 2u)·‖D‖‖h‖ (dot product, and D's own rounding)
        low = m - 2 * gamma * h_norm[rows, None] * dist - underflow
        quotient = (low / dist) * (1 - 1e-12)
        quotient[:, dist == 0] = -math.inf   # a duplicate head row: a tie no radius can protect
        quotient[:, y] = math.inf
        distance[rows] = torch.nan_to_num(quotient.amin(-1), nan=-math.inf)  # NaN: no claim
        m[:, y] = math.inf
        margin[rows] = m.amin(-1)
    return pred, margin, distance


@torch.no_grad()
def radii_from_hidden(hidden: Tensor, head_weight: Tensor, bounds: ModelBound) -> tuple[Tensor, Tensor, Tensor]:
    """(prediction, margin, radius) per row of the float64 final hidden states (T, d).

    radius = min_{j≠y} [((w_y − w_j)·h − rounding) / ‖w_y − w_j‖ − √d·e_h] / (√d · L_body), ≥ 0,
    with e_h = `bounds.hidden_error` (docs/lipschitz.md §6–6a).
    """
    pred, margin, distance = head_margins(hidden, head_weight)
    root_d = math.sqrt(head_weight.size(1))
    slack = root_d * bounds.hidden_error * (1 + 1e-12)  # ‖h − h_exact‖₂ ≤ √d·e_h
    radius = ((distance * (1 - 1e-12) - slack).clamp(min=0) / (root_d * bounds.body)) * (1 - 1e-12)
    return pred, margin, torch.nan_to_num(radius, nan=0.0)   # NaN (overflowed bounds): no claim
