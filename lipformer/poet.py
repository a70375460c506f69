"""POET: linear layers trained by orthogonal equivalence transformation (DESIGN §4).

Reference: Qiu et al., "Reparameterized LLM Training via Orthogonal Equivalence Transformation"
(arXiv 2506.08001). The weight of a `POETLinear` is

    W = R · W0 · P          (d_out × d_in)

with W0 a fixed buffer and R (d_out × d_out), P (d_in × d_in) orthogonal matrices that are the only
trainable parameters. Orthogonal factors keep W0's singular values, so a layer whose W0 has every
σ equal to its cap is a Lipschitz layer that needs *no* projection step.

Block-stochastic primitive (one per side, `BlockStochasticOrthogonal`). For a side of size n and
block size b (clamped to n):

    G = Πᵀ · diag(C_1, …, C_m, C_last) · Π

Π is a random permutation (a buffer, so save/load reproduces the function), the C_j are
b × b blocks and, when b does not divide n, one last block of size r = n mod b (no padding: the
last block is simply smaller; a 1 × 1 block is the identity and has no parameter). Each block is
C = (I + Q)(I + Q + Q² + … + Q^k), the k-term Cayley–Neumann approximation of the Cayley
transform (I + Q)(I − Q)⁻¹, of a skew-symmetric Q stored by its free strictly-upper-triangular
entries only.

Trainable parameters (`poet_trainable_params`): for a side of size n with block b' = min(b, n),

    ⌊n/b'⌋ · b'(b'−1)/2  +  r(r−1)/2,      r = n − b'⌊n/b'⌋,

and a layer has the sum over its two sides (n = d_out for R, n = d_in for P). E.g. 768 × 768,
b = 256: 2 · 3 · 32640 = 195 840 (dense: 589 824).

How orthogonal is Cayley–Neumann? Since (I − Q)(I + Q + … + Q^k) = I − Q^{k+1} and everything
commutes with Q, C = Cay(Q) · (I − Q^{k+1}) with Cay(Q) exactly orthogonal. Q is normal with
eigenvalues ±iθ, so the singular values of C are |1 − (iθ)^{k+1}| ∈ [1 − ‖Q‖^{k+1}, 1 + ‖Q‖^{k+1}];
for k ≡ 1 (mod 4) — the default k = 5 — they are 1 + θ^6 ≥ 1: the factors only ever *expand*.
Hence for every i (exact arithmetic, `neumann_spectrum_factor`):

    σ_i(W0)·Π_sides (1 − ‖Q‖^{k+1})  ≤  σ_i(W)  ≤  σ_i(W0)·Π_sides (1 + ‖Q‖^{k+1}),

and the series needs ‖Q‖₂ < 1 to be useful at all. Every merge folds the current (slightly
non-orthogonal) factors into W0, so the drift compounds over merges, and ‖Q‖ grows with the
learning rate between merges (measured on POETLinear(64, 48), AdamW, 300 steps, merge every 50:
relative drift 2.5e-2 at lr 1e-3, 0.39 at 1e-2).

Keeping the spectrum at any learning rate (`spectrum_tol`, default 1e-6). Before each use of a
side's blocks the layer bounds their stretch soundly and cheaply: for a skew Q with eigenvalues
±iθ_j, ‖Q‖_F² = 2Σθ_j² ≥ 2θ_max², and ‖Q‖_F² = 2‖q‖² over the free entries q, so
‖Q‖₂ ≤ ‖q‖₂ (no product needed; docs/lipschitz.md). If ‖q‖₂^{k+1} ≤ spectrum_tol for every block
of the side, Cayley–Neumann is used (every σ of the side moves by a factor within 1 ± tol);
otherwise the side uses the exact Cayley transform C = (I − Q)⁻¹(I + Q) (a batched solve, exactly
orthogonal up to rounding). A merge therefore folds in a stretch of at most (1 + tol)² per layer,
and M merges at most (1 + tol)^{2M}. Cost: one norm of the free entries per side per forward, a
host sync for the choice, and on the exact path an LU solve per block instead of 3 products
(forward) — on CPU about the same time, see docs/benchmarks.md. `spectrum_tol=None` restores the
plain series (the paper's choice, matmul-only: faster on GPUs, drifts at large learning rates).

Nothing here assumes σ is preserved: `norm_upper`, `bound` and `weight_bound` run
`spectral.sigma_upper` on the actual effective matrix, exactly as `CappedLinear` does.

`merge_then_reinitialize(optimizer)` sets W0 ← R W0 P (computed by the very code the forward
uses, so the function is unchanged bit for bit), Q ← 0, draws fresh permutations and clears the
optimizer state of the Q parameters. `merge_all(model, optimizer)` does it for a whole model,
`poetize(model)` turns a dense lipformer model's capped linears into POET layers.

Notes for integration: `POETLinear` is a `SpectralLinear` like the dense `CappedLinear`, so the
certificate's weight table and `Attention.bound`'s `_sigma(m.weight, H)` see the effective matrix.
`weight` is a computed tensor, not a Parameter; the layer's own `project` is what the projection
step calls: it caps W0 right after a merge (when W0 *is* the effective weight) and is a no-op
between merges, where the orthogonal factors are the constraint.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import spectral
from .nn import Cap, CappedLinear, SpectralLinear

INITS = ("normalized_gaussian", "uniform_spectrum")
DEFAULT_BLOCK_SIZE = 256
DEFAULT_KINDS = ("q", "k", "v", "o", "mlp_in", "mlp_out")
_SIDES = ("out", "in")


def poet_side_params(n: int, block_size: int) -> int:
    """Free skew entries of one block-stochastic side of size n: ⌊n/b⌋·b(b−1)/2 + r(r−1)/2."""
    b = min(block_size, n)
    full, rem = divmod(n, b)
    return full * b * (b - 1) // 2 + rem * (rem - 1) // 2


def poet_trainable_params(in_features: int, out_features: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Trainable parameters of a POETLinear: both sides, see the module docstring."""
    return poet_side_params(out_features, block_size) + poet_side_params(in_features, block_size)


