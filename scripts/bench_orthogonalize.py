"""Benchmark: lipformer `spectral.orthogonalize` vs torch.optim.Muon's Newton–Schulz.

Baseline: `torch.optim._muon._zeropower_via_newtonschulz` (torch's Muon, classic coefficients,
bf16). Both run the same number of steps on the same inputs, timed side by side in one process
with interleaved repeats (A B C, B C A, C A B, ...) and reported as medians, so machine noise hits
all of them alike. Accuracy is max |σ − 1| over every singular value of the output (exact float64
SVD), for Gaussian inputs of the GPT-2 shapes (Frobenius-normalized Gaussians have σ down to ~0,
so max |σ − 1| is dominated by the smallest σ; the median is printed too).

    .venv/bin/python scripts/bench_orthogonalize.py            # run, print, append to docs/benchmarks.md
    .venv/bin/python scripts/bench_orthogonalize.py --no-write --repeats 3
    .venv/bin/python scripts/bench_orthogonalize.py --threads 1 --clock cpu   # on a shared machine
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lipformer.spectral import CLASSIC, orthogonalize  # noqa: E402
from torch.optim._muon import _zeropower_via_newtonschulz  # noqa: E402

SHAPES = [(768, 3072), (3072, 768), (768, 2304), (768, 768)]


STAT = statistics.median  # or min (--stat): on a shared machine noise only adds time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def methods(steps: int):
    ortho = lambda G, **kw: orthogonalize(G, steps, "classic", out_dtype=torch.bfloat16, **kw)  # noqa: E731
    return {
        "torch Muon NS": lambda G: _zeropower_via_newtonschulz(G, CLASSIC, steps, 1e-7),
        # out_dtype=bf16: return the working dtype as torch's function does (no cast back)
        "standard": lambda G: ortho(G, method="standard"),
        "gram": lambda G: ortho(G, method="gram"),  # the device's plan (gram_plan)
        "gram 2 restarts": lambda G: ortho(G, method="gram", restarts=(2, 4)),  # the plan before 2026-12-02
        "gram no restart": lambda G: ortho(G, method="gram", restarts=()),
        "PE gram": lambda G: orthogonalize(G, steps, "polar_express", out_dtype=torch.bfloat16, method="gram"),
    }


def sigma_error(O: torch.Tensor) -> tuple[float, float]:
    s = torch.linalg.svdvals(O.double().cpu())
    dev = (s - 1).abs()
    return float(dev.max()), float(dev.median())


def bench(shape, steps: int, repeats: int, device: torch.device, clock=time.perf_counter):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
    fns = methods(steps)
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up (allocator, kernels)
        fn(G)
    _sync(device)
    order = list(fns.items())
    for r in range(repeats):
        for name, fn in order[r % len(order):] + order[:r % len(order)]:  # rotate: no fixed position
            _sync(device)
            t0 = clock()
            fn(G)
            _sync(device)
            times[name].append(clock() - t0)
    outputs = {name: fn(G) for name, fn in fns.items()}
    errors = {name: sigma_error(O) for name, O in outputs.items()}
    identical = torch.equal(outputs["torch Muon NS"], outputs["standard"])
    return {name: STAT(t) for name, t in times.items()}, errors, identical


def machine(device: torch.device, load_start: float | None = None) -> str:
    cpu = platform.processor() or platform.machine()
    try:  # the CPU's marketing name where Linux exposes it
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPU cores, torch {torch.__version__}"
    desc += f", {torch.get_num_threads()} threads"
    if hasattr(os, "getloadavg"):
        start = f"{load_start:.1f} at the start, " if load_start is not None else ""
        desc += f", load average {start}{os.getloadavg()[0]:.1f} at the end"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: this process's CPU time (with --threads 1 on a shared "
                         "machine: the time the work took, not the time spent waiting for a core)")
    ap.add_argument("--warmup", type=int, default=2, help="passes of every method over every shape before timing")
    ap.add_argument("--stat", choices=("median", "min"), default="median", help="per-method summary of the repeats")
    ap.add_argument("--no-write", action="store_true", help="print only, do not append to docs/benchmarks.md")
    args = ap.parse_args()
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    names = list(methods(args.steps))
    header = ("| shape | " + " | ".join(f"{n} ms" for n in names) + " | "
              + " | ".join(f"speed {n}" for n in names[1:]) + " | "
              + " | ".join(f"max abs(σ−1) {n}" for n in names) + " | standard bitwise = torch |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    # Warm-up over every shape first: whichever shape was timed first used to run the Gram path
    # ~10% slower (the allocator and kernel caches still settling), which made the first shape's
    # ratio depend on the order of SHAPES (measured: 1.36× first vs 1.57-1.59× after the others).
    for _ in range(args.warmup):
        for shape in SHAPES:
            G = torch.randn(*shape).to(device)
            for fn in methods(args.steps).values():
                fn(G)
    for shape in SHAPES:
        t, e, same = bench(shape, args.steps, args.repeats, device,
                           time.process_time if args.clock == "cpu" else time.perf_counter)
        base = t[names[0]]
        rows.append(f"| {shape[0]}×{shape[1]} | " + " | ".join(f"{t[n] * 1e3:.1f}" for n in names) + " | "
                    + " | ".join(f"{base / t[n]:.2f}×" for n in names[1:]) + " | "
                    + " | ".join(f"{e[n][0]:.3f}" for n in names) + f" | {'yes' if same else 'no'} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print()
    print(table)
    if args.no_write:
        return
    section = f"""
## orthogonalize (standard and Gram) vs torch.optim.Muon Newton–Schulz

- Date: {datetime.date.today().isoformat()}; machine: {machine(device, load_start)}; device: {device}.
- Baseline: `torch.optim._muon._zeropower_via_newtonschulz` (torch {torch.__version__}), classic
  coefficients {CLASSIC}, bf16, {args.steps} steps. lipformer `lipformer.spectral.orthogonalize`,
  same steps and coefficients: "standard" (torch's arithmetic), "gram" (the Gram-space iteration
  with this device's plan from `gram_plan`: on CPU bf16 with one restart before step 3 for
  classic, on CUDA float16 with one restart before step 2), "gram 2 restarts" (bf16, before steps
  2 and 4: the CPU plan until 2026-12-02), "gram no restart" (a speed reference only: wrong on
  ill-conditioned inputs, see tests/test_spectral.py), and "PE gram" (Polar Express coefficients,
  plan: restarts before 2 and 4). Inputs: seeded Gaussian matrices; times ({args.clock} clock,
  {torch.get_num_threads()} threads) are the {args.stat}s of {args.repeats} interleaved (rotated) repeats
  in one run, after {args.warmup} warm-up passes over all shapes; speed = torch time / ours (> 1: faster than torch); σ from an exact float64 SVD.
- Rerun: `.venv/bin/python scripts/bench_orthogonalize.py --threads {args.threads or torch.get_num_threads()} --clock {args.clock} --repeats {args.repeats} --stat {args.stat} --warmup {args.warmup}` (appends a new section here).

{table}
"""
    path = ROOT / "docs" / "benchmarks.md"
    if not path.exists():
        path.write_text("# Benchmarks\n\nMeasured side by side in one run, with the machine and date "
                        "(DESIGN §9). Each script appends its own section.\n")
    with path.open("a") as f:
        f.write(section)
    print(f"\nappended to {path}")


if __name__ == "__main__":
    main()
