"""Local certificates: per-position radii that pay only for the perturbation ball around *this* input.

The global radius (certify.radii_from_hidden) divides each margin by the body's worst-case
Lipschitz bound over the whole input ball. Here the bound is propagated along the actual clean
activations instead (docs/lipschitz.md §9): for a trial ε, every token's ℓ2 radius around its
computed activation is pushed through the blocks by the modules' `local_bound` methods, and
position t is certified at ε when its final radius is below the distance from ĥ_t to the nearest
decision boundary of the head. Every term grows with ε, so the radius is found by a search over
ε (batched k-ary rounds, §9f); any ε that passes is sound by itself, and the largest one that
passed is reported. What does not depend on ε (each block's clean scores, boxes and spreads) is
computed once per text.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from . import nn as lnn
from . import spectral
from .local_bounds import ROUND_UP, U
from .margins import head_margins, radii_from_hidden, require_float64


TRIALS_PER_CALL = 8          # trial ε evaluated together in one local pass
CHUNK_ENTRIES = 1 << 16      # trial × head × query × key entries per chunk: cache-sized on a CPU
CACHE_BYTES = 2 << 30        # keep the ε-independent tensors of a text when they fit in this


@dataclass
class CleanPass:
    """The computed float64 activations a local bound is centred on, and what the forward used."""
    inputs: list[tuple[Tensor, Tensor]]   # per block: the inputs of its attention and its MLP, (T, d)
    hidden: Tensor                        # final hidden states (T, d)
    rope: tuple[Tensor, Tensor]           # (cos, sin), (T, d_head)
    allowed: Tensor                       # (T, T): keys each query attends to
    prepared: list[dict] | None = None    # per block: the ε-independent tensors of its local bound


@dataclass
class Recorded:
    """The inputs of every block's attention (x, rope, mask, ...) and MLP (x,), as a forward passed them."""
    attn: list
    mlp: list


@contextmanager
def recording(model):
    """Record the sublayer inputs of the forward run inside (hooks; no copies, autograd graph kept).

    What the certificate (and the training surrogate) is centred on is then exactly what the
    model's own forward computed."""
    n = len(model.model.layers)
    seen = Recorded([None] * n, [None] * n)

    def grab(store, i):
        def hook(module, args):
            store[i] = args
        return hook

    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.attn.register_forward_pre_hook(grab(seen.attn, i)))
        hooks.append(layer.mlp.register_forward_pre_hook(grab(seen.mlp, i)))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def allowed_keys(mask: Tensor | None, T: int, device=None) -> Tensor:
    """(B or 1, T, T) bool: the keys each query attends to, from the mask the attention received.

    sdpa gets a boolean mask (True: attend); eager an additive one (0: attend, the dtype's minimum:
    masked). None is plain causal attention. Anything else would change the scores in a way the
    bounds do not model, and is refused."""
    if mask is None:
        return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None]
    if mask.size(-1) != T:
        raise ValueError("local certificates cover one whole sequence without a KV cache")
    m = mask[:, 0, :, -T:]
    if m.dtype == torch.bool:
        return m
    if not bool(((m == 0) | (m <= torch.finfo(m.dtype).min / 2)).all()):
        raise ValueError("local certificates need an attention mask of 0 (attend) and -inf/min (masked)")
    return m == 0


