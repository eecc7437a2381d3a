"""Distributed checkpointing: optimizer state keeps the parameters' layout, so DCP saves and reshards it."""

from __future__ import annotations

import pytest
from dist_harness import run_ranks
from test_dist_equivalence import SHAPES, STEPS, _assert_same, _dtensor_grad, build_optimizer, full_tensors, reference
from torch import nn


def _params_on(world_size: int, layout: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world_size // 2))
        place = [Replicate(), Shard(0)]
    else:
        mesh = init_device_mesh("cpu", (world_size,))
        place = [Shard(0)]
    full = full_tensors(SHAPES, 0)
    return {n: nn.Parameter(distribute_tensor(t, mesh, place, src_data_rank=None)) for n, t in full.items()}


def _state(params, opt):
    return {"params": dict(params), "optim": opt.state_dict()}


def _body_save(rank, world_size, kind, layout, path):
    import torch.distributed.checkpoint as dcp

    params = _params_on(world_size, layout)
    opt = build_optimizer(kind, list(params.items()))
    for step in range(STEPS - 1):
        for n, g in full_tensors(SHAPES, 100 + step).items():
            _dtensor_grad(params[n], g)
        opt.step()
    dcp.save(_state(params, opt), checkpoint_id=path)
    return sorted(opt.state_dict()["state"][0])


def _body_load(rank, world_size, kind, layout, path):
    import torch.distributed.checkpoint as dcp

    params = _params_on(world_size, layout)
    opt = build_optimizer(kind, list(params.items()))
    state = _state(params, opt)  # every state tensor exists already: DCP loads in place, no dummy step
    dcp.load(state, checkpoint_id=path)
    opt.load_state_dict(state["optim"])
    for n, g in full_tensors(SHAPES, 100 + STEPS - 1).items():
        _dtensor_grad(params[n], g)
    opt.step()
    return {n: p.full_tensor() for n, p in params.items()}


@pytest.mark.parametrize(
    ("kind", "save", "load"),
    [("disco", (4, "fsdp"), (2, "fsdp")), ("muon", (2, "fsdp"), (4, "hsdp")), ("scion", (4, "hsdp"), (3, "fsdp"))],
)
def test_dcp_reshards_optimizer_state(tmp_path, kind, save, load):
    want, _ = reference(kind, SHAPES)
    path = str(tmp_path / "ckpt")
    keys = run_ranks(_body_save, save[0], kind, save[1], path, timeout=120)
    assert keys[0] == ["momentum_buffer"]
    out = run_ranks(_body_load, load[0], kind, load[1], path, timeout=120)
    for got in out:
        _assert_same(got, want)
