"""The Lipschitz transformer: every module owns its forward *and* its bound.

Norms (docs/lipschitz.md §0): a token vector is measured by rms(x) = ‖x‖₂/√d, a sequence by
‖X‖ = max_t rms(x_t), a linear map by its RMS→RMS norm √(d_in/d_out)·σ_max.

Each module implements `bound(input_bound) -> Bound(lipschitz, output)`: given that every input
token has rms ≤ input_bound, `lipschitz` bounds the module's Lipschitz constant on that (convex)
input set in the sequence norm and `output` bounds the rms of every output token. The σ values
inside are *sound* upper bounds of the current weights (`spectral.sigma_upper`), never the caps.
`compose_bounds` chains them into the model's — no separate formula that could drift.
The Hugging Face model classes that assemble these modules are in `lipformer.modeling`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import spectral
from .config import LipformerConfig
from .local_bounds import (GELU_CURVATURE_MAX, GELU_SLOPE_MAX_UP, ROUND_UP, distance_upper, gelu_slope,
                           masked_max, softmax_box)

# GELU's largest slope is Φ(√2) + √2·φ(√2) = 1.1289039...; the architecture divides by the
# rounded 1.1289, so the activation's Lipschitz constant is this ratio — slightly above 1.
GELU_DIVISOR = 1.1289
GELU_MAX_SLOPE = 0.5 * (1.0 + math.erf(1.0)) + math.sqrt(2.0) * math.exp(-1.0) / math.sqrt(2.0 * math.pi)
GELU_LIPSCHITZ = GELU_MAX_SLOPE / GELU_DIVISOR * (1.0 + 1e-12)
ATTENTION_DIVISOR = 3.0


def maxmin(z: Tensor) -> Tensor:
    """GroupSort with groups of two (Anil, Lucas & Grosse 2019): unit i of the first half and unit
    i of the second half become (max, min). Wherever it is differentiable its Jacobian is a
    permutation, so it is exactly 1-Lipschitz in ℓ2 *and* keeps every norm (‖maxmin(z)‖ = ‖z‖):
    unlike GELU, which halves a small signal (slope 1/2 at 0) while the bound pays its peak
    slope, it passes the whole signal through at the price the bound charges. Exact in floating
    point (comparisons only)."""
    return _MaxMin.apply(z)[0]


class _MaxMin(torch.autograd.Function):
    """maxmin with one comparison kept for backward: the gradient is the same permutation as the
    forward (at a tie, the whole of it goes to one unit — a valid subgradient, where torch.maximum's
    backward splits it in halves). Values equal torch.maximum/minimum's for every non-NaN input (a
    NaN reaches one output here, both there; the next matmul spreads it to all either way). Two to
    three times faster than torch.maximum/minimum's forward and backward on the MLP's activations,
    which dominate a training step's elementwise time. Forward mode (jvp) applies the same
    permutation, and torch.func's transforms (jacrev, jvp, vmap) work through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> tuple[Tensor, Tensor]:
        a, b = z.chunk(2, dim=-1)
        keep = a >= b
        return torch.cat((torch.where(keep, a, b), torch.where(keep, b, a)), dim=-1), keep

    @staticmethod
    def setup_context(ctx, inputs, output):
        keep = output[1]
        ctx.mark_non_differentiable(keep)
        ctx.save_for_backward(keep)
        ctx.save_for_forward(keep)

    @staticmethod
    def _permute(keep: Tensor, t: Tensor) -> Tensor:
        hi, lo = t.chunk(2, dim=-1)   # torch ops: differentiable again (double backward)
        return torch.cat((torch.where(keep, hi, lo), torch.where(keep, lo, hi)), dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_keep) -> Tensor:
        keep, = ctx.saved_tensors
        return _MaxMin._permute(keep, grad)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> tuple[Tensor, None]:
        keep, = ctx.saved_tensors
        return _MaxMin._permute(keep, tangent), None


_U64 = 2.0**-53  # float64 unit roundoff


@dataclass(frozen=True)
class Bound:
    """Lipschitz constant on the input set, and bound on the output (both in max-rms norms)."""
    lipschitz: float
    output: float


@dataclass
class WeightBound:
    """One row of the per-weight table: `factor` = √(d_in/d_out)·sigma_upper, compare with w_max."""
    name: str
    sigma_upper: float
    w_max: float
    factor: float


@dataclass
class ModelBound:
    """Everything the certificate needs, computed from the current weights."""
    total: float                # inputs_embeds → logits
    body: float                 # inputs_embeds → final hidden states
    input_radius: float         # every token entering the body has rms ≤ this
    activations: list[dict] = field(default_factory=list)   # per block: output bound, L, sublayers
    weights: list[WeightBound] = field(default_factory=list)
    hidden_bound: float = 0.0   # rms bound on final hidden states
    logits_bound: float = 0.0   # rms bound on logits
    hidden_error: float = 0.0   # rms bound on the float64 evaluation error of the final hidden states (§6a)
    positions: int = 0          # hidden_error holds for sequences of at most this many tokens

    def to_json(self) -> dict:
        """The certificate's JSON form: `lipschitz.{total, body, layers[{name, sigma_upper, w_max, factor}]}`."""
        return {"lipschitz": {"total": self.total, "body": self.body, "layers": [vars(w) for w in self.weights]},
                "input_radius": self.input_radius, "activations": self.activations,
                "hidden_bound": self.hidden_bound, "logits_bound": self.logits_bound,
                "hidden_error_float64": self.hidden_error, "positions": self.positions,
                "norm": "max over tokens of rms; weights in the RMS→RMS operator norm (docs/lipschitz.md)"}


