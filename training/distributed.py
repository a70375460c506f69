"""Distributed training (DDP or FSDP2): process-group setup and the few collectives the trainer needs.

torchrun starts the processes; nothing here spawns any. On one machine with two processes:

    torchrun --standalone --nproc_per_node 2 -m lipformer.cli train --preset tiny --out runs/tiny \\
        data.dataset=char_dir data.path=FOLDER

(`--nproc_per_node` = GPUs per node on CUDA, where the backend is NCCL; on CPU it is gloo — set
OMP_NUM_THREADS so the processes do not oversubscribe the cores.) Several machines: the usual
`torchrun --nnodes N --node_rank I --rdzv_endpoint HOST:PORT ...`.

What a run does with W processes (see `training.train.run`):

* every rank builds the same model from the same seed; DDP averages the gradients;
* `train.batch_size` is per process: each step sees W × batch_size sequences, the rows of one
  global batch split between the ranks (`TokenDataset(rank=, world_size=)`), so W processes at
  batch B follow the 1-process batch W·B trajectory to float rounding;
* Muon/ROOT shard their Newton–Schulz orthogonalizations across the ranks (each rank orthogonalizes
  its share, then all-gather; bit-identical to the unsharded update);
* logged train loss, val loss/accuracy and activation maxima are reduced over the ranks;
* only rank 0 writes run.json, metrics, checkpoints and final/; a resumed run loads the checkpoint
  on every rank. The returned result dict is rank 0's, on every rank.

FSDP2, for models too large to replicate (`train.parallel=fsdp`; one process trains the plain
model either way): `shard_model` applies `torch.distributed.fsdp.fully_shard` to each transformer
block, then to the root (embedding and head), on a 1-D mesh over all ranks. Parameters, gradients
and optimizer state are then DTensors of which each rank holds 1/W of the rows (dim 0); gradients
are reduce-scattered after every micro-batch. What still sees whole matrices:

* Muon/ROOT's Newton–Schulz and the projection step's caps, being functions of the whole matrix:
  each matrix is gathered in turn, computed on one rank (round-robin) and every rank keeps its rows
  of the result (`lipformer.sharding`); the compute is still divided by W. Cost per step: two
  all-gathers of every matrix for Muon and two for the caps (about twice FSDP's own traffic), and
  about 2·W whole matrices held at a time (the results of two rounds) — some hundreds of MB for a
  1B model at W = 8, fine next to its activations; far larger models would want a smarter scheme.
* the eval bounds, checkpoints, final/ and its certificate: `gather_full` collects the full state
  dict on rank 0's CPU (one model copy; at a checkpoint the optimizer state too) and rank 0 works
  on a plain model built from it. Checkpoints are the same HF folder + trainer_state.pt as without
  FSDP, so a run can be resumed in either mode; `shard_optimizer_state` slices the loaded state.
* elementwise updates (AdamW, LPSGD, Lamb, the companions, the embedding's row clip) run on the
  shards as they are; Lamb's norms are DTensor reductions, hence global.

    torchrun --standalone --nproc_per_node 8 -m lipformer.cli train --preset gpt2-small --out runs/g \\
        data.dataset=shards data.path='fineweb10B/*_train_*.bin' train.parallel=fsdp
"""

from __future__ import annotations

import atexit
import os
import pickle
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def info() -> tuple[int, int]:
    """(rank, world size) of the initialized default group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; returns (rank, world).

    Does nothing (returns (0, 1)) unless WORLD_SIZE > 1, or returns the current group when one is
    already initialized. Backend: "nccl" when CUDA is available (the CUDA device is set from
    LOCAL_RANK first), else "gloo". The group is destroyed at interpreter exit.
    """
    if dist.is_available() and dist.is_initialized():
        return info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")  # env:// (MASTER_ADDR, RANK, ...)
    atexit.register(cleanup)
    return info()


def cleanup() -> None:
    """Destroy the default process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where tensors for collectives live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: Sequence[float], op: str = "mean") -> list[float]:
    """Mean ("mean"), sum or max of each number over the ranks (float64); unchanged on 1 process."""
    rank, world = info()
    if world == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= world
    return t.tolist()


def reduce_eval(record: dict) -> dict:
    """A record's val_loss/val_acc averaged over ranks (equal rows each) and activation maxima maxed."""
    _, world = info()
    if world == 1:
        return record
    keys = [k for k in ("val_loss", "val_acc") if k in record]
    for k, v in zip(keys, all_reduce([record[k] for k in keys])):
        record[k] = v
    acts = record.get("activations") or {}
    slots = [(layer, stat) for layer in sorted(acts) for stat in sorted(acts[layer])]
    for (layer, stat), v in zip(slots, all_reduce([acts[layer][stat] for layer, stat in slots], op="max")):
        acts[layer][stat] = v
    return record


def on_main(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run `fn` on rank 0 only and hand its result to every rank; an exception it raises is raised
    on every rank. Also a barrier: no rank returns before rank 0 is done. Plain call on 1 process."""
    rank, world = info()
    if world == 1:
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    error = None
    if rank == 0:
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
            try:
                pickle.dumps(exc)
                box[0] = ("error", exc)
            except Exception:  # noqa: BLE001
                box[0] = ("error", RuntimeError(f"rank 0: {type(exc).__name__}: {exc}"))
    dist.broadcast_object_list(box, src=0, device=_device())
    kind, value = box[0]
    if kind == "error":
        raise (error if error is not None else value)
    return value


# ---------------------------------------------------------------------------------------------
# FSDP2

def shard_model(model: torch.nn.Module, blocks, device: torch.device) -> None:
    """FSDP2: `fully_shard` each block (one block's weights are whole at a time in forward and
    backward), then the root (embedding, head), on a 1-D mesh over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def gather_full(obj: Any) -> Any:
    """`obj` (a state dict: nested dicts/lists of tensors) with every DTensor replaced by its full
    value on CPU, on rank 0; None on the other ranks. A collective: every rank calls it with the
    same structure (DTensors in the same order); only rank 0 keeps what is gathered."""
    rank, _ = info()

    def walk(x):
        if isinstance(x, DTensor):
            whole = x.full_tensor()  # an all-gather on every rank, one tensor at a time
            return whole.cpu() if rank == 0 else None
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    out = walk(obj)
    return out if rank == 0 else None


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `optimizer.load_state_dict(full_state)` on every rank: each state tensor shaped like its
    DTensor parameter becomes a DTensor holding this rank's part (sliced locally, no communication).
    Scalars such as step counts stay plain. A wrapped base optimizer's state (EAdaptor) too."""
    from lipformer.sharding import local_part

    for opt in (optimizer, getattr(optimizer, "base", None)):
        for p, state in (opt.state.items() if opt is not None else ()):
            if not isinstance(p, DTensor):
                continue
            for key, value in state.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == p.shape:
                    state[key] = local_part(value.to(p.device), p)
