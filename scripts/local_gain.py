"""Local vs global certified radii of trained runs, on Shakespeare val text (docs/results.md).

For each run: the median radius of both methods and their ratio, certified-and-correct accuracy at
a few ε for both, and a tightness check: PGD at the local radius (must find no flip) and at growing
multiples of it (the smallest multiple that flips, per attacked position).

    .venv/bin/python scripts/local_gain.py "c=20, v/o 4=runs/sc-c20-vo4" "c=20, mlp_in 8=runs/sc-c20-mlp8"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lipformer import LipformerForCausalLM, certify  # noqa: E402
from lipformer.training.data import prepare_shakespeare  # noqa: E402


def model_dir(run: Path) -> Path:
    for name in ("final", "checkpoint"):
        if (run / name / "config.json").is_file():
            return run / name
    raise SystemExit(f"error: {run} has no final/ or checkpoint/ model")


def flip_multiple(model, ids, certs, multiples=(1, 2, 4, 8, 16, 32, 64, 128), positions=8) -> list:
    """For `positions` certified positions: the smallest multiple of the local radius at which PGD
    flips the prediction (None: none up to the largest); multiple 1 must never flip."""
    picked = [c for c in certs if c.radius_local and c.radius_local > 0][:positions]
    found = {c.index: None for c in picked}
    for k in multiples:
        todo = [c for c in picked if found[c.index] is None]
        if not todo:
            break
        for c in todo:
            probe = certify.PositionCertificate(c.index, c.token, c.prediction, c.margin, c.radius_local * k)
            if certify.attack(model, ids, [probe], steps=40, max_positions=1)["violations"]:
                found[c.index] = k
    return list(found.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--sequences", type=int, default=2, help="val sequences of the model's context length")
    parser.add_argument("--radii", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2])
    parser.add_argument("--json", help="write the summary here too")
    args = parser.parse_args()
    val = np.fromfile(prepare_shakespeare()["val_bin"], dtype=np.uint16)[256:].astype(np.int64)  # skip the header
    summary = {}
    for spec in args.runs:
        label, _, path = spec.rpartition("=")
        model = certify.float64_copy(LipformerForCausalLM.from_pretrained(model_dir(Path(path))))
        bounds = model.bounds()
        T = model.config.max_position_embeddings
        certs, targets, seconds, flips = [], [], 0.0, []
        for i in range(args.sequences):
            ids = val[i * T:(i + 1) * T + 1].tolist()
            start = time.perf_counter()
            got = certify.certify_tokens(model, ids[:T], bounds, method="best")
            seconds += time.perf_counter() - start
            certs += got
            targets += ids[1:T + 1]
            if i == 0:
                flips = flip_multiple(model, ids[:T], got)
        local = np.array([c.radius_local for c in certs])
        glob = np.array([c.radius_global for c in certs])
        correct = np.array([c.prediction == t for c, t in zip(certs, targets)])
        ok = glob > 0
        row = {"lipschitz_total": bounds.total, "positions": len(certs), "accuracy": float(correct.mean()),
               "median_radius_local": float(np.median(local)), "median_radius_global": float(np.median(glob)),
               "median_ratio_local_over_global": float(np.median(local[ok] / glob[ok])) if ok.any() else None,
               "ratio_of_medians": float(np.median(local) / np.median(glob)) if np.median(glob) > 0 else None,
               "certified_and_correct_local": {f"{r:g}": float((correct & (local >= r)).mean()) for r in args.radii},
               "certified_and_correct_global": {f"{r:g}": float((correct & (glob >= r)).mean()) for r in args.radii},
               "seconds_per_sequence": seconds / args.sequences,
               "pgd_flip_multiple_of_local_radius": flips}
        summary[label] = row
        print(json.dumps({label: row}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