def cayley_neumann(Q: Tensor, terms: int) -> Tensor:
    """(I + Q)(I + Q + … + Q^terms) for a stack of square matrices Q (…, b, b).

    Expanded, this is the polynomial I + 2Q + 2Q² + … + 2Q^terms + Q^{terms+1}, evaluated by
    Paterson–Stockmeyer: powers up to Q^s (s ≈ √degree), then Horner in Q^s. For terms = 5 that is
    3 matrix products instead of the 5 of the factored form (the training step's backward
    doubles the saving). Exactly I when Q = 0.
    """
    degree = terms + 1
    coeffs = [1.0] + [2.0] * terms + [1.0]
    s = max(1, math.ceil(math.sqrt(degree)))
    eye = torch.eye(Q.size(-1), dtype=Q.dtype, device=Q.device).expand_as(Q)
    powers = [eye, Q]
    for _ in range(s - 1):
        powers.append(powers[-1] @ Q)

    def chunk(j: int) -> Tensor:  # Σ_i c_{js+i} Q^i, i < s
        out = None
        for i in range(s):
            if j * s + i <= degree:
                c = coeffs[j * s + i]
                term = powers[i] if c == 1.0 else c * powers[i]
                out = term if out is None else out + term
        return out

    chunks = (degree + s) // s  # ⌈(degree+1)/s⌉
    top = chunks - 1
    if degree % s == 0:  # the top chunk is c·I: Q^s times it needs no product
        result = chunk(top - 1) + powers[s]  # c_degree = 1
        top -= 1
    else:
        result = chunk(top)
    for j in range(top - 1, -1, -1):
        result = chunk(j) + powers[s] @ result
    return result


def exact_cayley(Q: Tensor) -> Tensor:
    """(I − Q)⁻¹(I + Q) for a stack of skew-symmetric Q: exactly orthogonal (I − Q is invertible,
    its eigenvalues are 1 ∓ iθ). Solved in at least float32 (no half-precision LU)."""
    work = Q if Q.dtype in (torch.float32, torch.float64) else Q.float()
    eye = torch.eye(work.size(-1), dtype=work.dtype, device=work.device).expand_as(work)
    return torch.linalg.solve(eye - work, eye + work).to(Q.dtype)


