"""Plots of a run's metrics.jsonl (written at the end of every run; scripts/ has the comparison plots)."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import read_metrics


def metrics_figure(rows: list[dict], certified: dict | None = None, title: str = "training run"):
    """Loss, accuracy and certificate panels. `certified`: the final certified_accuracy.json, if any.

    Accuracies are drawn on a fixed 0–1 axis: an autoscaled one turns noise of a percent into a cliff.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [r for r in rows if "val_loss" in r]
    fig, (loss_ax, acc_ax, cert_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    fig.suptitle(title)
    loss_ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    loss_ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="val loss")
    loss_ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats per token)", title="loss")
    acc_ax.plot([r["step"] for r in ev], [r["val_acc"] for r in ev], "o-", label="val next-token accuracy")
    cert_ax.plot([r["step"] for r in ev if "lipschitz_total" in r],
                 [r["lipschitz_total"] for r in ev if "lipschitz_total" in r], "s-", color="C3",
                 label="certified Lipschitz bound")
    cert_ax.set(xlabel="optimizer step", ylabel="Lipschitz bound, inputs_embeds → logits (Δlogits per unit ε)",
                title="certified bound")
    if certified:
        step = rows[-1]["step"] if rows else 0
        for k, (radius, frac) in enumerate(certified.get("certified_accuracy", {}).items()):
            acc_ax.plot([step], [frac], "D", color=f"C{k + 2}", label=f"certified accuracy, ε={radius} (final)")
    acc_ax.set(xlabel="optimizer step", ylabel="fraction of val positions", ylim=(0, 1), title="accuracy")
    for ax in (loss_ax, acc_ax, cert_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_metrics(metrics_file: Path, png: Path, certified: dict | None = None) -> None:
    rows = read_metrics(Path(metrics_file))
    if not rows:
        return
    import matplotlib.pyplot as plt

    run_json = Path(metrics_file).with_name("run.json")
    name = json.loads(run_json.read_text()).get("name", "run") if run_json.is_file() else "run"
    fig = metrics_figure(rows, certified, title=f"{name}: {Path(metrics_file).parent}")
    fig.savefig(png, dpi=100)
    plt.close(fig)
