"""Optimizer state whose shape differs from its parameter's, laid out so that DCP saves and reshards it.

Dion's ``Q`` (``n x r``) of an ``m x n`` weight follows the weight's column sharding: its dim 0 is sharded like
the weight's dim 1 and it is replicated over every other axis. ``derived_zeros`` makes such a tensor: a DTensor on
the parameter's mesh with placements from ``Layout.derive`` (so ``torch.distributed.checkpoint`` sees an ordinary
sharded tensor), or a plain tensor for a plain parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement as TorchPlacement

from .layout import Layout, Placement
from .resolve import dtensor_layout


def torch_placement(p: Placement) -> TorchPlacement:
    """The DTensor placement of a layout placement (``Partial`` is never state: refused)."""
    if p.kind == "shard":
        return Shard(p.dim)
    if p.kind == "strided_shard":
        from torch.distributed.tensor.placement_types import _StridedShard

        return _StridedShard(p.dim, split_factor=p.split_factor)
    if p.kind == "replicate":
        return Replicate()
    raise ValueError(f"state cannot be {p} (a Partial sum); reduce it first")


def derived_layout(param: Tensor, shape: Sequence[int], follows: dict[int, int]) -> Layout | None:
    """The layout of a ``shape`` tensor whose dim ``d`` is sharded like ``param``'s dim ``follows[d]``."""
    if not isinstance(param, DTensor):
        return None
    return dtensor_layout(param).derive(tuple(shape), follows)


def derived_zeros(
    param: Tensor, shape: Sequence[int], follows: dict[int, int], *, dtype: torch.dtype | None = None
) -> Tensor:
    """Zeros of global ``shape`` laid out like ``param`` along ``follows`` (``{state dim: param dim}``).

    For a DTensor parameter the result is a DTensor on its mesh whose local piece is this rank's; for a plain
    parameter, a plain tensor of ``shape``.
    """
    dtype = dtype or param.dtype
    lay = derived_layout(param, shape, follows)
    if lay is None:
        return torch.zeros(tuple(shape), dtype=dtype, device=param.device)
    assert isinstance(param, DTensor)
    mesh = param.device_mesh
    rank = int(mesh.get_rank())
    local = torch.zeros(lay.local_shape(rank), dtype=dtype, device=param.to_local().device)
    placements = [torch_placement(p) for p in lay.placements]
    return DTensor.from_local(local, mesh, placements, shape=torch.Size(shape), stride=_contiguous_stride(shape))


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))
