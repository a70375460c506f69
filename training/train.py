"""The training loop: optimizer + projection every step, eval with certified bounds, atomic
checkpoints, bit-identical `--resume`, final certified model.

    run(load_recipe(preset="demo"), out="checkpoints/demo")

Output folder:
    run.json            the resolved recipe (a different run in the same folder is refused)
    metrics.jsonl       one JSON line per log/eval step
    checkpoint/         HF folder (weights, config, tokenizer, certificate) + trainer_state.pt
    final/              the final model, tokenizer, certificate.json, certified_accuracy.json
    metrics.png         loss / accuracy curves
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from lipformer import LipformerConfig, LipformerForCausalLM, certify
from lipformer.constraints import SpectralProjection
from lipformer.monitor import ActivationMonitor
from lipformer.optim import build_optimizer

from . import data as D
from . import distributed as dist_utils
from .recipe import RecipeError, RunConfig

STATE_NAME = "trainer_state.pt"


class TrainingStopped(RuntimeError):
    """Training could not go on (e.g. a non-finite loss); the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# data

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


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------------
# schedule, eval

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


def _autocast(dtype: str, device: torch.device):
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise RecipeError(f"train.dtype must be float32 or bfloat16, got {dtype!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model, val, batches: int, dtype: str, device) -> dict:
    """Validation loss and next-token accuracy on `batches` batches, from a fixed position."""
    state = val.state_dict()
    val.reset()
    model.eval()
    losses, correct, total = [], 0, 0
    for _ in range(batches):
        x, y = (t.to(device) for t in val.next_batch())
        with _autocast(dtype, device):
            logits = model(x, use_cache=False).logits
        losses.append(float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))))
        correct += int((logits.argmax(-1) == y).sum())
        total += y.numel()
    model.train()
    val.load_state_dict(state)
    return {"val_loss": sum(losses) / len(losses), "val_acc": correct / total}


