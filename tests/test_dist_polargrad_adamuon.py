"""Distributed PolarGrad and AdaMuon on gloo ranks: FSDP2 x3 (uneven rows), HSDP 2x2 and FSDP x TP 2x2 equal one
process after 3 steps; each matrix is orthogonalized once per step, and the only bytes beyond Muon's are the
all-reduce of one number per matrix (the nuclear norm / the Frobenius norm of the normalized update), never a
second gather; AdaMuon's second moment stays laid out like its parameter and DCP reshards it."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from test_dist_dion import _mesh_and_placements
from torch import nn

from disco import AdaMuon, Muon, PolarGrad

SHAPES = {"a": (97, 64), "c": (18, 32), "e": (4, 10, 6)}
STEPS = 3
COMMON = dict(lr=0.01, momentum=0.9, weight_decay=0.1, compute_dtype=torch.float32)
CASES = {
    "polargrad": (PolarGrad, COMMON),
    "polargrad_first": (PolarGrad, dict(COMMON, polar_first=True)),
    "polargrad_nesterov": (PolarGrad, dict(COMMON, nesterov=True)),
    "adamuon": (AdaMuon, dict(COMMON, beta2=0.9)),
}
MATRICES = 2 + SHAPES["e"][0]  # two matrices and one stack of experts


def _full(seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) / 4 for n, s in SHAPES.items()}


def _placements_for(name, pl):
    from torch.distributed.tensor import Shard

    if name == "e":  # expert stack: shard the rows (dim 1) and columns (dim 2) instead of the experts
        return [Shard(p.dim + 1) if isinstance(p, Shard) else p for p in pl]
    return pl


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


def _steps(opt, params):
    stats = []
    for step in range(STEPS):
        _grads_to(params, step)
        opt.step()
        stats.append((opt.engine.stats.matrices_computed, opt.engine.stats.bytes_sent))
    return stats


def _body(rank, world_size, layout, case):
    cls, kw = CASES[case]
    params = _params(layout, world_size)
    opt = cls(list(params.items()), **kw)
    stats = _steps(opt, params)
    out = {n: p.full_tensor() for n, p in params.items()}
    state = {}
    for n, p in params.items():
        for key, t in opt.state[p].items():
            state[(n, key)] = (t.full_tensor(), tuple(str(x) for x in t.placements) == tuple(map(str, p.placements)))
    # the same momentum and LMO jobs under Muon: what the map alone moves
    muon_params = _params(layout, world_size)
    muon_kw = {k: v for k, v in kw.items() if k not in ("polar_first", "beta2")}
    muon = Muon(list(muon_params.items()), **{**muon_kw, "nesterov": kw.get("nesterov", case == "adamuon")})
    muon_bytes = [b for _, b in _steps(muon, muon_params)]
    return out, state, stats, muon_bytes


def _reference(case):
    cls, kw = CASES[case]
    params = {n: nn.Parameter(t.clone()) for n, t in _full(0).items()}
    opt = cls(list(params.items()), **kw)
    for step in range(STEPS):
        for n, g in _full(100 + step).items():
            params[n].grad = g
        opt.step()
    state = {(n, key): t for n, p in params.items() for key, t in opt.state[p].items()}
    return {n: p.detach() for n, p in params.items()}, state


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("layout", "world"), [("fsdp", 3), ("hsdp", 4), ("fsdp_tp", 4)])
def test_distributed_equals_one_process(layout, world, case):
    want, want_state = _reference(case)
    out = run_ranks(_body, world, layout, case, timeout=180)
    for got, state, stats, muon_bytes in out:
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0)
        assert set(state) == set(want_state)
        for key, (t, laid_out_like_param) in state.items():
            torch.testing.assert_close(t, want_state[key], atol=1e-5, rtol=1e-5)
            assert laid_out_like_param, key
        for (_, sent), base in zip(stats, muon_bytes):
            # beyond the map: at most one float32 per matrix per summed dim (2 for a stack's rows and columns)
            assert 0 <= sent - base <= 4 * 2 * MATRICES, (sent, base)
    for step in range(STEPS):
        assert sum(o[2][step][0] for o in out) == MATRICES  # each matrix orthogonalized once per step
    if layout != "hsdp":  # every rank holds a piece of every matrix: the norms must travel
        assert any(sent > base for o in out for (_, sent), base in zip(o[2], o[3]))


def _body_save(rank, world_size, path):
    import torch.distributed.checkpoint as dcp

    cls, kw = CASES["adamuon"]
    params = _params("fsdp_tp", world_size)
    opt = cls(list(params.items()), **kw)
    for step in range(STEPS - 1):
        _grads_to(params, step)
        opt.step()
    dcp.save({"params": params, "optim": opt.state_dict()}, checkpoint_id=path)
    return sorted(opt.state_dict()["state"][0])


def _body_load(rank, world_size, path):
    import torch.distributed.checkpoint as dcp

    cls, kw = CASES["adamuon"]
    params = _params("fsdp", world_size)
    opt = cls(list(params.items()), **kw)
    state = {"params": params, "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=path)
    opt.load_state_dict(state["optim"])
    _grads_to(params, STEPS - 1)
    opt.step()
    return {n: p.full_tensor() for n, p in params.items()}


def test_adamuon_dcp_saves_at_4_ranks_and_resumes_at_3(tmp_path):
    """The second moment is a DTensor laid out like its parameter: DCP reshards it from FSDP x TP to FSDP x3."""
    want, _ = _reference("adamuon")
    path = str(tmp_path / "ckpt")
    assert run_ranks(_body_save, 4, path, timeout=120)[0] == ["momentum_buffer", "second_moment"]
    for got in run_ranks(_body_load, 3, path, timeout=120):
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0)
