"""The training loop: optimizer + projection every step, eval with certified bounds, atomic
checkpoints, bit-identical `--resume`, final certified model.

    run(load_recipe(preset="demo"), out="checkpoints/demo")

Output folder:
    run.json            the resolved recipe (a different run in the same folder is refused)
    metrics.jsonl       one JSON line per log/eval step
    checkpoint/         HF folder (weights, config, tokenizer, certificate) + trainer_state.pt
    final/              the final model, tokenizer, certificate.json, certified_accuracy.json
    metrics.png         loss / accuracy curves

The pieces read separately: `train_step` (one optimizer step), `evaluation` (val metrics and
certified accuracy), `checkpoint` (the run folder on disk), `parallel` (single / DDP / FSDP2).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from lipformer import LipformerConfig, LipformerForCausalLM
from lipformer.constraints import SpectralProjection
from lipformer.monitor import ActivationMonitor
from lipformer.optim import build_optimizer
from lipformer.poet import merge_all

from . import data as D
from .checkpoint import STATE_NAME, find_checkpoint, prepare_output, save_checkpoint
from .distributed import info as _dist_info
from .distributed import on_main
from .evaluation import autocast, certified_accuracy, evaluate
from .objectives import Objective
from .parallel import Parallel
from .plots import plot_metrics
from .recipe import RecipeError, RunConfig, allocation_of

__all__ = ["run", "train_step", "open_data", "lr_lambda", "find_checkpoint", "TrainingStopped"]


class TrainingStopped(RuntimeError):
    """Training could not go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def open_data(run: RunConfig, cache_dir=None):
    """(train dataset, val dataset, tokenizer, vocab_size) for the recipe's [data] section."""
    t, d = run.train, run.data
    T = int(run.model.get("max_position_embeddings", 256))
    if d.dataset in ("shakespeare_char", "char_dir"):
        if d.dataset == "shakespeare_char" and d.path is None:
            meta = D.prepare_shakespeare(cache_dir)
        else:
            if d.path is None:
                raise RecipeError("data.dataset='char_dir' needs data.path=FOLDER (made by build_char_corpus)")
            meta = D.load_char_meta(d.path)
        folder = Path(meta.get("dir", d.path))
        train_src, val_src = folder / "train.bin", folder / "val.bin"
        tokenizer, vocab = D.char_tokenizer_from_meta(meta), int(meta["vocab_size"])
    elif d.dataset == "shards":
        if d.path is None:
            raise RecipeError("data.dataset='shards' needs data.path=GLOB of *_train_*.bin shards")
        train_src = d.path
        val_src = d.val_path or d.path.replace("_train_", "_val_")
        tokenizer, vocab = D.gpt2_hf_tokenizer(cache_dir), int(run.model.get("vocab_size", 50304))
    else:
        raise RecipeError(f"unknown data.dataset {d.dataset!r}; use shakespeare_char, char_dir or shards")
    rank, world = _dist_info()
    # vocab_size lets the dataset refuse ids the embedding would not have (a clear DataError)
    train = D.TokenDataset(train_src, t.batch_size, T, seed=t.seed, shuffle=True, rank=rank, world_size=world,
                           vocab_size=vocab)
    val = D.TokenDataset(val_src, t.batch_size, T, seed=t.seed + 1, shuffle=True, rank=rank, world_size=world,
                         vocab_size=vocab)
    return train, val, tokenizer, vocab


def lr_lambda(t) -> callable:
    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        if t.schedule == "constant":
            return 1.0
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape
    if t.schedule not in ("cosine", "linear", "constant"):
        raise RecipeError(f"train.schedule must be cosine, linear or constant, got {t.schedule!r}")
    return factor


def build_optimizer_for(model, t):
    """The recipe's optimizer (with its companion for non-matrix parameters) and LR schedule."""
    extra = {"total_steps": t.max_steps} if t.optimizer in ("lpsgd", "lpsgdm") else {}  # p anneals over the run
    extra.update(t.optimizer_args)
    try:
        optimizer = build_optimizer(model, t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                                    allocation=allocation_of(t), **extra,
                                    **({} if t.optimizer == "adamw" else {"companion": t.companion,
                                                                          "companion_lr": t.companion_lr}))
    except (TypeError, ValueError) as exc:  # a bad value in optimizer_args (names were checked earlier)
        raise RecipeError(f"[train] optimizer {t.optimizer!r}: {' '.join(str(exc).split())}") from None
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))


def train_step(par: Parallel, train_data, optimizer, scheduler, project, t, step: int, out: Path,
               objective: Objective | None = None) -> float:
    """One optimizer step over `t.grad_accum` micro-batches, then (POET merge and) the projection.

    `objective` is the training loss (training/objectives.py; None: cross-entropy).

    Returns the global batch's mean loss; a non-finite loss stops training before the step.
    """
    loss_sum = 0.0
    for micro in range(t.grad_accum):
        x, y = (v.to(par.device) for v in train_data.next_batch())
        with par.micro_batch(micro, t.grad_accum):
            with autocast(t.dtype, par.device):
                logits = par.forward(x, use_cache=False).logits
            if objective is None:
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
            else:
                loss = objective(par.model, logits, y)
            (loss / t.grad_accum).backward()
        loss_sum += float(loss.detach()) / t.grad_accum
    loss_sum = par.mean(loss_sum)
    if not math.isfinite(loss_sum):
        raise TrainingStopped(f"loss became {loss_sum} at step {step + 1}; the last good checkpoint is kept "
                              f"in {out / 'checkpoint'} — lower train.lr and --resume")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if t.merge_every and (step + 1) % t.merge_every == 0:
        merge_all(par.model, optimizer)  # before the projection step, which caps each merged W0
    project()
    return loss_sum


