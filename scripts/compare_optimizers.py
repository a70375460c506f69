"""Optimizer comparison harness: loss vs compute per optimizer × constraint (DESIGN §9).

Trains AdamW, Muon, ROOT, LPSGDM, ALTO and POET+AdamW, each with `model.constraint=hard_cap` and
`none`, at 3 model sizes on Shakespeare (char) for a fixed step budget, through the real training
loop (`lipformer.training.train.run` on the `tiny` preset with overrides). Compute C = 6 · params · tokens
(params: the dense-equivalent count of the model, embedding and head included; POET uses the same
count since its forward multiplies by the full W). Per optimizer and constraint it fits
log(val_loss) = a + b·log(C) over the sizes, and reports the compute-equivalent gain over AdamW
with the same constraint (and over unconstrained AdamW): the compute AdamW's fitted curve needs to
reach that run's loss, divided by the compute the run used (> 1: better than AdamW). The certified
bound (`lipschitz_total`) of every final model is in the table.

    .venv/bin/python scripts/compare_optimizers.py              # CPU default (≈ 10–15 min on 2 cores)
    .venv/bin/python scripts/compare_optimizers.py --scale gpu  # d 128/256/512, 4 layers, seq 256, 2000 steps

CPU default: d 32 / 64 / 128, 2 layers, 4 heads, seq 64, batch 16, 200 steps (204,800 tokens per
run), 36 runs in 2 worker processes of 1 thread. Learning rates are fixed per optimizer (not tuned
per size; see LRS, override with --lr muon=0.03). Writes docs/img/compare.png, a JSON of all runs,
and appends a dated section to docs/benchmarks.md (--no-append to skip).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPTIMIZERS = ("adamw", "muon", "root", "lpsgdm", "alto", "poet")   # poet = POET linears + AdamW
CONSTRAINTS = ("hard_cap", "none")
LRS = {"adamw": 3e-3, "muon": 0.05, "root": 0.05, "lpsgdm": 0.01, "alto": 3e-3, "poet": 1e-3}
SCALES = {
    # sizes as (hidden, layers, heads); every run of a scale sees the same tokens
    "cpu": dict(sizes=[(32, 2, 4), (64, 2, 4), (128, 2, 4)], seq=64, batch=16, steps=200, merge_every=20,
                eval_batches=8),
    "gpu": dict(sizes=[(128, 4, 4), (256, 4, 4), (512, 4, 8)], seq=256, batch=64, steps=2000, merge_every=200,
                eval_batches=20),
}


def overrides(opt: str, constraint: str, size, s: dict, lr: float) -> list[str]:
    d, layers, heads = size
    o = [f"model.hidden_size={d}", f"model.num_hidden_layers={layers}", f"model.num_attention_heads={heads}",
         f"model.max_position_embeddings={s['seq']}", f"model.constraint={constraint}",
         f"train.optimizer={'adamw' if opt == 'poet' else opt}", f"train.lr={lr}",
         f"train.batch_size={s['batch']}", f"train.max_steps={s['steps']}", f"train.warmup_steps={s['steps'] // 20}",
         f"train.eval_every={s['steps']}", f"train.eval_batches={s['eval_batches']}",
         f"train.log_every={s['steps']}", "train.checkpoint_every=0"]
    if opt == "poet":
        o += ["model.linear=poet", f"train.merge_every={s['merge_every']}"]
    if opt == "alto":  # batches of 16–64 sequences are ALTO's small-batch regime (α 0.5, β₁ 0.01)
        o += ["train.optimizer_args.preset=small_batch"]
    return o


def train_one(job: dict) -> dict:
    """One configuration in a worker process (1 thread): the real training loop."""
    import torch
    torch.set_num_threads(job["threads"])
    from lipformer import LipformerConfig, LipformerForCausalLM
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import run

    recipe = load_recipe("tiny", None, job["overrides"])
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(recipe, out=tmp, progress=False, log=lambda *a: None)
    dense = {**recipe.model, "linear": "dense", "vocab_size": job["vocab"]}
    params = sum(p.numel() for p in LipformerForCausalLM(LipformerConfig(**dense)).parameters())
    tokens = recipe.train.max_steps * recipe.train.batch_size * recipe.model["max_position_embeddings"]
    return {**{k: job[k] for k in ("opt", "constraint", "size", "lr")}, "params": params, "tokens": tokens,
            "compute": 6.0 * params * tokens, "seconds": time.time() - t0,
            **{k: res.get(k) for k in ("val_loss", "val_acc", "lipschitz_total", "loss")}}


def fit(rows: list[dict]) -> tuple[float, float] | None:
    """(a, b) of log L = a + b log C by least squares, or None with < 2 finite points."""
    import numpy as np
    pts = [(math.log(r["compute"]), math.log(r["val_loss"])) for r in rows
           if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def gain(run: dict, ref: tuple[float, float] | None) -> float | None:
    """C_ref(L_run) / C_run from the reference fit; None if the reference curve does not decrease."""
    if ref is None or ref[1] >= 0 or run.get("val_loss") is None:
        return None
    a, b = ref
    return math.exp((math.log(run["val_loss"]) - a) / b) / run["compute"]


def inside(rows, results, cons) -> bool:
    """Whether every loss in rows lies within the AdamW (constraint cons) losses, i.e. no extrapolation."""
    ref = [r["val_loss"] for r in results if r["opt"] == "adamw" and r["constraint"] == cons and r.get("val_loss")]
    return bool(ref) and all(min(ref) <= r["val_loss"] <= max(ref) for r in rows if r.get("val_loss"))


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def plot(results: list[dict], fits: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = dict(zip(OPTIMIZERS, plt.cm.tab10.colors))
    for ax, cons in zip(axes, CONSTRAINTS):
        for opt in OPTIMIZERS:
            rows = sorted((r for r in results if r["opt"] == opt and r["constraint"] == cons), key=lambda r: r["compute"])
            rows = [r for r in rows if r.get("val_loss") is not None]
            if not rows:
                continue
            c = np.array([r["compute"] for r in rows])
            ax.scatter(c, [r["val_loss"] for r in rows], color=colors[opt], s=18)
            f = fits.get((opt, cons))
            label = opt if opt != "poet" else "poet+adamw"
            if f is not None:
                cc = np.geomspace(c.min(), c.max(), 20)
                ax.plot(cc, np.exp(f[0] + f[1] * np.log(cc)), color=colors[opt], label=f"{label} (b={f[1]:.3f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"constraint = {cons}")
        ax.set_xlabel("compute 6·params·tokens (FLOPs)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("final val loss (Shakespeare char)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def table(results: list[dict], fits: dict, sizes) -> str:
    ref = {c: fits.get(("adamw", c)) for c in CONSTRAINTS}
    head = ("| optimizer | constraint | lr | " + " | ".join(f"val loss d{s[0]}" for s in sizes) +
            f" | val acc d{sizes[-1][0]} | slope b | gain vs AdamW (same constraint) | gain vs AdamW (none) | " +
            " | ".join(f"L_total d{s[0]}" for s in sizes) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for opt in OPTIMIZERS:
        for cons in CONSTRAINTS:
            rows = {tuple(r["size"]): r for r in results if r["opt"] == opt and r["constraint"] == cons}
            if not rows:
                continue
            f = fits.get((opt, cons))
            g_same = geomean([gain(r, ref[cons]) for r in rows.values()])
            g_none = geomean([gain(r, ref["none"]) for r in rows.values()])
            mark_same = "" if inside(rows.values(), results, cons) else " †"
            mark_none = "" if inside(rows.values(), results, "none") else " †"
            fmt = lambda v, p: "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{p}}"  # noqa: E731
            last = rows.get(tuple(sizes[-1]), {})
            lines.append(
                f"| {opt if opt != 'poet' else 'poet+adamw'} | {cons} | {next(iter(rows.values()))['lr']:g} | " +
                " | ".join(fmt(rows.get(tuple(s), {}).get("val_loss"), ".3f") for s in sizes) +
                f" | {fmt(last.get('val_acc'), '.3f')} | {fmt(f[1] if f else None, '.3f')} | "
                f"{fmt(g_same, '.3g')}×{mark_same} | {fmt(g_none, '.3g')}×{mark_none} | " +
                " | ".join(fmt(rows.get(tuple(s), {}).get("lipschitz_total"), '.3g') for s in sizes) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="size/step setting (default cpu)")
    p.add_argument("--gpu", action="store_const", const="gpu", dest="scale", help="same as --scale gpu")
    p.add_argument("--steps", type=int, default=None, help="override the scale's step budget")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list (default all six)")
    p.add_argument("--lr", action="append", default=[], help="NAME=LR override, repeatable")
    p.add_argument("--workers", type=int, default=2, help="parallel runs (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--out", default=str(ROOT / "runs" / "compare"), help="folder for results.json")
    p.add_argument("--png", default=str(ROOT / "docs" / "img" / "compare.png"), help="plot path")
    p.add_argument("--append", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file to append to")
    p.add_argument("--no-append", action="store_true", help="print only")
    p.add_argument("--from-json", default=None, help="re-tabulate and re-plot a results.json, no training")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results, sizes = saved["results"], saved["setting"]["sizes"]
        fits = {(o, c): fit([r for r in results if r["opt"] == o and r["constraint"] == c])
                for o in OPTIMIZERS for c in CONSTRAINTS}
        plot(results, fits, Path(args.png))
        print(table(results, fits, sizes))
        return
    s = dict(SCALES[args.scale])
    if args.steps:
        s["steps"] = args.steps
    lrs = dict(LRS)
    for item in args.lr:
        k, _, v = item.partition("=")
        lrs[k] = float(v)

    from lipformer.training.data import prepare_shakespeare
    vocab = int(prepare_shakespeare()["vocab_size"])  # cached once here, not raced by the workers
    opts = [o for o in args.optimizers.split(",") if o]
    jobs = [dict(opt=o, constraint=c, size=list(size), lr=lrs[o], vocab=vocab, threads=args.threads,
                 overrides=overrides(o, c, size, s, lrs[o]))
            for size in sorted(s["sizes"], reverse=True) for o in opts for c in CONSTRAINTS]  # big first
    t0 = time.time()
    results = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for job, fut in [(j, pool.submit(train_one, j)) for j in jobs]:
            try:
                r = fut.result()
            except Exception as exc:  # a diverged run is a result, not a crash of the harness
                r = {**{k: job[k] for k in ("opt", "constraint", "size", "lr")}, "error": str(exc)[:200],
                     "val_loss": None, "compute": float("nan")}
            results.append(r)
            print(f"[{time.time() - t0:6.0f}s] {r['opt']:7s} {r['constraint']:8s} d{r['size'][0]:<4d} "
                  f"val_loss {r.get('val_loss')}  L {r.get('lipschitz_total')}  {r.get('error', '')}", flush=True)
    wall = time.time() - t0
    fits = {(o, c): fit([r for r in results if r["opt"] == o and r["constraint"] == c]) for o in opts for c in CONSTRAINTS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"scale": args.scale, "setting": s, "lrs": lrs, "wall_s": wall,
                                                  "results": results}, indent=1))
    plot(results, fits, Path(args.png))
    md = table(results, fits, s["sizes"])
    (out / "table.md").write_text(md + "\n")
    print(md)
    print(f"wall {wall / 60:.1f} min; plot {args.png}; results {out / 'results.json'}")
    if args.no_append:
        return
    import torch
    load = os.getloadavg()[0]
    flags = " ".join(a for a in sys.argv[1:] if not a.startswith("--no-append"))
    sizes = ", ".join(f"d {d} × {n} layers × {h} heads" for d, n, h in s["sizes"])
    text = f"""
