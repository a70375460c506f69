"""A differentiable surrogate of the local deviation bound e_{N,t}(ε), for certified training.

`lipformer.local_certify.final_radii` bounds, soundly and in float64, how far the final hidden state
of every position can move when inputs_embeds move by at most ε (max-rms) around *this* input
(docs/lipschitz.md §9). Training against it (train.objective = "margin_local") needs the same
number as a differentiable function of the weights, on a whole training batch (B, T), in the
training dtype. This file computes it with the *same recursion*:

    e_0 = √d·ε at every token;
    attention: per head, the softmax box of the scores moved by β_ts = (c/d_h)(εq_t‖k_s − κ_t‖ + ‖q_t‖εk_s + εq_t·εk_s),
               g = σ_V·max_{s≤t} e_s + min(S_box, S_CS), heads in quadrature, σ_O/3, min with the global L_attn·max e;
    MLP:       σ_out·σ_in·m_t/1.1289·e_t with m_t GELU's largest slope over each unit's reachable interval,
               min with the global L_mlp·e;
    residual:  e ← (1 − α)e + α·f,

but (i) with σ's from `sigma(weight, heads)` (the differentiable power-iteration estimates of
training/objectives.py: an *under*-estimate, so this is not a certificate), (ii) without any
float64 rounding allowance, and (iii) with the computed clean softmax taken as exact (the sound
code boxes it by its rounding). None of that matters for a training signal: the certificate of the
trained weights is recomputed afterwards by `local_certify`, never from this. With exact σ's in
float64 it equals `final_radii` up to those rounding terms (tests/test_objectives.py).

The activations the recursion is centred on are the training forward's own (recorded by hooks, with
their graph), so the extra cost is one "box" pass per attention sublayer over (B, H, T, T) tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lipformer.local_bounds import GELU_CURVATURE_MAX, gelu_slope
from lipformer.local_certify import Recorded, allowed_keys, recording
from lipformer.nn import ATTENTION_DIVISOR, GELU_DIVISOR, GELU_MAX_SLOPE, apply_rope

TINY = 1e-30


def _sqrt(x: Tensor) -> Tensor:
    return (x + TINY).sqrt()   # finite gradient at 0


def _exclusive_lse(a: Tensor, allowed: Tensor) -> Tensor:
    """log Σ_{r≠s, r allowed} e^{a_r} for every s, differentiable and without the cancellation of
    log(Σ − e^{a_s}) at the row's largest entry (its others are summed without it)."""
    top = torch.where(allowed, a, torch.full_like(a, -math.inf)).amax(-1, keepdim=True).detach()
    x = torch.where(allowed, torch.exp(torch.where(allowed, a, top) - top), torch.zeros_like(a))
    others = x.sum(-1, keepdim=True) - x
    where = torch.where(allowed, a, torch.full_like(a, -math.inf)).argmax(-1, keepdim=True)
    without_top = x.scatter(-1, where, torch.zeros_like(x[..., :1])).sum(-1, keepdim=True)
    others = others.scatter(-1, where, without_top)
    return torch.log(others.clamp(min=TINY)) + top


