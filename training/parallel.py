"""The parallel strategy of one training process: single, DDP or FSDP2, behind one interface.

The train loop asks this object for everything that differs between the three — which module to
call, when gradients may be left unsynchronized, how the loss and eval are reduced, and how to get
whole weights for bounds and checkpoints — so the loop itself reads the same in every mode.
Process-group setup and the collectives live in `distributed`.
"""

from __future__ import annotations

import contextlib

import torch

from lipformer import LipformerForCausalLM

from . import distributed as dist_utils


class Parallel:
    """`mode`: "single" (one process), "ddp" (replicas, averaged gradients) or "fsdp" (FSDP2 shards)."""

    def __init__(self, model: LipformerForCausalLM, mode: str, device: torch.device, compile: bool = False):
        self.model, self.mode, self.device = model, mode, device
        self.rank, self.world = dist_utils.info()
        self.main = self.rank == 0
        self.forward = model
        self._ddp = None
        if mode == "fsdp":  # before the optimizer is built, so that it holds the sharded (DTensor) parameters
            dist_utils.shard_model(model, model.model.layers, device)
        elif mode == "ddp":  # every rank starts from the same weights (same seed or checkpoint); DDP checks it
            self.forward = self._ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if compile and device.type == "cuda":
            self.forward = torch.compile(self.forward)

    @classmethod
    def for_run(cls, model, parallel: str, device, compile: bool = False) -> "Parallel":
        world = dist_utils.info()[1]
        return cls(model, "single" if world == 1 else parallel, device, compile)

    def micro_batch(self, micro: int, grad_accum: int):
        """DDP all-reduces gradients on the last micro-batch only (FSDP2 reduce-scatters each one:
        accumulating whole gradients instead would cost a full model per rank)."""
        if self._ddp is not None and micro + 1 < grad_accum:
            return self._ddp.no_sync()
        return contextlib.nullcontext()

    def mean(self, value: float) -> float:
        """The global batch's value, the same on every rank (so all stop together)."""
        return dist_utils.all_reduce([value])[0] if self.world > 1 else value

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on some rank (e.g. a signal that reached one rank)."""
        return dist_utils.all_reduce([float(flag)], op="max")[0] > 0 if self.world > 1 else flag

    def reduce_eval(self, record: dict) -> None:
        if self.world > 1:  # over the whole global val batch, as one process would see it
            dist_utils.reduce_eval(record)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)
        if self.mode == "fsdp":  # every rank loaded the full state: keep this rank's rows
            dist_utils.shard_optimizer_state(optimizer)

    def full_model(self) -> LipformerForCausalLM | None:
        """The plain model with whole weights: itself, or under FSDP2 a copy gathered on rank 0's CPU
        (None on the other ranks; a collective there: every rank calls it)."""
        return full_model(self.model) if self.mode == "fsdp" else self.model

    def bounds(self):
        """The certified bounds of the current weights, on every rank (computed by rank 0 under FSDP2)."""
        if self.mode != "fsdp":
            return self.model.bounds()
        plain = self.full_model()
        return dist_utils.on_main(lambda: plain.bounds())

    def checkpoint_state(self, optimizer: torch.optim.Optimizer):
        """(plain model, optimizer state dict) to save on rank 0; (None, None) on the others."""
        if self.mode == "fsdp":
            return self.full_model(), dist_utils.gather_full(optimizer.state_dict())
        return (self.model, optimizer.state_dict()) if self.main else (None, None)


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


