"""Newton–Schulz polar iterations: the odd quintics behind Muon, ROOT and the matmul-only caps.

Approximate and fast (bf16 by default): nothing computed here may enter a certificate. The
coefficient schedules are named as in their papers (REFERENCES.md). Two ways to run the same
polynomials: the standard iteration on X (torch.optim.Muon's arithmetic, bit for bit) and the Gram
iteration on the n × n matrix XXᵀ (fewer flops for long rectangles; the idea of Dao lab's Gram
Newton–Schulz, written here from the identity X_k = P_k(XXᵀ)·X_0), chosen by `orthogonalize`'s
`method` ("auto": by `auto_picks_gram`, with the device's precision plan `gram_plan`).
"""

from __future__ import annotations

import math
import threading
from typing import Sequence, Union

import torch
from torch import Tensor

Coefficients = tuple[float, float, float]

# Keller Jordan's fixed quintic, the default of torch.optim.Muon. Singular values end in ~[0.68, 1.2].
CLASSIC: Coefficients = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al., arXiv 2505.16932): per-step minimax quintics for σ ∈ [1e-3, 1],
# with the input normalized by 1.01·‖X‖_F. Steps beyond these use the polishing quintic below.
POLAR_EXPRESS: tuple[Coefficients, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.01

# The degree-5 Newton–Schulz polynomial (15x - 10x³ + 3x⁵)/8: fixed point 1 with p'(1) = p''(1) = 0,
# so it polishes values already near 1 to working precision in a few steps.
POLISH: Coefficients = (15 / 8, -10 / 8, 3 / 8)

Schedule = Union[str, Coefficients, Sequence[Coefficients]]


def coefficient_schedule(coefficients: Schedule, steps: int) -> list[Coefficients]:
    """Per-step (a, b, c) for `steps` iterations from a name or explicit coefficients.

    "classic": the fixed quintic every step. "polar_express": the published 5-step schedule,
    then the polishing quintic. A single (a, b, c) repeats; a sequence is used as given (it must
    have at least `steps` entries).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(coefficients, str):
        if coefficients == "classic":
            return [CLASSIC] * steps
        if coefficients == "polar_express":
            return list(POLAR_EXPRESS[:steps]) + [POLISH] * max(0, steps - len(POLAR_EXPRESS))
        raise ValueError(f"unknown coefficient schedule {coefficients!r}; use 'classic', 'polar_express' "
                         "or explicit (a, b, c) tuples")
    coefficients = tuple(coefficients)
    if len(coefficients) == 3 and all(isinstance(v, (int, float)) for v in coefficients):
        return [tuple(float(v) for v in coefficients)] * steps  # type: ignore[list-item]
    if len(coefficients) < steps:
        raise ValueError(f"schedule has {len(coefficients)} steps, {steps} requested")
    return [tuple(float(v) for v in c) for c in coefficients[:steps]]  # type: ignore[misc]


def _times_poly(update: Tensor, Y: Tensor, a: float) -> Tensor:
    """a·Y + update·Y, fused (addmm for a matrix, baddbmm for a stack) as torch.optim.Muon does."""
    if Y.ndim == 2:
        return torch.addmm(Y, update, Y, beta=a)
    return torch.baddbmm(Y, update, Y, beta=a)


def _quintic_part(R: Tensor, b: float, c: float) -> Tensor:
    """b·R + c·R², the non-constant part of the step polynomial q(R) = aI + bR + cR²."""
    if R.ndim == 2:
        return torch.addmm(R, R, R, beta=b, alpha=c)
    return torch.baddbmm(R, R, R, beta=b, alpha=c)


def _odd_quintic(X: Tensor, schedule: Sequence[Coefficients]) -> Tensor:
    """X ← aX + (b·XXᵀ + c·(XXᵀ)²)X for each (a, b, c); X must be wide or square (rows ≤ cols).

    The 2-D path uses the same fused addmm calls as torch.optim.Muon so that the two agree to
    the last bit in bf16; stacks go through baddbmm.
    """
    lead = X.shape[:-2]
    if X.ndim > 3:
        X = X.reshape(-1, *X.shape[-2:])
    for a, b, c in schedule:
        X = _times_poly(_quintic_part(X @ X.mT, b, c), X, a)
    return X.reshape(*lead, *X.shape[-2:])


def _sym_gram(X: Tensor) -> Tensor:
    """X Xᵀ from its upper block rows: the top half of the rows against all of X, the bottom-right block,
    and the bottom-left block as the transpose of the top-right one — 3/4 of the multiply-adds of a full
    product, and exactly symmetric (rounding in a full product is not)."""
    n = X.size(-2)
    if n < 64:
        return X @ X.mT
    h = n // 2
    R = X.new_empty(*X.shape[:-1], n)
    torch.matmul(X[..., :h, :], X.mT, out=R[..., :h, :])
    torch.matmul(X[..., h:, :], X[..., h:, :].mT, out=R[..., h:, h:])
    R[..., h:, :h] = R[..., :h, h:].mT
    return R


def _scratch_like(X0: Tensor, X: Tensor) -> Tensor | None:
    """X_0's memory as a row-major tensor shaped like X (X_0 is dead after a restart), or None.

    Row-major whatever X_0's layout: for a tall G, X_0 = Gᵀ is column-major, and a product written
    into that layout runs ~1.7× slower on CPU (measured, bf16 768 × 3072) than into a row-major one.
    """
    for buf in (X0, X0.mT):
        if buf.is_contiguous() and buf.numel() == X.numel() and buf.dtype == X.dtype:
            return buf.view(-1).view(X.shape)
    return None


_WORKSPACE = threading.local()  # per thread: {(role, shape, dtype): reusable buffers} (CPU only)
WORKSPACE_MAX_BYTES = 16 * 2 ** 20


def _workspace(role: str, like: Tensor, count: int) -> list[Tensor]:
    """`count` reusable buffers shaped like `like` (CPU, each ≤ WORKSPACE_MAX_BYTES), else [].

    For tensors that never leave `_gram_quintic` (the restart's X_k, the n × n R, q, qR, P): on CPU
    fresh memory costs page faults every call (measured in the profile: the restart's 768 × 3072 bf16
    product took 4.9 ms into fresh memory, 3.1 ms into reused memory; ~2000 faults per call came from
    the n × n temporaries). An optimizer calls this with the same few shapes every step, so buffers
    are kept per (shape, dtype) per thread; larger matrices (an LM head) allocate each time.
    """
    if like.device.type != "cpu" or like.numel() * like.element_size() > WORKSPACE_MAX_BYTES:
        return []
    cache = getattr(_WORKSPACE, "buffers", None)
    if cache is None:
        cache = _WORKSPACE.buffers = {}
    key = (role, tuple(like.shape), like.dtype)
    if key not in cache:
        cache[key] = [torch.empty(like.shape, dtype=like.dtype) for _ in range(count)]
    return cache[key]


def _gram_quintic(X: Tensor, schedule: Sequence[Coefficients], restarts: Sequence[int] = (),
                  scale: Tensor | None = None, reuse_input: bool = False,
                  trace_norm: tuple[float, float] | None = None) -> Tensor | None:
    """The same odd quintics as `_odd_quintic`, iterated on the n × n Gram matrix (X is n × m, n ≤ m).

    Each step multiplies X on the left by q_k(R_k) = a_k I + b_k R_k + c_k R_k², R_k = X_k X_kᵀ,
    so X_K = P·X_0 with P = q_{K-1}(R_{K-1})···q_0(R_0), and since q_k(R_k) is a polynomial in R_k it
    commutes with it: R_{k+1} = q_k R_k q_k. Only the Gram R_0 = X_0X_0ᵀ and the final P·X_0 touch the
    long side m; every step in between costs four n × n products (R², qR, q(qR), qP; the first step of
    a segment has P = q free, the last skips R) instead of two n × n × m ones and one n × n, which wins
    once m ≳ 2n. q is formed once (its a only on the diagonal), so the products are bare matmuls.

    The recursion for R never looks at X again, so rounding in R and P compounds, and P grows like the
    product of the a_k (its value on the null space of R): in bf16 a relative error of 2⁻⁸ in a P of
    size 40 is a visible error in P·X_0. A restart before step k (k in `restarts`, see `gram_plan`)
    forms X_k = P·X_0 and its Gram afresh, resetting that growth at the cost of one extra n × n × m pair.

    `scale` (optional, one per matrix): iterate on scale·X without forming it — R_0 and the first P
    carry the factor, which saves an elementwise pass over the long side. `trace_norm` = (safety, eps):
    take scale = 1/max(safety·‖X‖_F, eps) with ‖X‖_F² = tr R_0 (float32 sum of R_0's diagonal), which
    saves the norm's own pass over X; returns None if ‖X‖² is outside 2^±80 (R_0 too near under- or
    overflow), and the caller then scales X itself. `reuse_input`: X is the
    caller's own scratch copy, so after a restart the result may overwrite it (no fresh n × m buffer:
    on CPU each one costs page faults, ~1 ms for 768 × 3072 bf16).
    """
    lead = X.shape[:-2]
    if X.ndim > 3:
        X = X.reshape(-1, *X.shape[-2:])
        scale = scale.reshape(-1, 1, 1) if scale is not None and scale.ndim else scale
    X0 = X
    R = _sym_gram(X)
    pool = _workspace("n×n", R, 5)
    free = list(pool)
    take = lambda: free.pop() if free else None  # noqa: E731  (None: a fresh tensor)
    give = lambda t: free.append(t) if any(t is b for b in pool) else None  # noqa: E731
    if trace_norm is not None:
        safety, eps = trace_norm
        sq = R.diagonal(dim1=-2, dim2=-1).float().sum(-1)  # ‖X‖_F² per matrix
        if not bool(((sq > 2.0 ** -80) & (sq < 2.0 ** 80)).all()):
            return None
        scale = (sq.sqrt() * safety).clamp(min=eps).reciprocal()
        scale = scale.reshape(-1, 1, 1) if R.ndim == 3 else scale
    if scale is not None:
        scale = scale.float()
        R.mul_(scale * scale)
    P = None  # None stands for scale·I since the last (re)start
    last = len(schedule) - 1
    for k, (a, b, c) in enumerate(schedule):
        if k in restarts and P is not None:
            X = torch.matmul(P, X, out=(_workspace("X_k", X, 1) or [None])[0] if X is X0 else None)
            give(R), give(P)
            R = _sym_gram(X)
            P, scale = None, None
        # q(R) = c(R² + (b/c)R) + aI, then bare products q(qR) and qP (one rounding each). Measured
        # against one fused addmm for bR + cR² (bf16, classic, Gaussian 768 × 3072): the output is
        # closer to exact arithmetic (relative Frobenius error 0.015 vs 0.018; torch's standard
        # iteration 0.010) and max |σ − 1| is 0.306 vs 0.326 (exact 0.318, torch 0.319); the fused
        # form tracks float32 better on ROOT's clipped momenta (tests/test_optim.py). Carrying c as a
        # scalar instead (Q' = R² + (b/c)R + (a/c)I, c in the alpha of the next addmm; one pass per
        # step less, ~4% faster) agrees with float32 to 2e-6 but lands 2× further from exact in bf16
        # (0.030 vs 0.015 at 5 steps; the gap opens at step 4, with float32 products as well), so the
        # bf16 rounding of q at its true scale is kept. Every n × n result goes into a free workspace
        # buffer (`take`; `give` returns a dead one), the same arithmetic as fresh tensors.
        if c != 0:
            S = torch.matmul(R, R, out=take())
            Q = torch.add(S, R, alpha=b / c, out=S).mul_(c)
        else:
            Q = R * b
        Q.diagonal(dim1=-2, dim2=-1).add_(a)
        if k < last and k + 1 not in restarts:  # a restart re-forms R from X anyway
            T = torch.matmul(Q, R, out=take())
            R_next = torch.matmul(Q, T, out=take())
            give(T), give(R)
            R = R_next
        if P is None:
            P = Q.mul_(scale) if scale is not None else Q
        else:
            P_next = torch.matmul(Q, P, out=take())
            give(P), give(Q)
            P = P_next
    X = torch.matmul(P, X, out=_scratch_like(X0, X) if reuse_input and X is not X0 else None)
    return X.reshape(*lead, *X.shape[-2:])


Method = str  # "auto" | "gram" | "standard"

# How much P may grow (∏ a_k over a segment, its norm on R's null space) before bf16 Gram needs a
# restart: the first segment starts from X_0 (σ ≤ 1, usually far less), later ones from X_k with
# σ_max ≈ 1, so they get less. Fitted on tests/test_spectral.py's condition-number sweep (cond 1 to
# 1e6, classic and Polar Express, 3 seeds): classic 5 steps → one restart, before step 3 (segments
# 3.4³ ≈ 41 and 3.4² ≈ 12), as accurate as the standard bf16 iteration; a restart before step 2
# instead (segments 12 and 41) is 10× worse than standard at cond 1e2. Polar Express → before 2
# and 4 (33, 13, 2.3); one restart before 3 (128, 7.7) is 10× worse.
BF16_SEGMENT_GAIN = (48.0, 16.0)


def gain_restarts(schedule: Sequence[Coefficients],
                  caps: tuple[float, float] = BF16_SEGMENT_GAIN) -> tuple[int, ...]:
    """Restart steps that keep each segment's ∏|a_k| within caps (first segment, later segments)."""
    restarts, gain, cap = [], 1.0, caps[0]
    for k, (a, _, _) in enumerate(schedule):
        if k and gain * abs(a) > cap:
            restarts.append(k)
            gain, cap = 1.0, caps[1]
        gain *= abs(a)
    return tuple(restarts)


def gram_plan(dtype: torch.dtype, device: torch.device, steps: int,
              coefficients: Schedule = "polar_express") -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, restarts) the Gram iteration uses for a `dtype` input on `device` and this schedule.

    Measured against SVD (tests/test_spectral.py, docs/benchmarks.md): with no restart, half
    precision breaks on ill-conditioned inputs (cond ≳ 1e2: σ up to 1.6 for classic, up to 30 for
    Polar Express, singular vectors mixed) because R_0's rounding floor hides σ² below it while P still
    lifts those directions by ∏a_k. Float16 (2⁻¹¹) with one restart before step 2 — Dao lab's choice
    — is as accurate as the standard bf16 iteration from cond 3 to 1e6; it is the plan on CUDA
    (float16 runs at bf16 speed there; every R ≤ 1.5 and P ≤ ∏a ≈ 40 per segment fit its range).
    CPUs run float16 matmuls ~100× slower than bf16, so bf16 (2⁻⁸) restarts where the segment's
    growth ∏a_k would pass `BF16_SEGMENT_GAIN` (`gain_restarts`): classic 5 steps (3,), Polar
    Express (2, 4). The default `coefficients` is the schedule that needs the most. Float32: none.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return dtype, ()
    if device.type == "cuda":
        return torch.float16, tuple(k for k in (2,) if k < steps)
    return torch.bfloat16, gain_restarts(coefficient_schedule(coefficients, steps))


