"""Distribution configs: how an optimizer learns where its parameters live."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


@dataclass
class DistributedConfig:
    """Where parameters live and how the engine runs.

    ``source`` is ``"dtensor"`` (layouts read from DTensor parameters), ``"process_groups"`` (plain tensors
    with the groups below), ``"callbacks"`` (the escape hatch: ``assign_fn``, ``gather_fn``,
    ``redistribute_fn``) or ``"local"`` (this process alone: what ``distributed_config=None`` gives plain tensors,
    with options).

    Options:
        prefetch_count: buckets whose gather is in flight ahead of the one being computed.
        async_gpu_parallelism: issue the results' return asynchronously (overlaps the next bucket's compute).
        comm_dtype: dtype on the wire; ``None`` (default) sends each piece in the dtype its spec computes from
            (``input_dtype``: bf16 for a bf16 compute dtype, which one process casts to at the same point, else
            the tensor's own), so that distributed equals one process bit for bit. Set, it decides the wire: a
            lossy ``torch.bfloat16`` halves the bytes of fp32 pieces under fp32 compute (see the README for its
            measured error); ``torch.float32`` sends fp32 pieces under bf16 compute (still exact, twice the bytes).
        bucket_size: most tensors per exchange (``None``: one exchange per key and shape).
        split_replicas: spread the work over replicas too (HSDP, DDP): every matrix computed once globally.
            ``False`` keeps each replica's work inside the replica (repeated per replica, less traffic across).
        average_gradients: for plain replicated tensors without a DDP wrapper, average gradients over the
            replicas before the step.
        stack_bytes: most input bytes of one batched spec call: same-shape tensors are stacked into one kernel
            up to this size, a larger tensor runs alone (0: one tensor per call). ``None``: one call per shape,
            however large. Default ``"auto"``: 0 on CPU, 64 MiB on accelerators
            (``disco.distributed.engine.auto_stack_bytes``).
    """

    source: str = "dtensor"
    fsdp_process_group: ProcessGroup | None = None
    tp_process_group: ProcessGroup | None = None
    replicate_process_group: ProcessGroup | None = None
    tp_dim_per_param: dict[int, int] = field(default_factory=dict)
    fsdp_dim: int = 0
    assign_fn: Callable[..., dict[int, list[int]]] | None = None
    gather_fn: Callable[..., torch.Tensor | None] | None = None
    redistribute_fn: Callable[..., torch.Tensor] | None = None
    prefetch_count: int = 1
    async_gpu_parallelism: bool = True
    comm_dtype: torch.dtype | None = None
    bucket_size: int | None = None
    split_replicas: bool = True
    average_gradients: bool = False
    stack_bytes: int | str | None = "auto"

    def __post_init__(self) -> None:
        sb = self.stack_bytes
        if sb is not None and sb != "auto" and (isinstance(sb, bool) or not isinstance(sb, int) or sb < 0):
            raise ValueError(f"stack_bytes must be 'auto', an int >= 0 or None, got {sb!r}")
        if self.source not in ("dtensor", "process_groups", "callbacks", "local"):
            raise ValueError(f"unknown distributed config source {self.source!r}")
        if self.source == "callbacks" and not (self.assign_fn and self.gather_fn and self.redistribute_fn):
            raise ValueError("a callbacks config needs assign_fn, gather_fn and redistribute_fn")
        if self.prefetch_count < 0:
            raise ValueError(f"prefetch_count must be >= 0, got {self.prefetch_count}")


def create_dtensor_config(**options: Any) -> DistributedConfig:
    """Config for DTensor parameters (FSDP2, TP, HSDP, EP, CP): layouts come from the parameters themselves."""
    return DistributedConfig(source="dtensor", **options)


def create_auto_config(
    fsdp_process_group: ProcessGroup | None = None,
    tp_process_group: ProcessGroup | None = None,
    tp_dim_per_param: dict[int, int] | None = None,
    *,
    replicate_process_group: ProcessGroup | None = None,
    **options: Any,
) -> DistributedConfig:
    """Config for plain tensors under user-managed groups.

    With no group at all, parameters are replicated over the default group (DDP, CP). ``fsdp_process_group``
    shards every parameter on dim 0 (``torch.chunk`` sizes); ``tp_process_group`` shards parameter ``i`` on
    ``tp_dim_per_param[i]``, ``i`` counting the optimizer's parameters over its groups in order, as
    ``state_dict()`` numbers them (parameters missing there are replicated over TP); ``replicate_process_group`` adds
    a replicated axis (HSDP).
    """
    return DistributedConfig(
        source="process_groups",
        fsdp_process_group=fsdp_process_group,
        tp_process_group=tp_process_group,
        replicate_process_group=replicate_process_group,
        tp_dim_per_param=dict(tp_dim_per_param or {}),
        **options,
    )


def create_local_config(**options: Any) -> DistributedConfig:
    """Config for one process with options (``stack_bytes``); ``distributed_config=None`` is this with defaults."""
    return DistributedConfig(source="local", **options)


def create_callback_config(
    assign_fn: Callable[..., dict[int, list[int]]],
    gather_fn: Callable[..., torch.Tensor | None],
    redistribute_fn: Callable[..., torch.Tensor],
    **options: Any,
) -> DistributedConfig:
    """The escape hatch for frameworks of their own.

    ``assign_fn(shapes: list[tuple], world_size) -> {rank: [param indices]}``; ``gather_fn(local, index, owner)``
    is called on every rank, in parameter order, and returns the full tensor on ``owner`` (``None`` elsewhere);
    ``redistribute_fn(full_or_none, index, owner, local)`` is called on every rank and returns its local piece.
    """
    return DistributedConfig(
        source="callbacks",
        assign_fn=assign_fn,
        gather_fn=gather_fn,
        redistribute_fn=redistribute_fn,
        **options,
    )
