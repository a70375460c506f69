"""Batches for training and evaluation: :class:`TokenDataset` serves ``(x, y)`` from token files
(see :mod:`lipformer.training.data.shards`), deterministic given a seed, resumable bit-identically and split
across DDP ranks; the class docstring gives the exact sampling rules.
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ._files import DataError
from .shards import load_tokens


def _resolve_files(source) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        s = str(source)
        if any(c in s for c in "*?["):
            files = [Path(p) for p in sorted(_glob.glob(s))]
            if not files:
                raise DataError(f"no token files match {s}; check the pattern or prepare the "
                                "data first")
            return files
        if Path(s).is_dir():
            raise DataError(f"{s} is a folder; give a .bin file, a list of files or a glob such "
                            f"as '{s}/*_train_*.bin'")
        return [Path(s)]
    files = [Path(p) for p in source]
    if not files:
        raise DataError("no token files given; pass a .bin path, a list or a glob")
    return files


class TokenDataset:
    """Batches ``(x, y)`` of int64 token ids, shape ``(batch_size, seq_len)``, ``y = x`` shifted
    by one, from plain uint16 ``.bin`` files or llm.c shards (a path, a glob or a list).

    * ``shuffle=True`` (training): step ``s`` draws the global batch's ``batch_size * world_size``
      windows uniformly from all files with a generator seeded by ``(seed, s)``, so a batch
      depends only on the seed and the step — no hidden RNG state.
    * ``shuffle=False`` (evaluation, or modded-nanogpt-style streaming): the files are read in
      order, each global batch taking the next ``batch_size * world_size * seq_len (+1)`` tokens;
      a file's tail shorter than a global batch is skipped; after the last file it starts over
      (``epoch`` counts the passes). :attr:`batches_per_epoch` gives one pass.

    DDP: every rank builds the same global batch and keeps rows
    ``rank * batch_size : (rank + 1) * batch_size`` — distinct rows, and the union over ranks is
    exactly the ``world_size=1`` batch of ``batch_size * world_size`` rows.

    Resuming: ``state_dict()`` is a small dict of ints/strings (JSON- and torch.save-friendly);
    ``load_state_dict()`` restores the position so the next batch is bit-identical.
    """

    def __init__(self, source, batch_size: int, seq_len: int, *, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 format: str = "auto", vocab_size: int | None = None,
                 device: str | torch.device | None = None) -> None:
        if int(batch_size) < 1 or int(seq_len) < 1:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and "
                            f"{seq_len}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if int(seed) < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed}")
        self.files = _resolve_files(source)
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self.vocab_size = vocab_size
        self.device = torch.device(device) if device is not None else None
        self._tokens = [load_tokens(f, format) for f in self.files]
        self.global_rows = self.batch_size * self.world_size
        T = self.seq_len
        if self.shuffle:
            windows = np.array([max(0, len(t) - T) for t in self._tokens], dtype=np.int64)
            if windows.sum() == 0:
                raise DataError(self._too_small(T + 1))
            self._cum_windows = np.cumsum(windows)
        else:
            span = self.global_rows * T
            self._batches = [max(0, (len(t) - 1) // span) for t in self._tokens]
            if sum(self._batches) == 0:
                raise DataError(self._too_small(span + 1))
        self.reset()

    def _too_small(self, need: int) -> str:
        sizes = ", ".join(f"{f.name}: {len(t)}" for f, t in zip(self.files, self._tokens))
        return (f"token files too small for one batch (need {need} tokens in one file; have "
                f"{sizes}); lower batch_size/seq_len or give more data")

    # -- position ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Go back to the first batch."""
        self.step = 0
        self.epoch = 0
        self._file = 0
        self._pos = 0
        if not self.shuffle:
            self._skip_small_files()

    def _skip_small_files(self) -> None:
        # position k * span of a file is valid while k < its batch count
        while self._pos >= self._batches[self._file] * self.global_rows * self.seq_len:
            self._file += 1
            self._pos = 0
            if self._file == len(self.files):
                self._file = 0
                self.epoch += 1

    @property
    def batches_per_epoch(self) -> int | None:
        """Global batches in one sequential pass (``None`` when shuffling: it never ends)."""
        return None if self.shuffle else int(sum(self._batches))

    def state_dict(self) -> dict:
        return {"version": 1, "step": self.step, "epoch": self.epoch, "file": self._file,
                "pos": self._pos, "seed": self.seed, "shuffle": self.shuffle,
                "global_rows": self.global_rows, "seq_len": self.seq_len,
                "files": [f.name for f in self.files]}

    def load_state_dict(self, state: dict) -> None:
        try:
            theirs = (int(state["seed"]), bool(state["shuffle"]), int(state["global_rows"]),
                      int(state["seq_len"]), list(state["files"]))
            step, epoch, file, pos = (int(state[k]) for k in ("step", "epoch", "file", "pos"))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data position state is incomplete ({e}); it does not come from "
                            "TokenDataset.state_dict()") from None
        ours = (self.seed, self.shuffle, self.global_rows, self.seq_len,
                [f.name for f in self.files])
        if theirs != ours:
            names = ("seed", "shuffle", "global batch rows", "seq_len", "files")
            diff = [f"{n} {a!r} vs {b!r}" for n, a, b in zip(names, theirs, ours) if a != b]
            raise DataError("the saved data position belongs to a different data setup ("
                            + "; ".join(diff) + "); resume with the same data settings")
        span = self.global_rows * self.seq_len
        if not 0 <= file < len(self.files) or pos < 0 or step < 0 or (not self.shuffle and (
                pos % span or pos >= self._batches[file] * span)):
            raise DataError(f"data position file={file} pos={pos} does not fit the data files "
                            f"({', '.join(f.name for f in self.files)}); were they changed?")
        self.step, self.epoch, self._file, self._pos = step, epoch, file, pos

    # -- batches ----------------------------------------------------------------------------
    def _global_starts(self) -> list[tuple[int, int]]:
        """(file index, start offset) of each row of the current global batch."""
        G, T = self.global_rows, self.seq_len
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.step])
            idx = rng.integers(0, int(self._cum_windows[-1]), size=G, dtype=np.int64)
            fi = np.searchsorted(self._cum_windows, idx, side="right")
            base = np.concatenate([[0], self._cum_windows[:-1]])
            return list(zip(fi.tolist(), (idx - base[fi]).tolist()))
        return [(self._file, self._pos + r * T) for r in range(G)]

    def _advance(self) -> None:
        self.step += 1
        if not self.shuffle:
            self._pos += self.global_rows * self.seq_len
            self._skip_small_files()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(x, y)`` for the current step, then advance one global batch."""
        T = self.seq_len
        starts = self._global_starts()
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = np.stack([np.asarray(self._tokens[f][s:s + T + 1]) for f, s in mine])
        self._advance()
        if self.vocab_size is not None:
            top = int(rows.max())
            if top >= self.vocab_size:
                raise DataError(f"token id {top} in {self.files[mine[0][0]].name} is outside the "
                                f"model's vocabulary of {self.vocab_size}; the data was tokenized "
                                "with a different tokenizer")
        both = torch.from_numpy(rows.astype(np.int64))
        x, y = both[:, :-1], both[:, 1:]
        x, y = x.contiguous(), y.contiguous()
        if self.device is not None and self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device is not None:
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def __repr__(self) -> str:
        return (f"TokenDataset({len(self.files)} files, batch {self.batch_size}x{self.seq_len}, "
                f"rank {self.rank}/{self.world_size}, shuffle={self.shuffle}, step {self.step})")
