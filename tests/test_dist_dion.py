"""Distributed Dion on real ranks (CUDA + NCCL where every rank gets its own GPU, else gloo): equals one process
for every layout, compressed sync equals the compressed algorithm, bytes counted by the engine, a mesh that
contradicts the placements is refused, DCP reshards M and Q."""

from __future__ import annotations

import math

import pytest
import torch
from dist_harness import RankError, run_ranks
from torch import nn

from disco import Dion
from disco.distributed.launch import rank_device, rank_device_type, rank_threads

# one process as the oracle, to fp32 rounding: fp32 matmuls in fp32 whatever the session's precision (Dion under
# "medium": tests/test_dion_precision.py)
pytestmark = pytest.mark.usefixtures("fp32_matmuls")


@pytest.fixture(autouse=True)
def _rank_threads():
    """Single-process references multiply with the ranks' thread count, so both run the same GEMM kernels (see
    ``disco.distributed.launch.RANK_THREADS``)."""
    with rank_threads():
        yield


SHAPES = {"a": (97, 64), "c": (18, 32)}
STEPS = 3
KW = dict(lr=0.05, mu=0.9, weight_decay=0.1, rank_fraction=0.5, qr_method="rcqr")


def _full(seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) / 4 for n, s in SHAPES.items()}


def _mesh_and_placements(layout, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    if layout == "fsdp":
        return init_device_mesh(rank_device_type(), (world,)), [Shard(0)]
    if layout == "fsdp_tp":
        return init_device_mesh(rank_device_type(), (2, 2)), [Shard(0), Shard(1)]
    if layout == "hsdp":
        return init_device_mesh(rank_device_type(), (2, 2)), [Replicate(), Shard(0)]
    raise ValueError(layout)


def _replica(layout, rank):
    return {"ddp": rank, "hsdp": rank // 2}.get(layout, 0)


def _body(rank, world_size, layout, sync, same_batch, extra):
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    full = _full(0)
    if layout == "ddp":
        params = {n: nn.Parameter(t.clone().to(rank_device())) for n, t in full.items()}
        opt = Dion(
            list(params.items()), replicate_mesh=dist.group.WORLD, replicate_mesh_grad_sync=sync, **{**KW, **extra}
        )
    else:
        mesh, pl = _mesh_and_placements(layout, world_size)
        params = {n: nn.Parameter(distribute_tensor(t, mesh, pl, src_data_rank=None)) for n, t in full.items()}
        opt = Dion(list(params.items()), replicate_mesh_grad_sync=sync, **{**KW, **extra})
    sent = []
    for step in range(STEPS):
        seed = 100 + step + (0 if same_batch else 1000 * _replica(layout, rank))
        for n, g in _full(seed).items():
            p = params[n]
            p.grad = (
                g.to(rank_device())
                if layout == "ddp"
                else distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
            )
        opt.step()
        sent.append(opt.engine.stats.bytes_sent)
    out = {n: (p.full_tensor() if layout != "ddp" else p.detach()) for n, p in params.items()}
    return out, sent, opt.engine.stats.matrices_computed


def _reference(extra=None):
    params = {n: nn.Parameter(t.clone()) for n, t in _full(0).items()}
    opt = Dion(list(params.items()), **{**KW, **(extra or {})})
    for step in range(STEPS):
        for n, g in _full(100 + step).items():
            params[n].grad = g
        opt.step()
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.parametrize(("layout", "world"), [("ddp", 2), ("fsdp", 2), ("fsdp", 4), ("fsdp_tp", 4), ("hsdp", 4)])
def test_synced_gradients_equal_one_process(layout, world):
    want = _reference()
    out = run_ranks(_body, world, layout, False, True, {}, timeout=120)
    for got, _, _ in out:
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0)
    assert sum(o[2] for o in out) == len(SHAPES)  # each P orthonormalized once over all ranks


def test_overlapped_batches_give_the_same_results():
    want = _reference()
    for got, _, _ in run_ranks(_body, 2, "fsdp", False, True, {"overlap_batches": 1}, timeout=120):
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0)


def test_power_iterations_and_cqr_under_fsdp_tp():
    extra = {"power_iters": 2, "qr_method": "cqr", "cqr_warmup_steps": 1}
    want = _reference(extra)
    for got, _, _ in run_ranks(_body, 4, "fsdp_tp", False, True, extra, timeout=120):
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["ddp", "hsdp"])
def test_compressed_sync_with_the_same_batch_equals_one_process(layout):
    want = _reference()
    for got, _, _ in run_ranks(_body, 2 if layout == "ddp" else 4, layout, True, True, {}, timeout=120):
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0)


def compressed_reference(replicas: int):
    """Dion with compressed data-parallel sync, simulated in one process in float64: each replica keeps its own
    momentum; P and R are averaged over replicas; every replica applies the same update."""
    X = {n: t.double().T for n, t in _full(0).items()}
    probe = Dion([nn.Parameter(torch.zeros(s)) for s in SHAPES.values()], **KW)
    Q = {n: probe.state[p]["Q"].double() for n, p in zip(SHAPES, probe.param_groups[0]["params"])}
    M = {n: [torch.zeros_like(X[n]) for _ in range(replicas)] for n in SHAPES}
    lr, mu, wd, eps = KW["lr"], KW["mu"], KW["weight_decay"], 1e-8
    for step in range(STEPS):
        grads = [_full(100 + step + 1000 * k) for k in range(replicas)]
        for n in SHAPES:
            # the default orientation ("columns"): Algorithm 1 on the transposes, M and X kept transposed here
            B = [M[n][k] + grads[k][n].double().T for k in range(replicas)]
            P = sum(b @ Q[n] for b in B) / replicas
            P, Rq = torch.linalg.qr(P)
            P = P * torch.sign(torch.diagonal(Rq))
            R = sum(b.T @ P for b in B) / replicas
            for k in range(replicas):
                M[n][k] = B[k] - (1 - mu) * P @ R.T
            Q[n] = R / (R.norm(dim=0, keepdim=True) + eps)
            c, m = X[n].shape  # X[n] is the transposed weight
            X[n] = (1 - lr * wd) * X[n] - lr * math.sqrt(m / c) * P @ Q[n].T
    return {n: x.T.float() for n, x in X.items()}


