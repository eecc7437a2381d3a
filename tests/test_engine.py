"""The engine's movements on real gloo ranks: Partial map, replicated results, all_reduce over layout axes,
gradient averaging of plain tensors, norm tracking without full_tensor(), and the callback config's refusals."""

from __future__ import annotations

import math

import pytest
import torch
from dist_harness import RankError, run_ranks
from torch import nn

from disco import Disco
from disco.distributed import (
    PARTIAL,
    Job,
    Placement,
    build_engine,
    create_auto_config,
    create_callback_config,
    create_dtensor_config,
    shard,
)
from disco.distributed.layout import chunk_bound
from disco.ops import LMOSpec, NormsSpec

M_SHAPE, R = (12, 10), 4
SPEC = LMOSpec(norm="spectral", backend="svd", compute_dtype=torch.float64)


def _full(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _body_partial(rank, world_size, mesh_shape, op):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", mesh_shape)
    M, Q = _full(M_SHAPE, 0), _full((M_SHAPE[1], R), 1)
    # M column-sharded over the last mesh axis (and row-sharded over the first on a 2-D mesh)
    m_pl = [Shard(1)] if len(mesh_shape) == 1 else [Shard(0), Shard(1)]
    q_pl = [Shard(0)] if len(mesh_shape) == 1 else [Replicate(), Shard(0)]
    Md = nn.Parameter(distribute_tensor(M, mesh, m_pl, src_data_rank=None))
    Qd = distribute_tensor(Q, mesh, q_pl, src_data_rank=None)
    P_local = Md.to_local() @ Qd.to_local()  # a summand of (rows of) P = M Q
    engine = build_engine([Md], create_dtensor_config())
    lay = engine.layout(0)
    pl = [Placement("partial", op=op)] if len(mesh_shape) == 1 else [shard(0), Placement("partial", op=op)]
    P_layout = lay.with_placements(pl, shape=(M_SHAPE[0], R))
    if op == "avg":
        P_local = P_local * mesh_shape[-1]  # the mean of the pieces is then M Q again
    got = {}
    for out in ("input", "replicated"):
        engine.stats.reset()
        (res,) = engine.map([Job(0, P_local, SPEC, P_layout)], out=out)
        got[out] = res
        got[out + "_sent"] = engine.stats.bytes_sent
        got[out + "_matrices"] = engine.stats.matrices_computed
        plan = engine.plan  # type: ignore[attr-defined]
        got[out + "_planned"] = plan.bytes_per_rank(element_size=8)[rank]["sent"]
    return got


@pytest.mark.parametrize(("mesh_shape", "op"), [((2,), "sum"), ((2,), "avg"), ((2, 2), "sum")])
def test_partial_map_equals_full_computation(mesh_shape, op):
    want = SPEC((_full(M_SHAPE, 0) @ _full((M_SHAPE[1], R), 1)).unsqueeze(0))[0]
    out = run_ranks(_body_partial, math.prod(mesh_shape), mesh_shape, op, timeout=90)
    assert sum(o["input_matrices"] for o in out) == 1  # reduced to one owner, computed once
    for rank, got in enumerate(out):
        torch.testing.assert_close(got["replicated"], want, atol=1e-10, rtol=0)
        if len(mesh_shape) == 1:  # Partial comes back reduced: every rank holds the whole result
            torch.testing.assert_close(got["input"], want, atol=1e-10, rtol=0)
        else:  # rows stay sharded over the first axis
            lo, hi = chunk_bound(M_SHAPE[0], 2, rank // 2)
            torch.testing.assert_close(got["input"], want[lo:hi], atol=1e-10, rtol=0)
        assert got["input_sent"] == got["input_planned"] and got["replicated_sent"] == got["replicated_planned"]
    assert sum(o["input_sent"] for o in out) > 0


def _body_all_reduce(rank, world_size, kind):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2))
    pl = [Replicate(), Shard(0)] if kind == "hsdp" else [Shard(0), Shard(1)]
    W = nn.Parameter(distribute_tensor(torch.zeros(8, 6), mesh, pl, src_data_rank=None))
    engine = build_engine([W], create_dtensor_config())
    lay = engine.layout(0)
    results = {}
    overs = ["replicas"] if kind == "hsdp" else [0, 1, "shards"]
    for over in overs:
        for op in ("sum", "avg", "max"):
            t = torch.full(W.to_local().shape, float(rank + 1))
            s = torch.tensor([float(10 * (rank + 1))])  # a second tensor, coalesced with the first
            engine.all_reduce([t, s], [lay, lay], over=over, op=op)
            results[(over, op)] = (t.unique().tolist(), s.tolist())
    return results


