"""Token files: llm.c / modded-nanogpt shards (a 256 x int32 header with magic 20240520, version 1
and the token count, then uint16 tokens) and nanoGPT's headerless uint16 ``.bin`` files.

Using the llm.c format means FineWeb shards made by llm.c / modded-nanogpt train unchanged.
:func:`write_shard` / :func:`read_shard` handle one shard, :func:`load_tokens` reads either kind,
and :func:`tokenize_folder` turns a folder of ``.txt`` documents into shards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ._files import DataError, _atomic_write_bytes
from .gpt2 import gpt2_encoding


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
        raise DataError(f"no token shard at {path}; check the path or prepare the data "
                        "first") from None
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
            raise DataError(f"no token file at {path}; check the path or prepare the data "
                            "first") from None
        format = "shard" if len(first) == 4 and int.from_bytes(first, "little") == SHARD_MAGIC \
            else "plain"
    if format == "shard":
        return read_shard(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"no token file at {path}; check the path or prepare the data "
                        "first") from None
    if size % 2:
        raise DataError(f"{path} has an odd number of bytes ({size}), so it is not uint16 "
                        "tokens; the file is truncated or corrupt — prepare it again")
    if size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r")


def _iter_documents(src: Path, batch: int = 64) -> Iterator[list[str]]:
    """The ``*.txt`` files under ``src`` (sorted, recursive) as lists of up to ``batch`` texts."""
    docs: list[str] = []
    for p in sorted(src.rglob("*.txt")):
        if not p.is_file():
            continue
        try:
            docs.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start}); "
                            "convert it or remove it from the folder") from None
        if len(docs) == batch:
            yield docs
            docs = []
    if docs:
        yield docs


def tokenize_folder(src_dir: str | os.PathLike, out_dir: str | os.PathLike, encoding=None, *,
                    shard_size: int = 100_000_000, val_tokens: int | None = None,
                    prefix: str | None = None, overwrite: bool = False) -> list[Path]:
    """Tokenize every ``*.txt`` under ``src_dir`` (sorted, recursive; one document per file)
    into llm.c shards in ``out_dir``, the llm.c / modded-nanogpt FineWeb layout.

    Each document is preceded by ``<|endoftext|>`` (llm.c's delimiter). The first ``val_tokens``
    tokens (default ``shard_size``) form ``PREFIX_val_000000.bin``; the rest fill
    ``PREFIX_train_000001.bin``, ``..._000002.bin``, ... of ``shard_size`` tokens each (the last
    one shorter); the shard number counts all shards, as in llm.c. When ``val_tokens`` is not
    given and the whole folder has no more than ``shard_size`` tokens, it is split 10% val /
    90% train instead, so a small folder still gets both splits. ``encoding`` is a
    ``tiktoken.Encoding`` (default: GPT-2 from the cache) or anything with ``encode_ordinary``
    and ``eot_token``. ``prefix`` defaults to the source folder's name. Existing shards with the
    prefix are an error unless ``overwrite``. Returns the shard paths in order.
    """
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise DataError(f"{src} is not a folder; give a folder of .txt files")
    if shard_size < 1:
        raise DataError(f"shard_size must be positive, got {shard_size}")
    if val_tokens is not None and val_tokens < 1:
        raise DataError(f"val_tokens must be positive, got {val_tokens}")
    if encoding is None:
        encoding = gpt2_encoding()
    n_vocab = getattr(encoding, "n_vocab", None)
    if n_vocab is not None and n_vocab > 65536:
        raise DataError(f"the encoding has {n_vocab} tokens; shards store uint16 ids, so it must "
                        "have at most 65536")
    prefix = prefix or src.resolve().name or "data"
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{prefix}_val_*.bin")) + sorted(out.glob(f"{prefix}_train_*.bin"))
    if existing and not overwrite:
        raise DataError(f"{out} already has {prefix}_*.bin shards ({existing[0].name}, ...); "
                        "pass overwrite=True or choose another folder or prefix")
    for p in existing:
        p.unlink()

    eot = int(encoding.eot_token)
    batch_encode = getattr(encoding, "encode_ordinary_batch", None)
    val_target = shard_size if val_tokens is None else val_tokens
    buf: list[np.ndarray] = []
    buf_len = 0
    written: list[Path] = []
    n_docs = 0

    def flush(n: int) -> None:
        nonlocal buf, buf_len
        data = np.concatenate(buf) if len(buf) != 1 else buf[0]
        chunk, rest = data[:n], data[n:]
        split = "val" if not written else "train"
        written.append(write_shard(out / f"{prefix}_{split}_{len(written):06d}.bin", chunk))
        buf, buf_len = ([rest] if len(rest) else []), len(rest)

    for docs in _iter_documents(src):
        n_docs += len(docs)
        encoded = (batch_encode(docs) if batch_encode is not None
                   else [encoding.encode_ordinary(d) for d in docs])
        for toks in encoded:
            ids = np.asarray([eot, *toks], dtype=np.int64)
            if ids.min() < 0 or ids.max() >= 65536:
                raise DataError(f"the encoding produced id {int(ids.max())}, which does not fit "
                                "uint16 shards; use a vocabulary of at most 65536 tokens")
            buf.append(ids.astype(np.uint16))
            buf_len += len(ids)
            # val is cut only once more tokens follow it (so a small folder can still be split)
            while (written and buf_len >= shard_size) or (not written and buf_len > val_target):
                flush(shard_size if written else val_target)
    if n_docs == 0:
        raise DataError(f"no .txt files under {src}; put the documents there as UTF-8 .txt")
    if not written:  # everything fit in the would-be val shard
        n_val = buf_len // 10 if val_tokens is None else val_tokens
        if n_val < 1 or buf_len - n_val < 1:
            raise DataError(f"{src} has only {buf_len} tokens, too few for a val and a train "
                            "shard; give more text or a smaller val_tokens")
        flush(n_val)
    while buf_len:
        flush(min(shard_size, buf_len))
    return written