def eval_record(par: Parallel, val_data, t) -> dict:
    """Val loss/accuracy, the certified bound of the current weights and activation maxima."""
    bounds = par.bounds()
    monitor = ActivationMonitor(par.model, policy="warn", bounds=bounds)  # records during eval
    record = evaluate(par.model, val_data, t.eval_batches, t.dtype, par.device)
    monitor.remove()
    record.update({"lipschitz_total": bounds.total, "lipschitz_body": bounds.body,
                   "activations": {k: v for k, v in monitor.stats.items() if "attn" not in k}})
    par.reduce_eval(record)
    return record


def run(run: RunConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
        max_steps: int | None = None, progress: bool = True, cache_dir=None, log=print) -> dict:
    """Train, checkpoint and certify. `max_steps` stops early (the schedule still uses train.max_steps)."""
    out = Path(out)
    t = run.train
    transformers.utils.logging.disable_progress_bar()  # per-shard save/load bars would drown the log
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    lr_lambda(t)  # validates the schedule before any work
    autocast(t.dtype, device)
    train_data, val_data, tokenizer, vocab = open_data(run, cache_dir)
    try:
        config = LipformerConfig(**{**run.model, "vocab_size": vocab})
    except Exception as exc:
        raise RecipeError(f"invalid [model]: {str(exc).strip().splitlines()[-1].strip()}") from exc
    # only now, with the recipe and data known good, touch the output folder (rank 0; the others
    # wait, and raise its error, so no rank reads the folder before it is ready)
    on_main(prepare_output, out, run, resume, overwrite)

    torch.manual_seed(t.seed)
    checkpoint = find_checkpoint(out) if resume else None
    model = LipformerForCausalLM.from_pretrained(checkpoint) if checkpoint is not None else LipformerForCausalLM(config)
    model.to(device).train()
    par = Parallel.for_run(model, t.parallel, device, compile=t.compile)
    optimizer, scheduler = build_optimizer_for(model, t)
    project = SpectralProjection(model, optimizer)
    objective = None if t.objective == "ce" else Objective(t.objective, t.eps)
    start = 0
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_NAME, weights_only=True)  # tensors and numbers only: no pickle code
        par.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        train_data.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        if par.main:
            log(f"resumed from {checkpoint} at step {start}")

    def save(step: int):
        """Rank 0 writes OUT/checkpoint; returns the plain model it saved (None on other ranks)."""
        plain, optimizer_state = par.checkpoint_state(optimizer)
        if par.main:
            save_checkpoint(out, plain, tokenizer, optimizer_state, scheduler, train_data, step)
        return plain

    stop = min(t.max_steps, max_steps) if max_steps is not None else t.max_steps
    metrics = open(out / "metrics.jsonl", "a") if par.main else None
    steps = range(start, stop)
    if progress and par.main:
        from tqdm import tqdm
        steps = tqdm(steps, initial=start, total=stop, desc="train", unit="step")
    tokens_per_step = t.batch_size * t.grad_accum * par.world * config.max_position_embeddings
    last = {}
    t0 = time.time()
    for step in steps:
        loss = train_step(par, train_data, optimizer, scheduler, project, t, step, out, objective)
        done = step + 1
        record = {"step": done, "loss": loss, "lr": scheduler.get_last_lr()[0],
                  "tokens": done * tokens_per_step, "elapsed": time.time() - t0}
        if t.eval_every and (done % t.eval_every == 0 or done == stop):
            record.update(eval_record(par, val_data, t))
        if par.main and (done % t.log_every == 0 or "val_loss" in record or done == stop):
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if progress and hasattr(steps, "set_postfix"):
                steps.set_postfix(loss=f"{loss:.3f}", **({"val_acc": f"{record['val_acc']:.3f}"}
                                                         if "val_acc" in record else {}))
        last = record
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done < stop:
            save(done)
    plain = save(stop)
    if par.main:
        metrics.close()
    result = dict(last)
    if par.main and stop == t.max_steps:
        # certified accuracy on the global val batch (rank 0's rows alone would be a subset)
        final_val = val_data if par.world == 1 else D.TokenDataset(
            val_data.files, t.batch_size * par.world, val_data.seq_len, seed=val_data.seed, shuffle=val_data.shuffle)
        result.update(_finish(out, plain, tokenizer, final_val, t))
    if par.world > 1:  # rank 0's result on every rank, once its files are written
        result = on_main(lambda: result)
    return result


def _finish(out: Path, model, tokenizer, val_data, t) -> dict:
    """OUT/final: model, tokenizer, certificate, certified accuracy; and the metrics plot."""
    final = out / "final"
    tmp = out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    cert = certified_accuracy(model, val_data, t.certify_radii, batches=max(1, min(t.eval_batches, 4)))
    (tmp / "certified_accuracy.json").write_text(json.dumps(cert, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    return {"final": str(final), **cert}