# Sound σ values are memoized only *within* one `bounds()` call (weights cannot change during it);
# a cache that outlived the call could go stale through `.data` writes and certify old weights.
_SIGMA_MEMO: dict | None = None


@contextmanager
def memoized_sigmas():
    """Reuse sound σ values inside one certification (the weights cannot change during it)."""
    global _SIGMA_MEMO
    outer = _SIGMA_MEMO
    _SIGMA_MEMO = {} if outer is None else outer
    try:
        yield
    finally:
        _SIGMA_MEMO = outer


def _sigma(weight: Tensor, heads: int | None = None) -> Tensor:
    """Sound σ_max bound of the weight, or of each head's row block when `heads` is given."""
    key = (id(weight), heads)
    if _SIGMA_MEMO is not None and key in _SIGMA_MEMO:
        return _SIGMA_MEMO[key][1]
    w = weight.detach()
    if heads is not None:
        # head-major rows, the same split as Attention.forward's view(B, T, heads, head_dim)
        w = w.reshape(heads, w.size(0) // heads, w.size(1))
    value = spectral.sigma_upper(w)
    if _SIGMA_MEMO is not None:
        # keep the tensor alive with its value: a freed tensor's id could be reused by another one
        _SIGMA_MEMO[key] = (weight, value)
    return value


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt()


def project_to_ball(x: Tensor, radius: float | Tensor) -> Tensor:
    """Each token vector (last dimension) moved onto {rms ≤ radius}: the nearest point, so 1-Lipschitz.

    `radius` may be a tensor broadcastable against x's leading dimensions with a trailing 1. The rms
    is taken in at least float32, so bf16 rows are not pushed outside the ball by a rounded norm.
    """
    wide = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    scale = torch.clamp(radius / _rms(wide).clamp(min=1e-30), max=1.0)
    return x * scale.to(x.dtype)


# The projection step hands each module its map (matrix, cap on σ_max) ↦ matrix with σ_max ≤ cap.
Cap = Callable[[Tensor, float], Tensor]


class SpectralLinear(nn.Module):
    """y = x Wᵀ (no bias) for a matrix W whose RMS→RMS norm √(d_in/d_out)·σ_max(W) is capped at w_max.

    What W is and how it is kept under the cap belongs to the subclass (`CappedLinear`: a Parameter
    capped by the projection step; `lipformer.poet.POETLinear`: R·W0·P, capped when it is merged).
    Everything a certificate needs is here and reads the actual `weight`: its sound norm and bound.
    """

    def __init__(self, d_in: int, d_out: int, w_max: float, kind: str):
        super().__init__()
        if not (math.isfinite(w_max) and w_max > 0):
            raise ValueError(f"w_max must be positive and finite, got {w_max}")
        self.d_in, self.d_out, self.w_max, self.kind = int(d_in), int(d_out), float(w_max), kind

    weight: Tensor  # a Parameter or a computed tensor, (d_out, d_in)

    @property
    def rms_scale(self) -> float:
        """σ_max ↦ RMS→RMS norm."""
        return math.sqrt(self.d_in / self.d_out)

    @property
    def sigma_cap(self) -> float:
        """The cap expressed on the plain σ_max."""
        return self.w_max / self.rms_scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def norm_upper(self) -> float:
        """Sound upper bound on the RMS→RMS norm of the current weight (never the cap)."""
        return self.rms_scale * float(_sigma(self.weight))

    def bound(self, input_bound: float) -> Bound:
        n = self.norm_upper()
        return Bound(n, n * input_bound)

    def weight_bound(self, name: str) -> WeightBound:
        s = float(_sigma(self.weight))
        return WeightBound(name, s, self.w_max, self.rms_scale * s)

    def project(self, cap: Cap) -> None:
        """Put the weight back under its cap (the projection step calls this after each optimizer step)."""
        raise NotImplementedError


class CappedLinear(SpectralLinear):
    """A dense capped matrix: a Parameter, put back under its cap by the projection step."""

    def __init__(self, d_in: int, d_out: int, w_max: float, kind: str):
        super().__init__(d_in, d_out, w_max, kind)
        self.weight = nn.Parameter(torch.empty(self.d_out, self.d_in))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Orthogonal at the cap: every singular value equal to sigma_cap, the modula/MIT init.
        nn.init.orthogonal_(self.weight)
        self.weight.mul_(self.sigma_cap)

    @torch.no_grad()
    def project(self, cap: Cap) -> None:
        self.weight.copy_(cap(self.weight, self.sigma_cap))


class MaxRMSEmbedding(nn.Embedding):
    """Token embedding whose rows (token vectors) have rms ≤ w_max; its projection clips rows."""

    def __init__(self, vocab_size: int, dim: int, w_max: float):
        self.w_max, self.kind = float(w_max), "embed"
        super().__init__(vocab_size, dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        self.weight.mul_(self.w_max / _rms(self.weight).clamp(min=1e-12))

    @torch.no_grad()
    def project(self, cap: Cap | None = None) -> None:
        # row by row: a DTensor sharded by rows (FSDP2) clips its own rows, nothing to gather
        self.weight.copy_(project_to_ball(self.weight, self.w_max))

    def weight_bound(self, name: str) -> WeightBound:
        # As a map from one-hot tokens (ℓ1) to rms: the largest row rms. Not part of the body bound.
        r = float(_rms(self.weight.detach().double()).max())
        return WeightBound(name, r, self.w_max, r)


class InputBall(nn.Module):
    """Project each token vector onto {rms ≤ radius}: 1-Lipschitz, output rms ≤ radius always.

    This is what makes the certificate hold for *any* perturbation of inputs_embeds: whatever
    arrives, the body only ever sees inputs inside the ball its bounds were derived for.
    """

    def __init__(self, radius: float):
        super().__init__()
        self.radius = float(radius)

    def forward(self, x: Tensor) -> Tensor:
        return project_to_ball(x, self.radius)

    def bound(self, input_bound: float) -> Bound:
        return Bound(1.0, min(input_bound, self.radius))


# Which matrix class the blocks are built from is chosen where the model is assembled
# (`lipformer.modeling.make_linear`: dense or POET); this module only needs the signature.
LinearFactory = Callable[[LipformerConfig, int, int, str], SpectralLinear]


def dense_linear(config: LipformerConfig, d_in: int, d_out: int, kind: str) -> CappedLinear:
    return CappedLinear(d_in, d_out, config.w_max[kind], kind)


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+h/2}) by position-dependent angles: an orthogonal map per token."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _prefix_max(e: Tensor, allowed: Tensor) -> Tensor:
    """(K, T): for each query t the largest radius among the keys it may see."""
    return torch.where(allowed[None], e[:, None, :], torch.zeros((), dtype=e.dtype)).amax(-1)