@torch.no_grad()
def clean_pass(model, ids: Tensor, attention_mask: Tensor | None = None) -> CleanPass:
    """Run the model's own forward on one sequence (1, T), recording every sublayer's input."""
    with recording(model) as seen:
        hidden = model.model(ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[0]
    x, rope, mask = seen.attn[0][:3]
    allowed = allowed_keys(mask, x.size(1))[0]
    inputs = [(a[0][0], m[0][0]) for a, m in zip(seen.attn, seen.mlp)]
    return CleanPass(inputs, hidden, (rope[0][0, 0], rope[1][0, 0]), allowed)


def final_radii(model, clean: CleanPass, eps: Tensor, record: list | None = None) -> Tensor:
    """(K, T): ℓ2 radius around ĥ_t that contains the exact final hidden state at position t for
    every perturbation of inputs_embeds with max_s rms(δ_s) ≤ eps[k] (docs/lipschitz.md §9d).
    With `record`, the (K, T) radii at every sublayer's input are appended to it, in forward order."""
    d = clean.hidden.size(-1)
    root_d = math.sqrt(d)
    ball = model.model.ball
    T = clean.hidden.size(0)
    # the input ball is 1-Lipschitz per token; its float64 evaluation is off by ≤ (γ_d + 8u)·r in rms
    start = root_d * (spectral.gamma(d) + 8 * U) * ball.radius
    e = (root_d * eps[:, None] * ROUND_UP + start).expand(-1, T).clone()
    with lnn.memoized_sigmas():
        for layer, prepared in zip(model.model.layers, _prepared(model, clean)):
            e = layer.local_bound(e, prepared, clean.rope, clean.allowed, record)
    return e


def _prepared(model, clean: CleanPass) -> list[dict]:
    """Each block's ε-independent tensors, computed on first use and kept on the clean pass when
    they fit in CACHE_BYTES (else each trial call recomputes them chunk by chunk: same bound)."""
    if clean.prepared is None:
        T = clean.hidden.size(0)
        cfg = model.config
        lam = _lambda(model, T)
        rows = CHUNK_ENTRIES // (TRIALS_PER_CALL * cfg.num_attention_heads * T)
        # ≈ 8 float64 numbers per head and causal query–key pair, per block
        keep = cfg.num_hidden_layers * cfg.num_attention_heads * T * (T + rows) / 2 * 8 * 8 <= CACHE_BYTES
        B = model.model.ball.radius
        clean.prepared = []
        with lnn.memoized_sigmas():
            for layer, (x_attn, x_mlp) in zip(model.model.layers, clean.inputs):
                clean.prepared.append(layer.local_prepare(x_attn, x_mlp, clean.rope, clean.allowed, B, lam, rows, keep))
                B = clean.prepared[-1]["output_bound"]
    return clean.prepared


def _lambda(model, T: int) -> float:
    c = model.config
    return lnn.float64_linear_error(max(8, c.hidden_size, c.intermediate_size, T, c.max_position_embeddings))


@torch.no_grad()
def local_radii(model, ids, bounds=None, *, attention_mask: Tensor | None = None, tolerance: float = 0.1,
                max_trials: int = 256, per_round: int = 24) -> tuple[Tensor, Tensor, Tensor]:
    """(prediction, margin, local radius) for every position of one sequence (1, T) or list of ids.

    Search over the lattice ε_j = ε_lo·(1 + tolerance)^j in rounds: every unresolved position
    proposes the points that cut its bracket (largest lattice index that passed, smallest that
    failed) into equal parts, at most `per_round` distinct values are tested in one batched local
    pass, and each tested value's verdict updates *every* position whose bracket it falls in, not
    only the ones that proposed it. The radius reported is the largest lattice ε that passed (0
    when none did), within a factor 1 + tolerance of the largest that would pass, unless
    `max_trials` trial values ran out first (then it is still a value that passed, only smaller).
    """
    require_float64(model)
    ids = torch.as_tensor(ids).reshape(1, -1)
    bounds = bounds or model.bounds(positions=ids.size(1))
    if bounds.positions < ids.size(1):
        raise ValueError(f"the bounds cover {bounds.positions} positions, the text has {ids.size(1)}: "
                         "pass model.bounds(positions=len(ids))")
    with lnn.memoized_sigmas():
        clean = clean_pass(model, ids, attention_mask)
        pred, margin, distance = head_margins(clean.hidden, model.head.weight)
        T, d = clean.hidden.shape
        radius = torch.zeros(T, dtype=torch.float64)
        ok = torch.isfinite(distance) & (distance > 0)
        if not ok.any():
            return pred, margin, radius
        # e_N ≥ (1 − α)^{2N}·√d·ε (each residual keeps (1 − α) of the radius): no ε above this passes
        keep = (1 - model.config.residual_alpha) ** (2 * model.config.num_hidden_layers)
        top = float((distance[ok] / (math.sqrt(d) * keep)).max())
        glob = radii_from_hidden(clean.hidden, model.head.weight, bounds)[2]
        floor = float(glob[ok & (glob > 0)].min()) / 2 if (ok & (glob > 0)).any() else top * 1e-12
        ratio = 1.0 + tolerance
        J = max(1, math.ceil(math.log(top / floor) / math.log(ratio)))
        lattice = floor * ratio ** torch.arange(J + 1, dtype=torch.float64)
        low = torch.full((T,), -1, dtype=torch.long)       # index that passed (−1: none yet)
        high = torch.full((T,), J + 1, dtype=torch.long)   # index that failed (J + 1: above the top)
        high[~ok] = 0
        trials = 0
        while trials < max_trials:
            values = _proposals(low, high, min(per_round, max_trials - trials))
            if values.numel() == 0:
                break
            trials += values.numel()
            passed = _verify(model, clean, lattice[values], distance)       # (K, T)
            low, high = _narrow(low, high, values, passed)
        radius = torch.where(low >= 0, lattice[low.clamp(min=0)], radius) * (1 - 1e-12)
    return pred, margin, radius


def _proposals(low: Tensor, high: Tensor, budget: int) -> Tensor:
    """Sorted distinct lattice indices to test next: each open bracket (low, high) asks for the
    points that cut it into `parts` equal pieces, with `parts` as large as the budget allows."""
    open_ = high - low > 1
    if not open_.any():
        return torch.empty(0, dtype=torch.long)
    brackets = torch.unique(torch.stack([low[open_], high[open_]], -1), dim=0)
    values = torch.empty(0, dtype=torch.long)
    for parts in range(max(2, budget // len(brackets) + 1), 1, -1):
        cut = torch.arange(1, parts, dtype=torch.float64) / parts
        lo, hi = brackets[:, :1].double(), brackets[:, 1:].double()
        points = torch.round(lo + (hi - lo) * cut).long()
        points = points[(points > brackets[:, :1]) & (points < brackets[:, 1:])]
        values = points.unique()
        if values.numel() <= budget:
            return values
    # more open brackets than the budget: their midpoints, spread over the whole range
    keep = torch.linspace(0, values.numel() - 1, budget).round().long().unique()
    return values[keep]


def _narrow(low: Tensor, high: Tensor, values: Tensor, passed: Tensor) -> tuple[Tensor, Tensor]:
    """Update every bracket with every verdict inside it: low ← the largest tested index that passed,
    high ← the smallest tested index above the new low that failed."""
    inside = (values[:, None] > low[None]) & (values[:, None] < high[None])            # (K, T)
    idx = values[:, None].expand_as(inside)
    best = torch.where(inside & passed, idx, torch.full_like(idx, -2)).amax(0)
    low = torch.maximum(low, best)
    fail = torch.where(inside & ~passed & (idx > low[None]), idx, torch.full_like(idx, 1 << 62)).amin(0)
    return low, torch.minimum(high, fail)


def _verify(model, clean: CleanPass, eps: Tensor, distance: Tensor, batch: int = TRIALS_PER_CALL) -> Tensor:
    """(K, T) bool: position t certified at eps[k] (its final radius is below its head distance)."""
    out = []
    for i in range(0, eps.numel(), batch):
        e = final_radii(model, clean, eps[i:i + batch])
        out.append(e * ROUND_UP < distance[None])
    return torch.cat(out)