def gram_is_cheaper(rows: int, cols: int, steps: int, restarts: Sequence[int] = ()) -> bool:
    """Does the Gram iteration take fewer multiply-adds than the standard one for a rows × cols X?

    In units of n³ (n = min side, r = max/min ≥ 1): standard K(2r + 1); Gram per segment one X Xᵀ
    (3r/4, `_sym_gram`) and one P·X (r), plus 4 n³ per step less 3 per segment (`_gram_quintic`).
    """
    n, m = sorted((rows, cols))
    r = m / n
    segments = 1 + len([k for k in restarts if 0 < k < steps])
    standard = steps * (2 * r + 1)
    gram = 1.75 * r * segments + 4 * steps - 3 * segments
    # a 20% margin: n × n products can run at a lower rate than the long ones (on an AMX CPU they
    # do not: 1 restart measured 1.3-1.65× at r = 4 for a flop ratio of 1.53); bf16: `auto_picks_gram`
    return gram < 0.8 * standard


def auto_picks_gram(rows: int, cols: int, steps: int, gram_dtype: torch.dtype,
                    restarts: Sequence[int]) -> bool:
    """`method="auto"`: Gram where it is cheaper (`gram_is_cheaper`), except with the bf16 plan (CPU).

    `schedule_gain` (Muon's step bound, on which the soft cap's guarantee rests) allows 5% above the
    polynomial's peak for rounding. The standard bf16 iteration stays below the peak and so do the
    float16 and float32 Gram iterations, but the bf16 Gram one does not for Polar Express: up to
    1.15× the peak on random 32 × 96 inputs (tests/test_optim.py). Classic stays below it, but the
    margin is a measured one and a schedule-dependent choice would be fragile, so "auto" keeps the
    standard iteration wherever the Gram one would run in bf16; method="gram" is there to opt in.
    """
    return gram_dtype != torch.bfloat16 and gram_is_cheaper(rows, cols, steps, restarts)