def neumann_deviation_bound(q: Tensor, terms: int) -> float:
    """Sound bound on max |σ(C) − 1| over the Cayley–Neumann blocks whose free entries are the rows of q.

    ‖Q‖₂ ≤ ‖q‖₂ (module docstring) and σ(C) = |1 − (iθ)^{k+1}| ∈ [1 − θ^{k+1}, 1 + θ^{k+1}], so
    |σ − 1| ≤ ‖q‖₂^{k+1}. The norm is taken in float64 from the stored values (the values the
    forward uses), so its own rounding is ~1e-16 relative.
    """
    norm = float(q.detach().double().square().sum(-1).sqrt().max()) if q.numel() else 0.0
    return norm ** (terms + 1)


def _skew_from_free(q: Tensor, index: Tensor, b: int) -> Tensor:
    """(m, b(b−1)/2) free entries → (m, b, b) skew-symmetric matrices."""
    Q = q.new_zeros(q.size(0), b * b)
    Q = Q.index_copy(1, index, q).view(q.size(0), b, b)
    return Q - Q.mT


def _permutation(n: int, seed: int, draw: int, side: str, device) -> Tensor:
    # Deterministic in (seed, draw, side): every data-parallel rank and a resumed run draw the same.
    # (tuples of ints hash the same in every process; strings would not, hence the side's index)
    gen = torch.Generator().manual_seed(hash((seed, draw, _SIDES.index(side))) & (2**63 - 1))
    return torch.randperm(n, generator=gen).to(device)