## Optimizer comparison harness, Shakespeare char, `--scale {args.scale}` ({datetime.date.today()})

Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.workers} workers × {args.threads}
thread, load average {load:.1f} at the end; wall {wall / 60:.1f} min for {len(results)} runs.

Setting: {sizes}; seq {s['seq']}, batch {s['batch']}, {s['steps']} steps (cosine, 5% warmup) per run; POET merges every
{s['merge_every']} steps; val loss on {s['eval_batches']} val batches at the end. Baseline: AdamW (`torch.optim.AdamW`
on every parameter) with the same constraint. Compute C = 6·params·tokens. Gain = C_AdamW(L) / C, with C_AdamW(L)
from AdamW's log–log fit over the 3 sizes (a geometric mean over the 3 sizes; a loss outside AdamW's range is an
extrapolation and marked †; "—" where AdamW's curve does not decrease). With slopes near 0 the inverse of
AdamW's curve is steep, so a small loss difference becomes a huge compute factor: read † gains as "better/worse
than AdamW at any size measured", not as a calibrated factor. L_total: the certified bound of the final model.
Learning rates fixed per optimizer, not tuned: {', '.join(f'{k} {v:g}' for k, v in lrs.items())}.

{md}

![loss vs compute](img/compare.png)

Rerun: `.venv/bin/python scripts/compare_optimizers.py{(' ' + flags) if flags else ''}`
"""
    with open(args.append, "a") as f:
        f.write(text)
    print(f"appended to {args.append}")


if __name__ == "__main__":
    main()
