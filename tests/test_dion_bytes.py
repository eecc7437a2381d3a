"""Dion's bytes per step on real gloo ranks: each orientation equals one process on every layout; the columns
orientation moves no more than microsoft/dion (its bytes derived from its algorithm in
``disco.bench.dion.dion_reference_bytes``) under FSDP and FSDP x TP; compressed data-parallel sync only where
``(m + n) r < m n``, else the gradient is averaged."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

from disco import Dion
from disco.bench.dion import dion_reference_bytes
from disco.distributed.launch import rank_threads
from disco.ops.dion import dion_rank

# each layout equals one process to fp32 rounding: fp32 matmuls in fp32 whatever the session's precision
pytestmark = pytest.mark.usefixtures("fp32_matmuls")


@pytest.fixture(autouse=True)
def _rank_threads():
    with rank_threads():
        yield


SHAPES = {"tall": (48, 32), "wide": (24, 40), "square": (32, 32)}
KW = dict(lr=0.05, mu=0.9, weight_decay=0.1, qr_method="rcqr")
STEPS = 2


def _full(seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) / 4 for n, s in shapes.items()}


def _placements(layout, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    if layout == "fsdp":
        return init_device_mesh("cpu", (world,)), [Shard(0)]
    if layout == "fsdp_tp":  # FSDP rows, TP columns (row-parallel)
        return init_device_mesh("cpu", (2, 2)), [Shard(0), Shard(1)]
    if layout == "fsdp_tp_col":  # FSDP and TP both on the rows (column-parallel)
        return init_device_mesh("cpu", (2, 2)), [Shard(0), Shard(0)]
    raise ValueError(layout)


def _body(rank, world, layout, extra, shapes, same_batch):
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    full = _full(0, shapes)
    if layout == "ddp":
        params = {n: nn.Parameter(t.clone()) for n, t in full.items()}
        opt = Dion(list(params.items()), replicate_mesh=dist.group.WORLD, **{**KW, **extra})
    else:
        mesh, pl = _placements(layout, world)
        params = {n: nn.Parameter(distribute_tensor(t, mesh, pl, src_data_rank=None)) for n, t in full.items()}
        opt = Dion(list(params.items()), replicate_mesh_grad_sync=False, **{**KW, **extra})
    sent = 0
    for step in range(STEPS):
        for n, g in _full(100 + step + (0 if same_batch else 1000 * rank), shapes).items():
            p = params[n]
            p.grad = g if layout == "ddp" else distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        opt.step()
        sent = opt.engine.stats.bytes_sent  # the last step's
    out = {n: (p.detach() if layout == "ddp" else p.full_tensor()) for n, p in params.items()}
    return out, sent


def _one_process(extra, shapes=SHAPES, replicas=1):
    """One process; with ``replicas`` the mean of the replicas' gradients (what a gradient all-reduce gives)."""
    params = {n: nn.Parameter(t.clone()) for n, t in _full(0, shapes).items()}
    opt = Dion(list(params.items()), **{**KW, **extra})
    for step in range(STEPS):
        batches = [_full(100 + step + 1000 * k, shapes) for k in range(replicas)]
        for n in shapes:
            params[n].grad = sum(b[n] for b in batches) / replicas if replicas > 1 else batches[0][n]
        opt.step()
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.parametrize("orientation", ["columns", "rows"])
@pytest.mark.parametrize(("layout", "world"), [("fsdp", 2), ("fsdp", 4), ("fsdp_tp", 4), ("fsdp_tp_col", 4)])
def test_each_orientation_equals_one_process(orientation, layout, world):
    extra = {"orientation": orientation, "rank_fraction": 0.5, "power_iters": 2}
    want = _one_process(extra)
    for got, _ in run_ranks(_body, world, layout, extra, SHAPES, True, timeout=180):
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0)


def test_the_orientations_differ():
    # not one algorithm under two names: the start Q lives on the other side, so the iterates differ
    a, b = _one_process({"orientation": "columns"}), _one_process({"orientation": "rows"})
    assert all(not torch.allclose(a[n], b[n], atol=1e-4) for n in SHAPES)


def test_fsdp_bytes_counted_exactly_per_orientation():
    """2 ranks, rows sharded. ``columns``: ``P`` (``n x r``) goes to its owner and back (``2 n r`` over both ranks)
    and the column norms of ``R`` are all-reduced (``r`` per rank). ``rows``: the other rank's half of ``P``
    (``m x r``) is gathered and returned (``m r``) and ``R`` (``n x r``) all-reduced by each rank (``2 n r``)."""
    totals = {}
    for orientation in ("columns", "rows"):
        out = run_ranks(
            _body, 2, "fsdp", {"orientation": orientation, "rank_fraction": 0.25}, SHAPES, True, timeout=120
        )
        totals[orientation] = sum(o[1] for o in out)
    r = {k: dion_rank(m, n, 0.25) for k, (m, n) in SHAPES.items()}
    assert totals["columns"] == sum((2 * n * r[k] + 2 * r[k]) * 4 for k, (m, n) in SHAPES.items())
    assert totals["rows"] == sum((m * r[k] + 2 * n * r[k]) * 4 for k, (m, n) in SHAPES.items())
    assert totals["columns"] < totals["rows"]


