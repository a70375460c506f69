"""Plots of a run's metrics.jsonl (written at the end of every run; scripts/ has the comparison plots)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_file: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    ev = [r for r in rows if "val_loss" in r]
    ax1.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="val loss")
    ax1.set_xlabel("step")
    ax1.legend()
    ax2.plot([r["step"] for r in ev], [r["val_acc"] for r in ev], "o-", label="val accuracy")
    ax2.set_xlabel("step")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
