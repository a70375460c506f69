"""The training loop: optimizer + projection every step, eval with certified bounds, atomic
checkpoints, bit-identical `--resume`, final certified model.

    run(load_recipe(preset="demo"), out="checkpoints/demo")

Output folder:
    run.json            the resolved recipe (a different run in the same folder is refused)
    metrics.jsonl       one JSON line per log/eval step
    checkpoint/         HF folder (weights, config, tokenizer, certificate) + trainer_state.pt
    final/              the final model, tokenizer, certificate.json, certified_accuracy.json
                        (with train.ema_decay: the weight average; checkpoint/ keeps the last step's)
    metrics.png         loss / accuracy curves

The pieces read separately: `train_step` (one optimizer step), `evaluation` (val metrics and
certified accuracy), `checkpoint` (the run folder on disk), `parallel` (single / DDP / FSDP2).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lipformer import LipformerConfig, LipformerForCausalLM
from lipformer.constraints import SpectralProjection
from lipformer.monitor import ActivationMonitor
from lipformer.optim import build_optimizer, optimizer_class
from lipformer.poet import merge_all

from . import data as D
from .checkpoint import STATE_NAME, find_checkpoint, prepare_output, read_metrics, save_checkpoint, trim_metrics
from .distributed import info as _dist_info
from .distributed import on_main
from .evaluation import autocast, certified_accuracy, cpu_has_native_bf16, evaluate
from .objectives import Distillation, Objective
from .parallel import Parallel
from .plots import plot_metrics
from .recipe import RecipeError, RunConfig, allocation_of, optimizer_kwargs

__all__ = ["run", "train_step", "open_data", "lr_lambda", "find_checkpoint", "TrainingStopped", "Interrupted"]


class TrainingStopped(RuntimeError):
    """Training could not go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run was checkpointed at `step` and continues with --resume."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"interrupted at step {step}; continue with --resume")
        self.step, self.signum = step, signum


