"""A preset's real training step, with and without the position-only fast path and the maxmin kernel.

Both rows run the training loop's own `train_step` (the preset's objective, autocast dtype,
optimizer, companion and projection) on the preset's data, from the same initial weights:

    general    what every step cost before 2026-12-05: position-only attention through the attention
               kernel (q·kᵀ·0 + an additive bias mask, softmax over batch × heads × T × T) and
               maxmin through torch.maximum / torch.minimum (their backward re-compares and splits ties)
    fast       the library as it is: `Attention.position_only` (the weights softmax(bias), formed
               once per layer, times all sequences' values in one matmul per head) and `_MaxMin`
               (one comparison kept for backward)

The two compute the same function (tests/test_position_only.py checks the outputs and gradients);
this script measures only their cost. Median of `--repeats` interleaved steps after `--warmup` each.

    .venv/bin/python scripts/bench_preset_step.py --preset shakespeare-char --threads 2
Appends a dated section to docs/benchmarks.md (--no-append to skip).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _bench import add_common_args, machine, step_parts  # noqa: E402

import lipformer.nn as lnn  # noqa: E402
from lipformer import LipformerConfig, LipformerForCausalLM  # noqa: E402
from training.recipe import load_recipe  # noqa: E402
from training.train import open_data, train_step  # noqa: E402


def reference_maxmin(z):
    a, b = z.chunk(2, dim=-1)
    return torch.cat((torch.maximum(a, b), torch.minimum(a, b)), dim=-1)


@contextlib.contextmanager
def general_path():
    """The pre-2026-12-05 kernels: an explicit causal mask keeps attention off the fast path (the
    mask holds what the no-mask case implies, so the function is unchanged)."""
    forward, act = lnn.Attention.forward, lnn.maxmin

    def masked(self, x, rope, mask=None, cache=None, layer_idx=None, attend=None):
        if mask is None and cache is None:
            T = x.size(1)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
        return forward(self, x, rope, mask, cache, layer_idx, attend)

    lnn.Attention.forward, lnn.maxmin = masked, reference_maxmin
    try:
        yield
    finally:
        lnn.Attention.forward, lnn.maxmin = forward, act


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare-char", help="a training/configs preset (default shakespeare-char)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row (default 2)")
    p.add_argument("--repeats", type=int, default=9, help="timed steps per row, interleaved (default 9)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for `lipformer train`")
    add_common_args(p, ROOT)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = load_recipe(args.preset, overrides=args.overrides)
    t = run.train
    train_data, _, _, vocab = open_data(run)
    torch.manual_seed(t.seed)
    base = LipformerForCausalLM(LipformerConfig(**{**run.model, "vocab_size": vocab})).train()
    rows = {}
    for name in ("general", "fast"):
        rows[name] = step_parts(copy.deepcopy(base), t)
    times = {name: [] for name in rows}
    with tempfile.TemporaryDirectory() as out:
        def one(name, step):
            par, optimizer, scheduler, project, objective = rows[name]
            with general_path() if name == "general" else contextlib.nullcontext():
                t0 = time.perf_counter()
                train_step(par, train_data, optimizer, scheduler, project, t, step, Path(out), objective)
                return time.perf_counter() - t0
        for name in rows:
            for s in range(args.warmup):
                one(name, s)
        order = list(rows)
        for r in range(args.repeats):
            for name in (order if r % 2 == 0 else order[::-1]):
                times[name].append(one(name, args.warmup + r))
    tokens = t.batch_size * t.grad_accum * run.model["max_position_embeddings"]
    med = {name: statistics.median(v) for name, v in times.items()}
    table = ["| path | median step s | tokens/s | speed vs general |", "|---|---:|---:|---:|"]
    table += [f"| {name} | {med[name]:.3f} | {tokens / med[name]:,.0f} | {med['general'] / med[name]:.2f}× |"
              for name in rows]
    print("\n".join(table))
    if args.no_append:
        return
    flags = " ".join([f"--preset {args.preset}", f"--threads {args.threads}", *args.overrides])
    text = f"""
## Training step of a preset: position-only fast path and maxmin kernel vs the general path ({datetime.date.today()})

Machine: {machine()}.

`{args.preset}` ({tokens} tokens/step, objective {t.objective}, dtype {t.dtype}, {t.optimizer}); the loop's own
`train_step` (forward, loss, backward, optimizer step, projection). `general` = position-only attention through
the attention kernel with a bias mask and maxmin through torch.maximum/minimum, as every run before this date;
`fast` = `Attention.position_only` and `_MaxMin`. Median of {args.repeats} interleaved steps after {args.warmup} warm-up steps each.

{chr(10).join(table)}

- Rerun: `.venv/bin/python scripts/bench_preset_step.py {flags}` (appends a new section here).
"""
    with open(args.append, "a") as f:
        f.write(text)
    print(f"appended to {args.append}")


if __name__ == "__main__":
    main()
