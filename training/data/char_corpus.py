"""Char-level corpora in the nanoGPT ``shakespeare_char`` layout: ``train.bin`` / ``val.bin``
(plain uint16 ids) and a ``meta.json`` with the sorted vocabulary and each file's size and sha256.

:func:`build_char_corpus` writes one from any text (Shakespeare is one such text),
:func:`load_char_meta` checks one before training, :func:`char_tokenizer_from_meta` gives its
Hugging Face tokenizer. The recorded sizes and checksums are what let a finished folder be reused
and a damaged one be refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._files import DataError, _atomic_write_bytes, _sha256, _umask


def _encode_chars(text: str, chars: str) -> np.ndarray:
    """Ids of ``text`` in the sorted alphabet ``chars`` (codepoint order, as ``sorted()``)."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(alphabet, cps)
    if len(cps) and (ids.max() >= len(alphabet) or not np.array_equal(alphabet[ids], cps)):
        raise DataError("text contains characters outside the vocabulary; rebuild the corpus")
    return ids.astype(np.uint16)


CHAR_META_FORMAT = "lipformer-char-v1"


def _valid_char_dir(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != CHAR_META_FORMAT:
            return None
        for split in ("train", "val"):
            f = folder / meta[f"{split}_file"]
            if f.stat().st_size != 2 * meta[f"{split}_tokens"]:
                return None
            if _sha256(f) != meta[f"{split}_sha256"]:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder into place, replacing an invalid old one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if _valid_char_dir(final) is None:  # another process did not finish it either
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_char_corpus(texts: Sequence[str] | str, out_dir: str | os.PathLike, *,
                      val_fraction: float = 0.1, source: dict | None = None,
                      force: bool = False) -> dict:
    """Write a char-level corpus: ``train.bin``/``val.bin`` (uint16 ids) and ``meta.json``.

    ``texts`` are joined with a blank line in the order given; the vocabulary is the sorted set of
    characters; the first ``1 - val_fraction`` of the ids are train, the rest val. The folder is
    built under a temporary name and renamed, and a valid existing folder is reused (unless
    ``force``). Returns the meta dict plus ``dir``, ``train_bin`` and ``val_bin`` paths.
    """
    out = Path(out_dir)
    if not force:
        meta = _valid_char_dir(out)
        if meta is not None:
            return _with_paths(meta, out)
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    corpus = texts if isinstance(texts, str) else "\n".join(t.rstrip("\n") + "\n" for t in texts)
    chars = "".join(sorted(set(corpus)))
    if len(chars) > 65536:
        raise DataError(f"{len(chars)} distinct characters do not fit uint16 ids; "
                        "use a BPE tokenizer for this text")
    ids = _encode_chars(corpus, chars)
    n_train = int(len(ids) * (1 - val_fraction))
    if n_train < 2 or len(ids) - n_train < 2:
        raise DataError(f"the corpus has only {len(ids)} characters, too few for a "
                        "train/val split; give it more text")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        meta: dict[str, Any] = {
            "format": CHAR_META_FORMAT, "dtype": "uint16", "chars": chars,
            "vocab_size": len(chars), "corpus_chars": len(corpus),
            "val_fraction": val_fraction,
        }
        for split, arr in (("train", ids[:n_train]), ("val", ids[n_train:])):
            f = tmp / f"{split}.bin"
            _atomic_write_bytes(f, [arr])
            meta[f"{split}_file"] = f.name
            meta[f"{split}_tokens"] = int(len(arr))
            meta[f"{split}_sha256"] = _sha256(f)
        meta["source"] = source or {}
        _atomic_write_bytes(tmp / "meta.json",
                            [json.dumps(meta, indent=1, ensure_ascii=False).encode()])
        _publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _with_paths(meta, out)


def _with_paths(meta: dict, folder: Path) -> dict:
    return {**meta, "dir": str(folder), "train_bin": str(folder / meta["train_file"]),
            "val_bin": str(folder / meta["val_file"])}



def load_char_meta(data_dir: str | os.PathLike) -> dict:
    """Read and check ``meta.json`` of a char corpus folder (paths added as in prepare)."""
    folder = Path(data_dir)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        raise DataError(f"no meta.json in {folder}; run the data preparation first "
                        "(training.data.prepare_shakespeare)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {folder / 'meta.json'} ({e}); delete {folder} and "
                        "prepare it again") from None
    if meta.get("format") != CHAR_META_FORMAT or "chars" not in meta:
        raise DataError(f"{folder / 'meta.json'} is not a lipformer char corpus; delete {folder} "
                        "and prepare it again")
    if _valid_char_dir(folder) is None:  # sizes and sha256 of train/val: a damaged file is not trained on
        raise DataError(f"the token files in {folder} do not match its meta.json (size or sha256); "
                        f"delete {folder} and prepare it again")
    return _with_paths(meta, folder)


def char_tokenizer_from_meta(meta: dict | str | os.PathLike):
    """The Hugging Face char tokenizer (lipformer.tokenization.char_tokenizer) of a corpus."""
    from lipformer.tokenization import char_tokenizer

    if not isinstance(meta, dict):
        meta = load_char_meta(meta)
    return char_tokenizer(meta["chars"])