@contextlib.contextmanager
def _signals_to_flag():
    """While training, the first SIGINT/SIGTERM only sets a flag: the loop finishes the current step,
    checkpoints it and raises `Interrupted` (a step cut in half cannot be resumed bit-identically).
    A second signal interrupts at once; the previous checkpoint is intact since saves are atomic."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
            raise RecipeError("data.dataset='shards' needs data.path=GLOB of *_train_*.bin shards: make them with "
                              "`lipformer prepare TEXT_FILES_OR_FOLDERS --out data/mine`, then pass "
                              "data.path='data/mine/*_train_*.bin' (FineWeb shards from llm.c work as they are)")
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
    """The recipe's optimizer (with its companion for non-matrix parameters) and LR schedule.

    Newton–Schulz runs in bf16 by default (as in torch.optim.Muon); on a CPU without native bf16 that
    is emulated and several times slower, so there, unless the recipe names `optimizer_args.ns_dtype`,
    it runs in float32 (`ns_float32_by_default`; the same polynomials, more exact, and where it takes
    fewer flops in their Gram form)."""
    extra = {"total_steps": t.max_steps} if t.optimizer in ("lpsgd", "lpsgdm") else {}  # p anneals over the run
    extra.update(optimizer_kwargs(t))
    if ns_float32_by_default(model, t):
        extra["ns_dtype"] = torch.float32
    try:
        optimizer = build_optimizer(model, t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                                    allocation=allocation_of(t), **extra,
                                    **({} if t.optimizer == "adamw" else {"companion": t.companion,
                                                                          "companion_lr": t.companion_lr}))
    except (TypeError, ValueError) as exc:  # a bad value in optimizer_args (names were checked earlier)
        raise RecipeError(f"[train] optimizer {t.optimizer!r}: {' '.join(str(exc).split())}") from None
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))


def ns_float32_by_default(model, t) -> bool:
    """Does this run's optimizer iterate Newton–Schulz in float32 only because bf16 would be emulated
    (a Muon-family optimizer on a CPU without native bf16, and no `optimizer_args.ns_dtype`)?"""
    takes_it = "ns_dtype" in inspect.signature(optimizer_class(t.optimizer).__init__).parameters
    on_cpu = next(model.parameters()).device.type == "cpu"
    return takes_it and "ns_dtype" not in t.optimizer_args and on_cpu and not cpu_has_native_bf16()


def train_step(par: Parallel, train_data, optimizer, scheduler, project, t, step: int, out: Path,
               objective: Objective | None = None, distill: Distillation | None = None) -> float:
    """One optimizer step over `t.grad_accum` micro-batches, then (POET merge and) the projection.

    `objective` is the training loss (training/objectives.py; None: cross-entropy); `distill` mixes
    it with the distillation loss against a teacher run on the same micro-batch.

    Returns the global batch's mean loss; a non-finite loss stops training before the step.
    """
    loss_sum = 0.0
    for micro in range(t.grad_accum):
        x, y = (v.to(par.device) for v in train_data.next_batch())
        with par.micro_batch(micro, t.grad_accum):
            if objective is None:
                with autocast(t.dtype, par.device):
                    logits = par.forward(x, use_cache=False).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
            else:
                with objective.recording(par.model), autocast(t.dtype, par.device):
                    logits = par.forward(x, use_cache=False).logits
                loss = objective(par.model, logits, y, step)
            if distill is not None:
                with autocast(t.dtype, par.device):
                    teacher_logits = distill.teacher_logits(x)
                loss = distill(loss, logits, teacher_logits)
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


def eval_record(par: Parallel, val_data, t, ema: AveragedModel | None = None) -> dict:
    """Val loss/accuracy, the certified bound of the current weights and activation maxima; with a
    weight average that has started, its val loss/accuracy too (`ema_val_loss`, `ema_val_acc`)."""
    bounds = par.bounds()
    monitor = ActivationMonitor(par.model, policy="warn", bounds=bounds)  # records during eval
    record = evaluate(par.model, val_data, t.eval_batches, t.dtype, par.device)
    monitor.remove()
    record.update({"lipschitz_total": bounds.total, "lipschitz_body": bounds.body,
                   "activations": {k: v for k, v in monitor.stats.items() if "attn" not in k}})
    par.reduce_eval(record)
    if ema is not None and int(ema.n_averaged) > 0:
        averaged = evaluate(ema.module, val_data, t.eval_batches, t.dtype, par.device)
        par.reduce_eval(averaged)
        record.update({"ema_val_loss": averaged["val_loss"], "ema_val_acc": averaged["val_acc"]})
    return record


def run(run: RunConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
        max_steps: int | None = None, progress: bool = True, cache_dir=None, log=print) -> dict:
    """Train, checkpoint and certify. `max_steps` stops early (the schedule still uses train.max_steps).

    `resume` continues from OUT's checkpoint and refuses when there is none, unless `overwrite` is
    also given (then a run with no checkpoint starts afresh). A run that already reached
    train.max_steps is not trained again: its recorded result is returned.
    SIGINT/SIGTERM checkpoint the last finished step and raise `Interrupted`.
    """
    out = Path(out)
    t = run.train
    transformers.utils.logging.disable_progress_bar()  # per-shard save/load bars would drown the log
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    lr_lambda(t)  # validates the schedule before any work
    autocast(t.dtype, device)
    checkpoint = find_checkpoint(out) if resume else None
    state = _check_resume(out, checkpoint, resume, overwrite, max_steps, t)
    train_data, val_data, tokenizer, vocab = open_data(run, cache_dir)
    try:
        config = LipformerConfig(**{**run.model, "vocab_size": vocab})
    except Exception as exc:
        raise RecipeError(f"invalid [model]: {str(exc).strip().splitlines()[-1].strip()}") from exc
    # train.init_from (unless resuming): its model must be the recipe's, checked before any write
    source = _initial_weights(config, t.init_from) if checkpoint is None and t.init_from else None
    teacher = _teacher(t.distill_from, config) if t.distill_from is not None else None
    # only now, with the recipe and data known good, touch the output folder (rank 0; the others
    # wait, and raise its error, so no rank reads the folder before it is ready)
    on_main(prepare_output, out, run, checkpoint is not None, overwrite and checkpoint is None)
    start = state["step"] if state is not None else 0
    finished = out / "final" / "certified_accuracy.json"
    if start == t.max_steps and finished.is_file():
        last = read_metrics(out / "metrics.jsonl")
        log(f"the run in {out} already finished at step {start}; its final model is {out / 'final'}")
        return {**(last[-1] if last else {"step": start}), "final": str(out / "final"),
                **json.loads(finished.read_text())}
    if _dist_info()[0] == 0:
        # rows past the checkpoint belong to steps about to be redone: drop them, so the curve
        # never goes back in time
        trim_metrics(out / "metrics.jsonl", start)

    torch.manual_seed(t.seed)
    model = LipformerForCausalLM.from_pretrained(checkpoint) if checkpoint is not None else LipformerForCausalLM(config)
    if source is not None:
        model.load_state_dict(source.state_dict())  # strict: every tensor, same shapes
        del source
        if _dist_info()[0] == 0:
            log(f"weights from {t.init_from}")
    model.to(device).train()
    par = Parallel.for_run(model, t.parallel, device, compile=t.compile)
    optimizer, scheduler = build_optimizer_for(model, t)
    project = SpectralProjection(model, optimizer)
    objective = None if t.objective == "ce" else Objective(t.objective, t.eps, eps_warmup=t.eps_warmup,
                                                                  weight=t.margin_weight, stability=t.stability,
                                                                  margin_on=t.margin_on, stability_eps=t.stability_eps)
    distill = None if teacher is None else Distillation(teacher.to(device), t.distill_weight, t.distill_temperature)
    # the average of projected weights needs no projection of its own: every cap is a norm bound,
    # a convex set, so an average of points inside it stays inside (the certificate is computed
    # from the averaged tensors themselves in any case)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay)) if t.ema_decay else None
    if state is not None:
        # the saved groups bring back their hyperparameters; the Newton–Schulz dtype is how this
        # machine computes the step, not part of the run's state, so the current choice stays
        ns_dtypes = [g.get("ns_dtype") for g in optimizer.param_groups]
        par.load_optimizer_state(optimizer, state["optimizer"])
        for group, ns_dtype in zip(optimizer.param_groups, ns_dtypes):
            if "ns_dtype" in group:
                group["ns_dtype"] = ns_dtype
        scheduler.load_state_dict(state["scheduler"])
        train_data.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        if ema is not None:  # run.json already refused a resume with another recipe
            ema.load_state_dict(state["ema"])
        if par.main:
            log(f"resumed from {checkpoint} at step {start}")
    del state

    def save(step: int):
        """Rank 0 writes OUT/checkpoint; returns the plain model it saved (None on other ranks)."""
        plain, optimizer_state = par.checkpoint_state(optimizer)
        if par.main:
            save_checkpoint(out, plain, tokenizer, optimizer_state, scheduler, train_data, step,
                            extra=None if ema is None else {"ema": ema.state_dict()})
        return plain

    stop = min(t.max_steps, max_steps) if max_steps is not None else t.max_steps
    tokens_per_step = t.batch_size * t.grad_accum * par.world * config.max_position_embeddings
    if par.main:
        _warn_if_slow_on_cpu(model, device, tokens_per_step, log)
        _warn_if_bf16_is_emulated(t.dtype, device, log)
        if ns_float32_by_default(model, t):
            log("Newton–Schulz runs in float32: this CPU has no native bf16 "
                "(train.optimizer_args.ns_dtype chooses)")
    last = (read_metrics(out / "metrics.jsonl") or [{}])[-1] if par.main else {}
    steps = range(start, stop)
    if progress and par.main:
        from tqdm import tqdm
        steps = tqdm(steps, initial=start, total=stop, desc="train", unit="step")
    t0 = time.time()
    with _signals_to_flag() as signals, (open(out / "metrics.jsonl", "a") if par.main
                                         else contextlib.nullcontext()) as metrics:
        for step in steps:
            if par.any(bool(signals)):  # every rank stops at the same step
                if step > start or checkpoint is None:
                    save(step)
                if hasattr(steps, "close"):
                    steps.close()
                raise Interrupted(step, signals[0] if signals else signal.SIGTERM)
            loss = train_step(par, train_data, optimizer, scheduler, project, t, step, out, objective, distill)
            done = step + 1
            if ema is not None and done > t.ema_start:
                ema.update_parameters(model)  # the first update copies the weights after step ema_start + 1
            record = {"step": done, "loss": loss, "lr": scheduler.get_last_lr()[0],
                      "tokens": done * tokens_per_step, "elapsed": time.time() - t0}
            if step == start and par.main:
                _warn_if_slow_on_cpu(model, device, tokens_per_step, log, measured=time.time() - t0,
                                     remaining=stop - done)
            if t.eval_every and (done % t.eval_every == 0 or done == stop):
                record.update(eval_record(par, val_data, t, ema))
            if par.main and (done % t.log_every == 0 or "val_loss" in record or done == stop):
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if progress and hasattr(steps, "set_postfix"):
                    steps.set_postfix(loss=f"{loss:.3f}", **({"val_acc": f"{record['val_acc']:.3f}"}
                                                             if "val_acc" in record else {}))
            last = record
            if t.checkpoint_every and done % t.checkpoint_every == 0 and done < stop:
                save(done)
        # nothing trained (resumed at the end): the checkpoint already holds these weights
        plain = save(stop) if stop > start else par.full_model()
    result = dict(last)
    if par.main and stop == t.max_steps:
        # certified accuracy on the global val batch (rank 0's rows alone would be a subset)
        final_val = val_data if par.world == 1 else D.TokenDataset(
            val_data.files, t.batch_size * par.world, val_data.seq_len, seed=val_data.seed, shuffle=val_data.shuffle)
        # OUT/checkpoint keeps the last step's weights (training resumes from them); OUT/final is the average
        final_model = plain if ema is None else ema.module
        result.update(_finish(out, final_model, tokenizer, final_val, t,
                              reference=_bigram_reference(train_data, val_data, vocab)))
    if par.world > 1:  # rank 0's result on every rank, once its files are written
        result = on_main(lambda: result)
    return result


def _initial_weights(config, folder):
    """train.init_from: the saved model whose weights start the run. Refused when its model is not
    the recipe's (a cap or a softmax scale the weights were not trained under is another model)."""
    src = LipformerForCausalLM.from_pretrained(folder)
    mine, theirs = config.to_dict(), src.config.to_dict()
    differ = sorted(k for k in set(mine) | set(theirs)
                    if k not in _CONFIG_BOOKKEEPING and mine.get(k) != theirs.get(k))
    if differ:
        raise RecipeError(f"train.init_from {folder}: its model differs from the recipe's [model] in "
                          + ", ".join(f"{k} ({theirs.get(k)!r} vs {mine.get(k)!r})" for k in differ))
    return src


