"""Text documents → llm.c token shards (the layout of llm.c / modded-nanogpt FineWeb), resumably.

:func:`prepare_shards` is what `lipformer prepare` runs; :func:`tokenize_folder` is its one-folder,
all-or-nothing form. Each document is one text file, preceded by ``<|endoftext|>`` (llm.c's
delimiter); the first ``val_tokens`` tokens form ``PREFIX_val_000000.bin`` and the rest fill
``PREFIX_train_000001.bin``, ``..._000002.bin``, … of ``shard_size`` tokens (the last shorter).

Resuming: after every shard, ``PREFIX_progress.json`` records where the stream stands — documents
``0..docs_done-1`` written whole and the first ``skip_tokens`` tokens of document ``docs_done`` —
which is exact because a shard is cut only right after a document is added, so what is left over
is always a suffix of that one document. A rerun checks it was given the same inputs and settings,
drops shards written after the record, and tokenizes only from there on.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ._files import DataError, _atomic_write_bytes
from .gpt2 import gpt2_encoding
from .shards import write_shard


def _documents(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """The documents in order: each file as given, each folder's ``*.txt`` (sorted, recursive)."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files += [p for p in sorted(source.rglob("*.txt")) if p.is_file()]
        elif source.is_file():
            files.append(source)
        else:
            raise DataError(f"{source} is neither a file nor a folder; give text files or folders of .txt files")
    return files


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        "convert it or remove it from the inputs") from None


def _batches(files: list[Path], first: int, size: int = 64) -> Iterator[list[tuple[int, str]]]:
    for start in range(first, len(files), size):
        yield [(k, _read(files[k])) for k in range(start, min(start + size, len(files)))]


