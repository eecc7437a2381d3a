"""MuonBP (``disco.optim.muonbp``): a float64 reference of the paper's algorithm (arXiv 2510.16981) with explicit
blocks on one process equals FSDP2 x2 (uneven), FSDP2 x3 (an empty shard), TP x2 (rowwise) and FSDP x TP 2x2
runs whose shards are those blocks; block steps move zero bytes, full steps what Muon moves."""

from __future__ import annotations

import math

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

from disco import Muon, MuonBP
from disco.distributed.launch import rank_threads

SHAPE = (13, 8)
STEPS = 5
KW = dict(
    lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.1, period=3, block_lr_ratio=0.5, backend="svd",
    compute_dtype=torch.float64,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _rank_threads():
    with rank_threads():
        yield


def _init(shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 4


def _grad(step, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + step), dtype=torch.float64)


def _polar(X):
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def _factor(m, n):
    return math.sqrt(max(1.0, m / n))  # norm_factor="original"


def chunks(length, n):
    """``torch.chunk``'s pieces of ``range(length)`` padded to ``n`` (empty ones at the end)."""
    size = -(-length // n)
    return [range(min(k * size, length), min((k + 1) * size, length)) for k in range(n)]


def reference(blocks, steps=STEPS, *, lr=0.05, mu=0.9, wd=0.1, period=3, ratio=0.5):
    """The paper's MuonBP, written out in float64 with explicit blocks ``(rows, cols)``::

        M <- mu M + G
        t % P == 0:  W <- (1 - lr wd) W - lr f(W) Orth(M)
        else:        W[b] <- (1 - lr_b wd) W[b] - lr_b f(W[b]) Orth(M[b])  for every block b, lr_b = ratio lr

    (the decoupled weight decay with each step's lr is Disco's; ``Orth`` is scale-free, so Disco's EMA momentum
    gives the same directions)."""
    W, M = _init(), torch.zeros(SHAPE, dtype=torch.float64)
    for t in range(steps):
        M = mu * M + _grad(t)
        if t % period == 0:
            W = (1 - lr * wd) * W - lr * _factor(*SHAPE) * _polar(M)
            continue
        eta = ratio * lr
        W = W.clone()
        for rows, cols in blocks:
            if len(rows) == 0 or len(cols) == 0:
                continue
            r, c = slice(rows.start, rows.stop), slice(cols.start, cols.stop)
            Mb = M[r, c]
            W[r, c] = (1 - eta * wd) * W[r, c] - eta * _factor(*Mb.shape) * _polar(Mb)
    return W


def blocks_of(layout, world):
    m, n = SHAPE
    if layout == "fsdp":
        return [(rows, range(n)) for rows in chunks(m, world)]
    if layout == "hsdp":  # 2 replicas x 2 shards: each replica's blocks are the row halves
        return [(rows, range(n)) for rows in chunks(m, 2)]
    if layout == "tp_rowwise":
        return [(range(m), cols) for cols in chunks(n, world)]
    if layout == "fsdp_tp":
        return [(rows, cols) for rows in chunks(m, 2) for cols in chunks(n, 2)]
    raise ValueError(layout)


def test_one_process_equals_reference_with_one_block():
    """One process holds the whole matrix: its only block is the matrix (block steps: block lr, whole factor)."""
    p = nn.Parameter(_init())
    opt = MuonBP([p], **KW)
    for step in range(STEPS):
        p.grad = _grad(step)
        opt.step()
        assert opt.engine.stats.bytes_sent == 0
    want = reference([(range(SHAPE[0]), range(SHAPE[1]))])
    torch.testing.assert_close(p.detach(), want, atol=1e-10, rtol=0)
    assert int(opt.state[p]["step"]) == STEPS


def test_reference_blocks_change_the_result():
    """The explicit-block reference differs from one block, and period 1 is Muon (the tests can fail)."""
    one = reference([(range(SHAPE[0]), range(SHAPE[1]))])
    assert (reference(blocks_of("fsdp", 2)) - one).abs().max() > 1e-3
    p = nn.Parameter(_init())
    q = nn.Parameter(_init())
    bp = MuonBP([p], **{**KW, "period": 1})
    mu = Muon([q], **{k: v for k, v in KW.items() if k not in ("period", "block_lr_ratio")})
    for step in range(STEPS):
        p.grad, q.grad = _grad(step), _grad(step)
        bp.step()
        mu.step()
    torch.testing.assert_close(p.detach(), q.detach(), atol=1e-12, rtol=0)


def test_checkpoint_resumes_the_phase():
    p = nn.Parameter(_init())
    opt = MuonBP([p], **KW)
    for step in range(2):
        p.grad = _grad(step)
        opt.step()
    saved, weights = opt.state_dict(), p.detach().clone()
    q = nn.Parameter(weights)
    opt2 = MuonBP([q], **KW)
    opt2.load_state_dict(saved)
    for step in range(2, STEPS):
        q.grad = _grad(step)
        opt2.step()
    torch.testing.assert_close(q.detach(), reference([(range(SHAPE[0]), range(SHAPE[1]))]), atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"period": 0}, "period=0 must be an int >= 1"),
        ({"period": 2.5}, "period"),
        ({"block_lr_ratio": -1.0}, "block_lr_ratio"),
        ({"num_heads": 2}, "does not split its weights"),
        ({"weight_constraint": "spectral_clip", "sigma_max": 1.0}, "not supported by algorithm 'muonbp'"),
        ({"commit": "streaming"}, "streaming"),
    ],
)
def test_bad_settings_are_refused(extra, needle):
    p = nn.Parameter(torch.zeros(8, 4))
    with pytest.raises((ValueError, TypeError), match=needle):
        MuonBP([{"params": [p], "param_names": ["w"], **extra}])


def test_cli_builder():
    from disco.optim.registry import get_optimizer_spec

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    entry = get_optimizer_spec("muonbp")
    opt = entry.build(model, lr=entry.default_lr)
    assert isinstance(opt, MuonBP)
    assert any(g["algorithm"] == "muonbp" for g in opt.param_groups)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()


# ---- distributed -----------------------------------------------------------------------------------------------
def _body(rank, world_size, layout):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if layout == "fsdp_tp":
        mesh, pl = init_device_mesh("cpu", (2, 2)), [Shard(0), Shard(1)]
    elif layout == "hsdp":
        mesh, pl = init_device_mesh("cpu", (2, 2)), [Replicate(), Shard(0)]
    else:
        mesh, pl = init_device_mesh("cpu", (world_size,)), [Shard(1 if layout == "tp_rowwise" else 0)]
    p = nn.Parameter(distribute_tensor(_init(), mesh, pl, src_data_rank=None))
    opt = MuonBP([p], **KW)
    moved = []
    for step in range(STEPS):
        p.grad = distribute_tensor(_grad(step), mesh, pl, src_data_rank=None)
        opt.step()
        s = opt.engine.stats
        moved.append((s.bytes_sent, s.bytes_received))
    return p.full_tensor(), moved


@pytest.mark.parametrize(
    ("layout", "world"), [("fsdp", 2), ("fsdp", 3), ("tp_rowwise", 2), ("fsdp_tp", 4), ("hsdp", 4)]
)
def test_distributed_equals_reference_with_its_shards_as_blocks(layout, world):
    want = reference(blocks_of(layout, world))
    out = run_ranks(_body, world, layout, timeout=180)
    for got, _ in out:
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    for step in range(STEPS):
        total = sum(sent + received for _, moved in out for sent, received in [moved[step]])
        if step % KW["period"] == 0:
            assert total > 0  # the full step gathers the matrix
        else:
            assert total == 0  # block steps move nothing
