"""Engines run a whole-tensor function on tensors whose pieces may live on many ranks.

The optimizer hands ``map`` a list of jobs ``(param index, local piece, key)`` and a function
``fn(key, stack) -> stack`` on stacks of whole tensors; the engine decides who computes what, moves pieces to the
owner, runs ``fn`` once per owned bucket and brings each rank its piece of the result. It never names an
algorithm. ``LocalEngine`` is the single-device twin used as the oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

Job = tuple[int, Tensor, Hashable]
MapFn = Callable[[Hashable, Tensor], Tensor]


@dataclass
class EngineStats:
    """Counters of the last ``map`` call on this rank."""

    matrices_computed: int = 0
    tensors_computed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    history: list[dict] = field(default_factory=list)

    def reset(self) -> None:
        self.matrices_computed = self.tensors_computed = 0
        self.bytes_sent = self.bytes_received = self.collectives = 0


def local_piece(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local piece, a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _n_matrices(shape: Sequence[int], batch_ndim: int) -> int:
    return math.prod(shape[:batch_ndim]) if batch_ndim else 1


class LocalEngine:
    """Everything on this process: same-key, same-shape tensors stacked into one batched call."""

    def __init__(self, n_params: int, *, batch_ndims: Sequence[int] | None = None) -> None:
        self.n_params = n_params
        self.batch_ndims = list(batch_ndims or [0] * n_params)
        self.stats = EngineStats()
        self.current_rank = 0
        self.assignments = {0: list(range(n_params))}

    def check_grads(self, present: list[bool], names: Sequence[str]) -> None:
        return None

    def map(self, jobs: Sequence[Job], fn: MapFn) -> list[Tensor]:
        self.stats.reset()
        out: list[Tensor | None] = [None] * len(jobs)
        by: dict[tuple, list[int]] = {}
        for j, (_, t, key) in enumerate(jobs):
            by.setdefault((key, tuple(t.shape), t.dtype), []).append(j)
        for (key, shape, _), members in by.items():
            res = fn(key, torch.stack([jobs[j][1] for j in members]))
            for k, j in enumerate(members):
                out[j] = res[k]
                self.stats.matrices_computed += _n_matrices(shape, self.batch_ndims[jobs[j][0]])
            self.stats.tensors_computed += len(members)
        return out  # type: ignore[return-value]
