"""Byte-level text data: the ``pydoc_data`` corpus by default, any text file with ``--data PATH``.

Batches come from a seeded generator that every rank and every optimizer replays identically: all
ranks draw the same *global* batch of offsets and each data-parallel rank keeps its own slice of rows.
The generator state travels in the checkpoint, so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from disco.train.config import UsageError


def load_text(path: str | None = None) -> bytes:
    """The bytes of ``path``, or the Python docs topics shipped with CPython (about 465 KB).

    A missing, unreadable or empty file raises ``UsageError`` (one line, exit status 2 in the CLI).
    """
    if path:
        file = Path(path)
        if not file.exists():
            raise UsageError(f"--data {path}: no such file")
        if not file.is_file():
            raise UsageError(f"--data {path}: not a file")
        try:
            data = file.read_bytes()
        except OSError as e:
            raise UsageError(f"--data {path}: cannot read it ({e.strerror or e})") from None
        if not data:
            raise UsageError(f"--data {path}: the file is empty")
        return data
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics)).encode("utf-8")


def train_val_split(data: bytes, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """First 90% for training, last 10% for validation, as ``uint8`` tensors (vocab 256)."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n_train = int(len(tokens) * (1 - val_fraction))
    return tokens[:n_train].clone(), tokens[n_train:].clone()


def check_long_enough(train: Tensor, val: Tensor, seq_len: int, source: str) -> None:
    """Both splits need more than ``seq_len + 1`` bytes to draw a window from."""
    need = seq_len + 2
    if min(len(train), len(val)) < need:
        raise UsageError(
            f"{source}: {len(train) + len(val)} bytes are too few for --seq-len {seq_len} (the training and the"
            f" validation split each need at least {need} bytes; got {len(train)} and {len(val)})"
        )


def _windows(tokens: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    rows = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()
    return rows[:, :-1], rows[:, 1:]


class BatchSampler:
    """Random windows of ``seq_len + 1`` bytes; ``global_batch`` rows per step, this rank's slice returned."""

    def __init__(
        self, tokens: Tensor, seq_len: int, global_batch: int, *, seed: int, dp_rank: int = 0, dp_size: int = 1
    ):
        if global_batch % dp_size:
            raise ValueError(f"batch size {global_batch} is not divisible by {dp_size} data-parallel ranks")
        if len(tokens) <= seq_len + 1:
            raise ValueError(f"text of {len(tokens)} bytes is too short for sequences of {seq_len}")
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        local = global_batch // dp_size
        self.rows = slice(dp_rank * local, (dp_rank + 1) * local)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        """Inputs and targets ``[local_batch, seq_len]`` (int64)."""
        high = len(self.tokens) - self.seq_len - 1
        starts = torch.randint(0, high, (self.global_batch,), generator=self.generator)
        return _windows(self.tokens, starts[self.rows], self.seq_len)

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


def eval_batches(
    tokens: Tensor, seq_len: int, global_batch: int, n_batches: int, *, seed: int, dp_rank: int = 0, dp_size: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """A fixed list of validation batches (the same at every evaluation and for every optimizer)."""
    sampler = BatchSampler(tokens, seq_len, global_batch, seed=seed, dp_rank=dp_rank, dp_size=dp_size)
    return [sampler.next() for _ in range(n_batches)]