class BlockStochasticOrthogonal(nn.Module):
    """G = Πᵀ diag(C_1, …, C_m, C_last) Π, each block a Cayley–Neumann map of a skew matrix.

    Parameters: `q` (m, b(b−1)/2) for the m full blocks and `q_last` (r(r−1)/2,) for a smaller
    last block when b does not divide n (absent when there is none or r = 1).
    """

    def __init__(self, n: int, block_size: int, neumann_terms: int, seed: int, side: str,
                 device=None, dtype=None, spectrum_tol: float | None = None):
        super().__init__()
        self.spectrum_tol = spectrum_tol  # None: always Cayley–Neumann (see the module docstring)
        if n < 1 or block_size < 1:
            raise ValueError(f"need a positive size and block size, got n={n}, block_size={block_size}")
        b = min(block_size, n)
        self.n, self.b, self.terms, self.side = n, b, int(neumann_terms), side
        self.full, self.rem = divmod(n, b)
        factory = {"device": device, "dtype": dtype}
        self.q = nn.Parameter(torch.zeros(self.full, b * (b - 1) // 2, **factory)) if b > 1 else None
        self.q_last = (nn.Parameter(torch.zeros(self.rem * (self.rem - 1) // 2, **factory))
                       if self.rem > 1 else None)
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64, device=device))
        self.register_buffer("draws", torch.tensor(0, dtype=torch.int64, device=device))
        self.register_buffer("perm", _permutation(n, int(seed), 0, side, device))

    @staticmethod
    def _upper_index(b: int, device) -> Tensor:
        i, j = torch.triu_indices(b, b, offset=1, device=device)
        return i * b + j

    def num_trainable(self) -> int:
        return poet_side_params(self.n, self.b)

    def parameters_q(self) -> list[nn.Parameter]:
        return [p for p in (self.q, self.q_last) if p is not None]

    def skew_blocks(self) -> tuple[Tensor | None, Tensor | None]:
        """The skew matrices (m, b, b) and (1, r, r) (None where a side has no such block)."""
        # indices built per call, not kept as non-persistent buffers: from_pretrained materializes
        # modules on the meta device and would leave such buffers uninitialized
        full = (_skew_from_free(self.q, self._upper_index(self.b, self.q.device), self.b)
                if self.q is not None else None)
        last = (_skew_from_free(self.q_last[None], self._upper_index(self.rem, self.q_last.device), self.rem)
                if self.q_last is not None else None)
        return full, last

    def uses_exact(self) -> bool:
        """Whether the blocks are exact Cayley transforms now: the series' proved deviation
        `neumann_deviation_bound` of some block exceeds `spectrum_tol`."""
        if self.spectrum_tol is None:
            return False
        worst = max((neumann_deviation_bound(p.reshape(-1, p.size(-1)), self.terms) for p in self.parameters_q()),
                    default=0.0)
        return worst > self.spectrum_tol

    def blocks(self) -> tuple[Tensor | None, Tensor | None]:
        full, last = self.skew_blocks()
        transform = exact_cayley if self.uses_exact() else (lambda Q: cayley_neumann(Q, self.terms))
        return (transform(full) if full is not None else None,
                transform(last)[0] if last is not None else None)

    def left_multiply(self, M: Tensor, transpose: bool = False) -> Tensor:
        """G M (or Gᵀ M) for M of shape (n, c)."""
        full, last = self.blocks()
        X = M.index_select(0, self.perm)  # Π M
        split = self.full * self.b
        parts = []
        if full is not None:
            D = full.mT if transpose else full
            parts.append(torch.bmm(D, X[:split].reshape(self.full, self.b, -1)).reshape(split, -1))
        else:  # b = 1: every block is the 1 × 1 identity
            parts.append(X[:split])
        if self.rem:
            tail = X[split:]
            if last is not None:
                tail = (last.mT if transpose else last) @ tail
            parts.append(tail)
        Y = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        return Y.index_select(0, torch.argsort(self.perm))  # Πᵀ Y

    def matrix(self, dtype: torch.dtype | None = None) -> Tensor:
        """G as a dense n × n matrix (for tests and inspection)."""
        params = self.parameters_q()
        dtype = dtype or (params[0].dtype if params else torch.get_default_dtype())
        return self.left_multiply(torch.eye(self.n, dtype=dtype, device=self.perm.device))

    @torch.no_grad()
    def q_norm_upper(self) -> float:
        """Sound upper bound on max ‖Q_block‖₂ (0 right after a merge)."""
        values = [spectral.sigma_upper(Q).max() for Q in self.skew_blocks() if Q is not None]
        return float(torch.stack(values).max()) if values else 0.0

    @torch.no_grad()
    def reinitialize(self) -> None:
        """Q ← 0 (in place, so optimizers keep their references) and a fresh permutation."""
        for p in self.parameters_q():
            p.zero_()
        self.draws += 1
        self.perm.copy_(_permutation(self.n, int(self.seed), int(self.draws), self.side, self.perm.device))


def reset_optimizer_state(optimizer: torch.optim.Optimizer | None, params: Iterable[Tensor]) -> int:
    """Forget the optimizer's per-parameter state (moments, step counts) of `params`.

    Works for any `torch.optim.Optimizer`: its state is the dict `optimizer.state[p]`, and an
    optimizer that finds it empty re-initializes it at the next step, as for a new parameter.
    Returns how many entries were cleared.
    """
    if optimizer is None:
        return 0
    cleared = 0
    for p in params:
        if p in optimizer.state:
            del optimizer.state[p]
            cleared += 1
    return cleared


class POETLinear(SpectralLinear):
    """y = x Wᵀ with W = R W0 P (no bias); R, P block-stochastic Cayley–Neumann orthogonals.

    Args:
        in_features, out_features: the shape of W is (out_features, in_features).
        w_max: cap on the RMS→RMS norm √(d_in/d_out)·σ_max (as `CappedLinear`); kind: weight kind.
        block_size: b, clamped to each side's size; need not divide it (last block smaller).
        neumann_terms: k ≥ 1 in (I + Q)(I + Q + … + Q^k). k ≡ 1 (mod 4) makes the factors expand
            σ by at most 1 + ‖Q‖^{k+1}, never shrink (module docstring); k = 1 drifts fast.
        init: "uniform_spectrum" — W0 = sigma_cap · (semi-)orthogonal: every σ equals the cap, so
            the layer sits at w_max without projection; "normalized_gaussian" — Gaussian rows
            normalized to unit ℓ2 norm (the POET paper's init), then the whole matrix scaled by
            sigma_cap / sigma_upper(W0) so the layer starts with RMS→RMS norm ≤ w_max (unit rows
            alone would give a norm ≈ 1 + √(d_in/d_out), growing with the shape). Rows stay equal
            in norm.
        seed: seeds the permutations (drawn deterministically from (seed, merge count, side), so
            data-parallel ranks agree); default: drawn from torch's global generator.
        spectrum_tol: largest proved per-side σ deviation the Cayley–Neumann series may cause
            before a side switches to the exact Cayley transform (default 1e-6; 0: always exact
            once Q ≠ 0; None: always the series, which drifts at large learning rates).

    Trainable parameters: `poet_trainable_params(in_features, out_features, block_size)`.
    """

    def __init__(self, in_features: int, out_features: int, w_max: float = 1.0, kind: str = "q",
                 block_size: int = DEFAULT_BLOCK_SIZE, neumann_terms: int = 5,
                 init: str = "normalized_gaussian", seed: int | None = None, device=None, dtype=None,
                 spectrum_tol: float | None = 1e-6):
        super().__init__(in_features, out_features, w_max, kind)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if int(neumann_terms) < 1:
            raise ValueError(f"neumann_terms must be >= 1, got {neumann_terms}")
        if spectrum_tol is not None and not (math.isfinite(spectrum_tol) and spectrum_tol >= 0):
            raise ValueError(f"spectrum_tol must be None or a finite number >= 0, got {spectrum_tol}")
        self._merged = False  # W0 changed by a merge and not yet projected
        self.block_size, self.neumann_terms, self.init = int(block_size), int(neumann_terms), init
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu").item())  # also under HF's meta-device init
        self.register_buffer("w0", torch.empty(self.d_out, self.d_in, device=device, dtype=dtype))
        self.rot_out = BlockStochasticOrthogonal(self.d_out, block_size, neumann_terms, seed, "out", device, dtype,
                                                 spectrum_tol)
        self.rot_in = BlockStochasticOrthogonal(self.d_in, block_size, neumann_terms, seed, "in", device, dtype,
                                                spectrum_tol)
        self.reset_parameters()

    in_features = property(lambda self: self.d_in)
    out_features = property(lambda self: self.d_out)

    @classmethod
    def from_dense(cls, linear: CappedLinear, **kwargs) -> "POETLinear":
        """A POET layer computing exactly `linear`'s function now: W0 = its weight, Q = 0."""
        w = linear.weight.detach()
        kwargs.setdefault("init", "uniform_spectrum")  # overwritten below; the cheaper one
        layer = cls(linear.d_in, linear.d_out, linear.w_max, linear.kind, device=w.device, dtype=w.dtype, **kwargs)
        layer.w0.copy_(w)
        return layer

    @torch.no_grad()
    def reset_parameters(self) -> None:
        gen_dtype = torch.float64
        W = torch.empty(self.d_out, self.d_in, dtype=gen_dtype, device=self.w0.device)
        if self.init == "uniform_spectrum":
            nn.init.orthogonal_(W)
            W.mul_(self.sigma_cap)
        else:
            nn.init.normal_(W)
            W.div_(torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp(min=1e-30))
            W.mul_(self.sigma_cap / float(spectral.sigma_upper(W)))
        self.w0.copy_(W)
        for side in (self.rot_out, self.rot_in):
            for p in side.parameters_q():
                p.zero_()

    def q_parameters(self) -> list[nn.Parameter]:
        return self.rot_out.parameters_q() + self.rot_in.parameters_q()

    def num_trainable(self) -> int:
        return self.rot_out.num_trainable() + self.rot_in.num_trainable()

    @property
    def weight(self) -> Tensor:
        """The effective matrix R W0 P (differentiable in the Q parameters)."""
        A = self.rot_in.left_multiply(self.w0.mT, transpose=True).mT  # W0 P = (Pᵀ W0ᵀ)ᵀ
        return self.rot_out.left_multiply(A)                          # R (W0 P)

    def orthogonal_factors(self) -> tuple[Tensor, Tensor]:
        """(R, P) as dense matrices."""
        return self.rot_out.matrix(), self.rot_in.matrix()

    @torch.no_grad()
    def project(self, cap: Cap) -> None:
        """The projection step for POET: cap W0 right after a merge, when it *is* the effective weight.

        Between merges the (nearly) orthogonal factors are the constraint and there is nothing to
        do; Cayley–Neumann factors can only stretch σ (by 1 + O(‖Q‖^{k+1})), and without this cap
        the stretch would compound over merges. The certificate measures the effective matrix anyway.
        """
        if self._merged:
            self.w0.copy_(cap(self.w0, self.sigma_cap))
            self._merged = False

    def neumann_spectrum_factor(self) -> tuple[float, float]:
        """(lo, hi) with lo·σ_i(W0) ≤ σ_i(W) ≤ hi·σ_i(W0) in exact arithmetic (module docstring).

        A diagnostic for choosing the merge frequency, not a certificate (`bound` is that). A side
        on the exact Cayley path contributes 1 (orthogonal up to rounding).
        """
        k1 = self.neumann_terms + 1
        lo = hi = 1.0
        for side in (self.rot_out, self.rot_in):
            if side.uses_exact():
                continue
            t = side.q_norm_upper() ** k1
            hi *= 1.0 + t
            lo *= 1.0 if self.neumann_terms % 4 == 1 else max(0.0, 1.0 - t)
        return lo, hi

    @torch.no_grad()
    def merge_then_reinitialize(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """W0 ← R W0 P, Q ← 0, fresh permutations, optimizer state of Q cleared.

        The merged matrix is computed by the forward's own code in the layer's dtype, and with
        Q = 0 the factors are exactly the identity, so outputs are unchanged bit for bit.
        """
        merged = self.weight
        self.w0.copy_(merged)
        self.rot_out.reinitialize()
        self.rot_in.reinitialize()
        reset_optimizer_state(optimizer, self.q_parameters())
        self._merged = True

    def extra_repr(self) -> str:
        return (f"in_features={self.d_in}, out_features={self.d_out}, w_max={self.w_max}, kind={self.kind!r}, "
                f"block_size={self.block_size}, neumann_terms={self.neumann_terms}, init={self.init!r}, "
                f"spectrum_tol={self.rot_out.spectrum_tol}")


def poet_modules(model: nn.Module) -> list[tuple[str, POETLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, POETLinear)]


@torch.no_grad()
def merge_all(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Merge every POETLinear of `model` (the trainer calls this every `merge_every` steps, before
    the projection step, which then caps each merged W0 through `POETLinear.project`)."""
    layers = poet_modules(model)
    for _, layer in layers:
        layer.merge_then_reinitialize(optimizer)
    return len(layers)


def poetize(model: nn.Module, kinds: Iterable[str] = DEFAULT_KINDS, block_size: int = DEFAULT_BLOCK_SIZE,
            neumann_terms: int = 5, init: str = "uniform_spectrum", seed: int | None = None) -> list[str]:
    """Replace every dense `CappedLinear` whose kind is in `kinds` by a POETLinear of the same shape,
    w_max and kind (default: all attention and MLP matrices, not the head).

    init: "uniform_spectrum" (every σ at the layer's cap: Lipschitz without projection),
    "normalized_gaussian", or "copy" (W0 = the current weight: the model's function is unchanged,
    e.g. to fine-tune a trained dense model with POET). Build the optimizer *after* this call.
    Returns the names of the replaced modules. `model.config.linear` is not changed.
    """
    kinds = set(kinds)
    if init not in INITS + ("copy",):
        raise ValueError(f"init must be one of {INITS + ('copy',)}, got {init!r}")
    base = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is CappedLinear and m.kind in kinds]
    for i, (name, old) in enumerate(targets):
        w = old.weight.detach()
        kw = dict(block_size=block_size, neumann_terms=neumann_terms, seed=base + i)
        if init == "copy":
            new = POETLinear.from_dense(old, **kw)
        else:
            new = POETLinear(old.d_in, old.d_out, old.w_max, old.kind, init=init, device=w.device, dtype=w.dtype, **kw)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return [n for n, _ in targets]


__all__ = ["POETLinear", "BlockStochasticOrthogonal", "cayley_neumann", "exact_cayley", "merge_all",
           "neumann_deviation_bound", "poet_modules",
           "poetize", "poet_side_params", "poet_trainable_params", "reset_optimizer_state"]
