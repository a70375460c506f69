"""A preset's real training step in bf16 and in float32, on this CPU: is bf16 native here?

On a CPU without native bf16 (no AVX512 or AMX: oneDNN says so, `cpu_has_native_bf16`) torch
emulates bf16 matmuls. Four rows, each the training loop's own `train_step` (the preset's
objective, optimizer, companion and projection) on the preset's data from the same initial weights:

    bf16        train.dtype=bfloat16 autocast, Newton–Schulz in bf16 (what the preset ran before
                2026-12-06 on every machine)
    bf16, NS32  bf16 autocast, Newton–Schulz in float32 (what the trainer now picks on such a CPU)
    float32, NS bf16   train.dtype=float32, Newton–Schulz in bf16 (the optimizer's default: what a
                float32 recipe such as `demo` ran before 2026-12-06)
    float32     train.dtype=float32, Newton–Schulz in float32 (what the trainer now picks for it)

plus one bare 16384 × 256 × 1024 matmul in each dtype. Median of `--repeats` steps after `--warmup`.

    .venv/bin/python scripts/bench_cpu_dtype.py --preset shakespeare-char --threads 2
Appends a dated section to docs/benchmarks.md (--no-append to skip).
"""

from __future__ import annotations

import argparse
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

from _bench import add_common_args, machine, preset_step  # noqa: E402

from training.evaluation import cpu_has_native_bf16  # noqa: E402
from training.train import train_step  # noqa: E402

ROWS = {"bf16": ("bfloat16", "bfloat16"), "bf16, NS32": ("bfloat16", "float32"),
        "float32, NS bf16": ("float32", "bfloat16"), "float32": ("float32", "float32")}


def matmul_seconds(dtype: torch.dtype, repeats: int) -> float:
    a, w = torch.randn(16384, 256, dtype=dtype), torch.randn(1024, 256, dtype=dtype)
    a @ w.T
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ w.T
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_seconds(preset: str, overrides: list[str], autocast: str, ns: str, warmup: int, repeats: int) -> float:
    t, train_data, (par, optimizer, scheduler, project, objective) = preset_step(
        preset, [*overrides, f"train.dtype={autocast}", f"train.optimizer_args.ns_dtype={ns}"])
    times = []
    with tempfile.TemporaryDirectory() as out:
        for step in range(warmup + repeats):
            t0 = time.perf_counter()
            train_step(par, train_data, optimizer, scheduler, project, t, step, Path(out), objective)
            if step >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare-char", help="a training/configs preset (default shakespeare-char)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per row (default 3)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for `lipformer train`")
    add_common_args(p, ROOT)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mm = {name: matmul_seconds(dtype, 5) for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16))}
    steps = {}
    for name, (autocast, ns) in ROWS.items():
        steps[name] = step_seconds(args.preset, args.overrides, autocast, ns, args.warmup, args.repeats)
        print(f"{name}: {steps[name]:.2f} s/step", flush=True)
    table = ["| row | median step s | vs float32 |", "|---|---:|---:|"]
    table += [f"| {name} | {s:.2f} | {s / steps['float32']:.1f}× |" for name, s in steps.items()]
    table += [f"| matmul 16384×256×1024, {name} | {s:.3f} | {s / mm['float32']:.1f}× |" for name, s in mm.items()]
    print("\n".join(table))
    if args.no_append:
        return
    flags = " ".join([f"--preset {args.preset}", f"--threads {args.threads}", *args.overrides])
    text = f"""
## bf16 on a CPU without native bf16 ({datetime.date.today()})

Machine: {machine()}; native bf16 (oneDNN): {cpu_has_native_bf16()}.

`{args.preset}` with {' '.join(args.overrides) or 'its own settings'}: the loop's own `train_step` (forward, loss,
backward, optimizer step, projection), median of {args.repeats} steps after {args.warmup} warm-up. `bf16` = bf16
autocast and Newton–Schulz in bf16; `bf16, NS32` = bf16 autocast, Newton–Schulz in float32; `float32, NS bf16` = no autocast, Newton–Schulz in
bf16; `float32` = both float32.

{chr(10).join(table)}

- Rerun: `.venv/bin/python scripts/bench_cpu_dtype.py {flags}` (appends a new section here).
"""
    with open(args.append, "a") as f:
        f.write(text)
    print(f"appended to {args.append}")


if __name__ == "__main__":
    main()
