"""Process group, device mesh and model wrapping for ``--parallel none|ddp|fsdp|hsdp|tp|fsdp+tp``.

Mesh dimension names::

    ddp      ("dp",)                          DistributedDataParallel over all ranks
    fsdp     ("dp_shard",)                    FSDP2: fully_shard per block, then the root
    hsdp     ("dp_replicate", "dp_shard")     FSDP2 on a 2-D mesh: replicate x shard
    tp       ("tp",)                          parallelize_module: colwise q/k/v/w1/w3, rowwise wo/w2
    fsdp+tp  ("dp_shard", "tp")               TP inside each data-parallel group, FSDP2 across them
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from disco.train.model import GPT, Block

PARALLEL_MODES = ("none", "ddp", "fsdp", "hsdp", "tp", "fsdp+tp")


@dataclass
class World:
    parallel: str
    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None
    dp_rank: int  # which slice of the global batch this rank trains on
    dp_size: int
    owns_process_group: bool = False
    threads: int = 1  # torch's intra-op threads in this process
    threads_auto: bool = True  # chosen by init_world (cores / processes here), not by --threads

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def layout(self) -> str:
        """The layout in words, as the mesh has it: ``"1 replica x 2 shards"`` for HSDP on 2 ranks."""
        mesh = self.mesh
        if self.parallel == "none" or mesh is None:
            return "1 process"
        sizes = dict(zip(mesh.mesh_dim_names or (), mesh.mesh.shape))
        if self.parallel == "ddp":
            return f"{self.world_size} replicas"
        if self.parallel == "fsdp":
            return f"{self.world_size} shards"
        if self.parallel == "tp":
            return f"{self.world_size}-way tensor parallel"
        if self.parallel == "hsdp":
            r, sh = sizes["dp_replicate"], sizes["dp_shard"]
            return f"{_plural(r, 'replica')} x {_plural(sh, 'shard')}"
        return f"{_plural(sizes['dp_shard'], 'shard')} x {sizes['tp']}-way tensor parallel"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def auto_threads(processes: int) -> int:
    """CPU threads per process when ``--threads`` is 0: this machine's cores over its processes (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_world(
    parallel: str = "none", device: str = "auto", tp_size: int = 2, dp_shard: int = 0, threads: int = 0
) -> World:
    """Start the process group if launched by torchrun (RANK / WORLD_SIZE set) and build the mesh.

    ``threads``: torch's CPU threads in this process (``torch.set_num_threads``); 0 picks
    :func:`auto_threads` of the processes on this machine (``LOCAL_WORLD_SIZE``), so ranks do not oversubscribe
    the cores (torch's own default is every core in every process), unless the caller initialised the process
    group itself (its threads are kept).
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"unknown --parallel {parallel!r}; valid: {', '.join(PARALLEL_MODES)}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if threads or not dist.is_initialized():  # a process group set up by the caller keeps its threads
        torch.set_num_threads(threads or auto_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    n_threads = torch.get_num_threads()
    if world_size == 1 and not dist.is_initialized():
        if parallel != "none":
            print(f"[disco] one process: --parallel {parallel} needs torchrun; running without parallelism")
        return World("none", 0, 1, dev, None, 0, 1, threads=n_threads, threads_auto=not threads)
    if parallel == "none":
        raise ValueError("several ranks need --parallel ddp|fsdp|hsdp|tp|fsdp+tp")
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=10), device_id=dev if backend == "nccl" else None)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shape, names = _mesh_shape(parallel, world_size, tp_size, dp_shard)
    mesh = init_device_mesh(dev.type, shape, mesh_dim_names=names)
    if parallel in ("ddp", "fsdp", "hsdp"):
        dp_rank, dp_size = rank, world_size
    elif parallel == "tp":
        dp_rank, dp_size = 0, 1
    else:  # fsdp+tp: ranks of one TP group share a batch slice
        dp_rank, dp_size = mesh["dp_shard"].get_local_rank(), mesh["dp_shard"].size()
    return World(parallel, rank, world_size, dev, mesh, dp_rank, dp_size, owns, n_threads, not threads)


def _mesh_shape(parallel: str, world: int, tp_size: int, dp_shard: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if parallel == "ddp":
        return (world,), ("dp",)
    if parallel == "fsdp":
        return (world,), ("dp_shard",)
    if parallel == "tp":
        return (world,), ("tp",)
    if parallel == "hsdp":
        shard = dp_shard or (world // 2 if world >= 4 and world % 2 == 0 else world)
        if world % shard:
            raise ValueError(f"dp_shard={shard} does not divide the world size {world}")
        return (world // shard, shard), ("dp_replicate", "dp_shard")
    if world % tp_size:
        raise ValueError(f"tp_size={tp_size} does not divide the world size {world}")
    return (world // tp_size, tp_size), ("dp_shard", "tp")


def _replicate(module: nn.Module, mesh: DeviceMesh) -> None:
    """Parameters become ``Replicate`` DTensors; inputs and outputs stay plain tensors."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def to_dtensor(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], device_mesh: DeviceMesh) -> tuple[DTensor, ...]:
        return tuple(DTensor.from_local(x, device_mesh, [Replicate()], run_check=False) for x in inputs)

    def to_local(_mod: nn.Module, output: DTensor, _mesh: DeviceMesh) -> torch.Tensor:
        return output.to_local()

    distribute_module(module, mesh, input_fn=to_dtensor, output_fn=to_local)  # type: ignore[arg-type]  # torch types the hooks as returning None; it uses their results