def _box_mean(cost: Tensor, low: Tensor, up: Tensor, allowed: Tensor) -> Tensor:
    """Upper bound on E_p[cost] over every distribution p with low ≤ p ≤ up (cost ≥ 0), summing over
    the last dimension: min(Σ up·cost, Σ low·cost + (1 − Σ low)·max cost) (docs/lipschitz.md §9b)."""
    cost = torch.where(allowed, cost, torch.zeros((), dtype=cost.dtype))
    spare = (1 - low.sum(-1)).clamp(min=0)
    return torch.minimum((up * cost).sum(-1), (low * cost).sum(-1) + spare * cost.amax(-1)) * ROUND_UP


class Attention(nn.Module):
    """Causal multi-head attention: scores c·q·k/d_head on RoPE'd q, k; output W_o(attn(V))/3."""

    def __init__(self, config: LipformerConfig, linear: LinearFactory = dense_linear):
        super().__init__()
        d = config.hidden_size
        self.heads, self.head_dim, self.scale = config.num_attention_heads, config.head_dim, config.softmax_scale
        self.q, self.k, self.v, self.o = (linear(config, d, d, kind) for kind in ("q", "k", "v", "o"))
        # A learned score offset per head and query–key distance 0..W−1 (farther keys share the last).
        # It does not depend on the input, so the score path's c·σ_Q·σ_K never pays for it (§4, §9b):
        # heads can pick positions sharply at a small (even zero) softmax scale.
        window = config.position_bias
        self.position_bias = nn.Parameter(torch.zeros(self.heads, window)) if window else None

    def score_bias(self, query_index: Tensor, keys: int) -> Tensor | None:
        """(H, T, S): what each head adds to the score of query t (at key slot query_index[t]) and
        key slot s < keys; None without a position bias. Slots are cache positions, so with left
        padding the distance between two real tokens is still their distance in the text."""
        if self.position_bias is None:
            return None
        slots = torch.arange(keys, device=query_index.device)
        distance = (query_index[:, None] - slots[None]).clamp(0, self.position_bias.size(1) - 1)
        return self.position_bias[:, distance]

    def _biased_mask(self, mask: Tensor | None, start: int | Tensor, T: int, S: int, dtype: torch.dtype) -> Tensor:
        """The mask the attention kernel gets with a position bias: an additive float mask holding the
        bias on allowed keys and the dtype's minimum elsewhere (finite: a padding row stays uniform)."""
        device = self.position_bias.device
        query = torch.arange(T, device=device) + start   # `start` may be a static cache's 0-d counter
        if mask is None:   # causal: query t (slot start + t) sees slots ≤ start + t
            allowed = torch.arange(S, device=device)[None] <= query[:, None]
        elif mask.dtype == torch.bool:
            allowed = mask
        else:
            allowed = mask > torch.finfo(mask.dtype).min / 2
        bias = self.score_bias(query, S).to(dtype)
        return torch.where(allowed, bias, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=bias.device))

    def position_only(self, v: Tensor) -> Tensor:
        """(B, H, T, d_head) values → (B, T, H·d_head): causal attention at softmax scale 0 without a
        padding mask or a cache. Its weights softmax(bias) are then the same for every sequence, so
        they are formed once, (H, T, T), instead of per sequence through q·kᵀ·0 + mask and a batched
        softmax; and the weighted sum is one matmul per head over all sequences' values at once.
        The same function as the general path (its scores are bias + 0·q·k), at about half the cost
        of a training step at the `shakespeare-char` size (docs/benchmarks.md)."""
        B, H, T, dh = v.shape
        scores = self._biased_mask(None, 0, T, T, torch.promote_types(v.dtype, torch.float32))
        weights = torch.softmax(scores, dim=-1).to(v.dtype)                       # (H, T, T)
        y = torch.bmm(weights, v.permute(1, 2, 0, 3).reshape(H, T, B * dh))      # (H, T, B·dh)
        return y.view(H, T, B, dh).permute(2, 1, 0, 3).reshape(B, T, H * dh)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None = None,
                cache=None, layer_idx: int | None = None, attend=None) -> Tensor:
        """`attend(module, q, k, v, mask) -> (B, T, H, d_head)` replaces the built-in SDPA call:
        the Hugging Face shell passes its attention-interface dispatch (eager / sdpa / flex) there."""
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        cos, sin = rope
        q = apply_rope(split(self.q(x)), cos, sin)
        k = apply_rope(split(self.k(x)), cos, sin)
        v = split(self.v(x))
        start = 0
        if cache is not None and self.position_bias is not None:
            start = cache.get_seq_length(layer_idx)   # before the update; a static cache's counter is
            if isinstance(start, Tensor):             # a tensor it then increments in place: copy it
                start = start.clone()
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        if self.position_bias is not None and self.scale == 0 and mask is None and cache is None:
            # q and k enter with weight 0, as in the general path's 0·q·kᵀ: their gradients stay exact
            # zeros, not None (DDP's gradient buckets wait for every parameter it was given)
            return self.o(self.position_only(v)) / ATTENTION_DIVISOR + 0 * (q.sum() + k.sum())
        if self.position_bias is not None:
            mask = self._biased_mask(mask, start, T, k.size(-2), q.dtype)
        elif mask is None and self.scale == 0:
            # torch's CPU sdpa returns NaN for is_causal=True at scale 0 (uniform causal attention):
            # spell the causal mask out, additive so that every attention interface reads it the same
            keep = torch.ones(T, k.size(-2), dtype=torch.bool, device=x.device).tril(k.size(-2) - T)
            mask = torch.zeros(1, 1, T, k.size(-2), dtype=q.dtype, device=x.device).masked_fill(
                ~keep, torch.finfo(q.dtype).min)
        if attend is not None:
            return self.o(attend(self, q, k, v, mask).reshape(B, T, -1)) / ATTENTION_DIVISOR
        if mask is None and k.size(-2) != T:  # decoding with a cache: causal, aligned bottom-right
            mask = torch.ones(T, k.size(-2), dtype=torch.bool, device=x.device).tril(k.size(-2) - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=self.scale / self.head_dim)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o(y) / ATTENTION_DIVISOR

    def bound(self, input_bound: float) -> Bound:
        """docs/lipschitz.md §4: per head h, with σ's of the head's row blocks and B the input bound,
            ‖d y_h‖_rms ≤ √H σ_V,h (1 + 2cH σ_Q,h σ_K,h B²) ‖dX‖,
        heads concatenate in quadrature, then W_o and /3."""
        H, c, B = self.heads, self.scale, input_bound
        sq, sk, sv = (_sigma(m.weight, H) for m in (self.q, self.k, self.v))
        so = float(_sigma(self.o.weight))
        per_head = sv * (1.0 + 2.0 * c * H * sq * sk * B * B)
        mix = float(torch.sqrt((per_head**2).sum()))
        value_gain = float(torch.sqrt((sv**2).sum()))
        return Bound(so * mix / ATTENTION_DIVISOR, so * value_gain * B / ATTENTION_DIVISOR)

    def rounding_error(self, input_bound: float, lam: float) -> float:
        """rms bound on |float64 forward − exact forward| at one computed input of rms ≤ B (§6a):
            (σ_O/3)·λ·B·[(Σ_h σ_V,h²(12 + φ_h)²)^½ + 2(Σ_h σ_V,h²)^½],
        φ_h = min(e^{14λS_h} − 1, 2)(1 + λ)/λ, S_h = cH·σ_Q,h·σ_K,h·B² + max|bias_h| the bound on |scores|."""
        H, c, B = self.heads, self.scale, input_bound
        sq, sk, sv = (_sigma(m.weight, H) for m in (self.q, self.k, self.v))
        so = float(_sigma(self.o.weight))
        scores = c * H * sq * sk * B * B
        if self.position_bias is not None:
            scores = scores + self.position_bias.detach().abs().amax(-1).to(scores.dtype) * ROUND_UP
        # score errors ≤ 7λS move every softmax weight by a factor e^{±14λS}; both are distributions
        shift = torch.clamp(torch.expm1(14.0 * lam * scores), max=2.0) * (1.0 + lam) / lam
        heads = torch.sqrt((sv**2 * (12.0 + shift) ** 2).sum()) + 2.0 * torch.sqrt((sv**2).sum())
        return float(so * lam * B * heads / ATTENTION_DIVISOR)

    def local_prepare(self, x: Tensor, rope: tuple[Tensor, Tensor], allowed: Tensor, lam: float,
                      rows: int, keep: bool = True) -> dict:
        """The ε-independent part of the local bound at the computed input x (T, d), in chunks of
        `rows` query rows: per chunk the clean scores with their float64 error, the clean softmax
        box, the distances of keys and values from their attention-weighted centres (§9b). A
        certification evaluates many trial ε on one input, so with `keep` the chunks are computed
        once here (≈ 6 float64 numbers per allowed query–key pair and head); without it, on every
        call. Each chunk stops at its last allowed key: causal rows never see later ones."""
        H, dh, c = self.heads, self.head_dim, self.scale
        T = x.size(0)
        Wq, Wk, Wv = (m.weight.detach() for m in (self.q, self.k, self.v))
        # RoPE's float64 tables rotate with norm ≤ 1 + 4u: carried by the factor on σ_Q, σ_K
        sq, sk, sv = (_sigma(m.weight, H) * ROUND_UP for m in (self.q, self.k, self.v))
        split = lambda t: t.view(T, H, dh).transpose(0, 1)  # noqa: E731
        cos, sin = rope
        q, k, v = apply_rope(split(F.linear(x, Wq)), cos, sin), apply_rope(split(F.linear(x, Wk)), cos, sin), split(F.linear(x, Wv))
        # the exact q, k, v at x̂ are within these of the computed ones (§6a step 1)
        xn = spectral.row_norm_upper(x)
        dq, dk, dv = (2 * lam * s[:, None] * xn[None] for s in (sq, sk, sv))          # (H, T)
        qn, kn = spectral.row_norm_upper(q), spectral.row_norm_upper(k)
        state = {"sq": sq, "sk": sk, "sv": sv, "so": float(_sigma(self.o.weight)), "f": c / dh,
                 "q_up": (qn + dq) * ROUND_UP, "tensors": (q, k, v, dq, dk, dv, qn, kn), "chunks": []}
        for t0 in range(0, T, max(1, rows)):
            t1 = min(T, t0 + max(1, rows))
            seen = allowed[t0:t1].any(0).nonzero()
            span = (t0, t1, int(seen.max()) + 1 if seen.numel() else 0)
            state["chunks"].append(self._local_rows(state, allowed, *span) if keep else span)
        return state

    def _local_rows(self, state: dict, allowed: Tensor, t0: int, t1: int, S: int) -> dict:
        """One chunk of `local_prepare`: query rows t0:t1 against keys :S."""
        q, k, v, dq, dk, dv, qn, kn = state["tensors"]
        f, keys = state["f"], allowed[t0:t1, :S]
        if S == 0:   # rows that see no key
            return {"span": (t0, t1, S)}
        q, qn, dq, k, kn, dk, v, dv = q[:, t0:t1], qn[:, t0:t1], dq[:, t0:t1], k[:, :S], kn[:, :S], dk[:, :S], v[:, :S], dv[:, :S]
        raw = f * (q @ k.mT)                                                             # (H, Tc, S)
        # |computed − exact| score: the errors of q, k, the d_h-term dot product, the scaling
        gamma = (q.size(-1) + 4) * _U64
        d_a = (f * (dq[:, :, None] * (kn[:, None, :] + dk[:, None, :]) + qn[:, :, None] * dk[:, None, :]
                    + gamma * qn[:, :, None] * kn[:, None, :]) + 4 * _U64 * raw.abs()) * ROUND_UP
        bias = self.score_bias(torch.arange(t0, t1, device=raw.device), S)   # this chunk's rows only
        if bias is not None:   # the offset is exact; adding it rounds once more
            raw = raw + bias.detach().to(raw.dtype)
            d_a = d_a + 2 * _U64 * raw.abs() * ROUND_UP
        center = torch.where(keys, raw, torch.full_like(raw, -math.inf))
        p = torch.softmax(center, -1)
        kappa, vbar = p @ k, p @ v                      # any fixed centres will do: the computed ones
        kd = distance_upper(kappa, k) + dk[:, None, :]                                  # ≥ ‖k_s − κ_t‖
        r = distance_upper(vbar, v) + dv[:, None, :]                                    # ≥ ‖v_s − v̄_t‖
        low0, up0, eta0 = softmax_box(center, d_a)      # the exact clean weights p_t lie in this box
        return {"span": (t0, t1, S), "keys": keys, "center": center, "d_a": d_a, "kd": kd, "r": r,
                "low0": low0, "up0": up0, "eta0": eta0, "r_max": masked_max(r, keys)}

    def local_bound(self, x: Tensor, e: Tensor, rope: tuple[Tensor, Tensor], allowed: Tensor,
                    input_bound: float, lam: float, budget: int = 1 << 16, prepared: dict | None = None) -> Tensor:
        """Per-token ℓ2 radii of the output around the exact output at x̂ (docs/lipschitz.md §9b).

        x: (T, d) the computed float64 input; e: (K, T) ℓ2 radii of the input around x̂, one row per
        trial; rope: the (cos, sin) tables the forward used, (T, d_head); allowed: (T, T) the keys
        each query sees; input_bound: an rms bound on every point of the segments from x̂ (for the
        global bound); lam: the §6a float64 constant; budget: entries per chunk of query rows (their
        ~60 elementwise passes then stay in cache: ≈4× faster on CPU than one large chunk);
        prepared: `local_prepare(...)` when the caller evaluates many e on the same x. Returns
        (K, T): per query and trial, the smaller of the local bound (value path plus
        min(S_box, S_CS), heads in quadrature, W_o/3) and the global bound times the largest input
        radius the query sees.
        """
        H, T, K = self.heads, x.size(0), e.size(0)
        P = prepared if prepared is not None else self.local_prepare(
            x, rope, allowed, lam, rows=budget // max(1, K * H * T), keep=False)
        sq, sk, sv, f, q_up = P["sq"], P["sk"], P["sv"], P["f"], P["q_up"]
        eq, ek = sq[None, :, None] * e[:, None], sk[None, :, None] * e[:, None]          # (K, H, T)
        seen = _prefix_max(e, allowed)                                                 # (K, T)
        value = sv[None, :, None] * seen[:, None]                                       # (K, H, T)
        glob = self.bound(input_bound).lipschitz * seen
        s_box = torch.empty(K, H, T, dtype=x.dtype)
        s_cs = torch.empty(K, H, T, dtype=x.dtype)
        for chunk in P["chunks"]:
            C = chunk if isinstance(chunk, dict) else self._local_rows(P, allowed, *chunk)
            t0, t1, S = C["span"]
            if S == 0:   # no key, no local statement: the global bound stands (NaN → ∞ below)
                s_box[:, :, t0:t1] = s_cs[:, :, t0:t1] = math.nan
                continue
            center, d_a, kd, r, low0, up0, keys = (C[n] for n in ("center", "d_a", "kd", "r", "low0", "up0", "keys"))
            EQ, EK = eq[:, :, t0:t1, None], ek[:, :, None, :S]
            beta = f * (EQ * kd + q_up[None, :, t0:t1, None] * EK + EQ * EK) * ROUND_UP
            low1, up1, eta1 = softmax_box(center, beta + d_a)   # every weight on the perturbed segment
            eta = 2 * max(C["eta0"], eta1)
            up_l, low_l = up1 * (1 + eta), low1 * (1 - eta)      # outward: the exact box lies inside
            more = (up1 - low0 + eta * (up1 + low0)).clamp(min=0)    # ≥ p′_s − p_s
            less = (up0 - low1 + eta * (up0 + low1)).clamp(min=0)    # ≥ p_s − p′_s
            w = torch.maximum(more, less)
            tv = torch.minimum(more.sum(-1), less.sum(-1)).clamp(max=1.0)
            s_box[:, :, t0:t1] = torch.minimum((w * r).sum(-1), 2 * tv * C["r_max"])
            spread_v = r + sv[None, :, None, None] * e[:, None, None, :S]
            mean = lambda cost: _box_mean(cost, low_l, up_l, keys)  # noqa: E731
            sk_ = mean((kd + EK).pow(2)).sqrt()
            ek_ = mean(EK.pow(2).expand_as(beta)).sqrt()
            sv_ = mean(spread_v.pow(2)).sqrt()
            s_cs[:, :, t0:t1] = f * (EQ[..., 0] * sk_ + (q_up[None, :, t0:t1] + EQ[..., 0]) * ek_) * sv_
        heads = value + torch.nan_to_num(torch.minimum(s_box, s_cs), nan=math.inf)
        local = P["so"] * heads.pow(2).sum(1).sqrt() / ATTENTION_DIVISOR * ROUND_UP
        return torch.minimum(local, glob)


class MLP(nn.Module):
    """W_out · act(W_in x), act = gelu(·)/1.1289 (the paper's) or maxmin (norm-preserving)."""

    def __init__(self, config: LipformerConfig, linear: LinearFactory = dense_linear):
        super().__init__()
        d, h = config.hidden_size, config.intermediate_size
        self.fc_in = linear(config, d, h, "mlp_in")
        self.fc_out = linear(config, h, d, "mlp_out")
        self.activation = config.activation
        # act_lipschitz: the activation's Lipschitz constant; act_shrink: rms(act(z)) ≤ act_shrink·rms(z)
        if self.activation == "maxmin":
            self.act_lipschitz, self.act_shrink = 1.0, 1.0
        elif self.activation != "gelu":   # the forward and every bound below know these two only
            raise ValueError(f"activation must be 'gelu' or 'maxmin', got {self.activation!r}")
        else:
            self.act_lipschitz, self.act_shrink = GELU_LIPSCHITZ, 1.0 / GELU_DIVISOR

    def act(self, z: Tensor) -> Tensor:
        return maxmin(z) if self.activation == "maxmin" else F.gelu(z) / GELU_DIVISOR

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))

    def bound(self, input_bound: float) -> Bound:
        # |gelu(z)| ≤ |z| entrywise, so GELU also shrinks magnitudes by 1/1.1289; maxmin keeps them.
        first = self.fc_in.bound(input_bound)
        second = self.fc_out.bound(first.output * self.act_shrink)
        return Bound(first.lipschitz * self.act_lipschitz * second.lipschitz, second.output)

    def rounding_error(self, input_bound: float, lam: float) -> float:
        """rms bound on |float64 forward − exact forward| at one computed input of rms ≤ B (§6a).
        (maxmin is exact in floating point, so GELU's allowance covers it.)"""
        return 3.0 * lam * self.fc_in.norm_upper() * self.fc_out.norm_upper() * input_bound

    def local_prepare(self, x: Tensor) -> dict:
        """The ε-independent part of the local bound at the computed input x (T, d)."""
        gain = float(_sigma(self.fc_out.weight)) * float(_sigma(self.fc_in.weight)) * self.act_shrink
        if self.activation == "maxmin":   # a permutation Jacobian everywhere: no local slope to gain
            return {"gain": gain}
        W_in = self.fc_in.weight.detach()
        z = F.linear(x, W_in)                                                   # (T, d_ff)
        rows = spectral.row_norm_upper(W_in)                                    # (d_ff,)
        # |ẑ_ti − z_ti| ≤ γ_d‖w_i‖‖x_t‖ (a d-term dot product)
        dz = (x.size(-1) + 2) * _U64 * rows[None] * spectral.row_norm_upper(x)[:, None] * ROUND_UP
        return {"clean": gelu_slope(z).abs().amax(-1) + 1e-13,                  # (T,): erf, exp within ulps
                "row_max": rows.max(), "dz": dz.amax(-1), "gain": gain}

    def local_bound(self, x: Tensor, e: Tensor, input_bound: float, lam: float, prepared: dict | None = None) -> Tensor:
        """Per-token ℓ2 radii of the output around the exact output at x̂ (docs/lipschitz.md §9c):
        σ_out·σ_in·m_t/1.1289·e_t, m_t ≥ |GELU′| anywhere in every unit's reachable interval
        z_ti ± ‖w_i‖e_t: m_t = max_i |GELU′(ẑ_ti)| + max|GELU″|·max_i(‖w_i‖e_t + rounding).
        maxmin: σ_out·σ_in·e_t. x: (T, d); e: (K, T); prepared: `local_prepare(x)`; returns (K, T)."""
        P = prepared if prepared is not None else self.local_prepare(x)
        if self.activation == "maxmin":
            local = P["gain"] * e * ROUND_UP
        else:
            reach = (P["row_max"] * e + P["dz"]) * ROUND_UP                      # (K, T)
            slope = torch.clamp(P["clean"] + GELU_CURVATURE_MAX * reach, max=GELU_SLOPE_MAX_UP)
            local = P["gain"] * slope * e * ROUND_UP
        return torch.minimum(local, self.bound(input_bound).lipschitz * e)

