"""Certified bound of a gpt2-small-size model vs exact SVD of every matrix (DESIGN §9).

Builds `LipformerForCausalLM` at gpt2-small size (12 × 768, 12 heads, vocab 50304, seq 1024; the
`gpt2-small` preset's caps) and takes every matrix the certificate measures: q, k, v, o, mlp_in,
mlp_out of each block, the head (50304 × 768), and the per-head row blocks of q, k, v that the
attention bound uses (12 × 64 × 768 stacks). The embedding is not a spectral matrix of the bound
(its certificate entry is the largest row RMS), so it is left out.

Timed side by side, interleaved, median of `--repeats`:
  exact      `torch.linalg.svdvals` in float64 (LAPACK) on every matrix/stack, top value (the baseline);
  lipformer  `spectral.sigma_upper` (Cholesky certificate: float64 Gram product, Lanczos guess,
             factorizations of μI − WᵀW with Higham's rounding term; sound), the certificate's σ;
  gram       `spectral.sigma_upper_gram` (float64 Gram iteration, 14 steps, sound), the matmul-only one.
Also: one end-to-end `model.bounds()` (the certificate, composition included).
Tightness (bound / exact σ_max, per matrix and per head block) is reported for two spectra:
  init      the model's own init, every σ equal to its cap (a flat spectrum: Gram iteration's worst case);
  gaussian  every matrix replaced by an i.i.d. Gaussian one (a spread-out spectrum, closer to trained).

    .venv/bin/python scripts/bench_certify.py                  # 2 of the 12 blocks + head, 3 repeats (~3 min, 2 cores)
    .venv/bin/python scripts/bench_certify.py --layers 12      # the whole model (~15+ min on 2 busy cores)
The default measures 2 blocks because LAPACK's svdvals on the flat-spectrum init matrices takes
2–8 s per matrix on 2 shared cores; every block has the same shapes, so per-matrix ratios and the
time ratio do not depend on the block count (the head's share shrinks as blocks are added).
Appends a dated section to docs/benchmarks.md (--no-append to skip).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _bench import add_common_args, machine  # noqa: E402

from lipformer import LipformerConfig, LipformerForCausalLM, spectral  # noqa: E402
from lipformer.nn import CappedLinear  # noqa: E402




def matrices(model: LipformerForCausalLM) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every matrix the certificate measures; per-head stacks are (H, d_head, d)."""
    H = model.config.num_attention_heads
    out = []
    for name, m in model.named_modules():
        if isinstance(m, CappedLinear):
            w = m.weight.detach()
            out.append((name, w))
            if name.rsplit(".", 1)[-1] in ("q", "k", "v"):
                out.append((name + "[heads]", w.reshape(H, w.size(0) // H, w.size(1))))
    return out


def kind(name: str) -> str:
    """Group for the per-kind timing: 768×768 (q k v o), MLP (d×4d), head, per-head blocks."""
    last = name.rsplit(".", 1)[-1]
    if name.endswith("[heads]"):
        return "q/k/v head blocks"
    return {"q": "q/k/v/o", "k": "q/k/v/o", "v": "q/k/v/o", "o": "q/k/v/o",
            "fc_in": "mlp_in/mlp_out", "fc_out": "mlp_in/mlp_out"}.get(last, last)


def per_matrix(fn, mats):
    """(total seconds, {kind: seconds}, values) of fn on every matrix."""
    values, by_kind = [], {}
    for name, w in mats:
        t = time.perf_counter()
        values.append(fn(w))
        dt = time.perf_counter() - t
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + dt
    return sum(by_kind.values()), by_kind, values


SIDES = {
    "exact": lambda w: torch.linalg.svdvals(w.double())[..., 0],
    "sigma_upper": spectral.sigma_upper,
    "sigma_upper_gram": spectral.sigma_upper_gram,
}


def timed(fn, *args):
    t = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - t, value


def tightness(mats, bounds, exact):
    """(min, max) of bound/exact over full matrices and over head blocks, and any violation."""
    full, heads = [], []
    for (name, _), b, e in zip(mats, bounds, exact):
        r = (b / e).flatten().tolist()
        (heads if name.endswith("[heads]") else full).extend(r)
    return full, heads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="blocks (default 2; gpt2-small has 12, same shapes per block)")
    p.add_argument("--hidden", type=int, default=768, help="width (default 768)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary = head rows (default 50304)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (default 3)")
    add_common_args(p, ROOT)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = LipformerConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, max_position_embeddings=1024,
                             w_max={"head": 10.0})
    model = LipformerForCausalLM(config).eval()
    mats = matrices(model)
    n_full = sum(not n.endswith("[heads]") for n, _ in mats)
    n_heads = sum(w.size(0) for n, w in mats if n.endswith("[heads]"))
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} x {args.hidden}, {args.heads} heads, vocab {args.vocab}, {params / 1e6:.1f}M params; "
          f"{n_full} matrices + {n_heads} head blocks")

    # interleaved timing on the init weights (rotate which side goes first)
    names = list(SIDES)
    totals = {k: [] for k in names}
    per_kind = {k: [] for k in names}
    values = {}
    for r in range(args.repeats):
        for side in names[r % len(names):] + names[:r % len(names)]:
            t, by_kind, values[side] = per_matrix(SIDES[side], mats)
            totals[side].append(t)
            per_kind[side].append(by_kind)
        print("  repeat {}: {}".format(r + 1, ", ".join(f"{k} {totals[k][-1]:.2f}s" for k in names)))
    t_bounds, mb = timed(model.bounds)
    tight = {side: tightness(mats, values[side], values["exact"]) for side in names[1:]}

    # tightness on a spread-out spectrum: Gaussian matrices (one pass each, also timed once)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CappedLinear):
                m.weight.normal_(0.0, m.d_in ** -0.5)
    mats_g = matrices(model)
    gauss_t, gauss_kind, gauss_v = {}, {}, {}
    for side in names:
        gauss_t[side], gauss_kind[side], gauss_v[side] = per_matrix(SIDES[side], mats_g)
    tight_g = {side: tightness(mats_g, gauss_v[side], gauss_v["exact"]) for side in names[1:]}

    med = {k: statistics.median(v) for k, v in totals.items()}
    table = ["| bound | weights | bound/exact min (matrices) | max (matrices) | min (head blocks) | max (head blocks) | any bound < exact |",
             "|---|---|---:|---:|---:|---:|---|"]
    all_r = []
    for side in names[1:]:
        for label, (full, heads) in (("init (σ all at cap)", tight[side]), ("gaussian", tight_g[side])):
            bad = min(full + heads) < 1.0
            if side == "sigma_upper":
                all_r += full + heads
            table.append(f"| {side} | {label} | {min(full):.7f} | {max(full):.7f} | {min(heads):.7f} | {max(heads):.7f} | "
                         f"{'YES' if bad else 'no'} |")
    labels = {"exact": "exact: torch.linalg.svdvals float64", "sigma_upper": "lipformer: spectral.sigma_upper (Cholesky)",
              "sigma_upper_gram": "lipformer: spectral.sigma_upper_gram (Gram iteration)"}
    timing = [f"| side | median s (init, {args.repeats} repeats) | time ratio exact / side | gaussian, 1 pass s | ratio |",
              "|---|---:|---:|---:|---:|"]
    for side in names:
        timing.append(f"| {labels[side]} | {med[side]:.2f} | {med['exact'] / med[side]:.2f}× | {gauss_t[side]:.2f} | "
                      f"{gauss_t['exact'] / gauss_t[side]:.2f}× |")
    timing.append(f"| lipformer: model.bounds() end to end (once) | {t_bounds:.2f} | | | |")
    counts = {}
    for n, _ in mats:
        counts[kind(n)] = counts.get(kind(n), 0) + 1
    kinds = ["| kind (count) | svdvals s | sigma_upper s | ratio | sigma_upper_gram s | ratio | gaussian: svdvals s | sigma_upper s | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in counts:
        e, c, g = (statistics.median(x[k] for x in per_kind[side]) for side in names)
        ge, gc = gauss_kind["exact"][k], gauss_kind["sigma_upper"][k]
        kinds.append(f"| {k} ({counts[k]}) | {e:.2f} | {c:.2f} | {e / c:.2f}× | {g:.2f} | {e / g:.2f}× | "
                     f"{ge:.2f} | {gc:.2f} | {ge / gc:.2f}× |")
    print("\n".join(timing))
    print("\n".join(kinds))
    print("\n".join(table))
    print(f"certified total bound of the init model: {mb.total:.4g}")

    if args.no_append:
        return
    cmd = "  ".join([".venv/bin/python scripts/bench_certify.py"] +
                    [f"--{k} {v}" for k, v in (("layers", args.layers), ("threads", args.threads)) if v != p.get_default(k)])
    ratio = med["exact"] / med["sigma_upper"]
    goal_speed = "met" if ratio >= 10 else "**missed**"
    goal_tight = "met" if min(all_r) >= 1.0 and max(all_r) <= 1.01 else "**missed**"
    text = f"""
## Certified bound (sigma_upper) vs exact SVD of every matrix, gpt2-small size ({datetime.date.today()})

Machine: {machine()}.

Model: `LipformerForCausalLM`, {args.layers} × {args.hidden}, {args.heads} heads, vocab {args.vocab}
({params / 1e6:.1f}M parameters). Matrices: every `CappedLinear` weight ({n_full}: q, k, v, o, mlp_in,
mlp_out per block and the {args.vocab} × {args.hidden} head) plus the {n_heads} per-head row blocks of q, k, v
that the attention bound uses (batched as {args.heads}-stacks on every side). Baseline: exact
`torch.linalg.svdvals` in float64, top value. lipformer: `spectral.sigma_upper`, the Cholesky
certificate the bounds use (docs/lipschitz.md §1), and `spectral.sigma_upper_gram` (Gram iteration, 14
float64 steps), both sound upper bounds. Times: median of {args.repeats} interleaved repeats in one run on
the init weights; a second pass on Gaussian weights measures tightness on a spread spectrum.

{chr(10).join(timing)}

Per kind of matrix (init: medians of the repeats; gaussian: the one pass):

{chr(10).join(kinds)}

{chr(10).join(table)}

- Time ratio goal ≥ 10× (svdvals / sigma_upper): {goal_speed} ({ratio:.2f}× on the init weights,
  {gauss_t['exact'] / gauss_t['sigma_upper']:.2f}× on Gaussian ones).
- Bound / exact goal ≥ 1 and ≤ 1.01 (sigma_upper): {goal_tight} (min {min(all_r):.7f}, max {max(all_r):.7f}
  over all matrices and head blocks, both spectra).
- Rerun: `{cmd}` (appends a new section here).
"""
    with open(args.append, "a") as f:
        f.write(text)
    print(f"appended to {args.append}")


if __name__ == "__main__":
    main()
