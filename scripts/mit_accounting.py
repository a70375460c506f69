"""MIT's Lipschitz accounting of a lipformer model's weights — NOT A SOUND BOUND.

A re-implementation (from reading it) of `utils.calculate_lipschitz_constant` in
Arongil/lipschitz-transformers (commit 16cccff, June 2025; the version whose numbers match the
transformer points in their plotting notebook), fed with the RMS→RMS norms of *our* weights. It is
here only to put their figure beside the sound one for the same weights. What it leaves out
(`../shared/REFERENCES.md`): the factor H in the score term and √H across heads, GELU's divisor is
divided out a second time, no input projection (it assumes every token has rms ≤ 1), and
`final_scale`. Never use it as a certificate.

Their recursion, with α = 1/(2N), norms n_* in RMS→RMS units, c the softmax scale:
    a₀ = 1;  per block: a ← (1−α)a + α·(n_o n_v/3)·a;  a ← (1−α)a + α·(n_out n_in/1.1289)·a
    L = n_embed;  per block: L ← (1−α)L + α·L·c·n_o(n_v + 2 n_v a² n_q n_k)/3
                             L ← (1−α)L + α·L·n_out n_in/1.1289
    L ← L · n_head
"""

from __future__ import annotations

import torch


def _norms(model) -> dict:
    out = {}
    for i, layer in enumerate(model.model.layers):
        a, m = layer.attn, layer.mlp
        out[i] = {k: getattr(a, k).norm_upper() for k in ("q", "k", "v", "o")}
        out[i]["in"], out[i]["out"] = m.fc_in.norm_upper(), m.fc_out.norm_upper()
    return out


@torch.no_grad()
def mit_lipschitz(model) -> float:
    """Their formula on this model's weights (NOT SOUND; see the module docstring). NaN for a model
    whose MLP is not their GELU (activation "maxmin"): the formula has no term for it."""
    cfg = model.config
    if getattr(cfg, "activation", "gelu") != "gelu":
        return float("nan")
    N, c = cfg.num_hidden_layers, cfg.softmax_scale
    alpha = 1.0 / (2 * N)  # their residual weight, whatever the model's residual_alpha is
    norms = _norms(model)
    embed = float(model.model.embed.weight.detach().double().pow(2).mean(-1).sqrt().max())
    head = model.head.norm_upper()
    acts = [1.0]
    for i in range(N):
        n = norms[i]
        acts.append((1 - alpha) * acts[-1] + alpha * (n["o"] * n["v"] / 3) * acts[-1])
        acts.append((1 - alpha) * acts[-1] + alpha * (n["out"] * n["in"] / 1.1289) * acts[-1])
    L = embed
    for i in range(N):
        n = norms[i]
        att = n["o"] * (n["v"] + 2 * n["v"] * acts[2 * i] ** 2 * n["q"] * n["k"]) * c / 3
        L = (1 - alpha) * L + alpha * L * att
        L = (1 - alpha) * L + alpha * L * n["out"] * n["in"] / 1.1289
    return L * head
