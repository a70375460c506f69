"""GPT-2 BPE with no download outside the package registry: the rank file comes from the pinned
``openai-whisper`` sdist (``whisper/assets/gpt2.tiktoken``, checked against its sha256) and is
loaded into a ``tiktoken.Encoding`` (50257 tokens, ``<|endoftext|>`` = 50256); the same file
builds the Hugging Face tokenizer saved with models.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from ._files import DataError, _atomic_write_bytes, _cache
from .registry import extract_from_archive, fetch_sdist


GPT2_EOT_ID = 50256

# pinned so the rank file (and its checksum below) never changes under a cache
WHISPER_REQUIREMENT = "openai-whisper==20250625"
GPT2_RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken rank file (``base64-token rank`` per line)."""
    import base64
    import binascii

    path = Path(path)
    ranks: dict[bytes, int] = {}
    try:
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except FileNotFoundError:
        raise DataError(f"no tiktoken rank file at {path}; run training.data.gpt2_rank_file() "
                        "to fetch it") from None
    except (ValueError, binascii.Error):
        raise DataError(f"{path} line {n} is not 'base64-token rank'; delete it to fetch it "
                        "again") from None
    return ranks


def gpt2_rank_file(cache_dir: str | os.PathLike | None = None) -> Path:
    """``CACHE/gpt2/gpt2.tiktoken``, extracted from the ``openai-whisper`` sdist on first use."""
    cache = _cache(cache_dir)
    path = cache / "gpt2" / "gpt2.tiktoken"
    if path.is_file():
        return path
    archive = fetch_sdist(WHISPER_REQUIREMENT, cache)
    found = extract_from_archive(archive, GPT2_RANKS_MEMBER)
    if not found:
        raise DataError(f"{archive} has no {GPT2_RANKS_MEMBER}; delete it to fetch "
                        f"{WHISPER_REQUIREMENT} again")
    data = found[GPT2_RANKS_MEMBER]
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise DataError(f"{GPT2_RANKS_MEMBER} in {archive} has sha256 {digest}, expected "
                        f"{GPT2_RANKS_SHA256}; delete the archive to fetch it again")
    _atomic_write_bytes(path, [data])
    return path


@lru_cache(maxsize=8)
def _encoding_from_file(path: str, mtime_ns: int):
    import tiktoken

    from lipformer.tokenization import GPT2_EOT, GPT2_PATTERN

    ranks = load_tiktoken_ranks(path)
    if len(ranks) != GPT2_EOT_ID or sorted(ranks.values()) != list(range(GPT2_EOT_ID)):
        raise DataError(f"{path} has {len(ranks)} ranks, GPT-2 needs ranks 0..{GPT2_EOT_ID - 1}; "
                        "delete it to fetch it again")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={GPT2_EOT: GPT2_EOT_ID},
                             explicit_n_vocab=GPT2_EOT_ID + 1)


def gpt2_encoding(cache_dir: str | os.PathLike | None = None, *,
                  rank_file: str | os.PathLike | None = None):
    """GPT-2 BPE as a ``tiktoken.Encoding`` (50257 tokens, ``<|endoftext|>`` = 50256)."""
    path = Path(rank_file) if rank_file is not None else gpt2_rank_file(cache_dir)
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise DataError(f"no tiktoken rank file at {path}; run training.data.gpt2_rank_file() "
                        "to fetch it") from None
    return _encoding_from_file(str(path.resolve()), mtime)


def gpt2_hf_tokenizer(cache_dir: str | os.PathLike | None = None):
    """The Hugging Face GPT-2 tokenizer (lipformer.tokenization.gpt2_tokenizer) from the cache."""
    from lipformer.tokenization import gpt2_tokenizer

    return gpt2_tokenizer(gpt2_rank_file(cache_dir))
