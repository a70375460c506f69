"""Benchmark: one POETLinear training step vs a dense nn.Linear + AdamW step at equal shape.

A step is forward + backward (including dL/dx, as for a layer inside a network) + AdamW step, on
a batch of `--tokens` token vectors. Variants run interleaved (dense, POET b=…, dense, …) so a
noisy machine slows them alike; the table gives the median step time and the ratio to the
dense baseline measured in the same run, plus the peak memory of one step from torch.profiler's
memory timeline (params, grads, optimizer state, buffers, activations; CPU).

    .venv/bin/python scripts/bench_poet.py                     # prints the table
    .venv/bin/python scripts/bench_poet.py --append docs/benchmarks.md
    .venv/bin/python scripts/bench_poet.py --threads 1        # one intra-op thread

POET's step is the dense matmuls plus ~50 small ops (Cayley–Neumann blocks, permutations); on
a loaded machine with 2 OpenMP threads each small op can stall on a descheduled thread, so the
ratio there mostly measures contention — run with --threads 1 too and compare.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lipformer.poet import POETLinear  # noqa: E402


def make(variant: str, d_in: int, d_out: int):
    torch.manual_seed(0)
    if variant == "dense":
        layer = nn.Linear(d_in, d_out, bias=False)
    else:
        block = int(variant.split("b=")[1].split()[0])
        # "exact": spectrum_tol 0, the exact Cayley path from the first step on (what the default
        # spectrum_tol runs once ‖q‖^6 > 1e-6); "series": spectrum_tol None, Cayley–Neumann always
        tol = {"exact": 0.0, "series": None}[variant.split()[-1]]
        layer = POETLinear(d_in, d_out, block_size=block, neumann_terms=5, init="uniform_spectrum", spectrum_tol=tol)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-4)
    return layer, opt


def step(layer, opt, x):
    y = layer(x)
    loss = y.square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def peak_memory(layer, opt, x) -> float | None:
    """Peak bytes live during one step (after a warm-up step created the optimizer state)."""
    from torch.profiler import ProfilerActivity, profile
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            step(layer, opt, x)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = os.path.join(tmp, "timeline.json")
            prof.export_memory_timeline(path, device="cpu")
            _, sizes = json.load(open(path))
        return max(sum(s) for s in sizes)
    except Exception as exc:  # the timeline API is deprecated; report instead of failing
        print(f"memory timeline unavailable: {exc}", file=sys.stderr)
        return None


def trainable(layer) -> int:
    return sum(p.numel() for p in layer.parameters() if p.requires_grad)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--shapes", default="768x768,768x3072", help="d_in x d_out, comma separated")
    ap.add_argument("--blocks", default="256,64", help="POET block sizes to compare")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--append", help="append a markdown section to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = ["dense"] + [f"poet b={b} {path}" for b in args.blocks.split(",") for path in ("series", "exact")]
    rows = []
    for shape in args.shapes.split(","):
        d_in, d_out = (int(v) for v in shape.lower().split("x"))
        x = torch.randn(args.tokens, d_in, requires_grad=True)
        built = {v: make(v, d_in, d_out) for v in variants}
        for v in variants:
            for _ in range(args.warmup):
                step(*built[v], x)
        times = {v: [] for v in variants}
        for _ in range(args.repeats):  # interleaved
            for v in variants:
                t0 = time.perf_counter()
                step(*built[v], x)
                times[v].append(time.perf_counter() - t0)
        memory = {v: peak_memory(*built[v], x) for v in variants}
        base_t, base_m = statistics.median(times["dense"]), memory["dense"]
        for v in variants:
            t = statistics.median(times[v])
            m = memory[v]
            rows.append({"shape": f"{d_in}x{d_out}", "variant": v, "params": trainable(built[v][0]),
                         "ms": 1e3 * t, "ratio": t / base_t,
                         "mem_mb": None if m is None else m / 2**20,
                         "mem_ratio": None if (m is None or not base_m) else m / base_m})

    header = "| shape (in×out) | variant | trainable params | median step (ms) | time ratio | peak mem (MiB) | mem ratio |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = "n/a" if r["mem_mb"] is None else f"{r['mem_mb']:.1f}"
        memr = "n/a" if r["mem_ratio"] is None else f"{r['mem_ratio']:.2f}×"
        lines.append(f"| {r['shape']} | {r['variant']} | {r['params']:,} | {r['ms']:.1f} | {r['ratio']:.2f}× | {mem} | {memr} |")
    table = "\n".join(lines)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine = (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
               + (f", load average at the end {load[0]:.1f}" if load else ""))
    print(table)
    print(machine)
    if args.append:
        today = datetime.date.today().isoformat()
        section = (
            f"\n## POETLinear training step vs dense nn.Linear + AdamW ({today})\n\n"
            f"Machine: {machine}.\n\n"
            f"One step = forward + backward (with dL/dx) + AdamW step on {args.tokens} tokens, float32. "
            f"Baseline: `torch.nn.Linear(bias=False)` + `torch.optim.AdamW` at the same shape. "
            f"POET: `lipformer.poet.POETLinear`, k = 5, uniform-spectrum init, AdamW on the skew parameters; "
            f"\"series\": Cayley–Neumann blocks (spectrum_tol None), \"exact\": exact Cayley blocks by a batched solve "
            f"(spectrum_tol 0; the default spectrum_tol 1e-6 runs this path once the proved series stretch exceeds it). "
            f"Median of {args.repeats} interleaved repeats after {args.warmup} warm-up steps; "
            f"peak memory of one step from torch.profiler's memory timeline.\n\n"
            f"{table}\n\n"
            f"Rerun: `.venv/bin/python scripts/bench_poet.py{' --threads ' + str(args.threads) if args.threads else ''} "
            f"--append docs/benchmarks.md`\n")
        path = Path(args.append)
        if not path.exists():
            path.write_text("# Benchmarks\n")
        with path.open("a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
