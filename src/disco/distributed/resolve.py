"""Read layouts off parameters: DTensor meshes and placements, or plain tensors with process groups."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from .config import DistributedConfig
from .layout import REPLICATE, Layout, Placement, shard

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import Placement as TorchPlacement
    from torch.distributed.tensor.placement_types import _StridedShard

_GROUPS: dict[tuple[int, ...], ProcessGroup] = {}


def placement_of(p: TorchPlacement) -> Placement:
    name = type(p).__name__
    if name == "_StridedShard":
        strided = cast("_StridedShard", p)
        return Placement("strided_shard", int(strided.dim), int(strided.split_factor))
    if p.is_shard():
        return Placement("shard", int(cast("Shard", p).dim))
    if p.is_replicate():
        return REPLICATE
    if p.is_partial():
        return Placement("partial")
    raise ValueError(f"unsupported placement {p!r}")


def dtensor_layout(t: DTensor) -> Layout:
    mesh = t.device_mesh
    return Layout(
        tuple(t.shape),
        tuple(int(r) for r in mesh.mesh.flatten().tolist()),
        tuple(mesh.mesh.shape),
        tuple(placement_of(p) for p in t.placements),
    )


def group_for(ranks: Sequence[int]) -> ProcessGroup | None:
    """A process group over exactly ``ranks``, made once; only those ranks take part (PP stages differ)."""
    key = tuple(sorted(ranks))
    if key == tuple(range(dist.get_world_size())):
        return dist.group.WORLD
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(key), use_local_synchronization=True)
    return _GROUPS[key]


def _group_ranks(pg: ProcessGroup | None) -> list[int]:
    return dist.get_process_group_ranks(pg) if pg is not None else []


def process_group_layouts(
    params: Sequence[Tensor], config: DistributedConfig, ids: Sequence[int] | None = None
) -> list[Layout]:
    """Layouts of plain tensors from the config's groups (axes: replicate, fsdp, tp), checked on every rank."""
    me = dist.get_rank()
    axes = [
        ("replicate", config.replicate_process_group),
        ("fsdp", config.fsdp_process_group),
        ("tp", config.tp_process_group),
    ]
    used = [(name, pg) for name, pg in axes if pg is not None]
    if not used:
        ranks = list(range(dist.get_world_size()))
        return [Layout.replicated(tuple(p.shape), ranks) for p in params]
    mine = {
        "coord": tuple(_group_ranks(pg).index(me) for _, pg in used),
        "sizes": tuple(len(_group_ranks(pg)) for _, pg in used),
        "shapes": [tuple(p.shape) for p in params],
    }
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    mesh_shape = everyone[me]["sizes"]
    where: dict[tuple[int, ...], int] = {}
    for r, info in enumerate(everyone):
        if info["sizes"] == mesh_shape:
            where.setdefault(info["coord"], r)
    ranks = []
    for flat in range(len(where)):
        coord, rem = [], flat
        for size in reversed(mesh_shape):
            coord.append(rem % size)
            rem //= size
        ranks.append(where[tuple(reversed(coord))])
    layouts = []
    for i, p in enumerate(params):
        placements = []
        for name, _ in used:
            if name == "replicate":
                placements.append(REPLICATE)
            elif name == "fsdp":
                placements.append(shard(config.fsdp_dim))
            else:
                d = config.tp_dim_per_param.get(ids[i] if ids is not None else i)
                placements.append(REPLICATE if d is None else shard(d))
        # Global size of a sharded dim: the sum of local sizes over every coordinate of the shard_axes sharding it.
        shape = list(p.shape)
        for d in {pl.dim for pl in placements if pl.is_shard}:
            shard_axes = [a for a, q in enumerate(placements) if q.is_shard and q.dim == d]
            total = 0
            for flat in range(math.prod(mesh_shape[a] for a in shard_axes)):
                coord = list(everyone[me]["coord"])
                for a in reversed(shard_axes):
                    coord[a] = flat % mesh_shape[a]
                    flat //= mesh_shape[a]
                total += everyone[where[tuple(coord)]]["shapes"][i][d]
            shape[d] = total
        lay = Layout(tuple(shape), tuple(ranks), tuple(mesh_shape), tuple(placements))
        if lay.local_shape(me) != tuple(p.shape):
            raise ValueError(
                f"parameter {i} has local shape {tuple(p.shape)} on rank {me}, but {lay.describe()} gives "
                f"{lay.local_shape(me)}: shards must follow torch.chunk sizes"
            )
        layouts.append(lay)
    return layouts


def resolve_layouts(
    params: Sequence[Tensor], config: DistributedConfig, ids: Sequence[int] | None = None
) -> list[Layout]:
    """Layouts of ``params``; ``ids`` are their indices in the optimizer (what ``tp_dim_per_param`` keys)."""
    if config.source == "dtensor" or any(isinstance(p, DTensor) for p in params):
        if not all(isinstance(p, DTensor) for p in params):
            plain = [i for i, p in enumerate(params) if not isinstance(p, DTensor)]
            raise ValueError(
                f"parameters {plain[:8]} are plain tensors while others are DTensors; wrap them as DTensors "
                "(Replicate) or use create_auto_config for plain tensors"
            )
        layouts = [dtensor_layout(p) for p in params]  # type: ignore[arg-type]  # all DTensors: checked by the caller
        me = dist.get_rank()
        for i, (p, lay) in enumerate(zip(params, layouts)):
            if me in lay.ranks and lay.local_shape(me) != tuple(p.to_local().shape):  # type: ignore[attr-defined]  # a DTensor (see above)
                raise ValueError(
                    f"parameter {i}: local shape {tuple(p.to_local().shape)} differs from "  # type: ignore[attr-defined]  # a DTensor (see above)
                    f"{lay.local_shape(me)} expected for {lay.describe()}"
                )
        return layouts
    return process_group_layouts(params, config, ids)


def comm_dtype_for(t: Tensor, config: DistributedConfig, input_dtype: torch.dtype | None = None) -> torch.dtype:
    """The wire dtype of pieces like ``t``: ``config.comm_dtype`` where the user set one (a lossy one is their
    choice), else ``input_dtype`` (the spec's: the dtype every engine casts a piece to before computing, so sending
    it is exact and distributed equals single device bit for bit), else the tensor's own."""
    if config.comm_dtype is not None:
        return config.comm_dtype
    return t.dtype if input_dtype is None else input_dtype