BENCH = {f"{k}{i}": s for i in range(2) for k, s in (("q", (64, 64)), ("fc", (256, 64)), ("proj", (64, 256)))}


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.125])
@pytest.mark.parametrize(("layout", "world"), [("fsdp", 2), ("fsdp", 4), ("fsdp_tp", 4)])
def test_bytes_at_or_below_microsoft_dion(fraction, layout, world):
    out = run_ranks(_body, world, layout, {"rank_fraction": fraction}, BENCH, True, timeout=180)
    most = max(o[1] for o in out)  # the busiest rank
    dion = dion_reference_bytes(list(BENCH.values()), layout, world, fraction)
    assert 0 < most <= dion, (most, dion)


def test_compressed_sync_only_where_it_moves_less_than_the_gradient():
    """DDP x 2, different batches. ``(m + n) r < m n``: ``P`` to its owner and back and ``R`` all-reduced,
    ``2 (m + n) r`` over both ranks. Full rank (``(m + n) r >= m n``): the gradient is all-reduced (``m n`` by each
    rank) and the owner's ``P`` sent to the other replica (``n r``); the result is one process on the mean
    gradient."""
    shapes = {"w": (40, 24)}
    (m, n), low = shapes["w"], 0.25
    r = dion_rank(m, n, low)
    assert (m + n) * r < m * n and (m + n) * n >= m * n
    out = run_ranks(_body, 2, "ddp", {"rank_fraction": low}, shapes, False, timeout=120)
    assert sum(o[1] for o in out) == 2 * (m + n) * r * 4
    out = run_ranks(_body, 2, "ddp", {"rank_fraction": 1.0}, shapes, False, timeout=120)
    assert sum(o[1] for o in out) == (2 * m * n + n * n) * 4
    want = _one_process({"rank_fraction": 1.0}, shapes, replicas=2)
    for got, _ in out:
        torch.testing.assert_close(got["w"], want["w"], atol=1e-5, rtol=0)
    # microsoft/dion averages the gradient at full rank too; at r = 1/4 it moves (m + n) r per rank, as here
    assert sum(o[1] for o in out) / 2 <= dion_reference_bytes([shapes["w"]], "ddp", 2, 1.0)


def test_the_dion_model_counts_batches_padding_and_the_sketch():
    # fsdp x 2, r = 16: per batch of 2, P (n r) reduce-scattered and all-gathered, column norms 2 r
    assert dion_reference_bytes([(64, 64)] * 2, "fsdp", 2, 0.25) == (2 * 64 * 16 + 2 * 16) * 4
    # a third matrix is padded into a batch of its own
    assert dion_reference_bytes([(64, 64)] * 3, "fsdp", 2, 0.25) == 2 * (2 * 64 * 16 + 2 * 16) * 4
    # fsdp_tp 2 x 2, (m, n) = (64, 32), r = 8: Q unshard m r / 2, P all-reduce n r, sketch k = 128 and three r x r,
    # R all-reduce 2 m r / 2, column norms 2 r
    m, n, r = 64, 32, 8
    want = m * r / 2 + n * r + (128 * r + 3 * r * r) + 2 * m * r / 2 + 2 * r
    assert dion_reference_bytes([(m, n)] * 2, "fsdp_tp", 4, 0.25) == want * 4
    # ddp x 2 at full rank: the gradients all-reduced (a batch of 2) and P (the longer side) all-gathered
    assert dion_reference_bytes([(40, 24)] * 2, "ddp", 2, 1.0) == (2 * 40 * 24 + 40 * 24) * 4
    with pytest.raises(ValueError, match="layout"):
        dion_reference_bytes([(4, 4)], "hsdp", 2, 0.5)


def test_bench_dion_prints_disco_against_dion(capsys):
    import json

    from disco.bench.dion import main
    from disco.distributed.shapes import transformer

    argv = ["--ranks", "2", "--layouts", "fsdp,ddp", "--width", "32", "--fractions", "0.25", "--steps", "1"]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    dion = [r for r in rows if r["method"] == "dion r=0.25"]
    assert [r["layout"] for r in dion] == ["fsdp", "ddp"]
    shapes = [s.shape for s in transformer(2, 32, 128)]
    for r in dion:
        assert r["dion_mib"] == dion_reference_bytes(shapes, r["layout"], 2, 0.25) / 2**20
        assert 0 < r["sent_mib"] <= r["dion_mib"] and r["x_dion"] == r["sent_mib"] / r["dion_mib"]
