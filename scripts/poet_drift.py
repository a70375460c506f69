"""POET's spectrum drift and learning vs learning rate: plain Cayley–Neumann vs `spectrum_tol`.

Setup (as tests/test_poet.py): POETLinear(64, 48, block_size=16), a teacher with W0's spectrum
(reachable by rotations alone), 512 Gaussian inputs, MSE, AdamW (wd 0), 300 steps, merge every 50.
Drift = max over checks (every 10 steps) of max_i |σ_i(W) − σ_i(W_init)| / σ_max(W_init); the
stricter per-σ relative drift max_i |σ_i − σ_i(init)| / σ_i(init) is printed too. Learning =
final loss / first loss.

    .venv/bin/python scripts/poet_drift.py [--lrs 5e-4 1e-3 3e-3 1e-2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # tiny matrices: threads only add barrier stalls on a shared machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lipformer.poet import POETLinear  # noqa: E402


def run(lr: float, spectrum_tol, steps: int = 300, merge_every: int = 50, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    layer = POETLinear(64, 48, block_size=16, spectrum_tol=spectrum_tol)
    with torch.no_grad():
        teacher = torch.linalg.qr(torch.randn(48, 48))[0] @ layer.w0 @ torch.linalg.qr(torch.randn(64, 64))[0]
    x = torch.randn(512, 64)
    y = x @ teacher.T
    s0 = torch.linalg.svdvals(layer.weight.detach().double())
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.0)
    losses, drift_max, drift_each, exact_steps = [], 0.0, 0.0, 0
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        exact_steps += layer.rot_out.uses_exact() or layer.rot_in.uses_exact()
        loss = (layer(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % merge_every == 0:
            layer.merge_then_reinitialize(opt)
        if step % 10 == 0:
            s = torch.linalg.svdvals(layer.weight.detach().double())
            drift_max = max(drift_max, float((s - s0).abs().max() / s0.max()))
            drift_each = max(drift_each, float(((s - s0).abs() / s0).max()))
    return {"drift": drift_max, "drift_each": drift_each, "loss_ratio": losses[-1] / losses[0],
            "exact_share": exact_steps / steps, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 3e-3, 1e-2])
    ap.add_argument("--tol", type=float, default=1e-6, help="spectrum_tol of the new variant")
    args = ap.parse_args()
    print("| lr | variant | drift / σ_max | drift per σ | final/first loss | steps on exact Cayley | s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for lr in args.lrs:
        for name, tol in (("Cayley–Neumann only (tol None)", None), (f"spectrum_tol {args.tol:g}", args.tol)):
            r = run(lr, tol)
            print(f"| {lr:g} | {name} | {r['drift']:.2e} | {r['drift_each']:.2e} | {r['loss_ratio']:.4f} "
                  f"| {r['exact_share']:.0%} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
