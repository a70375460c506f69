"""Linear-relaxation certificates for position-only models (softmax scale 0, maxmin MLPs).

At softmax scale 0 every attention weight is softmax(b_h(t − s)) over the allowed keys: it depends
on positions only, so attention is a fixed linear map of the sequence. Residual mixes and matrices
are linear, and maxmin is (b + relu(a − b), a − relu(a − b)) on each pair (a, b). The body is then
piecewise linear with one ReLU per pair, and a lower bound on a margin's change over the whole
perturbation ball is one backward pass (the CROWN bound of Zhang et al. 2018, written here for the
norm max_s ‖δ_s‖₂ ≤ ε√d): a coefficient vector per source position goes back through each linear
map's transpose, through every pair whose order no perturbation in the ball can flip exactly, and
through the pairs that may flip by the triangle relaxation of the ReLU. At the input the worst
perturbation costs ε√d·Σ_s ‖Λ_s‖₂ (the dual norm). The module-wise bounds charge every layer its
worst case separately (the product of norms); this charges the product of the actual maps where
the ball cannot reorder a pair. On the trained `shakespeare-char` models about a fifth of the
positions get ×1.2–2.8 larger radii; the rest of the 2–3× that a first-order estimate promises is
lost to the pairs the per-token balls leave undecided (docs/lipschitz.md §10 has the proof, the
float64 accounting and where it is loose; docs/results.md the measurements). `refine=N` bounds
the pairs that cost a failing check the most by backward passes of their own (§10d).

What it costs: a backward pass per (position, competing class) — only for the classes the
module-wise certificate could not already rule out, most dangerous first — a few GFLOP per pair
at the `shakespeare-char` size. `certified_at` answers "is position t certified at ε" (what
certified accuracy needs); `linear_radii` searches each position's radius on a lattice.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import nn as lnn
from . import spectral
from .local_bounds import ROUND_UP, U, softmax_box
from .local_certify import CleanPass, clean_pass, final_radii
from .margins import require_float64

PAIRS_PER_PASS = 32            # (position, class) pairs in one batched backward pass
REFINE_PAIRS = 32              # default pairs refined per block and failing query (`refine_intervals`)


def unsupported(model) -> str | None:
    """Why the linear-relaxation certificate does not apply to this model (None: it does)."""
    c = model.config
    if c.softmax_scale != 0:
        return "attention depends on the input (softmax_scale > 0)"
    if c.activation != "maxmin":
        return "the MLP activation is not maxmin"
    return None


def _fro_upper(W: Tensor) -> float:
    return float(spectral.row_norm_upper(W.reshape(1, -1))[0])


def _rows(X: Tensor) -> Tensor:
    """Upper bounds on the ℓ2 norm of every vector along the last dimension."""
    return spectral.row_norm_upper(X)


@torch.no_grad()
def prepare(model, ids: Tensor) -> dict:
    """The ε-independent pieces for one sequence (1, T): the clean pass, each block's attention
    weights (with a bound on their float64 error) and MLP pre-activation pair differences, and
    the per-class clean margins at every position with their rounding (docs/lipschitz.md §10)."""
    require_float64(model)
    why = unsupported(model)
    if why:
        raise ValueError(f"the linear-relaxation certificate needs softmax_scale 0 and maxmin: {why}")
    clean = clean_pass(model, ids)
    T, d = clean.hidden.shape
    blocks = []
    with lnn.memoized_sigmas():
        for layer, (x_attn, x_mlp) in zip(model.model.layers, clean.inputs):
            att, mlp = layer.attn, layer.mlp
            H = att.heads
            bias = att.score_bias(torch.arange(T), T)
            scores = torch.zeros(H, T, T, dtype=torch.float64) if bias is None else bias.detach().double()
            center = torch.where(clean.allowed[None], scores, torch.full_like(scores, -math.inf))
            P = torch.softmax(center, -1)                                          # (H, T, T)
            low, up, eta = softmax_box(center, torch.zeros_like(center))
            off = torch.maximum(up * (1 + eta) - P, P - low * (1 - eta)).clamp(min=0)
            p_err = off.sum(-1).amax(-1) * ROUND_UP                                # (H,) ≥ max_t ‖P_t − P̂_t‖₁
            Wv, Wo, Win, Wout = (m.weight.detach() for m in (att.v, att.o, mlp.fc_in, mlp.fc_out))
            half = Win.size(0) // 2
            z = x_mlp @ Win.mT
            delta = z[:, :half] - z[:, half:]                                      # (T, half)
            wa, wb = Win[:half], Win[half:]
            pair_w = _rows(wa - wb) * (1 + 4 * U)                                  # ≥ ‖w_a − w_b‖₂
            ga = spectral.gamma(d + 2)
            noise = (ga * (_rows(wa) + _rows(wb))[None] * _rows(x_mlp)[:, None] + 2 * U * delta.abs()) * ROUND_UP
            blocks.append({
                "P": P, "p_err": p_err, "sv": lnn._sigma(att.v.weight, H), "so": float(lnn._sigma(Wo)),
                "s_in": float(lnn._sigma(Win)), "s_out": float(lnn._sigma(Wout)), "fro": {n: _fro_upper(W) for n, W in
                                                        (("o", Wo), ("v", Wv), ("in", Win), ("out", Wout))},
                "Wv": Wv, "Wo": Wo, "Win": Win, "Wout": Wout, "delta": delta, "pair_w": pair_w, "noise": noise,
            })
    W = model.head.weight.detach()
    pred = (clean.hidden @ W.mT).argmax(-1)
    D = W[pred][:, None, :] - W[None]                                              # (T, V, d) w_y − w_j
    dist = _rows(D) * (1 + 2 * spectral.gamma(d + 4))                              # ≥ ‖w_y − w_j‖₂
    m = (clean.hidden[:, None, :] * D).sum(-1)                                     # (T, V)
    rounding = 2 * spectral.gamma(d + 4) * _rows(clean.hidden)[:, None] * dist + 2.0 * (d + 2) * 2.0**-1074
    return {"clean": clean, "blocks": blocks, "pred": pred, "D": D, "dist": dist,
            "m_low": m - rounding, "alpha": model.config.residual_alpha, "d": d, "T": T}


def _radii(model, state: dict, eps: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor], Tensor]:
    """Module-wise ℓ2 radii around the computed activations for each trial ε and for ε = 0 (the
    float64 error alone): per sublayer input (K, T) and final (K, T), then the same at ε = 0."""
    record: list[Tensor] = []
    final = final_radii(model, state["clean"], torch.cat([eps, eps.new_zeros(1)]), record)
    return [r[:-1] for r in record], final[:-1], [r[-1] for r in record], final[-1]


def _pair_radius(B: dict, e: Tensor) -> Tensor:
    """(…, Tm, F/2): how far the exact pair differences can be from the computed δ̂ when the MLP's
    input at each position s < Tm is within ℓ2 radius e[..., s] of the computed one (§10a)."""
    return (B["pair_w"] * e[..., None] + B["noise"][:e.size(-1)]) * ROUND_UP


def _pair_relaxation(delta: Tensor, down: Tensor, up: Tensor, rad0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each ReLU r = relu(v) on a pair difference: the perturbed v′ lies in [l, u] = [δ̂ − down,
    δ̂ + up] and the clean v in δ̂ ± rad0. Returns (a, c_lo, s, c_up) with, for every such v′ and v,
        a(v′ − v) + c_lo ≤ relu(v′) − relu(v) ≤ s(v′ − v) + c_up      (docs/lipschitz.md §10b)."""
    lo, hi = delta - down, delta + up
    lo, hi = lo - 2 * U * lo.abs(), hi + 2 * U * hi.abs()                  # the subtraction's rounding, outward
    vlo, vhi = delta - rad0, delta + rad0
    vlo, vhi = vlo - 2 * U * vlo.abs(), vhi + 2 * U * vhi.abs()
    active, inactive = lo >= 0, hi <= 0
    one, zero = torch.ones_like(delta), torch.zeros_like(delta)
    a = (delta >= 0).to(delta.dtype)                                       # the tangent at the clean point
    c_lo = torch.where(a > 0, torch.clamp(vlo, max=0), -torch.clamp(vhi, min=0))
    width = torch.where(active | inactive, one, hi - lo)
    s = torch.clamp(hi / width, 0.0, 1.0)                                  # any s in [0, 1] is valid
    # max over [l, u] of relu(v′) − s·v′ (at an end); 1 − s is exact for s ≥ ½ (Sterbenz)
    t = torch.maximum(-s * lo, (1 - s) * hi) * ROUND_UP
    # max over the clean interval of s·v − relu(v) ≤ 0 (shrunk toward 0: an upper bound)
    g = torch.where(vlo > 0, (s - 1) * vlo, torch.where(vhi < 0, s * vhi, zero)) * (1 - 1e-10)
    c_up = torch.clamp(t + g + 2 * U * t, min=0) * ROUND_UP
    a = torch.where(active, one, torch.where(inactive, zero, a))
    s = torch.where(active, one, torch.where(inactive, zero, s))
    c_lo = torch.where(active | inactive, zero, c_lo)
    c_up = torch.where(active | inactive, zero, c_up)
    return a, c_lo, s, c_up