def _teacher(folder, config):
    """train.distill_from: the frozen teacher. It must predict over the run's vocabulary and read
    sequences as long as the run's."""
    teacher = LipformerForCausalLM.from_pretrained(folder)
    if teacher.config.vocab_size != config.vocab_size:
        raise RecipeError(f"train.distill_from {folder}: its vocabulary has {teacher.config.vocab_size} tokens, "
                          f"the run's data {config.vocab_size}")
    if teacher.config.max_position_embeddings < config.max_position_embeddings:
        raise RecipeError(f"train.distill_from {folder}: it reads at most {teacher.config.max_position_embeddings} "
                          f"positions, the run's sequences have {config.max_position_embeddings}")
    return teacher


# config.to_dict() keys that name a save, not a model
_CONFIG_BOOKKEEPING = {"transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype",
                       "auto_map", "_commit_hash", "_attn_implementation_autoset"}


def _check_resume(out: Path, checkpoint, resume: bool, overwrite: bool, max_steps, t) -> dict | None:
    """The checkpoint's trainer state, after refusing what would corrupt the run (nothing is touched yet)."""
    if resume and checkpoint is None:
        if overwrite:
            return None  # --resume --overwrite: continue if there is a checkpoint, else start afresh
        where = "does not exist" if not out.exists() else "has no checkpoint"
        raise RecipeError(f"--resume: {out} {where}; start the run without --resume "
                          "(add --overwrite to replace what is in the folder)")
    if checkpoint is None:
        return None
    state = torch.load(checkpoint / STATE_NAME, weights_only=True)  # tensors and numbers only: no pickle code
    step = int(state["step"])
    if step > t.max_steps:
        raise RecipeError(f"--resume: the checkpoint in {out} is at step {step}, past train.max_steps "
                          f"{t.max_steps}; resume with train.max_steps={step} or more")
    if max_steps is not None and max_steps <= step and step < t.max_steps:
        raise RecipeError(f"--max-steps {max_steps} is not past the checkpoint's step {step}; "
                          f"pass a larger --max-steps (the run ends at {t.max_steps}) or leave it out")
    return state