def apply_tp(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP: heads and FFN hidden units split over the ``tp`` mesh.

    Embedding and head are split over the vocabulary (their outputs gathered), the norms replicated, so
    that every parameter is a DTensor on the same mesh, as a distributed optimizer expects.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        ParallelStyle,
        RowwiseParallel,
        parallelize_module,
    )

    cfg = model.cfg
    if cfg.fused_qkv:
        raise ValueError("tensor parallelism needs separate wq/wk/wv (fused_qkv: false)")
    if cfg.n_experts:
        raise ValueError("tensor parallelism does not split experts: use --parallel fsdp for a MoE model")
    if cfg.n_heads % tp_mesh.size():
        raise ValueError(f"n_heads={cfg.n_heads} is not divisible by the TP degree {tp_mesh.size()}")
    plan: dict[str, ParallelStyle] = {f"attention.{n}": ColwiseParallel() for n in ("wq", "wk", "wv")}
    plan.update({"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel()})
    plan.update({"attention.wo": RowwiseParallel(), "feed_forward.w2": RowwiseParallel()})
    for block in model.layers:
        assert isinstance(block, Block)  # nn.ModuleList yields plain Modules
        parallelize_module(block, tp_mesh, plan)
        _replicate(block.attention_norm, tp_mesh)
        _replicate(block.ffn_norm, tp_mesh)
    rep = Replicate()
    parallelize_module(model.tok_embeddings, tp_mesh, RowwiseParallel(input_layouts=rep, output_layouts=rep))
    parallelize_module(model.output, tp_mesh, ColwiseParallel(input_layouts=rep, output_layouts=rep))
    # The gathered logits come back as a view of the all-gather's buffer; FSDP2 (--parallel fsdp+tp) warns that
    # an in-place op on a root module's view output would skip its pre-backward hook. A copy (batch x seq x vocab)
    # makes the model's output its own tensor.
    model.output.register_forward_hook(_own_tensor)
    _replicate(model.norm, tp_mesh)


def _own_tensor(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output.clone()


def apply_fsdp(model: GPT, mesh: DeviceMesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def parallelize(model: GPT, world: World) -> nn.Module:
    """Wrap ``model`` (already on its device, identically initialised on every rank) for ``world``.

    Returns the module to call for the forward pass (the DDP wrapper under DDP, ``model`` otherwise);
    the optimizer always gets ``model`` itself so that parameter names keep their TorchTitan form.
    """
    mesh = world.mesh
    if world.parallel == "none" or mesh is None:
        return model
    if world.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, process_group=mesh.get_group())
    if world.parallel in ("tp", "fsdp+tp"):
        apply_tp(model, mesh["tp"])
    if world.parallel in ("fsdp", "hsdp"):
        apply_fsdp(model, mesh)
    elif world.parallel == "fsdp+tp":
        apply_fsdp(model, mesh["dp_shard"])
    return model


def all_mean(x: float, world: World) -> float:
    """Mean of a Python float over all ranks (identity in one process)."""
    if world.world_size == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.item() / world.world_size


def barrier(world: World) -> None:
    if world.world_size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