def _expected(ranks, op):
    vals = [r + 1 for r in ranks]
    return {"sum": sum(vals), "avg": sum(vals) / len(vals), "max": max(vals)}[op]


def test_all_reduce_over_replica_axes_hsdp():
    out = run_ranks(_body_all_reduce, 4, "hsdp", timeout=90)
    for rank, res in enumerate(out):
        replicas = [rank % 2, rank % 2 + 2]  # mesh (replicate, shard): rows of the mesh are replicas
        for op in ("sum", "avg", "max"):
            t, s = res[("replicas", op)]
            assert t == [_expected(replicas, op)]
            assert s == [10 * _expected(replicas, op)]


def test_all_reduce_over_shard_axes_fsdp_tp():
    out = run_ranks(_body_all_reduce, 4, "fsdp_tp", timeout=90)
    for rank, res in enumerate(out):
        groups = {0: [rank % 2, rank % 2 + 2], 1: [rank // 2 * 2, rank // 2 * 2 + 1], "shards": [0, 1, 2, 3]}
        for over, ranks in groups.items():
            for op in ("sum", "avg", "max"):
                t, s = res[(over, op)]
                assert t == [_expected(ranks, op)], (rank, over, op)
                assert s == [10 * _expected(ranks, op)]


def _body_average(rank, world_size, mode):
    import torch.distributed as dist

    full_w, full_g = _full((8, 6), 0).float(), _full((8, 6), 1).float()
    if mode == "fsdp":  # plain Shard(0) pieces over the world: nothing is replicated
        lo, hi = chunk_bound(8, world_size, rank)
        cfg = create_auto_config(dist.group.WORLD, average_gradients=True)
        g = full_g[lo:hi]
    else:  # HSDP 2 x 2: replicate groups {0, 2}, {1, 3}; fsdp groups {0, 1}, {2, 3}
        rep = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
        fsdp = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
        lo, hi = chunk_bound(8, 2, rank % 2)
        cfg = create_auto_config(fsdp, replicate_process_group=rep, average_gradients=True)
        # replica 0 sees g + d, replica 1 sees g - d: their mean is g
        g = full_g[lo:hi] + (1 if rank < 2 else -1) * _full((8, 6), 2).float()[lo:hi]
    W = nn.Parameter(full_w[lo:hi].clone())
    opt = Disco([W], lr=0.1, momentum=0.0, backend="svd", distributed_config=cfg)
    W.grad = g.clone()
    opt.step()
    return W.detach(), W.grad, (lo, hi)


@pytest.mark.parametrize("mode", ["fsdp", "hsdp"])
def test_average_gradients_of_plain_shards(mode):
    full_w, full_g = _full((8, 6), 0).float(), _full((8, 6), 1).float()
    W = nn.Parameter(full_w.clone())
    opt = Disco([W], lr=0.1, momentum=0.0, backend="svd")
    W.grad = full_g.clone()
    opt.step()
    out = run_ranks(_body_average, 4 if mode == "hsdp" else 2, mode, timeout=90)
    for got_w, got_g, (lo, hi) in out:
        torch.testing.assert_close(got_g, full_g[lo:hi], atol=1e-6, rtol=0)  # per-shard means
        torch.testing.assert_close(got_w, W.detach()[lo:hi], atol=1e-5, rtol=0)


def _track_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.Linear(16, 6))


def _track_opt(model, **kw):
    from disco import create_disco_param_groups

    groups, cleaned = create_disco_param_groups(model, {"lr": 0.05, "vector_algorithm": "adamw", **kw})
    return Disco(groups, **cleaned)


def _track_grads(model):
    return {n: _full(p.shape, 10 + k).float() / 4 for k, (n, p) in enumerate(model.named_parameters())}


def _body_track(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    model = _track_model()
    grads = _track_grads(model)
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _track_opt(model)
    calls = [0]
    original = DTensor.full_tensor

    def counting(self, *a, **k):
        calls[0] += 1
        return original(self, *a, **k)

    DTensor.full_tensor = counting  # type: ignore[method-assign]
    try:
        for n, p in model.named_parameters():
            p.grad = distribute_tensor(grads[n], mesh, p.placements, src_data_rank=None)
        opt.calculate_norm_at_next_step(["rms_to_rms", "supremum", "rms", "condition_number"])
        opt.step()
        norms = opt.get_norms_at_current_step()
    finally:
        DTensor.full_tensor = original  # type: ignore[method-assign]
    return norms, calls[0], opt.engine.stats.matrices_computed


def test_norm_tracking_under_fsdp2_has_no_full_tensor_and_equals_single_device():
    model = _track_model()
    opt = _track_opt(model)
    for n, p in model.named_parameters():
        p.grad = _track_grads(model)[n]
    opt.calculate_norm_at_next_step(["rms_to_rms", "supremum", "rms", "condition_number"])
    opt.step()
    want = opt.get_norms_at_current_step()
    assert "track_update_rms_to_rms/0.weight" in want and "track_param_rms/1.bias" in want
    assert "track_update_condition_number/1.weight" not in want  # vectors: rms and supremum only
    out = run_ranks(_body_track, 2, timeout=90)
    for norms, calls, _ in out:
        assert calls == 0
        assert set(norms) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(norms[k], v, atol=1e-5, rtol=1e-5, msg=k)
    assert torch.equal(torch.stack(list(out[0][0].values())), torch.stack(list(out[1][0].values())))


def _body_callbacks(rank, world_size, what):
    import torch.distributed as dist

    full = _full((6, 4), 0).float()
    lo, hi = chunk_bound(6, world_size, rank)

    def assign_fn(shapes, world):
        return {r: [i for i in range(len(shapes)) if i % world == r] for r in range(world)}

    def gather_fn(local, index, owner):
        pieces = [torch.empty(chunk_bound(6, world_size, r)[1] - chunk_bound(6, world_size, r)[0], 4) for r in range(2)]
        dist.all_gather(pieces, local.contiguous())
        return torch.cat(pieces) if rank == owner else None

    def redistribute_fn(full_or_none, index, owner, local):
        box = [full_or_none]
        dist.broadcast_object_list(box, src=owner)
        return box[0][lo:hi]

    opts = {"average_gradients": True} if what == "average" else {}
    cfg = create_callback_config(assign_fn, gather_fn, redistribute_fn, **opts)
    W = nn.Parameter(full[lo:hi].clone())
    opt = Disco([W], lr=0.1, momentum=0.0, backend="svd", distributed_config=cfg)
    W.grad = _full((6, 4), 1).float()[lo:hi].clone()
    if what == "track":
        opt.calculate_norm_at_next_step(["rms_to_rms", "supremum"])
    opt.step()
    if what == "all_reduce":
        opt.engine.all_reduce([W.detach()], [], over="replicas")
    if what == "partial":
        from disco.distributed import Layout  # any layout of its own: the callbacks engine maps parameters only

        opt.engine.map([Job(0, W.detach(), SPEC, Layout((6, 4), (0, 1), (2,), (PARTIAL,)))])
    return W.detach(), opt.get_norms_at_current_step(), opt.engine.stats.matrices_computed


def test_callback_config_movements():
    full = _full((6, 4), 0).float()
    W = nn.Parameter(full.clone())
    ref = Disco([W], lr=0.1, momentum=0.0, backend="svd")
    W.grad = _full((6, 4), 1).float()
    ref.calculate_norm_at_next_step(["rms_to_rms", "supremum"])
    ref.step()
    want_norms = ref.get_norms_at_current_step()
    # map(out="input"): gather_fn / redistribute_fn; map(out="replicated"): the owner's norms broadcast
    out = run_ranks(_body_callbacks, 2, "track", timeout=90)
    for rank, (w, norms, _) in enumerate(out):
        lo, hi = chunk_bound(6, 2, rank)
        torch.testing.assert_close(w, W.detach()[lo:hi], atol=1e-6, rtol=0)
        assert set(norms) == set(want_norms)
        for k, v in want_norms.items():
            torch.testing.assert_close(norms[k], v, atol=1e-5, rtol=1e-5)
    # average_gradients: refused when the optimizer is built, on every rank
    with pytest.raises(RankError, match="callbacks config cannot average gradients") as e:
        run_ranks(_body_callbacks, 2, "average", timeout=90)
    assert set(e.value.failures) == {0, 1}
    with pytest.raises(RankError, match="cannot reduce over mesh axes"):
        run_ranks(_body_callbacks, 2, "all_reduce", timeout=90)
    with pytest.raises(RankError, match="maps parameters only"):
        run_ranks(_body_callbacks, 2, "partial", timeout=90)


def test_local_engine_refuses_partial_and_maps_norms():
    from disco.distributed import Layout, LocalEngine

    W = torch.randn(5, 3)
    engine = LocalEngine([W])
    (norms,) = engine.map([Job(0, W, NormsSpec(("spectral", "rms")))], out="replicated")
    torch.testing.assert_close(norms[0], torch.linalg.matrix_norm(W, ord=2))
    with pytest.raises(ValueError, match="Partial layout needs a distributed engine"):
        engine.map([Job(0, W, SPEC, Layout((5, 3), (0, 1), (2,), (PARTIAL,)))])
