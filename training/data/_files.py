"""Helpers every data module shares: :class:`DataError`, the cache folder, atomic writes, sha256.

They live apart so the fetching, preparing and batching modules can all raise the same error and
write files the same way without importing one another.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np


class DataError(Exception):
    """A data problem the user can fix; the message is one line naming the problem and the fix."""


def default_cache_dir() -> Path:
    """``$LIPFORMER_CACHE`` if set, else ``~/.cache/lipformer``."""
    env = os.environ.get("LIPFORMER_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lipformer"


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    path = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache folder {path} ({e.strerror}); "
                        "set LIPFORMER_CACHE to a writable folder") from None
    return path


def _atomic_write_bytes(path: Path, chunks: Iterable[bytes | memoryview | np.ndarray]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk.tobytes() if isinstance(chunk, np.ndarray) else chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
