"""Distributed NorMuon on gloo ranks: FSDP2 (uneven rows), HSDP and FSDP x TP equal one process after 3 steps,
each matrix is orthogonalized once per step over all ranks, and the row statistics stay sharded like the rows."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from test_dist_dion import _mesh_and_placements
from torch import nn

from disco import NorMuon
from disco.distributed.launch import rank_threads


@pytest.fixture(autouse=True)
def _rank_threads():
    """Single-process references multiply with the ranks' thread count, so both run the same GEMM kernels (see
    ``disco.distributed.launch.RANK_THREADS``)."""
    with rank_threads():
        yield


SHAPES = {"a": (97, 64), "c": (18, 32), "e": (4, 10, 6)}
STEPS = 3
KW = dict(lr=0.05, momentum=0.9, beta2=0.9, weight_decay=0.1, compute_dtype=torch.float32)


def _full(seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) / 4 for n, s in SHAPES.items()}


def _placements_for(name, pl):
    from torch.distributed.tensor import Shard

    if name == "e":  # expert stack: shard the rows (dim 1) and columns (dim 2) instead of the experts
        return [Shard(p.dim + 1) if isinstance(p, Shard) else p for p in pl]
    return pl


def _body(rank, world_size, layout):
    from torch.distributed.tensor import distribute_tensor

    mesh, pl = _mesh_and_placements(layout, world_size)
    params = {
        n: nn.Parameter(distribute_tensor(t, mesh, _placements_for(n, pl), src_data_rank=None))
        for n, t in _full(0).items()
    }
    opt = NorMuon(list(params.items()), **KW)
    computed = []
    for step in range(STEPS):
        for n, g in _full(100 + step).items():
            p = params[n]
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        opt.step()
        computed.append(opt.engine.stats.matrices_computed)
    out = {n: p.full_tensor() for n, p in params.items()}
    v = {n: opt.state[p]["row_var"] for n, p in params.items()}
    placements = {n: tuple(str(x) for x in t.placements) for n, t in v.items()}
    return out, {n: t.full_tensor() for n, t in v.items()}, placements, computed


def _reference():
    params = {n: nn.Parameter(t.clone()) for n, t in _full(0).items()}
    opt = NorMuon(list(params.items()), **KW)
    for step in range(STEPS):
        for n, g in _full(100 + step).items():
            params[n].grad = g
        opt.step()
    return {n: p.detach() for n, p in params.items()}, {n: opt.state[p]["row_var"] for n, p in params.items()}


@pytest.mark.parametrize(("layout", "world"), [("fsdp", 3), ("hsdp", 4), ("fsdp_tp", 4)])
def test_distributed_equals_one_process(layout, world):
    want, want_v = _reference()
    out = run_ranks(_body, world, layout, timeout=120)
    for got, v, placements, _ in out:
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0)
            torch.testing.assert_close(v[n], want_v[n], atol=1e-5, rtol=1e-5)
        assert placements["a"] == {"fsdp": ("S(0)",), "hsdp": ("R", "S(0)"), "fsdp_tp": ("S(0)", "R")}[layout]
    matrices = 2 + SHAPES["e"][0]  # two matrices and one stack of experts
    for step in range(STEPS):
        assert sum(o[3][step] for o in out) == matrices  # each matrix orthogonalized once per step


def _params(layout, world):
    from torch.distributed.tensor import distribute_tensor

    mesh, pl = _mesh_and_placements(layout, world)
    return {
        n: nn.Parameter(distribute_tensor(t, mesh, _placements_for(n, pl), src_data_rank=None))
        for n, t in _full(0).items()
    }


def _grads_to(params, step):
    from torch.distributed.tensor import distribute_tensor

    for n, g in _full(100 + step).items():
        p = params[n]
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)


def _body_save(rank, world_size, path):
    import torch.distributed.checkpoint as dcp

    params = _params("fsdp_tp", world_size)
    opt = NorMuon(list(params.items()), **KW)
    for step in range(STEPS - 1):
        _grads_to(params, step)
        opt.step()
    dcp.save({"params": params, "optim": opt.state_dict()}, checkpoint_id=path)
    return sorted(opt.state_dict()["state"][0])


def _body_load(rank, world_size, path):
    import torch.distributed.checkpoint as dcp

    params = _params("fsdp", world_size)
    opt = NorMuon(list(params.items()), **KW)
    state = {"params": params, "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=path)
    opt.load_state_dict(state["optim"])
    _grads_to(params, STEPS - 1)
    opt.step()
    return {n: p.full_tensor() for n, p in params.items()}


def test_dcp_saves_at_4_ranks_and_resumes_at_3(tmp_path):
    """The row statistics are DTensors laid out like the rows: DCP reshards them from FSDP x TP to FSDP x3."""
    want, _ = _reference()
    path = str(tmp_path / "ckpt")
    assert run_ranks(_body_save, 4, path, timeout=120)[0] == ["momentum_buffer", "row_var"]
    for got in run_ranks(_body_load, 3, path, timeout=120):
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0)
