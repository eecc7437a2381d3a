"""Process-group configs, the callback escape hatch, engine options and byte accounting, on real ranks (the
launcher's device: CUDA + NCCL where every rank gets its own GPU, else CPU + gloo)."""

from __future__ import annotations

import pytest
import torch
from dist_harness import RankError, run_ranks
from test_dist_equivalence import SHAPES, STEPS, _assert_same, _dtensor_grad, build_optimizer, full_tensors, reference
from torch import nn

from disco.distributed import create_auto_config, create_callback_config, create_dtensor_config
from disco.distributed.launch import rank_device, rank_device_type, rank_threads
from disco.distributed.layout import chunk_bound


@pytest.fixture(autouse=True)
def _rank_threads():
    """Single-process references multiply with the ranks' thread count, so both run the same GEMM kernels (see
    ``disco.distributed.launch.RANK_THREADS``)."""
    with rank_threads():
        yield


# build_optimizer puts the matrices first, then the bias: the optimizer's own parameter numbering.
FLAT_ORDER = ["a.weight", "b.weight", "c.weight", "e.weight", "b.bias"]
TP_DIMS = {0: 0, 1: 1, 2: 0, 3: 1, 4: 0}


def _body_pg(rank, world_size, kind, mode):
    import torch.distributed as dist

    full = full_tensors(SHAPES, 0)
    if mode == "fsdp":
        fsdp_pg, tp_pg, tp_dims, fsdp_ranks = dist.group.WORLD, None, {}, list(range(world_size))
    else:  # 2 x 2: fsdp groups {0,2},{1,3}; tp groups {0,1},{2,3}
        groups_f = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        groups_t = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        fsdp_pg, tp_pg = groups_f[rank % 2], groups_t[rank // 2]
        tp_dims = TP_DIMS
        fsdp_ranks = [rank % 2, rank % 2 + 2]

    def piece(name, t):
        i = FLAT_ORDER.index(name)
        k = fsdp_ranks.index(rank)
        lo, hi = chunk_bound(t.shape[0], len(fsdp_ranks), k)
        t = t[lo:hi]
        if mode == "fsdp_tp":
            d = tp_dims[i]
            lo, hi = chunk_bound(t.shape[d], 2, rank % 2)
            t = t.narrow(d, lo, hi - lo)
        return t.clone().to(rank_device())

    params = {n: nn.Parameter(piece(n, t)) for n, t in full.items()}
    config = create_auto_config(fsdp_pg, tp_pg, tp_dims)
    opt = build_optimizer(kind, list(params.items()), distributed_config=config)
    counts = []
    for step in range(STEPS):
        for n, g in full_tensors(SHAPES, 100 + step).items():
            params[n].grad = piece(n, g)
        opt.step()
        counts.append(opt.engine.stats.matrices_computed)
    return {n: p.detach() for n, p in params.items()}, counts


@pytest.mark.parametrize("mode", ["fsdp", "fsdp_tp"])
def test_process_group_config_matches_single_device(mode):
    want, per_step = reference("disco", SHAPES)
    out = run_ranks(_body_pg, 4, "disco", mode, timeout=120)
    for rank, (got, _counts) in enumerate(out):
        assert sum(o[1][0] for o in out) == per_step
        fsdp_ranks = list(range(4)) if mode == "fsdp" else [rank % 2, rank % 2 + 2]
        for name, full in want.items():
            lo, hi = chunk_bound(full.shape[0], len(fsdp_ranks), fsdp_ranks.index(rank))
            expect = full[lo:hi]
            if mode == "fsdp_tp":
                d = TP_DIMS[FLAT_ORDER.index(name)]
                a, b = chunk_bound(expect.shape[d], 2, rank % 2)
                expect = expect.narrow(d, a, b - a)
            torch.testing.assert_close(got[name], expect, atol=1e-5, rtol=0)


def _body_callbacks(rank, world_size, bad):
    import torch.distributed as dist

    full = full_tensors(SHAPES, 0)

    def assign_fn(shapes, world):
        if bad:
            return {0: [0, 1], 1: [1, 2]}
        return {r: [i for i in range(len(shapes)) if i % world == r] for r in range(world)}

    # Parameters are replicated; the owner already has the whole tensor and broadcasts the result.
    def gather_fn(local, index, owner):
        return local if rank == owner else None

    def redistribute_fn(full_or_none, index, owner, local):
        out = full_or_none if rank == owner else torch.empty_like(local)
        out = out.contiguous()
        dist.broadcast(out, src=owner)
        return out

    params = {n: nn.Parameter(t.clone().to(rank_device())) for n, t in full.items()}
    config = create_callback_config(assign_fn, gather_fn, redistribute_fn)
    opt = build_optimizer("disco", list(params.items()), distributed_config=config)
    counts = []
    for step in range(STEPS):
        for n, g in full_tensors(SHAPES, 100 + step).items():
            params[n].grad = g.to(rank_device())
        opt.step()
        counts.append(opt.engine.stats.matrices_computed)
    return {n: p.detach() for n, p in params.items()}, counts, opt.assignments


def test_callback_config_matches_single_device():
    want, per_step = reference("disco", SHAPES)
    out = run_ranks(_body_callbacks, 2, False, timeout=60)
    for got, _, assignments in out:
        _assert_same(got, want)
        assert assignments == {0: [0, 2, 4], 1: [1, 3]}
    assert all(out[0][1][s] + out[1][1][s] == per_step for s in range(STEPS))


def test_callback_config_with_bad_assignment_fails_clearly():
    with pytest.raises(RankError, match=r"assignment coverage error.*missing=\[3, 4\].*more than once=\[1\]"):
        run_ranks(_body_callbacks, 2, True, timeout=60)


def _body_options(rank, world_size, options, split):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if split:
        mesh = init_device_mesh(rank_device_type(), (world_size,))
        place = [Shard(0)]
    else:
        mesh = init_device_mesh(rank_device_type(), (2, 2))
        place = [Replicate(), Shard(0)]
    full = full_tensors(SHAPES, 0)
    params = {n: nn.Parameter(distribute_tensor(t, mesh, place, src_data_rank=None)) for n, t in full.items()}
    config = create_dtensor_config(**options)
    opt = build_optimizer("disco", list(params.items()), distributed_config=config)
    sent, received, counts = [], [], []
    for step in range(STEPS):
        for n, g in full_tensors(SHAPES, 100 + step).items():
            _dtensor_grad(params[n], g)
        opt.step()
        sent.append(opt.engine.stats.bytes_sent)
        received.append(opt.engine.stats.bytes_received)
        counts.append(opt.engine.stats.matrices_computed)
        assert opt.engine.stats.collectives == opt.engine.plan.stats()["collectives_per_step"]
    # On an fp64 wire the fp32 results of Newton-Schulz travel back in fp32 (a narrower result is sent as it is:
    # exact), the others (vectors' LMOs) in fp64: between the two plans.
    wire = 8 if options.get("comm_dtype") == torch.float64 else 4
    planned = [opt.engine.plan.bytes_per_rank(element_size=wire, result_size=r)[rank] for r in (4, wire)]
    return {n: p.full_tensor() for n, p in params.items()}, counts, sent, received, planned, opt.engine.plan.stats()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"prefetch_count": 0, "async_gpu_parallelism": False},
        {"prefetch_count": 3, "bucket_size": 1},
        {"comm_dtype": torch.float64},
    ],
)
def test_engine_options_do_not_change_results_and_bytes_match_plan(options):
    want, per_step = reference("disco", SHAPES)
    out = run_ranks(_body_options, 4, options, True, timeout=120)
    for got, _counts, sent, received, planned, stats in out:
        _assert_same(got, want)
        lo, hi = planned
        assert len(set(sent)) == len(set(received)) == 1
        assert lo["sent"] <= sent[0] <= hi["sent"] and lo["received"] <= received[0] <= hi["received"]
        if "comm_dtype" not in options:
            assert (sent[0], received[0]) == (lo["sent"], lo["received"])
        # Uneven shards: balance wins over the owner with the biggest piece, within 1% of the bound.
        assert stats["bytes_lower_bound"] <= stats["bytes_total"] <= 1.01 * stats["bytes_lower_bound"]
        assert stats["redundancy"] == 1.0
    assert sum(o[1][0] for o in out) == per_step


def test_hsdp_without_splitting_replicas_computes_once_per_replica():
    want, per_step = reference("disco", SHAPES)
    out = run_ranks(_body_options, 4, {"split_replicas": False}, False, timeout=120)
    for got, *_ in out:
        _assert_same(got, want)
    assert sum(o[1][0] for o in out) == 2 * per_step  # two replicas, each computes everything once