def residual_bound(alpha: float, input_bound: float, branch: Bound) -> Bound:
    """x ↦ (1−α)x + α f(x): Lipschitz ≤ (1−α) + α L_f, output ≤ (1−α)B + α B_f."""
    return Bound((1 - alpha) + alpha * branch.lipschitz, (1 - alpha) * input_bound + alpha * branch.output)


class Block(nn.Module):
    def __init__(self, config: LipformerConfig, linear: LinearFactory = dense_linear):
        super().__init__()
        self.alpha = config.residual_alpha
        self.attn = Attention(config, linear)
        self.mlp = MLP(config, linear)

    def forward(self, x: Tensor, rope, mask=None, cache=None, layer_idx=None, attend=None) -> Tensor:
        a = self.alpha
        x = (1 - a) * x + a * self.attn(x, rope, mask, cache, layer_idx, attend)
        return (1 - a) * x + a * self.mlp(x)

    def bound(self, input_bound: float) -> tuple[Bound, Bound]:
        """(attention sublayer, MLP sublayer) bounds, each including its residual mix."""
        attn = residual_bound(self.alpha, input_bound, self.attn.bound(input_bound))
        mlp = residual_bound(self.alpha, attn.output, self.mlp.bound(attn.output))
        return attn, mlp

    def float64_error(self, input_bound: float, error: float, lam: float) -> float:
        """Bound on the float64 evaluation error after this block, given `error` on its input (§6a).

        The computed input lies within `error` of an exact one of rms ≤ B, so inside the ball of
        rms B + error: there the exact sublayer is L(B + error)-Lipschitz (this carries the input's
        error forward), and evaluating it in float64 adds the sublayer's own rounding error.
        """
        a, B = self.alpha, input_bound
        for branch in (self.attn, self.mlp):
            wide = residual_bound(a, B + error, branch.bound(B + error))
            error = wide.lipschitz * error + a * branch.rounding_error(B + error, lam) + 3 * _U64 * wide.output
            B = residual_bound(a, B, branch.bound(B)).output
        return error

    def local_prepare(self, x_attn: Tensor, x_mlp: Tensor, rope, allowed: Tensor, input_bound: float,
                      lam: float, rows: int, keep: bool = True) -> dict:
        """The ε-independent part of `local_bound`: per sublayer its rms bound at x̂ and every exact
        point, its own prepared tensors (attention: in chunks of `rows` query rows, kept if `keep`),
        and the float64 error of evaluating it once at x̂ (§6a)."""
        a, root_d = self.alpha, math.sqrt(x_attn.size(-1))
        B, steps = input_bound, []
        for branch, x in ((self.attn, x_attn), (self.mlp, x_mlp)):
            here = max(B, float(x.pow(2).mean(-1).sqrt().max()) * ROUND_UP)   # x̂ and every exact point
            inner = (branch.local_prepare(x, rope, allowed, lam, rows, keep) if branch is self.attn
                     else branch.local_prepare(x))
            wide = residual_bound(a, here, branch.bound(here))
            rounding = root_d * (a * branch.rounding_error(here, lam) + 3 * _U64 * wide.output) * ROUND_UP
            steps.append((branch, x, here, inner, rounding))
            B = residual_bound(a, B, branch.bound(B)).output
        return {"steps": steps, "output_bound": B}

    def local_bound(self, e: Tensor, prepared: dict, rope, allowed: Tensor, record: list | None = None) -> Tensor:
        """Radii after the block around its computed output (docs/lipschitz.md §9c–d).

        e: (K, T) ℓ2 radii of the exact perturbed input around the computed one, one row per trial;
        prepared: `local_prepare(...)` of this block at that input (done once, however many trials);
        rope, allowed: as the forward used them; record: if given, the radii at each sublayer's
        input are appended to it (the linear-relaxation certificate needs them). Each residual mixes
        e ← (1 − α)e + α·f and adds
        the float64 error of evaluating that sublayer once at the computed input (§6a), which is
        what separates the next computed activation from the exact function of this one.
        """
        a = self.alpha
        for branch, x, here, inner, rounding in prepared["steps"]:
            if record is not None:
                record.append(e)
            if branch is self.attn:
                f = branch.local_bound(x, e, rope, allowed, here, None, prepared=inner)
            else:
                f = branch.local_bound(x, e, here, None, prepared=inner)
            e = ((1 - a) * e + a * f) * ROUND_UP + rounding
        return e


