"""The run folder on disk: atomic checkpoints, finding the last good one, and refusing to mix runs.

    OUT/run.json           the resolved recipe (a different run in the same folder is refused)
    OUT/checkpoint/        HF folder (weights, config, tokenizer, certificate) + trainer_state.pt
    OUT/checkpoint.old/    the previous checkpoint, kept only while a new one is being swapped in
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from .recipe import RecipeError, RunConfig

STATE_NAME = "trainer_state.pt"


def save_checkpoint(out: Path, model, tokenizer, optimizer_state: dict, scheduler, train_data, step: int,
                    extra: dict | None = None) -> None:
    """Write OUT/checkpoint atomically: build a temp folder, then swap it in by renames.

    A crash at any point leaves either the old or the new checkpoint complete (`checkpoint.old`
    is kept until the new one is in place; `find_checkpoint` falls back to it). `extra` (e.g. the
    weight average's state) goes into trainer_state.pt beside the optimizer's.
    """
    tmp = out / f".checkpoint-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "data": train_data.state_dict(), "torch_rng": torch.get_rng_state(), **(extra or {})},
                   tmp / STATE_NAME)
        _fsync_dir(tmp)
    except BaseException:  # e.g. disk full: the previous checkpoint is untouched, drop the partial one
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final, old = out / "checkpoint", out / "checkpoint.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for p in [*path.iterdir(), path] if path.is_dir() else [path]:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def find_checkpoint(out: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):
        folder = out / name
        if (folder / STATE_NAME).is_file() and (folder / "model.safetensors").is_file():
            return folder
    return None


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl (a torn last line, from a kill mid-write, is skipped)."""
    rows = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def trim_metrics(path: Path, step: int) -> None:
    """Keep the rows up to `step` (a resumed run redoes the later steps), atomically."""
    if not path.is_file():
        return
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def prepare_output(out: Path, run: RunConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: an existing folder needs --resume (same recipe) or --overwrite."""
    recipe = run.to_dict()
    run_file = out / "run.json"
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise RecipeError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        elif run_file.is_file():
            previous = json.loads(run_file.read_text())
            mine = {k: v for k, v in recipe.items()}
            for part in ("model", "data"):
                if previous.get(part) != mine.get(part):
                    raise RecipeError(f"--resume: {out} was trained with a different [{part}] section; "
                                      "use a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(recipe, indent=2))
    os.replace(tmp, run_file)