# 6·params·tokens FLOPs per step above this, on CPU, is a GPU-sized run (demo: ~1e10; gpt2-small: ~1e14)
_CPU_FLOPS_WARNING = 1e12


def _warn_if_slow_on_cpu(model, device, tokens_per_step: int, log, measured: float | None = None,
                         remaining: int = 0) -> None:
    if device.type != "cpu":
        return
    flops = 6 * sum(p.numel() for p in model.parameters()) * tokens_per_step
    if flops < _CPU_FLOPS_WARNING:
        return
    if measured is None:
        log(f"warning: no GPU found; this recipe needs ~{flops:.1e} FLOPs per step, which takes minutes "
            "per step on a CPU (it is sized for GPUs: run it under torchrun on CUDA machines)")
    else:
        log(f"warning: step 1 took {measured:.0f} s on the CPU; the remaining {remaining} steps would take "
            f"about {measured * remaining / 3600:.1f} h")


def _warn_if_bf16_is_emulated(dtype: str, device, log) -> None:
    if dtype == "bfloat16" and device.type == "cpu" and not cpu_has_native_bf16():
        log("warning: this CPU has no native bf16 (no AVX512 or AMX), so train.dtype=bfloat16 runs emulated, "
            "many times slower than float32 (28x per shakespeare-char step on an AVX2 CPU); "
            "train.dtype=float32 is the fast choice here")


def _bigram_reference(train_data, val_data, vocab: int) -> float | None:
    """Val accuracy of the most-frequent-next-token table counted on train, the score a model reading
    just the previous token gets (char vocabularies only: the table is vocab × vocab)."""
    import numpy as np

    from .evaluation import bigram_accuracy

    if vocab > 1024:
        return None
    train, val = ([np.asarray(D.load_tokens(f)) for f in ds.files] for ds in (train_data, val_data))
    return bigram_accuracy(np.concatenate(train), np.concatenate(val))


def _finish(out: Path, model, tokenizer, val_data, t, reference: float | None = None) -> dict:
    """OUT/final: model, tokenizer, certificate, certified accuracy; and the metrics plot."""
    final = out / "final"
    tmp = out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    cert = certified_accuracy(model, val_data, t.certify_radii, batches=max(1, min(t.eval_batches, 4)))
    if reference is not None:
        cert["bigram_accuracy"] = reference
    (tmp / "certified_accuracy.json").write_text(json.dumps(cert, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    plot_metrics(out / "metrics.jsonl", out / "metrics.png", certified=cert)
    return {"final": str(final), **cert}
