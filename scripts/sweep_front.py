"""The accuracy–robustness front: train points through the real loop, certify each, plot.

Each point is a set of recipe overrides on a fixed base recipe, `scripts/front_base.toml` (the
`shakespeare-char` size with plain cross-entropy, float32, q/k caps 0.5, the others 1), run as a proxy
(d 128, 3 blocks, 4 heads, seq 64, batch 32) by default or at the base's own size with `--full`. Per run it records

    val accuracy (fixed val batches), certified-and-correct accuracy at ε ∈ {1e-3, 1e-2, 3e-2},
    median certified radius, the sound global L (`model.bounds().total`), and MIT's accounting of
    the same weights (scripts/mit_accounting.py: NOT SOUND, printed only for comparison),

as one JSON line in OUT/front.jsonl; then writes OUT/front.md (a table) and OUT/front.png
(accuracy vs certified-and-correct accuracy at ε = 1e-2, with the 1/2/3-character n-gram tables
of this corpus, 26.3 / 39.5 / 48.6%, as reference lines). Radii are the global certificate's
(docs/lipschitz.md §6) — the best sound radius in this tree; ε is the max-rms of the
perturbation of `inputs_embeds` (token vectors have rms ≤ 1).

    python scripts/sweep_front.py --points caps1,preset --steps 300 --out runs/front
    python scripts/sweep_front.py --bench            # per-step cost of margin_global vs ce
    python scripts/sweep_front.py --report --out runs/front     # table + plot from front.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mit_accounting import mit_lipschitz  # noqa: E402

EPS = (1e-3, 1e-2, 3e-2)
BASE = Path(__file__).with_name("front_base.toml")   # every point's starting recipe (not the moving preset)
PLOT_EPS = "0.01"   # the ε of the plot's vertical axis (--plot-eps)
NGRAM = {"1-char table": 0.263, "2-char table": 0.395, "3-char table": 0.486}
PROXY = ["model.hidden_size=128", "model.num_hidden_layers=3", "model.num_attention_heads=4",
         "model.max_position_embeddings=64", "train.batch_size=32", "train.warmup_steps=20",
         "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=50"]
CAPS1 = [f"model.w_max.{k}=1" for k in ("q", "k")]  # the preset's other caps are already 1
MIT_RECIPE = CAPS1 + ["model.constraint=normalize", "model.zero_init=true", "train.allocation=modula",
                      "train.lr=9", "train.companion=colnorm", "train.companion_lr=9", "train.schedule=linear",
                      "train.warmup_steps=0", "train.optimizer_args.momentum=0.9",
                      "train.optimizer_args.nesterov=false"]
C8MLP4 = ["model.softmax_scale=8", "model.w_max.mlp_in=4"]
FINETUNE = ["train.lr=0.03", "train.companion_lr=0.001", "train.warmup_steps=10"]
C20VO4 = ["model.softmax_scale=20", "model.w_max.v=4", "model.w_max.o=4"]
# position-only attention: a learned score offset per head and distance (model.position_bias), no
# content scores (softmax_scale 0): the score path of every bound is 0, so attention costs only σ_V·σ_O
PB = CAPS1 + ["model.position_bias=16", "model.softmax_scale=0"]
POINTS = {
    "pb-c0": PB,
    "pb-c0-a0.5": PB + ["model.residual_alpha=0.5"],
    "pb-c0-a0.5-mlpin2": PB + ["model.residual_alpha=0.5", "model.w_max.mlp_in=2"],
    "pb-c0-a0.5-margin1e-2": PB + ["model.residual_alpha=0.5", "train.objective=margin_global", "train.eps=0.01"],
    "pb-c0-a0.5-local1e-2": PB + ["model.residual_alpha=0.5", "train.objective=margin_local", "train.eps=0.01"],
    "pb-c1-a0.5": CAPS1 + ["model.position_bias=16", "model.residual_alpha=0.5"],
    "pb-c8-mlpin4": C8MLP4 + ["model.position_bias=16"],
    "preset": [],                                           # q, k caps 0.5: sound L ≈ 1.5
    "caps1": CAPS1,                                         # MIT's caps-1.0 point: sound L ≈ 5
    "caps1-mit-recipe": MIT_RECIPE,                         # + modula allocation, zero init, lr 9, normalize
    "caps2": [f"model.w_max.{k}=2" for k in ("q", "k", "v", "o", "mlp_in", "mlp_out")],
    "c8-mlpin4": ["model.softmax_scale=8", "model.w_max.mlp_in=4"],
    "c20-vo4": C20VO4,
    "c4-alpha0.5": CAPS1 + ["model.softmax_scale=4", "model.residual_alpha=0.5"],
    "caps1-margin1e-2": CAPS1 + ["train.objective=margin_global", "train.eps=0.01"],
    "caps1-margin3e-2": CAPS1 + ["train.objective=margin_global", "train.eps=0.03"],
    "c8-mlpin4-margin1e-3": ["model.softmax_scale=8", "model.w_max.mlp_in=4", "train.objective=margin_global",
                             "train.eps=0.001"],
    "caps2-margin1e-2": [f"model.w_max.{k}=2" for k in ("q", "k", "v", "o", "mlp_in", "mlp_out")]
                        + ["train.objective=margin_global", "train.eps=0.01"],
    "caps1-mit-recipe-margin1e-2": MIT_RECIPE + ["train.objective=margin_global", "train.eps=0.01"],
    "preset-margin1e-2": ["train.objective=margin_global", "train.eps=0.01"],
    "unconstrained-adamw": ["model.constraint=none", "train.optimizer=adamw", "train.lr=3e-3"],
    # certified training against the local certificate (training/local_surrogate.py)
    "caps1-local1e-2": CAPS1 + ["train.objective=margin_local", "train.eps=0.01"],
    "c20-vo4-global1e-2": C20VO4 + ["train.objective=margin_global", "train.eps=0.01"],
    "c20-vo4-local1e-3": C20VO4 + ["train.objective=margin_local", "train.eps=0.001"],
    "c20-vo4-local1e-2": C20VO4 + ["train.objective=margin_local", "train.eps=0.01"],
    "c20-vo4-local3e-2": C20VO4 + ["train.objective=margin_local", "train.eps=0.03"],
    "c20-vo4-local1e-2-ramp": C20VO4 + ["train.objective=margin_local", "train.eps=0.01", "train.eps_warmup=100"],
    "c20-vo4-local1e-2-mix": C20VO4 + ["train.objective=margin_local", "train.eps=0.01", "train.eps_warmup=150",
                                       "train.margin_weight=0.5"],
    "c20-vo4-local1e-3-mix": C20VO4 + ["train.objective=margin_local", "train.eps=0.001", "train.eps_warmup=150",
                                       "train.margin_weight=0.5"],
    "c20-vo4-local3e-4": C20VO4 + ["train.objective=margin_local", "train.eps=0.0003"],
    "c20-vo2": ["model.softmax_scale=20", "model.w_max.v=2", "model.w_max.o=2"],
    "c20-vo2-local1e-3": ["model.softmax_scale=20", "model.w_max.v=2", "model.w_max.o=2",
                          "train.objective=margin_local", "train.eps=0.001"],
    "c20-vo2-local1e-3-w0.1": ["model.softmax_scale=20", "model.w_max.v=2", "model.w_max.o=2",
                               "train.objective=margin_local", "train.eps=0.001", "train.margin_weight=0.1"],
    "c20-vo4-local1e-3-w0.1": C20VO4 + ["train.objective=margin_local", "train.eps=0.001", "train.margin_weight=0.1"],
    "c20-local1e-3": ["model.softmax_scale=20", "train.objective=margin_local", "train.eps=0.001"],
    "c8-mlpin4-local1e-3": ["model.softmax_scale=8", "model.w_max.mlp_in=4", "train.objective=margin_local",
                            "train.eps=0.001"],
    "c20-local1e-2": ["model.softmax_scale=20", "train.objective=margin_local", "train.eps=0.01"],
    "c20": ["model.softmax_scale=20"],
    # fine-tunes of a trained c8-mlpin4 (run with --init-from its final/): a lower lr, a short warmup
    "ft-ce": C8MLP4 + FINETUNE,
    "ft-local1e-3": C8MLP4 + FINETUNE + ["train.objective=margin_local", "train.eps=0.001"],
    "ft-local3e-3": C8MLP4 + FINETUNE + ["train.objective=margin_local", "train.eps=0.003"],
    "ft-global1e-3": C8MLP4 + FINETUNE + ["train.objective=margin_global", "train.eps=0.001"],
    "ft-local1e-3-lr0.01": C8MLP4 + FINETUNE + ["train.lr=0.01", "train.companion_lr=0.0003",
                                                 "train.objective=margin_local", "train.eps=0.001"],
    "ft-local1e-3-w0.3": C8MLP4 + FINETUNE + ["train.objective=margin_local", "train.eps=0.001",
                                               "train.margin_weight=0.3"],
}


@torch.no_grad()
def certify_model(model, val, batches: int, local_sequences: int = 0) -> dict:
    """Accuracy, certified-and-correct fractions at EPS and the median radius on fixed val batches."""
    from lipformer import certify

    m64 = certify.float64_copy(model).cpu()
    bounds = m64.bounds()
    state = val.state_dict()
    val.reset()
    correct, radii = [], []
    for _ in range(batches):
        x, y = val.next_batch()
        hidden = m64.model(x, use_cache=False).last_hidden_state
        pred, _, radius = certify.radii_from_hidden(hidden, m64.head.weight, bounds)
        correct.append(pred == y.reshape(-1))
        radii.append(radius)
    ok, r = torch.cat(correct), torch.cat(radii)
    row = {"val_acc": float(ok.double().mean()), "positions": ok.numel(),
           "certified": {f"{e:g}": float((ok & (r >= e)).double().mean()) for e in EPS},
           "median_radius": float(r.median()), "sound_L": bounds.total, "sound_L_body": bounds.body,
           "mit_L_NOT_SOUND": mit_lipschitz(m64)}
    if local_sequences:
        row.update(certify_best(m64, val, bounds, local_sequences))
    val.load_state_dict(state)
    return row


@torch.no_grad()
def certify_best(m64, val, bounds, sequences: int) -> dict:
    """The best sound radius (max of local and global, docs/lipschitz.md §9) on the first
    `sequences` val sequences: certified-and-correct at EPS, median radius, accuracy there."""
    from lipformer import certify

    val.reset()
    right, best, local, seconds = [], [], [], time.time()
    while len(right) < sequences:
        x, y = val.next_batch()
        for row in range(min(x.size(0), sequences - len(right))):
            certs = certify.certify_tokens(m64, x[row].tolist(), bounds, method="best")
            right.append(torch.tensor([c.prediction for c in certs]) == y[row])
            best.append(torch.tensor([c.radius for c in certs]))
            local.append(torch.tensor([c.radius_local for c in certs]))
    ok, r, rl = torch.cat(right), torch.cat(best), torch.cat(local)
    return {"best_positions": ok.numel(), "best_val_acc": float(ok.double().mean()),
            "certified_best": {f"{e:g}": float((ok & (r >= e)).double().mean()) for e in EPS},
            "median_radius_best": float(r.median()), "median_radius_local": float(rl.median()),
            "certify_best_seconds": time.time() - seconds}


def train_point(name: str, steps: int, out: Path, full: bool, batches: int, local_sequences: int = 0,
                init_from: str | None = None, extra: list[str] = (), suffix: str = "") -> dict:
    from lipformer import LipformerForCausalLM
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import open_data, run

    overrides = ([] if full else PROXY) + [f"train.max_steps={steps}"] + POINTS[name] + list(extra)
    if init_from:
        overrides.append(f"train.init_from={init_from}")
    recipe = load_recipe(config_file=str(BASE), overrides=overrides)
    recipe.train.certify_radii = list(EPS)
    t0 = time.time()
    run(recipe, out / (name + suffix), overwrite=True, progress=False, log=lambda *_: None)
    seconds = time.time() - t0
    model = LipformerForCausalLM.from_pretrained(out / (name + suffix) / "final")
    _, val, _, _ = open_data(recipe)
    return {"name": name + suffix, "overrides": POINTS[name] + list(extra), "init_from": init_from, "steps": steps, "full_size": full,
            "seconds_per_step": seconds / steps, **certify_model(model, val, batches, local_sequences)}


def measure_run(folder: Path, batches: int, local_sequences: int) -> dict:
    """The same row for a run trained elsewhere (e.g. `lipformer train --preset shakespeare-char`),
    on val batches of its own sequence length and batch size."""
    from lipformer import LipformerForCausalLM
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import open_data

    saved = json.loads((folder / "run.json").read_text())
    recipe = load_recipe(preset="shakespeare-char", overrides=[
        f"model.max_position_embeddings={saved['model'].get('max_position_embeddings', 256)}",
        f"train.batch_size={saved['train']['batch_size']}"])
    _, val, _, _ = open_data(recipe)
    model = LipformerForCausalLM.from_pretrained(folder / "final")
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = max(m.get("step", 0) for m in metrics)
    elapsed = max(m.get("elapsed", 0.0) for m in metrics)
    return {"name": folder.name, "overrides": saved["model"], "train": {k: saved["train"].get(k) for k in (
                "objective", "eps", "margin_weight", "eps_warmup", "lr", "dtype")},
            "init_from": None, "steps": steps, "full_size": True, "seconds_per_step": elapsed / max(steps, 1),
            **certify_model(model, val, batches, local_sequences)}


def bench(steps: int = 10) -> dict:
    """Seconds per train step, ce vs margin_global, on the proxy, interleaved in one process."""
    from lipformer import LipformerConfig, LipformerForCausalLM
    from lipformer.constraints import SpectralProjection
    from lipformer.training.objectives import Objective
    from lipformer.training.parallel import Parallel
    from lipformer.training.recipe import load_recipe
    from lipformer.training.train import build_optimizer_for, open_data, train_step

    recipe = load_recipe(config_file=str(BASE), overrides=PROXY + CAPS1)
    train, _, _, vocab = open_data(recipe)
    names = ("ce", "margin_global", "margin_local")
    times = {n: [] for n in names}
    torch.manual_seed(0)
    model = LipformerForCausalLM(LipformerConfig(**{**recipe.model, "vocab_size": vocab}))
    par = Parallel.for_run(model, "ddp", torch.device("cpu"))
    opt, sched = build_optimizer_for(model, recipe.train)
    project = SpectralProjection(model, opt)
    objectives = {"ce": None, "margin_global": Objective("margin_global", 0.01),
                  "margin_local": Objective("margin_local", 0.01)}
    for i in range(len(names) * (steps + 1)):
        name = names[i % len(names)]
        t0 = time.perf_counter()
        train_step(par, train, opt, sched, project, recipe.train, i, Path("."), objectives[name])
        if i >= len(names):  # the first round warms up (and cold-starts the power iteration)
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"seconds_per_step_median": med, "ratio_margin_over_ce": med["margin_global"] / med["ce"],
            "ratio_local_over_ce": med["margin_local"] / med["ce"], "steps_each": steps,
            "threads": torch.get_num_threads()}


def label_rows(heights: list[float], gap: float = 2.2, floor: float = 1.0) -> list[float]:
    """Heights for a column of labels whose points sit at `heights` (descending): each label as close
    to its point as a gap of `gap` below the one above allows, the column lifted if it ends below `floor`."""
    out = []
    for h in heights:
        out.append(min(h, out[-1] - gap) if out else h)
    lift = max(floor - out[-1], 0) if out else 0
    return [h + lift for h in out]


def report(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "front.jsonl").read_text().splitlines() if line.strip()]
    best = any("certified_best" in r for r in rows)
    lines = ["| point | steps | val acc | cert@1e-3 | cert@1e-2 | cert@3e-2 | median radius | sound L | "
             "MIT L (NOT SOUND) | s/step |" + (" best-radius positions | acc there | best cert@1e-3 | best cert@1e-2 | "
                                             "best cert@3e-2 | median best radius |" if best else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * 6 if best else "")]
    def pct(d, key):
        return "—" if d is None or d.get(key) is None else f"{100 * d[key]:.1f}%"

    def num(r, key, fmt):
        return "—" if r.get(key) is None else format(r[key], fmt)

    # Rows transcribed from a results table (`"transcribed": true`) carry only what the table did.
    for r in rows:
        c = r.get("certified")
        line = (f"| {r['name']} | {r.get('steps', '—')} | {100 * r['val_acc']:.1f}% | {pct(c, '0.001')} | "
                f"{pct(c, '0.01')} | {pct(c, '0.03')} | {num(r, 'median_radius', '.2g')} | "
                f"{num(r, 'sound_L', '.3g')} | {num(r, 'mit_L_NOT_SOUND', '.3g')} | {num(r, 'seconds_per_step', '.2f')} |")
        if best:
            b = r.get("certified_best")
            line += (f" {r.get('best_positions', '—')} | {pct(r, 'best_val_acc')} | {pct(b, '0.001')} | "
                     f"{pct(b, '0.01')} | {pct(b, '0.03')} | {num(r, 'median_radius_best', '.2g')} |"
                     if b else " — | — | — | — | — | — |")
        lines.append(line)
    (out / "front.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for label, acc in NGRAM.items():
        ax.axvline(100 * acc, color="grey", ls="--", lw=0.8)
        ax.axhline(100 * acc, color="grey", ls=":", lw=0.8)
        ax.text(100 * acc, 1, label, rotation=90, fontsize=7, color="grey", va="bottom", ha="right")
    named = []
    for r in rows:
        x, y = 100 * r["val_acc"], 100 * r.get("certified_best", r["certified"])[PLOT_EPS]
        margin = (any(str(o).startswith("train.objective=margin") for o in r["overrides"])
                  or (r.get("train") or {}).get("objective", "ce") != "ce")
        o = r["overrides"]
        maxmin = (o.get("activation") == "maxmin" if isinstance(o, dict)
                  else "model.activation=maxmin" in o)
        ax.scatter(x, y, marker="D" if margin else "o", color="C2" if maxmin else ("C3" if margin else "C0"),
                   s=90 if r.get("full_size") else 30, edgecolors="k" if r.get("full_size") else "none")
        if r.get("full_size") or not r.get("transcribed"):   # proxy rows transcribed from a table: named there
            named.append((x, y, f"{r['name']} (L {r['sound_L']:.2g})"))
    # Full-size points sit within a few points of each other: their names go in a column right of
    # the axes, in the points' vertical order, spaced apart, each with a leader line to its point.
    named.sort(key=lambda n: -n[1])
    for (x, y, text), ly in zip(named, label_rows([n[1] for n in named])):
        ax.annotate(text, (x, y), xytext=(61, ly), textcoords="data", fontsize=7, va="center", annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"})
    ax.plot([0, 100], [0, 100], color="k", lw=0.5, label="certified = accuracy")
    if PLOT_EPS == "0.01":   # issue 19's shakespeare-char target: ≥ 50% accuracy and ≥ 40% certified at 1e-2
        ax.fill_between([50, 100], 40, 100, color="gold", alpha=0.25, lw=0, label="target (issue 19)")
    ax.legend(loc="upper left", fontsize=7)
    ax.set_xlim(10, 60)
    ax.set_ylim(-1, 50)
    ax.set_xlabel("val accuracy (%)")
    ax.set_ylabel(f"certified-and-correct at ε = {PLOT_EPS} (%)")
    ax.set_title("accuracy vs certified accuracy (best sound radius where measured)\n◆ = margin objective, "
                 "green = maxmin activation, large = full size", fontsize=9)
    fig.savefig(out / "front.png", dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default=",".join(POINTS), help=f"comma list from: {', '.join(POINTS)}")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="runs/front")
    p.add_argument("--full", action="store_true", help="the preset's full size instead of the d 128 proxy")
    p.add_argument("--batches", type=int, default=8, help="val batches for accuracy and certificates")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--local-sequences", type=int, default=0,
                   help="also certify this many val sequences with the best (local or global) radius")
    p.add_argument("--init-from", default=None, help="a saved model folder whose weights start every point")
    p.add_argument("--extra", default="", help="comma list of overrides appended to every point")
    p.add_argument("--suffix", default="", help="appended to every point's name (with --extra)")
    p.add_argument("--measure", default=None, help="measure an already trained run folder instead of training")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--report", action="store_true")
    p.add_argument("--plot-eps", default="0.01", choices=[f"{e:g}" for e in EPS])
    a = p.parse_args(argv)
    global PLOT_EPS
    PLOT_EPS = a.plot_eps
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.bench:
        print(json.dumps(bench()))
        return 0
    if a.report:
        report(out)
        return 0
    if a.measure:
        row = measure_run(Path(a.measure), a.batches, a.local_sequences)
        print(json.dumps(row), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "front.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return 0
    unknown = [n for n in a.points.split(",") if n not in POINTS]
    if unknown:
        print(f"unknown points {unknown}; choose from {', '.join(POINTS)}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for name in a.points.split(","):
        row = train_point(name, a.steps, out, a.full, a.batches, a.local_sequences, a.init_from,
                          [x for x in a.extra.split(",") if x], a.suffix)
        print(json.dumps(row), flush=True)
        with open(out / "front.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