def float64_linear_error(n: int) -> float:
    """λ = γ_n·√n: a float64 matrix–vector product with inner dimensions ≤ n is off by at most
    λ·‖W‖₂‖x‖₂ (γ_n·‖W‖_F‖x‖₂, with ‖W‖_F ≤ √n·‖W‖₂; docs/lipschitz.md §6a)."""
    return spectral.gamma(n) * math.sqrt(n)


def compose_bounds(ball: InputBall, layers: list[Block], head: SpectralLinear,
                   constrained: list[tuple[str, nn.Module]], *, positions: int) -> ModelBound:
    """Compose every module's bound into the model's (docs/lipschitz.md §5).

    `constrained` lists (state-dict name, module) for the per-weight table; `positions` is the
    longest sequence the model is run on (the softmax sums over that many terms, §6a).
    """
    global _SIGMA_MEMO
    _SIGMA_MEMO = {}
    try:
        B = ball.bound(math.inf)  # any inputs_embeds at all
        body, x_bound = B.lipschitz, B.output
        widths = [layer.mlp.fc_in.d_out for layer in layers]  # d_ff; d and d_head are ≤ head.d_in
        lam = float64_linear_error(max([8, head.d_in, positions, *widths]))
        # the ball's projection: an rms (a d-term sum, then a root), a division, a min, a product
        error = (spectral.gamma(head.d_in) + 8 * _U64) * x_bound
        activations = []
        for i, layer in enumerate(layers):
            error = layer.float64_error(x_bound, error, lam)
            attn, mlp = layer.bound(x_bound)
            body *= attn.lipschitz * mlp.lipschitz
            activations.append({"block": i, "lipschitz": attn.lipschitz * mlp.lipschitz,
                                "attn_output": attn.output, "mlp_output": mlp.output})
            x_bound = mlp.output
        out = head.bound(x_bound)
        weights = [m.weight_bound(name + ".weight") for name, m in constrained]
        return ModelBound(total=body * out.lipschitz, body=body, input_radius=ball.radius,
                          activations=activations, weights=weights, hidden_bound=x_bound,
                          logits_bound=out.output, hidden_error=error, positions=positions)
    finally:
        _SIGMA_MEMO = None


def constrained_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every weight that carries a cap, names as in the state dict."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (SpectralLinear, MaxRMSEmbedding))]
