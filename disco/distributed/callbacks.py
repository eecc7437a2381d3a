"""The escape hatch: an engine driven by three user functions (``create_callback_config``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor

from .config import DistributedConfig
from .engine import EngineStats, Job, MapFn, _n_matrices


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
    """Per parameter, in index order: ``gather_fn`` to the owner, ``fn`` there, ``redistribute_fn`` back."""

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        config: DistributedConfig,
        batch_ndims: Sequence[int],
        names: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.batch_ndims = list(batch_ndims)
        self.stats = EngineStats()
        self.current_rank = dist.get_rank()
        world = dist.get_world_size()
        assert config.assign_fn is not None
        self.assignments = {
            int(r): sorted(int(i) for i in ids)
            for r, ids in config.assign_fn([tuple(p.shape) for p in params], world).items()
        }
        validate_assignments(self.assignments, len(params), world)
        self.owner = {i: r for r, ids in self.assignments.items() for i in ids}

    def check_grads(self, present: list[bool], names: Sequence[str]) -> None:
        return None  # the user's collectives define who takes part

    def map(self, jobs: Sequence[Job], fn: MapFn) -> list[Tensor]:
        self.stats.reset()
        assert self.config.gather_fn is not None and self.config.redistribute_fn is not None
        out = []
        for i, local, key in sorted(jobs, key=lambda j: j[0]):
            owner = self.owner[i]
            full = self.config.gather_fn(local, i, owner)
            result = None
            if self.current_rank == owner:
                if full is None:
                    raise RuntimeError(f"gather_fn returned None on the owner (rank {owner}) of parameter {i}")
                result = fn(key, full.unsqueeze(0))[0]
                self.stats.matrices_computed += _n_matrices(tuple(full.shape), self.batch_ndims[i])
                self.stats.tensors_computed += 1
            out.append((i, self.config.redistribute_fn(result, i, owner, local)))
        by_index = dict(out)
        return [by_index[i] for i, _, _ in jobs]