@torch.no_grad()
def certified_accuracy(model, val, radii, batches: int = 4, local_sequences: int = 4) -> dict:
    """Fraction of val next-token predictions that are correct AND certified at radius ε.

    `certified_accuracy` uses the best sound radius (local or global, docs/lipschitz.md §9) on the
    first `local_sequences` val sequences (local certificates cost a few local passes per sequence);
    `certified_accuracy_global` is the global radius on those same positions, and
    `certified_accuracy_global_all` the global radius on every position of `batches` val batches.
    """
    m64 = certify.float64_copy(model).cpu()
    bounds = m64.bounds()
    state = val.state_dict()
    val.reset()
    keys = [f"{r:g}" for r in radii]
    hits = {name: dict.fromkeys(keys, 0) for name in ("best", "local", "global", "global_all")}
    correct = total = local_total = 0
    for _ in range(batches):
        x, y = val.next_batch()
        if x.size(1) > m64.config.max_position_embeddings:
            raise ValueError("certified_accuracy: val sequences are longer than the bounds allow")
        hidden = m64.model(x.cpu(), use_cache=False).last_hidden_state
        # positions are independent: certify every (row, t) of the batch in one call
        pred, _, radius = certify.radii_from_hidden(hidden, m64.head.weight, bounds)
        ok = pred == y.reshape(-1)
        correct += int(ok.sum())
        total += y.numel()
        _count(hits["global_all"], radii, ok, radius)
        for row in range(min(x.size(0), local_sequences - local_total // x.size(1))):
            certs = certify.certify_tokens(m64, x[row].tolist(), bounds, method="best")
            right = torch.tensor([c.prediction for c in certs]) == y[row].cpu()
            for name in ("best", "local", "global"):
                field = {"best": "radius", "local": "radius_local", "global": "radius_global"}[name]
                _count(hits[name], radii, right, torch.tensor([getattr(c, field) for c in certs]))
            local_total += len(certs)
    val.load_state_dict(state)
    share = lambda counts, n: {k: v / max(1, n) for k, v in counts.items()}  # noqa: E731
    return {"accuracy": correct / total, "certified_accuracy": share(hits["best"], local_total),
            "certified_accuracy_local": share(hits["local"], local_total),
            "certified_accuracy_global": share(hits["global"], local_total),
            "certified_accuracy_global_all": share(hits["global_all"], total),
            "lipschitz_total": bounds.total, "lipschitz_body": bounds.body, "positions": total,
            "local_positions": local_total}


def _count(counts: dict, radii, correct: torch.Tensor, radius: torch.Tensor) -> None:
    for r in radii:
        counts[f"{r:g}"] += int((correct & (radius >= r)).sum())


# ---------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(out: Path, model, tokenizer, optimizer_state: dict, scheduler, train_data, step: int) -> None:
    """Write OUT/checkpoint atomically: build a temp folder, then swap it in by renames.

    A crash at any point leaves either the old or the new checkpoint complete (`checkpoint.old`
    is kept until the new one is in place; `find_checkpoint` falls back to it).
    """
    tmp = out / f".checkpoint-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "data": train_data.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / STATE_NAME)
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


def full_model(model) -> LipformerForCausalLM | None:
    """A plain LipformerForCausalLM with the full weights of an FSDP2-sharded `model`, on rank 0's CPU;
    None on the other ranks. A collective: every rank calls it."""
    state = dist_utils.gather_full(model.state_dict())
    if state is None:
        return None
    with torch.device("meta"):  # no init work: every tensor is replaced by its gathered value
        plain = LipformerForCausalLM(model.config)
    plain.load_state_dict(state, assign=True)  # the gathered tensors themselves: bit-identical
    if any(b.is_meta for b in plain.buffers()):  # a buffer outside the state dict would stay empty
        raise RuntimeError("full_model: the model has non-persistent buffers; it cannot be rebuilt from its state dict")
    return plain.train(model.training)


def find_checkpoint(out: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):
        folder = out / name
        if (folder / STATE_NAME).is_file() and (folder / "model.safetensors").is_file():
            return folder
    return None


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


# ---------------------------------------------------------------------------------------------
# the loop

def run(run: RunConfig, out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
        max_steps: int | None = None, progress: bool = True, cache_dir=None, log=print) -> dict:
    """Train, checkpoint and certify. `max_steps` stops early (the schedule still uses train.max_steps)."""
    out = Path(out)
    t = run.train
    transformers.utils.logging.disable_progress_bar()  # per-shard save/load bars would drown the log
    rank, world = _dist_info()
    main = rank == 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    lr_lambda(t)  # validates the schedule before any work
    _autocast(t.dtype, device)
    train_data, val_data, tokenizer, vocab = open_data(run, cache_dir)
    try:
        config = LipformerConfig(**{**run.model, "vocab_size": vocab})
    except Exception as exc:
        raise RecipeError(f"invalid [model]: {str(exc).strip().splitlines()[-1].strip()}") from exc
    # only now, with the recipe and data known good, touch the output folder (rank 0; the others
    # wait, and raise its error, so no rank reads the folder before it is ready)
    dist_utils.on_main(prepare_output, out, run, resume, overwrite)

    torch.manual_seed(t.seed)
    checkpoint = find_checkpoint(out) if resume else None
    if checkpoint is not None:
        model = LipformerForCausalLM.from_pretrained(checkpoint)
    else:
        model = LipformerForCausalLM(config)
    model.to(device).train()
    fsdp = world > 1 and t.parallel == "fsdp"
    if fsdp:  # before the optimizer is built, so that it holds the sharded (DTensor) parameters
        dist_utils.shard_model(model, model.model.layers, device)
    extra = {"total_steps": t.max_steps} if t.optimizer in ("lpsgd", "lpsgdm") else {}  # p anneals over the run
    extra.update(t.optimizer_args)
    try:
        optimizer = build_optimizer(model, t.optimizer, lr=t.lr, weight_decay=t.weight_decay, **extra,
                                    **({} if t.optimizer == "adamw" else {"companion": t.companion,
                                                                          "companion_lr": t.companion_lr}))
    except (TypeError, ValueError) as exc:  # a bad value in optimizer_args (names were checked earlier)
        raise RecipeError(f"[train] optimizer {t.optimizer!r}: {' '.join(str(exc).split())}") from None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
    project = SpectralProjection(model, optimizer)
    start = 0
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_NAME, weights_only=True)  # tensors and numbers only: no pickle code
        optimizer.load_state_dict(state["optimizer"])
        if fsdp:  # every rank loaded the full state: keep this rank's rows
            dist_utils.shard_optimizer_state(optimizer)
        scheduler.load_state_dict(state["scheduler"])
        train_data.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        if main:
            log(f"resumed from {checkpoint} at step {start}")
    forward = ddp = model
    if world > 1 and not fsdp:  # every rank starts from the same weights (same seed or checkpoint); DDP checks it
        forward = ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile and device.type == "cuda":
        forward = torch.compile(forward)

    def save(step: int):
        """Rank 0 writes OUT/checkpoint; returns the plain model it saved (None on other ranks).
        Under FSDP2 every rank takes part in gathering the full weights and optimizer state."""
        if fsdp:
            plain, optimizer_state = full_model(model), dist_utils.gather_full(optimizer.state_dict())
        else:
            plain, optimizer_state = (model, optimizer.state_dict()) if main else (None, None)
        if main:
            save_checkpoint(out, plain, tokenizer, optimizer_state, scheduler, train_data, step)
        return plain

    stop = min(t.max_steps, max_steps) if max_steps is not None else t.max_steps
    metrics = open(out / "metrics.jsonl", "a") if main else None
    steps = range(start, stop)
    if progress and main:
        from tqdm import tqdm
        steps = tqdm(steps, initial=start, total=stop, desc="train", unit="step")
    tokens_per_step = t.batch_size * t.grad_accum * world * config.max_position_embeddings
    last = {}
    t0 = time.time()
    for step in steps:
        loss_sum = 0.0
        for micro in range(t.grad_accum):
            x, y = (v.to(device) for v in train_data.next_batch())
            # DDP: gradients are all-reduced on the last micro-batch only (FSDP2 reduce-scatters each
            # one: accumulating whole gradients instead would cost a full model per rank)
            with ddp.no_sync() if ddp is not model and micro + 1 < t.grad_accum else contextlib.nullcontext():
                with _autocast(t.dtype, device):
                    logits = forward(x, use_cache=False).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
                (loss / t.grad_accum).backward()
            loss_sum += float(loss.detach()) / t.grad_accum
        if world > 1:  # the global batch's loss, the same on every rank (so all stop together)
            loss_sum = dist_utils.all_reduce([loss_sum])[0]
        if not math.isfinite(loss_sum):
            raise TrainingStopped(f"loss became {loss_sum} at step {step + 1}; the last good checkpoint is kept "
                                  f"in {out / 'checkpoint'} — lower train.lr and --resume")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        project()
        if t.merge_every and (step + 1) % t.merge_every == 0:
            _merge_poet(model, optimizer)
        done = step + 1
        record = {"step": done, "loss": loss_sum, "lr": scheduler.get_last_lr()[0],
                  "tokens": done * tokens_per_step, "elapsed": time.time() - t0}
        if t.eval_every and (done % t.eval_every == 0 or done == stop):
            if fsdp:  # bounds need whole matrices: rank 0 computes them on a gathered copy
                plain = full_model(model)
                bounds = dist_utils.on_main(lambda: plain.bounds())
            else:
                bounds = model.bounds()
            monitor = ActivationMonitor(model, policy="warn", bounds=bounds)  # records during eval
            record.update(evaluate(model, val_data, t.eval_batches, t.dtype, device))
            monitor.remove()
            record.update({"lipschitz_total": bounds.total, "lipschitz_body": bounds.body,
                           "activations": {k: v for k, v in monitor.stats.items() if "attn" not in k}})
            if world > 1:  # over the whole global val batch, as one process would see it
                dist_utils.reduce_eval(record)
        if main and (done % t.log_every == 0 or "val_loss" in record or done == stop):
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if progress and hasattr(steps, "set_postfix"):
                steps.set_postfix(loss=f"{loss_sum:.3f}", **({"val_acc": f"{record['val_acc']:.3f}"}
                                                            if "val_acc" in record else {}))
        last = record
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done < stop:
            save(done)
    plain = save(stop)
    if main:
        metrics.close()
    result = dict(last)
    if main and stop == t.max_steps:
        # certified accuracy on the global val batch (rank 0's rows alone would be a subset)
        final_val = val_data if world == 1 else D.TokenDataset(
            val_data.files, t.batch_size * world, val_data.seq_len, seed=val_data.seed, shuffle=val_data.shuffle)
        result.update(_finish(out, plain, tokenizer, final_val, t))
    if world > 1:  # rank 0's result on every rank, once its files are written
        result = dist_utils.on_main(lambda: result)
    return result


def _merge_poet(model, optimizer) -> None:
    from lipformer.poet import merge_all
    config = model.config
    merge_all(model, optimizer, cap_method=None if config.constraint == "none" else config.cap_method)


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