@torch.no_grad()
def margin_lower_bounds(model, state: dict, targets: Tensor, classes: Tensor, eps: Tensor,
                        refined: dict | None = None, chosen: dict | None = None) -> Tensor:
    """(P,) lower bounds on the exact margin z_y − z_j at position targets[p] against class
    classes[p], over every perturbation of inputs_embeds with max_s rms(δ_s) ≤ eps[p].
    `refined` = {block: (down, up)}, each (T, F/2): tighter pair intervals from `pair_intervals`,
    valid at every eps[p] used here. `chosen` = {block: (T, F/2) bool}: marks, for each query, the
    chosen["top"] undecided pairs per block that weigh most in its bound (`refine_intervals`)."""
    out = torch.empty(targets.numel(), dtype=torch.float64)
    values, index = eps.unique(return_inverse=True)
    e_in, e_fin, e0_in, e0_fin = _radii(model, state, values)
    order = torch.argsort(targets)                     # similar lengths in one pass
    for i in range(0, order.numel(), PAIRS_PER_PASS):
        sel = order[i:i + PAIRS_PER_PASS]
        out[sel] = _backward(state, targets[sel], classes[sel], eps[sel], index[sel], e_in, e_fin, e0_in, e0_fin,
                             refined, chosen)
    return out


@torch.no_grad()
def pair_intervals(model, state: dict, block: int, positions: Tensor, eps: Tensor, refined: dict | None = None,
                   pairs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Tighter intervals for block `block`'s maxmin pairs (docs/lipschitz.md §10d): the module-wise
    interval δ̂_s ± ‖w_a − w_b‖·e_s charges every earlier layer its worst case in every direction;
    here each pair gets two backward passes of its own (directions ±(w_a − w_b) from that MLP's
    input at s, back through the block's attention sublayer and every earlier block, with the same
    relaxations — using `refined` for earlier blocks — and the same rounding accounting as a margin):
        δ̂_s − down ≤ δ′_s ≤ δ̂_s + up   for every perturbation with max rms(δ) ≤ eps (one float64 value).
    `pairs` (T, F/2) bool selects which (position, pair) to compute; default: every pair at
    `positions` that the module-wise interval leaves undecided. Returns (down, up), each (T, F/2),
    +inf where nothing was computed (the intersection with the module-wise interval keeps the latter)."""
    T, d = state["T"], state["d"]
    B = state["blocks"][block]
    half = B["delta"].size(1)
    down = torch.full((T, half), math.inf, dtype=torch.float64)
    up = down.clone()
    e_in, _, e0_in, _ = _radii(model, state, eps.reshape(1))
    where = 2 * block + 1                                                             # this MLP's input
    rad, rad0 = _pair_radius(B, e_in[where][0]), _pair_radius(B, e0_in[where])      # (T, half)
    open_ = (B["delta"] - rad < 0) & (B["delta"] + rad > 0)                          # undecided by the interval
    if pairs is None:
        pairs = torch.zeros_like(open_)
        pairs[positions] = True
    q_pos, q_pair = (pairs & open_).nonzero(as_tuple=True)
    if q_pos.numel() == 0:
        return down, up
    C = B["Win"][:half] - B["Win"][half:]                                             # ĉ, within u·|c| of w_a − w_b
    lb = torch.empty(2, q_pos.numel(), dtype=torch.float64)
    k0 = torch.zeros(PAIRS_PER_PASS, dtype=torch.long)
    for i in range(0, q_pos.numel(), PAIRS_PER_PASS):
        t, c = q_pos[i:i + PAIRS_PER_PASS], C[q_pair[i:i + PAIRS_PER_PASS]]
        Tm, P = int(t.max()) + 1, t.numel()
        rows, k = torch.arange(P), k0[:P]
        dev = e_in[where][0, t] + 2 * e0_in[where][t]                                 # ≥ ‖exact x′_s − exact x_s‖
        for side, sign in enumerate((1.0, -1.0)):
            lam = torch.zeros(P, Tm, d, dtype=torch.float64)
            lam[rows, t] = sign * c
            lam, icpt, slack = _propagate(state, lam, k, e_in, e0_in, block, "attn", refined)
            # ĉ against the exact w_a − w_b: ≤ u‖ĉ‖(1 + u)·‖δx_s‖
            slack = slack + 2 * U * _rows(c) * dev
            dual = math.sqrt(d) * eps * _rows(lam).sum(-1) * ROUND_UP * ROUND_UP
            terms = (icpt * ROUND_UP, -slack * ROUND_UP, -dual)
            lb[side, i:i + P] = sum(terms) - 3 * U * sum(x.abs() for x in terms)     # ≤ ±cᵀ(x′_s − x_s), exact
    # δ′ ≥ δ − rad0 + lb₊ and δ′ ≤ δ + rad0 − lb₋, with δ the exact clean value, |δ − δ̂| ≤ rad0
    r0 = rad0[q_pos, q_pair]
    down[q_pos, q_pair] = torch.nan_to_num(r0 - lb[0] + 2 * U * (r0 + lb[0].abs()), nan=math.inf)
    up[q_pos, q_pair] = torch.nan_to_num(r0 - lb[1] + 2 * U * (r0 + lb[1].abs()), nan=math.inf)
    return down, up


@torch.no_grad()
def refine_intervals(model, state: dict, targets: Tensor, classes: Tensor, eps: Tensor,
                     top: int = REFINE_PAIRS) -> dict:
    """{block: (down, up)} for the (target, class) queries that failed at one radius eps (a float64
    0-d tensor): one recording pass marks, per query and block, the `top` undecided pairs
    whose relaxation costs its bound the most (|κ|·interval width); then blocks are refined bottom
    up, each with the earlier blocks' refined intervals."""
    chosen: dict = {"top": top}       # the ints are blocks
    margin_lower_bounds(model, state, targets, classes, eps.expand(targets.numel()), None, chosen)
    refined: dict = {}
    for b in range(len(state["blocks"])):
        if b in chosen and chosen[b].any():
            refined[b] = pair_intervals(model, state, b, targets, eps, refined, pairs=chosen[b])
    return refined


def _backward(state, targets, classes, eps, k, e_in, e_fin, e0_in, e0_fin, refined=None, chosen=None) -> Tensor:
    d = state["d"]
    P, Tm = targets.numel(), int(targets.max()) + 1
    rows = torch.arange(P)
    D = state["D"][targets, classes]                                                 # (P, d)
    lam = torch.zeros(P, Tm, d, dtype=torch.float64)
    lam[rows, targets] = D
    # D̂ is within u of w_y − w_j: the exact margin's change differs by ≤ 2u‖D̂‖‖δh_t‖
    dh = e_fin[k, targets] + e0_fin[targets]
    lam, icpt, slack = _propagate(state, lam, k, e_in, e0_in, len(state["blocks"]) - 1, "mlp", refined, chosen)
    slack = slack + 2 * U * _rows(D) * dh
    dual = math.sqrt(d) * eps * _rows(lam).sum(-1) * ROUND_UP * ROUND_UP
    m_low, cut = state["m_low"][targets, classes], state["dist"][targets, classes] * e0_fin[targets] * ROUND_UP
    terms = (m_low, -cut, icpt * ROUND_UP, -slack * ROUND_UP, -dual)
    # each of the four additions rounds by ≤ u of its result: subtract 4u·Σ|terms| so the sign is the exact sum's
    return sum(terms) - 4 * U * sum(t.abs() for t in terms)


def _propagate(state, lam, k, e_in, e0_in, start: int, sub0: str, refined=None, chosen=None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Back from coefficients `lam` (P, Tm, d) on the output of sublayer `sub0` of block `start` (for
    "mlp": the block's output; for "attn": its MLP's input) to coefficients on inputs_embeds's
    deviation. Returns (coefficients, intercept (P,), rounding slack (P,)): for every perturbation in
    the ball, lam·Δ(there) ≥ intercept − slack + Σ_s coefficients_s·Δx⁰_s (§10a). `refined`:
    {block: (down, up)} tighter pair intervals (`pair_intervals`); `chosen`: see margin_lower_bounds."""
    alpha = state["alpha"]
    P, Tm, _ = lam.shape
    icpt = torch.zeros(P, dtype=torch.float64)
    slack = torch.zeros(P, dtype=torch.float64)
    for b in reversed(range(start + 1)):
        B = state["blocks"][b]
        for sub in ("mlp", "attn"):
            if b == start and sub0 == "attn" and sub == "mlp":
                continue
            where = 2 * b + (1 if sub == "mlp" else 0)
            e = e_in[where][k, :Tm]                                                  # (P, Tm)
            dev = e + e0_in[where][None, :Tm]                                        # ≥ ‖x′_s − x_s‖₂
            if sub == "mlp":
                weight = [] if chosen is not None else None
                rho, part, err = _mlp_back(B, lam, alpha, e, e0_in[where][:Tm], dev,
                                           (refined or {}).get(b), weight)
                icpt += part
                if weight:
                    _mark_costliest(chosen, b, weight[0], state["T"])
            else:
                rho, err = _attn_back(B, lam, alpha, dev)
            keep = lam * (1 - alpha)
            # fl((1 − α)Λ + ρ): ≤ 2u‖(1 − α)Λ‖ + u‖ρ‖ per position, against δx_s
            err = err + 3 * U * ((_rows(keep) + _rows(rho)) * dev).sum(-1)
            lam = keep + rho
            slack = slack + err
    return lam, icpt, slack


def _mark_costliest(chosen: dict, b: int, weight: Tensor, T: int) -> None:
    """Mark, per query, the chosen["top"] (position, pair) entries of weight (P, Tm, half) that are
    > 0 and largest, in chosen[b] (T, half)."""
    P, Tm, half = weight.shape
    if b not in chosen:
        chosen[b] = torch.zeros(T, half, dtype=torch.bool)
    flat = weight.reshape(P, -1)
    val, ind = flat.topk(min(chosen["top"], flat.size(1)), dim=1)
    ind = ind[val > 0]
    chosen[b][ind // half, ind % half] = True


def _mlp_back(B: dict, lam: Tensor, alpha: float, e: Tensor, e0: Tensor, dev: Tensor,
              bounds=None, weight: list | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients on the MLP sublayer's branch input from those on the sublayer's output (lam):
    α, W_outᵀ, the pair relaxations, W_inᵀ. Returns (coefficients, intercept (P,), rounding slack (P,))."""
    Win, Wout, fro, s_in = B["Win"], B["Wout"], B["fro"], B["s_in"]
    d, dff = Win.size(1), Win.size(0)
    half = dff // 2
    lam = lam * alpha
    mu = lam @ Wout                                                                   # (P, Tm, dff)
    dz = s_in * dev                                                                   # ≥ ‖δz_s‖, ‖δ(maxmin)_s‖
    # α·Λ rounds by u (against δy_s, ‖δy_s‖ ≤ σ_out·‖δz_s‖); the product by γ_d‖W_out‖_F (against δ maxmin)
    err = ((U * B["s_out"] + spectral.gamma(d) * fro["out"]) * _rows(lam) * dz).sum(-1) * ROUND_UP
    l1, l2 = mu[..., :half], mu[..., half:]                                           # on max, on min
    kappa = l1 - l2
    rad, rad0 = _pair_radius(B, e), _pair_radius(B, e0)[None]
    down = up = rad
    if bounds is not None:                 # both intervals hold: the intersection does
        down = torch.minimum(rad, bounds[0][None, :e.size(1)])
        up = torch.minimum(rad, bounds[1][None, :e.size(1)])
    delta = B["delta"][None, :e.size(1)]
    a, c_lo, s, c_up = _pair_relaxation(delta, down, up, rad0)
    if weight is not None:                 # what each undecided pair's relaxation may cost this bound
        weight.append(kappa.abs() * (down + up) * ((delta - down < 0) & (delta + up > 0)))
    pos = kappa >= 0
    ks = kappa * torch.where(pos, a, s)
    terms = kappa * torch.where(pos, c_lo, c_up)                                      # every term ≤ 0
    icpt = terms.sum((1, 2)) * (1 + spectral.gamma(terms[0].numel() + 2))            # a sum of ≤ 0 terms, rounded out
    nu = torch.cat((l2 + ks, l1 - ks), -1)                                            # on a (first half), on b
    err = err + (20 * U * _rows(mu) * dz).sum(-1)
    rho = nu @ Win                                                                    # (P, Tm, d)
    err = err + (spectral.gamma(dff) * fro["in"] * _rows(nu) * dev).sum(-1)
    return rho, icpt, err


def _attn_back(B: dict, lam: Tensor, alpha: float, dev: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients on the attention sublayer's branch input from those on the sublayer's output
    (lam): α/3, W_oᵀ, the transposed attention weights per head, W_vᵀ. Returns (coefficients,
    rounding slack (P,))."""
    Wv, Wo, fro, sv = B["Wv"], B["Wo"], B["fro"], B["sv"]
    Pm, Tm, d = lam.shape
    H = sv.numel()
    lam = lam * (alpha / lnn.ATTENTION_DIVISOR)
    top = dev.amax(-1)                                                                # (P,) ≥ every ‖δx_s‖
    mu = lam @ Wo                                                                     # (P, Tm, d)
    quad = float(torch.sqrt((sv**2).sum())) * ROUND_UP                               # ≥ ‖δc_t‖ / max_s ‖δx_s‖
    # α/3·Λ rounds by 3u (against W_o·δc_t); the product by γ_d‖W_o‖_F (against δc_t)
    err = ((3 * U * B["so"] + spectral.gamma(d) * fro["o"]) * _rows(lam)).sum(-1) * quad * top * ROUND_UP
    mu = mu.view(Pm, Tm, H, d // H)
    nu = torch.einsum("hts,pthd->pshd", B["P"][:, :Tm, :Tm], mu)
    per_head = _rows(mu).sum(1)                                                       # (P, H): Σ_t ‖μ_{h,t}‖
    mix = (spectral.gamma(Tm + 2) * 2 + B["p_err"]) * ROUND_UP
    err = err + (mix[None] * per_head * sv[None]).sum(-1) * top
    nu = nu.reshape(Pm, Tm, d)
    rho = nu @ Wv
    err = err + (spectral.gamma(d) * fro["v"] * _rows(nu) * dev).sum(-1)
    return rho, err


@torch.no_grad()
def certified_at(model, state: dict, eps: Tensor, positions: Tensor | None = None, *, refine: int = 0) -> Tensor:
    """(T,) bool: the prediction at position t is certified at radius eps[t] (one value per
    position), each competing class ruled out by the module-wise radius or, failing that, by the
    linear relaxation. `positions` (bool, T): only these are checked (others False).

    Classes are relaxed in waves, the most dangerous first (smallest module-wise distance): a
    position is dropped at its first class that fails, and the waves double in size, so a position
    that fails costs about one backward pass and one that passes about as many as it needs.
    With `refine` = N > 0, the positions that fail get a second try with the N costliest pairs of
    every block bounded by their own backward passes (`refine_intervals`; e.g. N = REFINE_PAIRS; up
    to 2N passes per block and failing position: slow, for evaluation)."""
    T = state["T"]
    if not isinstance(eps, Tensor) or eps.dtype != torch.float64:
        # a float32 ε (torch.tensor(0.01)) is not the radius asked for: 0.01 rounds *down* in float32
        raise ValueError("certified_at: pass eps as a float64 tensor (torch.tensor(r, dtype=torch.float64))")
    eps = eps.expand(T).clone()
    todo = torch.ones(T, dtype=torch.bool) if positions is None else positions.clone()
    todo &= eps > 0
    ok = torch.zeros(T, dtype=torch.bool)
    if not todo.any():
        return ok
    idx = todo.nonzero()[:, 0]
    values, inv = eps[idx].unique(return_inverse=True)
    _, e_fin, _, _ = _radii(model, state, values)
    e_t = e_fin[inv, idx]                                                             # (n,)
    dist, m_low = state["dist"][idx], state["m_low"][idx]                           # (n, V)
    cut = dist * e_t[:, None] * ROUND_UP
    slack = m_low - cut - 2 * U * (m_low.abs() + cut)                                # > 0: ruled out
    slack[torch.arange(idx.numel()), state["pred"][idx]] = math.inf
    slack = torch.nan_to_num(slack, nan=-math.inf)                                   # NaN: no claim, relax it
    # open classes first (the loop relaxes exactly the first `open_` of this order), most dangerous first
    key = torch.nan_to_num(slack / dist.clamp(min=1e-300), nan=-math.inf)
    danger = torch.argsort(torch.where(slack <= 0, key, torch.full_like(key, math.inf)), dim=-1, stable=True)
    open_ = (slack <= 0).sum(-1)                                                      # classes left to relax
    alive = _waves(model, state, idx, eps, danger, open_)
    if refine and not alive.all():
        # the positions the relaxation could not certify: their costliest pairs, bounded one by one
        again = (~alive).nonzero()[:, 0]
        for value in eps[idx[again]].unique():             # intervals hold for one radius at a time
            sub = again[eps[idx[again]] == value]
            refined = refine_intervals(model, state, idx[sub], danger[sub, 0], value, int(refine))
            alive[sub] = _waves(model, state, idx[sub], eps, danger[sub], open_[sub], refined)
    ok[idx] = alive
    return ok


def _waves(model, state, idx: Tensor, eps: Tensor, danger: Tensor, open_: Tensor, refined=None) -> Tensor:
    """(n,) bool: every one of the first open_[i] classes of danger[i] ruled out at position idx[i]."""
    alive = torch.ones(idx.numel(), dtype=torch.bool)
    done, width = torch.zeros(idx.numel(), dtype=torch.long), 1
    while True:
        rows = (alive & (done < open_)).nonzero()[:, 0]
        if rows.numel() == 0:
            break
        take = torch.clamp(open_[rows] - done[rows], max=width)
        r = torch.repeat_interleave(rows, take)
        offset = torch.arange(r.numel()) - torch.repeat_interleave(torch.cumsum(take, 0) - take, take)
        classes = danger[r, done[r] + offset]
        lb = margin_lower_bounds(model, state, idx[r], classes, eps[idx[r]], refined)
        failed = torch.zeros(idx.numel(), dtype=torch.bool).index_put_((r,), ~(lb > 0), accumulate=True)  # NaN fails
        alive &= ~failed
        done[rows] += take
        width *= 2
    return alive


LATTICE = 2.0 ** (1 / 4)     # radii are searched on start·2^(k/4)


@torch.no_grad()
def linear_radii(model, ids, start: Tensor, *, top: int = 16) -> tuple[Tensor, Tensor]:
    """(prediction, radius) per position; the radius is at least `start` (radii already certified by
    another sound method; positions at 0 stay at 0). On the lattice start·2^(k/4), k ≤ `top`: try
    k = 2 (√2), then double k while it passes, then bisect between the last index that passed and
    the first that failed; the radius is the largest index that passed (within 2^(1/4) of the first
    that failed below the top). Most positions settle in two rounds. Every reported value above
    `start` passed `certified_at` itself."""
    if unsupported(model) is not None:
        raise ValueError(f"linear_radii: the linear relaxation does not apply: {unsupported(model)}")
    state = prepare(model, torch.as_tensor(ids).reshape(1, -1))
    T = state["T"]
    best = start.to(torch.float64).clone()
    lo = torch.zeros(T, dtype=torch.long)                       # largest index known to pass (0: start)
    hi = torch.where(best > 0, top + 1, 0)                      # smallest index known to fail
    probe = torch.full((T,), 2, dtype=torch.long)               # the next index to test while growing
    growing = best > 0
    while True:
        search = hi - lo > 1
        if not search.any():
            break
        k = torch.where(growing, torch.minimum(probe, hi - 1), (lo + hi) // 2)
        k = torch.where(search, k, lo)
        ok = certified_at(model, state, best * LATTICE ** k.double(), search)
        lo = torch.where(search & ok, k, lo)
        hi = torch.where(search & ~ok, k, hi)
        probe = torch.where(ok, probe * 2, probe)
        growing &= ok
    radius = torch.where(lo > 0, best * LATTICE ** lo.double() * (1 - 1e-12), best)
    return state["pred"], radius
