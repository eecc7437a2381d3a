"""The escape hatch: an engine driven by three user functions (``create_callback_config``).

The user's functions know where the pieces live; the engine does not (it has no layouts). So it implements:

* ``map(out="input")``: per tensor, in index order, ``gather_fn`` to the owner, ``spec`` there, ``redistribute_fn``
  back;
* ``map(out="replicated")``: the same gather, then the owner's result broadcast to every rank;
* ``check_step`` / ``check_agreement`` and the failures of ``map``: over the default group (the callbacks run
  on every rank);

and refuses what needs layouts: ``Partial`` job layouts and ``all_reduce`` (so ``average_gradients=True`` is
refused when the engine is built, never mid-step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.specs import Spec
from .agreement import Outcomes, check_step, digest, first_difference, settle
from .config import DistributedConfig
from .engine import EngineStats, Job, Out, Over, ReduceOp, consumed, n_matrices, run_spec, spec_of
from .layout import Layout


def validate_assignments(assignments: dict[int, list[int]], n_params: int, world_size: int) -> None:
    """Every parameter index assigned to exactly one rank in ``range(world_size)``, else a clear error."""
    bad_ranks = sorted(r for r in assignments if not 0 <= r < world_size)
    count: dict[int, int] = {}
    for ids in assignments.values():
        for i in ids:
            count[i] = count.get(i, 0) + 1
    missing = [i for i in range(n_params) if count.get(i, 0) == 0]
    twice = sorted(i for i, c in count.items() if c > 1)
    unknown = sorted(i for i in count if not 0 <= i < n_params)
    if bad_ranks or missing or twice or unknown:
        raise ValueError(
            "assignment coverage error: every parameter must be assigned to exactly one rank; "
            f"missing={missing[:10]} assigned more than once={twice[:10]} unknown indices={unknown[:10]} "
            f"ranks outside the world={bad_ranks}"
        )


class CallbackEngine:
    """Per tensor, in index order: ``gather_fn`` to the owner, the spec there, ``redistribute_fn`` back."""

    has_layouts = False

    def __init__(
        self, params: Sequence[Tensor], *, config: DistributedConfig, names: Sequence[str] | None = None
    ) -> None:
        if config.average_gradients:
            raise ValueError(
                "a callbacks config cannot average gradients: it knows no layouts, so it cannot tell replicas "
                "from shards; average them in your framework (or use create_auto_config / DTensors)"
            )
        if config.assign_fn is None or config.gather_fn is None or config.redistribute_fn is None:
            raise ValueError("a callbacks config needs assign_fn, gather_fn and redistribute_fn")
        self.config = config
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(params))]
        self.stats = EngineStats()
        self.current_rank = dist.get_rank()
        self.shapes = [tuple(p.shape) for p in params]
        world = dist.get_world_size()
        self._assignments = {
            int(r): sorted(int(i) for i in ids) for r, ids in config.assign_fn(list(self.shapes), world).items()
        }
        validate_assignments(self._assignments, len(params), world)
        self.owner = {i: r for r, ids in self._assignments.items() for i in ids}
        self._mapped: list[int] | None = None

    @property
    def assignments(self) -> dict[int, list[int]]:
        """rank -> parameter indices it computes (all of ``assign_fn``'s, or those of the last ``map``)."""
        if self._mapped is None:
            return {r: list(ids) for r, ids in self._assignments.items()}
        mapped = set(self._mapped)
        return {r: [i for i in ids if i in mapped] for r, ids in self._assignments.items()}

    def layout(self, index: int) -> Layout:
        raise ValueError(
            f"a callbacks config has no layouts (asked for {self.names[index]}); only its gather_fn and "
            "redistribute_fn know where pieces live"
        )

    def _all_ranks_int(self, values: list[int]) -> list[list[int]]:
        mine = torch.tensor(values, dtype=torch.int64)
        everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        return [t.tolist() for t in everyone]

    def check_step(
        self, present: Sequence[bool], nonfinite: Sequence[bool], settings: Sequence[str], error: str | None
    ) -> list[int]:
        ranks = list(range(dist.get_world_size()))
        return check_step(None, ranks, self.names, present, nonfinite, settings, error)

    def check_agreement(self, items: Sequence[str], what: str) -> None:
        if len({v[0] for v in self._all_ranks_int([digest(tuple(items))])}) == 1:
            return
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, list(items))
        raise RuntimeError(f"ranks disagree on {what}: " + first_difference(everyone, range(len(everyone))))

    def all_reduce(
        self, tensors: Sequence[Tensor], layouts: Sequence[Layout], *, over: Over = "replicas", op: ReduceOp = "sum"
    ) -> None:
        raise ValueError("a callbacks config knows no layouts, so it cannot reduce over mesh axes")

    def assign(self, jobs: Sequence[Job], spec: Spec | None = None, *, out: Out = "input") -> dict[int, list[int]]:
        self._mapped = sorted(j.index for j in jobs)
        return self.assignments

    def map(self, jobs: Sequence[Job], spec: Spec | None = None, *, out: Out = "input") -> list[Tensor]:
        assert self.config.gather_fn is not None and self.config.redistribute_fn is not None
        for job in jobs:
            if job.layout is not None:
                raise ValueError(
                    f"a callbacks config maps parameters only; {self.names[job.index]} came with a layout of its "
                    f"own ({job.layout.describe()})"
                )
        results: dict[int, Tensor] = {}
        outcomes = Outcomes()
        for k in sorted(range(len(jobs)), key=lambda k: jobs[k].index):
            job, s = jobs[k], spec_of(jobs[k], spec)
            i, owner = job.index, self.owner[job.index]
            piece = job.values()
            full = self.config.gather_fn(piece, i, owner)
            result = None
            if self.current_rank == owner:
                if full is None:
                    raise RuntimeError(f"gather_fn returned None on the owner (rank {owner}) of parameter {i}")
                result = run_spec(s, full.unsqueeze(0), self.stats, outcomes, [k])[0]
                shape = tuple(full.shape)
                self.stats.matrices_computed += n_matrices(shape, s.batch_ndim(shape))
                self.stats.tensors_computed += 1
            if out == "replicated":
                box = [result]
                dist.broadcast_object_list(box, src=owner)
                results[k] = box[0]  # type: ignore[assignment]  # the box holds the result once the call returned
            else:
                results[k] = self.config.redistribute_fn(result, i, owner, piece)
        self._mapped = sorted(j.index for j in jobs)
        settle(outcomes, None, list(range(dist.get_world_size())), [j.index for j in jobs], self.names)
        # User functions move the pieces: results are handed to ``consume`` only once every rank agreed.
        return [consumed(job, results[k]) for k, job in enumerate(jobs)]