@pytest.mark.parametrize("layout", ["ddp", "hsdp"])
def test_compressed_sync_with_different_batches_equals_the_compressed_algorithm(layout):
    want = compressed_reference(2)
    out = run_ranks(_body, 2 if layout == "ddp" else 4, layout, True, False, {}, timeout=120)
    for got, _, _ in out:
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0)
    assert all(torch.equal(out[0][0][n], o[0][n]) for o in out for n in SHAPES)  # replicas stay equal


def test_compressed_sync_moves_low_rank_factors_only():
    out = run_ranks(_body, 2, "ddp", True, False, {"rank_fraction": 0.25}, timeout=120)
    per_step = sum(o[1][-1] for o in out)  # bytes the engine counted, both ranks, one step
    mn = sum(m * n for m, n in SHAPES.values()) * 4 * 2  # a gradient all-reduce: m n per rank
    r = {n: math.ceil(0.25 * min(s)) for n, s in SHAPES.items()}
    # P (n r: it spans the columns) goes to its owner and back, one way each (2 n r over both ranks); R (m r) is
    # all-reduced by each rank: (m + n) r per rank and matrix, as microsoft/dion moves at 2 replicas
    low = sum(2 * (m + n) * r[k] * 4 for k, (m, n) in SHAPES.items())
    assert per_step == low, (per_step, low)
    assert per_step < mn


def _body_synchronize(rank, world_size):
    import torch.distributed as dist

    params = {n: nn.Parameter(t.clone().to(rank_device())) for n, t in _full(0).items()}
    opt = Dion(list(params.items()), replicate_mesh=dist.group.WORLD, **KW)
    for n, g in _full(100 + 1000 * rank).items():  # a different batch on each replica
        params[n].grad = g.to(rank_device())
    opt.step()
    before = [opt.state[p]["momentum_buffer"].clone() for p in params.values()]
    opt.synchronize_for_checkpoint()
    return before, [opt.state[p]["momentum_buffer"].clone() for p in params.values()]


def test_synchronize_for_checkpoint_averages_the_replicas_momenta():
    (b0, a0), (b1, a1) = run_ranks(_body_synchronize, 2, timeout=60)
    for x0, x1, y0, y1 in zip(b0, b1, a0, a1):
        assert not torch.allclose(x0, x1)  # compressed sync: the momenta drift apart by design
        torch.testing.assert_close(y0, (x0 + x1) / 2)
        torch.testing.assert_close(y1, y0)


def _body_bad_mesh(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(rank_device_type(), (2, 2))
    W = nn.Parameter(distribute_tensor(torch.zeros(8, 6), mesh, [Shard(0), Shard(1)], src_data_rank=None))
    # the rows are sharded over mesh dim 0 ({0, 2} / {1, 3}); claim they are sharded over {0, 1} / {2, 3}
    wrong = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    Dion([("w", W)], outer_shard_mesh=wrong[rank // 2])


def test_a_mesh_that_contradicts_the_placements_is_refused():
    with pytest.raises(RankError, match=r"'w'.*outer mesh ranks \[0, 1\] do not match its placements"):
        run_ranks(_body_bad_mesh, 4, timeout=60)


def _body_save(rank, world_size, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import distribute_tensor

    mesh, pl = _mesh_and_placements("fsdp_tp" if world_size == 4 else "fsdp", world_size)
    params = {n: nn.Parameter(distribute_tensor(t, mesh, pl, src_data_rank=None)) for n, t in _full(0).items()}
    opt = Dion(list(params.items()), replicate_mesh_grad_sync=False, **KW)
    for step in range(STEPS - 1):
        for n, g in _full(100 + step).items():
            params[n].grad = distribute_tensor(g, mesh, pl, src_data_rank=None)
        opt.step()
    dcp.save({"params": params, "optim": opt.state_dict()}, checkpoint_id=path)
    return sorted(opt.state_dict()["state"][0])


def _body_load(rank, world_size, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import distribute_tensor

    mesh, pl = _mesh_and_placements("fsdp", world_size)
    params = {n: nn.Parameter(distribute_tensor(t, mesh, pl, src_data_rank=None)) for n, t in _full(0).items()}
    opt = Dion(list(params.items()), replicate_mesh_grad_sync=False, **KW)
    state = {"params": params, "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=path)
    opt.load_state_dict(state["optim"])
    for n, g in _full(100 + STEPS - 1).items():
        params[n].grad = distribute_tensor(g, mesh, pl, src_data_rank=None)
    opt.step()
    return {n: p.full_tensor() for n, p in params.items()}


def test_dcp_saves_at_4_ranks_and_resumes_at_2(tmp_path):
    want = _reference()
    path = str(tmp_path / "ckpt")
    keys = run_ranks(_body_save, 4, path, timeout=120)
    assert keys[0] == ["Q", "momentum_buffer", "step"]
    for got in run_ranks(_body_load, 2, path, timeout=120):
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0)
