"""A preset's training step under glibc's default malloc and under `retain_freed_memory`.

`lipformer train` raises glibc's mmap and trim thresholds (training/allocator.py) so that the step's
large activations are reused from the heap instead of mapped and zero-filled again at every step.
This script measures what that buys on the loop's own `train_step` (the preset's objective, dtype,
optimizer and projection), from the same initial weights. The two settings belong to the process, so
each row runs in a child process of its own (LIPFORMER_MALLOC=default for the baseline). The children
alternate, `--rounds` times each. Reported: median step time, kernel (system) CPU seconds and minor
page faults per timed step, and the child's peak resident memory.

    .venv/bin/python scripts/bench_allocator.py --threads 2
Appends a dated section to docs/benchmarks.md (--no-append to skip).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _bench import add_common_args, append_section, machine, preset_step  # noqa: E402
from training.allocator import USER_SETTINGS, retain_freed_memory  # noqa: E402
from training.train import train_step  # noqa: E402

ROWS = ("glibc default", "retain_freed_memory")


def child(args) -> None:
    """One row: time `--steps` training steps after `--warmup`, print one JSON line."""
    applied = retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    t, train_data, (par, optimizer, scheduler, project, objective) = preset_step(args.preset, args.overrides)
    times = []
    with tempfile.TemporaryDirectory() as out:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            train_step(par, train_data, optimizer, scheduler, project, t, step, Path(out), objective)
            times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    n = args.steps
    print(json.dumps({"applied": applied, "step_s": statistics.median(times[args.warmup:]),
                      "sys_s": (r1.ru_stime - r0.ru_stime) / n, "user_s": (r1.ru_utime - r0.ru_utime) / n,
                      "faults": (r1.ru_minflt - r0.ru_minflt) / n, "peak_mib": r1.ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare-char", help="a training/configs preset (default shakespeare-char)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per child (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per child (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="children per row, alternating (default 2)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value, as for `lipformer train`")
    add_common_args(p, ROOT)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.threads:   # the children's count, for the machine line
        torch.set_num_threads(args.threads)
    base_env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS + ("LIPFORMER_MALLOC",)}
    cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--threads", str(args.threads), *args.overrides]
    results = {row: [] for row in ROWS}
    for r in range(args.rounds):
        for row in (ROWS if r % 2 == 0 else ROWS[::-1]):
            env = {**base_env, "LIPFORMER_MALLOC": "default"} if row == ROWS[0] else base_env
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"the {row} child failed:\n{done.stderr}")
            results[row].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(row, results[row][-1], flush=True)
            if row == ROWS[1] and not results[row][-1]["applied"]:
                sys.exit("retain_freed_memory did not apply here (not glibc's malloc, or malloc tunables set): "
                         "nothing to compare")

    def med(row, key):
        return statistics.median(x[key] for x in results[row])

    base = med(ROWS[0], "step_s")
    table = ["| malloc | median step s | speed vs default | system CPU s/step | user CPU s/step | "
             "minor page faults/step | peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {row} | {med(row, 'step_s'):.3f} | {base / med(row, 'step_s'):.2f}× | {med(row, 'sys_s'):.2f} | "
              f"{med(row, 'user_s'):.2f} | {med(row, 'faults'):,.0f} | {med(row, 'peak_mib'):,.0f} |" for row in ROWS]
    print("\n".join(table))
    flags = " ".join([f"--preset {args.preset}", f"--threads {args.threads}", f"--rounds {args.rounds}",
                      f"--steps {args.steps}", *args.overrides])
    text = f"""
## CPU allocator: glibc's default malloc vs `retain_freed_memory` on a preset's training step ({datetime.date.today()})

Machine: {machine()}.

`{args.preset}`, the loop's own `train_step`, from the same initial weights. Each row is {args.rounds} child
processes (alternating), each timing {args.steps} steps after {args.warmup} warm-up steps; medians over the
children. `glibc default` maps every block of 32 MiB or more afresh and zero-fills its pages at each step;
`retain_freed_memory` (training/allocator.py, what `lipformer train` and `lipformer demo` do) keeps them on
the heap.

{chr(10).join(table)}

- Rerun: `.venv/bin/python scripts/bench_allocator.py {flags}` (appends a new section here).
"""
    append_section(args, text)


if __name__ == "__main__":
    main()
