"""Does the Gram-space Newton–Schulz train like the standard one? Tiny preset, Muon, both methods.

Trains the `tiny` preset (char level, on this repository's own docs as corpus) with
`train.optimizer_args.ns_method` = "standard" and = "gram", for several seeds, and prints the train
loss every `--log` steps and the final val loss per run, plus the seed-to-seed spread that "within
noise" is judged against.

    .venv/bin/python scripts/train_gram_vs_standard.py --steps 200 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lipformer.training.data import build_char_corpus  # noqa: E402
from lipformer.training.recipe import load_recipe  # noqa: E402
from lipformer.training.train import run  # noqa: E402


def corpus_text() -> str:
    return "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"])


def train_once(corpus: str, method: str, seed: int, steps: int, log: int, work: Path) -> list[dict]:
    out = work / f"{method}-{seed}"
    recipe = load_recipe("tiny", None, [
        "data.dataset=char_dir", f"data.path={corpus}", f"train.max_steps={steps}", f"train.seed={seed}",
        f"train.log_every={log}", f"train.eval_every={steps}", "train.checkpoint_every=0",
        f"train.optimizer_args.ns_method={method}"])
    run(recipe, out, progress=False, log=lambda *a, **k: None)
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--log", type=int, default=25)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = str(work / "corpus")
        build_char_corpus([corpus_text()], corpus)
        curves = {(m, s): train_once(corpus, m, s, args.steps, args.log, work)
                  for s in args.seeds for m in ("standard", "gram")}
    steps = [r["step"] for r in curves[("standard", args.seeds[0])] if "loss" in r]
    print("| step | " + " | ".join(f"{m} s{s}" for (m, s) in curves) + " |")
    print("|" + "---|" * (len(curves) + 1))
    for i, step in enumerate(steps):
        print(f"| {step} | " + " | ".join(f"{c[i]['loss']:.3f}" for c in curves.values()) + " |")
    final = {k: c[-1].get("val_loss") for k, c in curves.items()}
    print("final val loss: " + ", ".join(f"{m} s{s} {v:.4f}" for (m, s), v in final.items()))
    for m in ("standard", "gram"):
        vals = [final[(m, s)] for s in args.seeds]
        print(f"{m}: mean val {statistics.mean(vals):.4f}, seed spread (max−min) {max(vals) - min(vals):.4f}")
    gaps = [abs(final[("gram", s)] - final[("standard", s)]) for s in args.seeds]
    print(f"|gram − standard| val per seed: {', '.join(f'{g:.4f}' for g in gaps)}")


if __name__ == "__main__":
    main()
