"""Matrices sharded across ranks (FSDP2's DTensors): whole matrices where the math needs them.

FSDP2 (`torch.distributed.fsdp.fully_shard`) makes every parameter a DTensor of which each rank
holds a block of rows. Elementwise and row-wise updates (AdamW, l_p descent, Lamb, the embedding's
row clip) run on those blocks as they are: DTensor dispatches each op to the local shard, and
reductions such as Lamb's norms come out global. Matrix functions — Newton–Schulz, the spectral
caps, σ bounds — need the whole matrix, and computed on a block they would be silently wrong.

`sharded_map` deals that work out: rank r computes on the full matrices i with i % world == r,
every rank receives every result, and `local_part` keeps the rows a rank holds. The same function
serves DDP, where every rank holds the same full tensors and nothing needs gathering.
"""

from __future__ import annotations

from functools import reduce
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole value of a DTensor (an all-gather: every rank of its mesh must call it); a plain tensor as is."""
    return t.full_tensor() if is_dtensor(t) else t


def local_part(whole: Tensor, like: Tensor) -> Tensor:
    """`whole` laid out as `like`: for a DTensor, a DTensor of the same mesh and placements holding this
    rank's part of `whole` — sliced locally, no communication, so every rank must hold the same `whole`.
    For a plain `like`, `whole` itself."""
    if not is_dtensor(like):
        return whole
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def mesh_shards(tensors: Sequence[Tensor], who: str):
    """(rank, world, process group) of the 1-D device mesh the DTensors in `tensors` live on; None when
    none is a DTensor. One mesh for all, and no plain tensors among them: anything else is refused."""
    meshes = {t.device_mesh for t in tensors if is_dtensor(t)}
    if not meshes:
        return None
    if len(meshes) > 1 or not all(is_dtensor(t) for t in tensors):
        raise ValueError(f"{who}: the matrices of one param group must all be DTensors on one device mesh "
                         "(FSDP2-shard the whole model) or all plain tensors")
    mesh = meshes.pop()
    if mesh.ndim != 1:
        raise ValueError(f"{who}: DTensor parameters on a {mesh.ndim}-D device mesh are not supported; "
                         "shard on a 1-D mesh (plain FSDP, no HSDP)")
    return mesh.get_local_rank(), mesh.size(), mesh.get_group()


def sharded_map(fn: Callable[[int, Tensor], Tensor], tensors: Sequence[Tensor], rank: int, world: int,
                group=None) -> Iterator[tuple[int, Tensor]]:
    """Yield (i, fn(i, full(tensors[i]))) for every i, in order, on every rank; fn runs on rank i % world only.

    The tensors go in rounds of `world`: each rank computes its one, and the results are all-gathered
    (flattened, padded to the round's largest, in a dtype that holds each exactly), so every rank gets
    bit for bit what the owner computed. A round's transfer overlaps the next round's compute; at
    most two rounds of results are held at once. A DTensor is gathered to its full value first, by
    every rank in turn (an all-gather each; only the owner keeps it). All of this is collective:
    every rank must iterate to the end, with the same tensors in the same order. `fn` returns a
    tensor of its input's shape; results come back in the input's dtype, whole (not sharded).
    """
    pending = None
    for base in range(0, len(tensors), world):
        chunk = range(base, min(base + world, len(tensors)))
        own = None
        for i in chunk:
            whole = full(tensors[i])
            if i == base + rank:
                own = whole
        dtype = reduce(torch.promote_types, (tensors[i].dtype for i in chunk))
        size = max(tensors[i].numel() for i in chunk)
        device = tensors[chunk[0]].device
        mine = torch.zeros(size, dtype=dtype, device=device)
        if own is not None:
            result = fn(base + rank, own)
            mine[:result.numel()].copy_(result.reshape(-1))
        gathered = [torch.empty(size, dtype=dtype, device=device) for _ in range(world)]
        work = dist.all_gather(gathered, mine, group=group, async_op=True)
        if pending is not None:
            yield from _results(*pending, tensors)
        pending = (work, chunk, gathered)
    if pending is not None:
        yield from _results(*pending, tensors)


def _results(work, chunk, gathered, tensors) -> Iterator[tuple[int, Tensor]]:
    work.wait()
    for r, i in enumerate(chunk):
        t = tensors[i]
        yield i, gathered[r][:t.numel()].view(t.shape).to(t.dtype)