def softmax_box(a: Tensor, beta: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """(low, up) of docs/lipschitz.md §9a, zero on masked keys (no rounding allowance)."""
    up = torch.sigmoid(a + beta - _exclusive_lse(a - beta, allowed))
    low = torch.sigmoid(a - beta - _exclusive_lse(a + beta, allowed))
    zero = torch.zeros_like(up)
    return torch.where(allowed, low, zero), torch.where(allowed, up, zero)


def _distances(x: Tensor, y: Tensor) -> Tensor:
    """‖x_i − y_j‖₂ for all pairs by the Gram expansion (clamped at 0; fine for a training signal)."""
    d2 = x.pow(2).sum(-1)[..., :, None] - 2 * (x @ y.mT) + y.pow(2).sum(-1)[..., None, :]
    return _sqrt(d2.clamp(min=0))


def _box_mean(cost: Tensor, low: Tensor, up: Tensor, allowed: Tensor) -> Tensor:
    """Upper bound on E_p[cost] over every distribution p in the box (§9a(ii))."""
    cost = torch.where(allowed, cost, torch.zeros_like(cost))
    spare = (1 - low.sum(-1)).clamp(min=0)
    return torch.minimum((up * cost).sum(-1), (low * cost).sum(-1) + spare * cost.amax(-1))


def attention_local(att, x: Tensor, rope, allowed: Tensor, e: Tensor, sig: dict, glob: Tensor) -> Tensor:
    """(B, T) surrogate of `Attention.local_bound`: x (B, T, d), e (B, T) ℓ2 radii of the input,
    sig the σ estimates {"q", "k", "v": (H,), "o": ()}, glob (B,) the global L_attn per sequence."""
    B, T, _ = x.shape
    H, dh, f = att.heads, att.head_dim, att.scale / att.head_dim
    split = lambda t: t.view(B, T, H, dh).transpose(1, 2)  # noqa: E731
    cos, sin = rope
    q = apply_rope(split(att.q(x)), cos, sin)
    k = apply_rope(split(att.k(x)), cos, sin)
    v = split(att.v(x))
    keys = allowed[:, None]                                                     # (B|1, 1, T, T)
    a = f * (q @ k.mT)
    bias = att.score_bias(torch.arange(T, device=x.device), T)
    if bias is not None:   # input-independent: it shifts the clean scores, never β
        a = a + bias.to(a.dtype)
    p = torch.softmax(a.masked_fill(~keys, -math.inf), -1)
    kappa, vbar = p @ k, p @ v
    kd = _distances(kappa, k)                                                   # ≥ ‖k_s − κ_t‖
    r = _distances(vbar, v)                                                     # ‖v_s − v̄_t‖
    qn = _sqrt(q.pow(2).sum(-1))                                                # (B, H, T)
    sq, sk, sv = (sig[n][None, :, None] for n in ("q", "k", "v"))
    eq, ek = sq * e[:, None], sk * e[:, None]                                   # (B, H, T)
    EQ, EK = eq[..., None], ek[..., None, :]
    beta = f * (EQ * kd + qn[..., None] * EK + EQ * EK)
    low, up = softmax_box(a, beta, keys)
    more, less = (up - p).clamp(min=0), (p - low).clamp(min=0)
    w = torch.maximum(more, less)
    tv = torch.minimum(more.sum(-1), less.sum(-1)).clamp(max=1.0)
    r_max = torch.where(keys, r, torch.zeros_like(r)).amax(-1)
    s_box = torch.minimum((w * r).sum(-1), 2 * tv * r_max)
    mean = lambda cost: _box_mean(cost, low, up, keys)  # noqa: E731
    sk_ = _sqrt(mean((kd + EK).pow(2)))
    ek_ = _sqrt(mean(EK.pow(2).expand_as(beta)))
    sv_ = _sqrt(mean((r + sv[..., None] * e[:, None, None, :]).pow(2)))
    s_cs = f * (eq * sk_ + (qn + eq) * ek_) * sv_
    seen = torch.where(allowed, e[:, None, :], torch.zeros_like(e[:, None, :])).amax(-1)   # (B, T)
    heads = sv * seen[:, None] + torch.minimum(s_box, s_cs)
    local = sig["o"] * _sqrt(heads.pow(2).sum(1)) / ATTENTION_DIVISOR
    return torch.minimum(local, glob[:, None] * seen)


def mlp_local(mlp, x: Tensor, e: Tensor, sig: dict, glob: Tensor) -> Tensor:
    """(B, T) surrogate of `MLP.local_bound`: GELU's largest slope over each unit's reachable
    interval ẑ ± ‖w_i‖e_t, bounded by |GELU′(ẑ)| plus the curvature bound times the reach
    (maxmin: σ_out·σ_in·e_t, its Jacobian being a permutation everywhere)."""
    if mlp.activation == "maxmin":
        return torch.minimum(sig["out"] * sig["in"] * e, glob * e)
    W = mlp.fc_in.weight
    z = F.linear(x, W)
    clean = gelu_slope(z).abs().amax(-1)
    reach = W.pow(2).sum(-1).max().sqrt() * e
    slope = torch.clamp(clean + GELU_CURVATURE_MAX * reach, max=GELU_MAX_SLOPE)
    local = sig["out"] * sig["in"] * slope / GELU_DIVISOR * e
    return torch.minimum(local, glob * e)


def _sigmas(model, sigma) -> list[dict]:
    H = model.config.num_attention_heads
    out = []
    for layer in model.model.layers:
        att, mlp = layer.attn, layer.mlp
        out.append({"q": sigma(att.q.weight, H), "k": sigma(att.k.weight, H), "v": sigma(att.v.weight, H),
                    "o": sigma(att.o.weight), "in": sigma(mlp.fc_in.weight), "out": sigma(mlp.fc_out.weight)})
    return out


def local_deviation(model, seen: Recorded, eps: float, sigma) -> Tensor:
    """(B, T): the surrogate of e_{N,t}(eps), centred on the recorded activations of one forward.

    The global per-module bounds it is capped by follow `Block.local_bound`: attention's at
    B̃ = max(global activation bound, the sequence's largest input rms), the MLP's (which does not
    depend on B), and the global activation bound B advances as in docs/lipschitz.md §5.
    """
    cfg = model.config
    H, c, a = cfg.num_attention_heads, cfg.softmax_scale, cfg.residual_alpha
    x0 = seen.attn[0][0]
    Bsz, T, d = x0.shape
    dtype = model.model.layers[0].attn.q.weight.dtype
    e = torch.full((Bsz, T), math.sqrt(d) * eps, dtype=dtype, device=x0.device)
    bound = torch.tensor(float(model.model.ball.radius), dtype=dtype, device=x0.device)
    for layer, args, (xm, *_), sig in zip(model.model.layers, seen.attn, seen.mlp, _sigmas(model, sigma)):
        x, rope, mask = args[0].to(dtype), args[1], args[2] if len(args) > 2 else None
        rope = tuple(r.to(dtype) for r in rope)
        allowed = allowed_keys(mask, T, x.device)
        here = torch.maximum(bound, x.pow(2).mean(-1).sqrt().amax(-1))           # (B,)
        per_head = sig["v"] * (1 + 2 * c * H * sig["q"] * sig["k"] * here[:, None] ** 2)
        L_att = sig["o"] * _sqrt(per_head.pow(2).sum(-1)) / ATTENTION_DIVISOR
        e = (1 - a) * e + a * attention_local(layer.attn, x, rope, allowed, e, sig, L_att)
        mlp = layer.mlp
        n_in = math.sqrt(mlp.fc_in.d_in / mlp.fc_in.d_out) * sig["in"]
        n_out = math.sqrt(mlp.fc_out.d_in / mlp.fc_out.d_out) * sig["out"]
        L_mlp = n_in * mlp.act_lipschitz * n_out
        e = (1 - a) * e + a * mlp_local(mlp, xm.to(dtype), e, sig, L_mlp)
        # the global activation bound, as compose_bounds advances it
        B_att = (1 - a) * bound + a * sig["o"] * _sqrt(sig["v"].pow(2).sum()) * bound / ATTENTION_DIVISOR
        bound = (1 - a) * B_att + a * n_out * n_in * B_att * mlp.act_shrink
    return e


__all__ = ["Recorded", "recording", "local_deviation", "softmax_box", "attention_local", "mlp_local"]