def prepare_shards(sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike, encoding=None, *,
                   shard_size: int = 100_000_000, val_tokens: int | None = None, prefix: str | None = None,
                   overwrite: bool = False, resume: bool = True, progress: bool = False) -> list[Path]:
    """Tokenize the documents of `sources` (files, or folders of ``*.txt``) into shards in `out_dir`.

    Without `val_tokens`, a corpus of no more than `shard_size` tokens is split 10% val / 90% train
    so that a small one still gets both splits. `encoding` is a ``tiktoken.Encoding`` (default: GPT-2)
    or anything with ``encode_ordinary`` and ``eot_token``; `prefix` defaults to the first source's
    name. Existing shards with the prefix are continued (`resume`, same inputs only), replaced
    (`overwrite`) or refused. `progress` draws a bar over the input bytes on stderr.
    Returns the shard paths in order.
    """
    if shard_size < 1:
        raise DataError(f"shard_size must be positive, got {shard_size}")
    if val_tokens is not None and val_tokens < 1:
        raise DataError(f"val_tokens must be positive, got {val_tokens}")
    files = _documents(sources)
    if not files:
        raise DataError(f"no .txt files under {', '.join(map(str, sources))}; put the documents there as UTF-8 .txt")
    out = Path(out_dir)
    first = Path(sources[0]).resolve()
    prefix = prefix or (first.stem if first.is_file() else first.name) or "data"
    if encoding is None:
        encoding = gpt2_encoding()
    n_vocab = getattr(encoding, "n_vocab", None)
    if n_vocab is not None and n_vocab > 65536:
        raise DataError(f"the encoding has {n_vocab} tokens; shards store uint16 ids, so it must have at most 65536")

    record_file = out / f"{prefix}_progress.json"
    settings = {"inputs": [[str(p.resolve()), p.stat().st_size] for p in files], "shard_size": shard_size,
                "val_tokens": val_tokens, "encoding": getattr(encoding, "name", type(encoding).__name__)}
    existing = sorted(out.glob(f"{prefix}_val_*.bin")) + sorted(out.glob(f"{prefix}_train_*.bin"))
    record = None
    if resume and not overwrite and record_file.is_file():
        record = json.loads(record_file.read_text())
        if record["settings"] != settings:
            raise DataError(f"{out} holds {prefix}_*.bin shards of other inputs or settings; "
                            "pass --overwrite to replace them, or choose another folder or --prefix")
        if record["complete"]:
            return [out / name for name in record["shards"]]
    elif existing and not overwrite:
        raise DataError(f"{out} already has {prefix}_*.bin shards ({existing[0].name}, ...); "
                        "pass overwrite=True (--overwrite) or choose another folder or prefix")
    keep = set(record["shards"]) if record else set()
    for p in existing:  # shards of another run, or written after the last record: made again
        if p.name not in keep:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    written = [out / name for name in record["shards"]] if record else []
    docs_done, skip = (record["docs_done"], record["skip_tokens"]) if record else (0, 0)
    eot = int(encoding.eot_token)
    batch_encode = getattr(encoding, "encode_ordinary_batch", None)
    val_target = shard_size if val_tokens is None else val_tokens
    buf: list[np.ndarray] = []
    buf_len = 0

    def save_record(doc: int, doc_tokens: int, complete: bool = False) -> None:
        if not resume:  # an all-or-nothing run leaves only shards
            return
        left = buf_len  # tokens of document `doc` not yet in a shard
        state = {"settings": settings, "shards": [p.name for p in written], "complete": complete,
                 "docs_done": doc + (left == 0), "skip_tokens": 0 if left == 0 else doc_tokens - left}
        _atomic_write_bytes(record_file, [json.dumps(state, indent=1).encode()])

    def flush(n: int) -> None:
        nonlocal buf, buf_len
        data = np.concatenate(buf) if len(buf) != 1 else buf[0]
        chunk, rest = data[:n], data[n:]
        split = "val" if not written else "train"
        written.append(write_shard(out / f"{prefix}_{split}_{len(written):06d}.bin", chunk))
        buf, buf_len = ([rest] if len(rest) else []), len(rest)

    bar = None
    if progress:
        from tqdm import tqdm
        sizes = [p.stat().st_size for p in files]
        bar = tqdm(total=sum(sizes), initial=sum(sizes[:docs_done]), unit="B", unit_scale=True,
                   desc=f"tokenizing {len(files)} files", file=sys.stderr)
    for batch in _batches(files, docs_done):
        texts = [text for _, text in batch]
        encoded = batch_encode(texts) if batch_encode is not None else [encoding.encode_ordinary(t) for t in texts]
        for (k, text), toks in zip(batch, encoded):
            ids = np.asarray([eot, *toks], dtype=np.int64)
            if ids.min() < 0 or ids.max() >= 65536:
                raise DataError(f"the encoding produced id {int(ids.max())}, which does not fit uint16 shards; "
                                "use a vocabulary of at most 65536 tokens")
            if k == docs_done and skip:  # its first `skip` tokens are in a shard already
                ids = ids[skip:]
            buf.append(ids.astype(np.uint16))
            buf_len += len(ids)
            flushed = False
            # val is cut only once more tokens follow it (so a small corpus can still be split)
            while (written and buf_len >= shard_size) or (not written and buf_len > val_target):
                flush(shard_size if written else val_target)
                flushed = True
            if flushed:
                save_record(k, len(toks) + 1)
            if bar is not None:
                bar.update(len(text.encode()))
    if bar is not None:
        bar.close()
    if not written:  # everything fit in the would-be val shard
        n_val = buf_len // 10 if val_tokens is None else val_tokens
        if n_val < 1 or buf_len - n_val < 1:
            raise DataError(f"the inputs have only {buf_len} tokens, too few for a val and a train shard; "
                            "give more text or a smaller val_tokens")
        flush(n_val)
    while buf_len:
        flush(min(shard_size, buf_len))
    save_record(len(files) - 1, 0, complete=True)
    return written


def tokenize_folder(src_dir: str | os.PathLike, out_dir: str | os.PathLike, encoding=None, *,
                    shard_size: int = 100_000_000, val_tokens: int | None = None,
                    prefix: str | None = None, overwrite: bool = False) -> list[Path]:
    """Every ``*.txt`` under `src_dir` (sorted, recursive; one document per file) into shards in
    `out_dir`, in one go (see :func:`prepare_shards`; the prefix defaults to the folder's name)."""
    src = Path(src_dir)
    if not src.is_dir():
        raise DataError(f"{src} is not a folder; give a folder of .txt files")
    return prepare_shards([src], out_dir, encoding, shard_size=shard_size, val_tokens=val_tokens,
                          prefix=prefix or src.resolve().name or "data", overwrite=overwrite, resume=False)
