"""``DummyParallelDims``: a stand-in for TorchTitan's ``ParallelDims`` outside TorchTitan.

Disco's optimizers accept a ``parallel_dims`` object for API compatibility with TorchTitan, but infer every
parameter's layout from the parameters themselves (DTensor mesh and placements). Outside TorchTitan, pass a
``DummyParallelDims()``: it describes plain DDP (every rank a data-parallel replica) or a single device.

Sizes follow TorchTitan's convention: ``dp_replicate * dp_shard * cp * tp * pp == world_size``, with ``-1``
for ``dp_shard`` meaning "whatever is left". When every size is left at 1 on more than one rank, the ranks are
taken to be DDP replicas (``dp_replicate = world_size``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


def _default_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@dataclass
class DummyParallelDims:
    """Parallel sizes of a plain DDP or single-device run, shaped like TorchTitan's ``ParallelDims``."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    world_size: int = field(default_factory=_default_world_size)

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "cp", "tp", "pp", "ep", "etp", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DummyParallelDims.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"DummyParallelDims.dp_shard must be >= 1 or -1 (auto), got {self.dp_shard}")
        rest = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % rest:
                raise ValueError(f"world_size {self.world_size} is not divisible by dp_replicate*cp*tp*pp={rest}")
            self.dp_shard = self.world_size // rest
        elif rest * self.dp_shard == 1 and self.world_size > 1:
            self.dp_replicate = self.world_size  # plain DDP: every rank is a replica
        product = self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp
        if product != self.world_size:
            raise ValueError(
                f"dp_replicate({self.dp_replicate}) * dp_shard({self.dp_shard}) * cp({self.cp}) "
                f"* tp({self.tp}) * pp({self.pp}) = {product} != world_size({self.world_size})"
            )

    @property
    def world_mesh(self) -> None:
        """TorchTitan builds a ``DeviceMesh`` here; the dummy has none (layouts come from the parameters)."""
        return None

    @property
    def dp_enabled(self) -> bool:
        return self.dp_replicate > 1 or self.dp_shard > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard_enabled or self.cp_enabled

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def dp_cp_enabled(self) -> bool:
        return self.dp_enabled or self.cp_enabled

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def etp_enabled(self) -> bool:
        return self.etp > 1

    @property
    def loss_parallel_enabled(self) -> bool:
        return False

    @property
    def non_data_parallel_size(self) -> int:
        return self.cp * self.tp * self.pp
