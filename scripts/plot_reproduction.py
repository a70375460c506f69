"""Plots and numbers for the shakespeare-char reproduction (docs/results.md).

Given trained run folders (each with `final/`, as `lipformer train` writes), draws
  * the singular-value spectra of every capped matrix in RMS→RMS units, one panel per run;
  * a histogram of per-position certified radii on the first `--chars` validation characters;
  * the loss / accuracy curves of every run from its metrics.jsonl;
and prints a JSON summary per run: certified bounds, radius quantiles, accuracy on the text, the
fraction certified-and-correct at a few radii, and how sharp each layer's attention is (mean
largest attention weight against the uniform 1/(t+1), and the mean range of the scores in a row).

    .venv/bin/python scripts/plot_reproduction.py "Muon + hard cap=runs/sc2000" \\
        "AdamW, unconstrained=runs/sc2000-adamw" --out docs/img --prefix repro
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lipformer import LipformerForCausalLM  # noqa: E402
from lipformer.certify import certified_fractions, certify_tokens, float64_copy  # noqa: E402
from lipformer.nn import CappedLinear, apply_rope  # noqa: E402
from lipformer.training.data import prepare_shakespeare  # noqa: E402

COLORS = {"q": "C0", "k": "C1", "v": "C2", "o": "C3", "mlp_in": "C4", "mlp_out": "C5", "head": "k"}


def parse_runs(specs: list[str]) -> dict[str, Path]:
    runs = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name, spec
        if model_dir(Path(path)) is None:
            raise SystemExit(f"error: {path} has no final/ or checkpoint/ model (train it with `lipformer train`)")
        runs[label] = Path(path)
    return runs


def model_dir(run: Path) -> Path | None:
    """final/ of a finished run, else the checkpoint of one stopped early with --max-steps."""
    for name in ("final", "checkpoint"):
        if (run / name / "config.json").is_file():
            return run / name
    return None


def spectra(ax, model, title: str) -> None:
    seen = set()
    for m in model.modules():
        if isinstance(m, CappedLinear):
            s = torch.linalg.svdvals(m.weight.detach().double()).numpy() * m.rms_scale
            ax.plot(np.linspace(0, 1, len(s)), s, color=COLORS.get(m.kind, "gray"), lw=0.8,
                    label=m.kind if m.kind not in seen else None)
            seen.add(m.kind)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("singular value index (normalized)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def summarize(model, ids: list[int]) -> tuple[dict, np.ndarray]:
    m64 = float64_copy(model)
    bound = m64.bounds()
    certs = certify_tokens(m64, ids, bound)
    radii = np.array([c.radius for c in certs])
    targets = ids[1:]
    certs = certs[:-1]  # the last position has no next character to check
    correct = [c.prediction == t for c, t in zip(certs, targets)]
    summary = {"L_total": bound.total, "L_body": bound.body,
               "radius_quantiles": {q: float(np.quantile(radii, q)) for q in (0.1, 0.5, 0.9)},
               "max_radius": float(radii.max()), "acc_on_text": float(np.mean(correct)),
               "certified_and_correct": certified_fractions(certs, targets=targets),
               "weights": [(w.name, round(w.factor, 4), w.w_max) for w in bound.weights]}
    return summary, radii


@torch.no_grad()
def attention_sharpness(model, ids: list[int], seq: int = 256, skip: int = 16) -> list[dict]:
    """Per layer: mean over rows t ≥ skip of the largest attention weight and of the score range.

    Uniform attention over a causal prefix gives 1/(t+1); a layer that can pick out one position
    gives weights near 1 and score ranges of several units (docs/results.md, reproduction).
    """
    n = len(ids) // seq
    x = torch.tensor(ids[:n * seq]).view(n, seq)
    rows = []

    def probe(attn, args, kwargs):
        h = args[0]
        cos, sin = args[1] if len(args) > 1 else kwargs["rope"]
        B, T, _ = h.shape
        split = lambda t: t.view(B, T, attn.heads, attn.head_dim).transpose(1, 2)  # noqa: E731
        q, k = (apply_rope(split(m(h)), cos, sin) for m in (attn.q, attn.k))
        scores = (q @ k.transpose(-1, -2)) * (attn.scale / attn.head_dim)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        spread = scores.masked_fill(~causal, -math.inf).amax(-1) - scores.masked_fill(~causal, math.inf).amin(-1)
        rows.append({"max_weight": float(weights.amax(-1)[..., skip:].mean()),
                     "uniform_weight": float((1.0 / torch.arange(skip + 1, T + 1)).mean()),
                     "score_range": float(spread[..., skip:].mean())})

    hooks = [layer.attn.register_forward_pre_hook(probe, with_kwargs=True) for layer in model.model.layers]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def curves(runs: dict[str, Path], path: Path) -> None:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, run) in enumerate(runs.items()):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        evals = [r for r in rows if "val_loss" in r]
        ax_loss.plot(*zip(*train), color=f"C{i}", alpha=0.4, lw=0.8)
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color=f"C{i}",
                     label=f"{label} (val)")
        ax_acc.plot([r["step"] for r in evals], [r["val_acc"] for r in evals], "o-", color=f"C{i}", label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (faint: train)")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("val accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (or RUN_DIR), each with final/ (or checkpoint/) and metrics.jsonl")
    p.add_argument("--chars", type=int, default=2048, help="validation characters to certify (default 2048)")
    p.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder for the PNGs (default docs/img)")
    p.add_argument("--prefix", default="repro", help="PNG name prefix (default repro)")
    args = p.parse_args()
    runs = parse_runs(args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    val = np.fromfile(prepare_shakespeare()["val_bin"], dtype=np.uint16)
    ids = [int(i) for i in val[:args.chars]]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), sharey=True, squeeze=False)
    fig_r, ax_r = plt.subplots(figsize=(6, 4))
    summary = {}
    for ax, (label, run) in zip(axes[0], runs.items()):
        model = LipformerForCausalLM.from_pretrained(model_dir(run)).eval()
        spectra(ax, model, label)
        summary[label], radii = summarize(model, ids)
        summary[label]["attention"] = attention_sharpness(model, ids)
        positive = radii[radii > 0]
        if len(positive):
            ax_r.hist(np.log10(positive), bins=40, alpha=0.6,
                      label=f"{label} (L={summary[label]['L_total']:.3g}, {len(positive)}/{len(radii)} > 0)")
    axes[0][0].set_ylabel("σ in RMS→RMS units (√(d_in/d_out)·σ)")
    fig.tight_layout()
    fig.savefig(out / f"{args.prefix}_spectra.png", dpi=110)
    ax_r.set_xlabel("log10 certified radius (max-rms of inputs_embeds perturbation)")
    ax_r.set_ylabel("positions")
    ax_r.set_title(f"certified radii on {len(ids)} val chars")
    ax_r.legend(fontsize=7)
    fig_r.tight_layout()
    fig_r.savefig(out / f"{args.prefix}_radii.png", dpi=110)
    curves(runs, out / f"{args.prefix}_curves.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
