"""Token files: llm.c / modded-nanogpt shards (a 256 x int32 header with magic 20240520, version 1
and the token count, then uint16 tokens) and nanoGPT's headerless uint16 ``.bin`` files.

Using the llm.c format means FineWeb shards made by llm.c / modded-nanogpt train unchanged.
:func:`write_shard` / :func:`read_shard` handle one shard, :func:`load_tokens` reads either kind,
and :mod:`.prepare` turns text documents into shards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._files import DataError, _atomic_write_bytes


SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
_HEADER_BYTES = SHARD_HEADER_INTS * 4


def write_shard(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray) -> Path:
    """Write ``tokens`` as an llm.c shard (256 x int32 header, then uint16), atomically."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"tokens for {path} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"tokens for {path} must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 65536):
        raise DataError(f"token ids for {path} must lie in [0, 65535] to fit uint16, got "
                        f"[{int(arr.min())}, {int(arr.max())}]; use a vocabulary below 65536")
    if arr.size >= 2**31:
        raise DataError(f"{arr.size} tokens do not fit one shard's int32 count; split them")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    _atomic_write_bytes(path, [header, arr.astype("<u2", copy=False)])
    return path


def _read_header(path: Path) -> np.ndarray | None:
    with open(path, "rb") as f:
        raw = f.read(_HEADER_BYTES)
    if len(raw) < _HEADER_BYTES:
        return None
    return np.frombuffer(raw, dtype="<i4")


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map an llm.c shard's tokens (read-only uint16), checking magic, version and size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        header = _read_header(path)
    except FileNotFoundError:
        raise DataError(f"no token shard at {path}; check the path, or make shards "
                        "first with `lipformer prepare TEXT_FILES --out DIR`") from None
    except OSError as e:
        raise DataError(f"cannot read token shard {path} ({e.strerror})") from None
    if header is None:
        raise DataError(f"{path} is {size} bytes, shorter than the 1024-byte shard header; "
                        "the file is truncated or not a token shard — write it again")
    if int(header[0]) != SHARD_MAGIC:
        raise DataError(f"{path} has magic {int(header[0])}, not {SHARD_MAGIC}: not an "
                        "llm.c/modded-nanogpt token shard (plain uint16 .bin files are read by "
                        "load_tokens)")
    if int(header[1]) != SHARD_VERSION:
        raise DataError(f"{path} is shard version {int(header[1])}; only version "
                        f"{SHARD_VERSION} (uint16 tokens) is supported")
    n = int(header[2])
    expected = _HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        raise DataError(f"{path} header says {n} tokens ({expected} bytes) but the file has "
                        f"{size} bytes; the shard is truncated or corrupt — write it again")
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=_HEADER_BYTES, shape=(n,))


def load_tokens(path: str | os.PathLike, format: str = "auto") -> np.ndarray:
    """Tokens of a ``.bin`` file as a read-only uint16 memmap.

    ``format``: ``"shard"`` (llm.c header), ``"plain"`` (headerless uint16, nanoGPT), or ``"auto"``
    (a shard when the first int32 is the shard magic — it would be ids 54088, 308 in a plain file,
    impossible for vocabularies up to 50304 — else plain).
    """
    path = Path(path)
    if format not in ("auto", "shard", "plain"):
        raise DataError(f"unknown token file format {format!r}; use auto, shard or plain")
    if format == "auto":
        try:
            with open(path, "rb") as f:
                first = f.read(4)
        except FileNotFoundError:
            raise DataError(f"no token file at {path}; check the path, or make "
                            "shards first with `lipformer prepare TEXT_FILES --out DIR`") from None
        format = "shard" if len(first) == 4 and int.from_bytes(first, "little") == SHARD_MAGIC \
            else "plain"
    if format == "shard":
        return read_shard(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"no token file at {path}; check the path, or make shards "
                        "first with `lipformer prepare TEXT_FILES --out DIR`") from None
    if size % 2:
        raise DataError(f"{path} has an odd number of bytes ({size}), so it is not uint16 "
                        "tokens; the file is truncated or corrupt — prepare it again")
    if size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r")