def _can_fold_norm(X: Tensor, gram_dtype: torch.dtype) -> bool:
    """May the Gram path skip scaling X (an elementwise pass over the long side, ~4% of its CPU time)
    and read ‖X‖ off R_0's trace (`_gram_quintic`'s `trace_norm`: no pass of its own for the norm, 2–4% of
    the bf16 call at 768 × 3072 measured paired)?

    Only on CPU (the range check reads the trace, a sync on an accelerator) and in a wide-range dtype;
    the range itself (R_0 = X Xᵀ far from under/overflow) is checked on R_0.
    """
    return X.device.type == "cpu" and torch.float16 not in (X.dtype, gram_dtype)


def orthogonalize(
    G: Tensor,
    steps: int = 5,
    coefficients: Schedule = "classic",
    dtype: torch.dtype | None = torch.bfloat16,
    eps: float = 1e-7,
    out_dtype: torch.dtype | None = None,
    method: Method = "auto",
    restarts: Sequence[int] | None = None,
) -> Tensor:
    """Approximate polar factor U Vᵀ of G = U Σ Vᵀ by an odd-quintic Newton–Schulz iteration.

    G is first scaled by its Frobenius norm (times 1.01 for Polar Express) so every σ ≤ 1; the
    iteration then pushes each σ toward 1. With "classic" the result is only roughly orthogonal
    (σ ∈ ~[0.7, 1.2]) — good enough for Muon, not for a cap. Returns a tensor of `out_dtype`
    (default: G's dtype; pass the working dtype to skip the cast, as torch.optim.Muon does).

    `method`: "standard" iterates on X itself (bit-identical to torch.optim.Muon's Newton–Schulz
    for the classic schedule), "gram" on the n × n Gram matrix (`_gram_quintic`: same polynomials,
    fewer flops for rectangular X), "auto" (default) picks "gram" where `auto_picks_gram` (cheaper,
    and not in bf16: on CPU "auto" is "standard").
    `restarts`: steps before which the Gram iteration re-forms X (default: `gram_plan`, which also
    picks its dtype: float16 on CUDA for a bf16/half working dtype, the working dtype elsewhere).
    """
    if method not in ("auto", "gram", "standard"):
        raise ValueError(f"unknown method {method!r}; use 'auto', 'gram' or 'standard'")
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix (or a stack of them), got shape {tuple(G.shape)}")
    schedule = coefficient_schedule(coefficients, steps)
    safety = POLAR_EXPRESS_SAFETY if coefficients == "polar_express" else 1.0
    X = G.to(dtype) if dtype is not None else G
    scratch = X is not G  # our own copy: the Gram path may write its result into it
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    gram_dtype, planned = gram_plan(X.dtype, X.device, steps, coefficients)
    restarts = planned if restarts is None else tuple(restarts)
    if method == "auto":  # never bf16 Gram: see `auto_picks_gram`
        gram = auto_picks_gram(X.size(-2), X.size(-1), steps, gram_dtype, restarts)
        method = "gram" if gram else "standard"
    folded = None
    if method == "gram" and _can_fold_norm(X, gram_dtype):  # 1/‖X‖ from tr R_0, riding in R_0 and the first P
        W = X.to(gram_dtype)
        folded = _gram_quintic(W, schedule, restarts, reuse_input=scratch or W is not X, trace_norm=(safety, eps))
    if folded is not None:
        X = folded.to(X.dtype)
    else:
        raw = torch.linalg.matrix_norm(X, keepdim=True) if X.ndim > 2 else X.norm()
        norm = (raw * safety).clamp(min=eps) if safety != 1.0 else raw.clamp(min=eps)
        if method == "gram":
            X = _gram_quintic((X / norm).to(gram_dtype), schedule, restarts, reuse_input=True).to(X.dtype)
        else:
            X = _odd_quintic(X / norm, schedule)
    if tall:
        X = X.mT
    return X.to(out_dtype or G.dtype)

