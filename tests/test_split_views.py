"""Split views (``disco.optim.split``): fused QKV blocks and attention heads orthogonalized one by one.

One process against a float64 reference (explicit loops, SVD polar factor per block); TP x2 with heads sharded
colwise equal to one process and moving zero bytes; FSDP2 x2 / x3 uneven and FSDP x TP 2x2 equal to one process;
bad sizes refused with the parameter, its shape and the sizes."""

from __future__ import annotations

import math

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

from disco import Disco, Muon, NorMuon, PolarGrad, routing_table
from disco.distributed.launch import rank_threads
from disco.distributed.layout import Layout, Placement
from disco.ops.specs import LMOSpec, SplitLMOSpec
from disco.optim.split import blocks_of, stack_layouts

KW = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, backend="svd", compute_dtype=torch.float64)
STEPS = 3

# name -> (shape, split settings, block sizes along the output dim, transposed)
CASES = {
    "qkv": ((32, 12), {"split_sizes": [16, 8, 8]}, [16, 8, 8], False),
    "heads": ((32, 12), {"num_heads": 4}, [8] * 4, False),
    "gqa": ((32, 12), {"split_sizes": [16, 8, 8], "num_heads": 4, "num_kv_heads": 2}, [4] * 8, False),
    "gqa_fused": ((32, 12), {"num_heads": 4, "num_kv_heads": 2}, [4] * 8, False),
    "conv1d": ((12, 24), {"split_sizes": [8, 8, 8], "num_heads": 2}, [4] * 6, True),
    "uneven": ((32, 12), {"split_sizes": [12, 10, 10]}, [12, 10, 10], False),
}


@pytest.fixture(autouse=True)
def _rank_threads():
    with rank_threads():
        yield


def _polar(X):
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def reference_direction(U, blocks, transposed, norm="spectral"):
    """The split LMO, by explicit loops: each block's SVD polar factor times its own norm factor."""
    out = torch.empty_like(U)
    start = 0
    for size in blocks:
        if transposed:  # stored in x out: the block is columns, its matrix their transpose (size x in)
            B = U[:, start : start + size].T
            m, n = B.shape
            out[:, start : start + size] = (_polar(B) * _factor(norm, m, n)).T
        else:
            B = U[start : start + size]
            m, n = B.shape
            out[start : start + size] = _polar(B) * _factor(norm, m, n)
        start += size
    return out


def _factor(norm, m, n):
    return {"spectral": math.sqrt(m / n), "original": math.sqrt(max(1.0, m / n))}[norm]


def _grads(shape, step, seed=100):
    g = torch.Generator().manual_seed(seed + step)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _init(shape):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g, dtype=torch.float64) / 4


def reference_run(name, steps=STEPS):
    """Muon's step (decoupled, Nesterov) with the split LMO, written out in float64."""
    shape, _, blocks, transposed = CASES[name]
    W, M = _init(shape), torch.zeros(shape, dtype=torch.float64)
    lr, beta, wd = KW["lr"], KW["momentum"], KW["weight_decay"]
    for step in range(steps):
        G = _grads(shape, step)
        M = beta * M + (1 - beta) * G
        U = (1 - beta) * G + beta * M  # Nesterov
        W = (1 - lr * wd) * W - lr * reference_direction(U, blocks, transposed)
    return W


def _group(name, p):
    _, split, _, transposed = CASES[name]
    return {"params": [p], "param_names": [name], "transposed": transposed, **split}


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_process_equals_reference(name):
    shape = CASES[name][0]
    p = nn.Parameter(_init(shape))
    opt = Disco([_group(name, p)], norm_factor="spectral", **KW)
    for step in range(STEPS):
        p.grad = _grads(shape, step)
        opt.step()
    torch.testing.assert_close(p.detach(), reference_run(name), atol=1e-10, rtol=0)
    assert opt.engine.stats.matrices_computed == len(CASES[name][2])  # every block its own matrix


@pytest.mark.parametrize("mode", ["streaming", "light", "overlap"])
def test_streaming_light_and_overlap_equal_the_plain_step(mode):
    """A split group committed from inside the map (streaming), with its momentum in p.grad (light), or computed
    in backward (overlap) takes the plain step."""
    shape = CASES["gqa"][0]
    x = torch.randn(5, shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def run(extra, overlap=False):
        lin = nn.Linear(shape[1], shape[0], bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(_init(shape))
        group = {"params": [lin.weight], "param_names": ["gqa"], **CASES["gqa"][1], **extra}
        kw = {**KW, "nesterov": KW["nesterov"] and not extra.get("is_light", False)}
        opt = Disco([group], norm_factor="spectral", **kw)
        if overlap:
            opt.overlap_with_backward()
        for step in range(STEPS):
            (lin(x * (step + 1)) ** 2).sum().backward()
            opt.step()
            if not extra.get("is_light"):
                opt.zero_grad()
        return lin.weight.detach()

    extra = {"streaming": {"commit": "streaming"}, "light": {"is_light": True}, "overlap": {}}[mode]
    # light mode's twin keeps the same EMA in optimizer state (light mode has no Nesterov form)
    plain = run({"nesterov": False} if mode == "light" else {})
    assert (plain - _init(shape)).abs().max() > 1e-3
    got = run(extra, overlap=mode == "overlap")
    torch.testing.assert_close(got, plain, atol=1e-10, rtol=0)


def test_without_split_differs():
    """The reference is not Muon's whole-matrix LMO (the test above can fail)."""
    U = _grads((32, 12), 0)
    whole = _polar(U) * _factor("spectral", 32, 12)
    assert (reference_direction(U, [8] * 4, False) - whole).abs().max() > 0.1


@pytest.mark.parametrize("name", sorted(CASES))
def test_split_spec_equals_reference(name):
    """The gathered path (``SplitLMOSpec`` on the whole weight), as an owner runs it."""
    shape, _, blocks, transposed = CASES[name]
    inner = LMOSpec.for_param(shape, transposed=transposed, norm="spectral", backend="svd", compute_dtype=torch.float64)
    spec = SplitLMOSpec(inner, tuple(blocks))
    U = torch.stack([_grads(shape, 0), _grads(shape, 1)])
    got = spec(U)
    for k in range(2):
        torch.testing.assert_close(got[k], reference_direction(U[k], blocks, transposed), atol=1e-12, rtol=0)
    assert spec.cost(shape) > 0 and spec.result_shape(shape) == shape


def test_muon_original_factor_per_block():
    """Muon's default norm factor (``sqrt(max(1, rows/cols))``) is taken from each block's shape."""
    shape = (32, 12)
    p = nn.Parameter(_init(shape))
    group = {"params": [p], "param_names": ["w"], "num_heads": 2}
    opt = Muon(
        [group],
        lr=0.1,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        **{k: KW[k] for k in ("backend", "compute_dtype")},
    )
    G = _grads(shape, 0)
    p.grad = G.clone()
    opt.step()
    want = _init(shape) - 0.1 * reference_direction(G, [16, 16], False, norm="original")
    torch.testing.assert_close(p.detach(), want, atol=1e-10, rtol=0)


# ---- refusals --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("split", "needle"),
    [
        ({"split_sizes": [16, 8, 4]}, "split_sizes=[16, 8, 4] sum to 28"),
        ({"num_heads": 5}, "num_heads=5 (5 heads) does not divide"),
        ({"split_sizes": [16, 8, 8], "num_heads": 3}, "num_heads=3 does not divide block 0"),
        ({"split_sizes": [16, 8, 8], "num_heads": 4, "num_kv_heads": 3}, "num_kv_heads=3 does not divide block 1"),
    ],
)
def test_sizes_that_do_not_divide_are_refused(split, needle):
    p = nn.Parameter(torch.zeros(32, 12))
    with pytest.raises(ValueError, match="attn.qkv") as e:
        Muon([{"params": [p], "param_names": ["attn.qkv"], **split}])
    assert needle in str(e.value) and "(32, 12)" in str(e.value)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"split_sizes": [16, -16]}, "positive ints"),
        ({"split_sizes": "16,16"}, "positive ints"),
        ({"num_heads": 2.0}, "must be int"),
        ({"num_kv_heads": 2}, "needs num_heads"),
        ({"num_heads": 2, "weight_constraint": "spectral_clip", "sigma_max": 1.0}, "whole matrix"),
        ({"num_heads": 2, "norm_factor": "embed_sqrt"}, "not a matrix norm"),
    ],
)
def test_bad_split_settings_are_refused(extra, needle):
    p = nn.Parameter(torch.zeros(32, 12))
    with pytest.raises((ValueError, TypeError), match=needle):
        Disco([{"params": [p], "param_names": ["w"], **extra}])


def test_a_split_needs_a_2d_weight():
    p = nn.Parameter(torch.zeros(2, 32, 12))
    with pytest.raises(ValueError, match=r"'experts' \(shape \(2, 32, 12\)\): a split .* needs a 2-D weight"):
        Muon([{"params": [p], "param_names": ["experts"], "num_heads": 2}])


@pytest.mark.parametrize("cls", [NorMuon, PolarGrad])
def test_rules_that_change_the_step_refuse_a_split(cls):
    p = nn.Parameter(torch.zeros(32, 12))
    with pytest.raises(ValueError, match="does not split its weights"):
        cls([{"params": [p], "param_names": ["w"], "num_heads": 2}])


def test_elementwise_groups_do_not_read_split_settings():
    p = nn.Parameter(torch.zeros(32, 12))
    with pytest.raises(ValueError, match="not a setting of algorithm 'adamw'"):
        Muon([{"params": [p], "param_names": ["w"], "algorithm": "adamw", "num_heads": 2}])


def test_routing_table_shows_the_split():
    from disco import create_disco_param_groups

    model = nn.Sequential(nn.Linear(8, 24, bias=False), nn.Linear(24, 8, bias=False))
    groups, _ = create_disco_param_groups(
        model,
        {"extra_param_group_split_rules": [{"str_match": r"^0\.weight$", "split_sizes": [8, 8, 8], "num_heads": 2}]},
    )
    table = routing_table(groups)
    line = next(row for row in table.splitlines() if row.split()[1:2] == ["0.weight"])
    assert "split 8/8/8; heads 2" in line
    opt = Disco(groups, lr=0.01)  # the routed group is accepted as it is
    assert any(g.get("num_heads") == 2 for g in opt.param_groups)


# ---- layouts ---------------------------------------------------------------------------------------------------
def test_stack_layouts_whole_heads_per_rank():
    """Colwise TP x2 of 4 heads: each rank's rows are 2 whole heads, so the heads stack is Shard(0) on the head
    dim; 3 ranks cut a head, so the weight is gathered whole."""
    lay = Layout((32, 12), (0, 1), (2,), (Placement("shard", 0),))
    st = stack_layouts(lay, 0, (8,) * 4, 1)
    assert st is not None and len(st) == 1
    assert st[0].layout.shape == (4, 8, 12) and st[0].layout.placements == (Placement("shard", 0),)
    assert st[0].local == tuple(range(16))
    assert stack_layouts(Layout((32, 12), (0, 1, 2), (3,), (Placement("shard", 0),)), 0, (8,) * 4, 0) is None
    assert stack_layouts(lay, 0, (12, 10, 10), 0) is None  # block 1 straddles the two ranks
    opt = Disco([{"params": [nn.Parameter(torch.zeros(32, 12))], "num_heads": 4}])
    assert blocks_of(opt.settings_of(opt.param_groups[0]), (32, 12), "w") == (8,) * 4


def test_stack_layouts_fsdp_over_tp_strided():
    """FSDP2 over colwise TP (``_StridedShard(0, 2)`` then ``Shard(0)``): each rank holds 2 whole heads, in the
    order the same placements give the heads stack; two blocks of 16 rows are cut by the shards."""
    lay = Layout((32, 12), (0, 1, 2, 3), (2, 2), (Placement("strided_shard", 0, 2), Placement("shard", 0)))
    for rank, first in enumerate([0, 16, 8, 24]):
        st = stack_layouts(lay, 0, (4,) * 8, rank)
        assert st is not None and st[0].layout.local_shape(rank) == (2, 4, 12)
        assert st[0].layout.index_lists(rank)[0] == [first // 4, first // 4 + 1]
    assert stack_layouts(lay, 0, (16, 16), 0) is None


# ---- distributed -----------------------------------------------------------------------------------------------
def _mesh(layout, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    if layout == "tp":  # heads sharded colwise: the output dim (dim 1 for a transposed weight)
        return init_device_mesh("cpu", (world,)), None
    if layout == "fsdp":
        return init_device_mesh("cpu", (world,)), [Shard(0)]
    if layout == "fsdp_tp":
        return init_device_mesh("cpu", (2, 2)), [Shard(0), Shard(1)]
    if layout == "hsdp":
        return init_device_mesh("cpu", (2, 2)), [Replicate(), Shard(0)]
    if layout == "fsdp_tp_heads":
        return init_device_mesh("cpu", (2, 2)), [Shard(0), Shard(0)]
    raise ValueError(layout)


def _body(rank, world_size, name, layout, extra=None):
    from torch.distributed.tensor import Shard, distribute_tensor

    shape, _, _, transposed = CASES[name]
    mesh, pl = _mesh(layout, world_size)
    if pl is None:
        pl = [Shard(1 if transposed else 0)]
    p = nn.Parameter(distribute_tensor(_init(shape), mesh, pl, src_data_rank=None))
    opt = Disco([{**_group(name, p), **(extra or {})}], norm_factor="spectral", **KW)
    moved = []
    for step in range(STEPS):
        p.grad = distribute_tensor(_grads(shape, step), mesh, pl, src_data_rank=None)
        opt.step()
        s = opt.engine.stats
        moved.append((s.bytes_sent, s.bytes_received, s.matrices_computed))
    return p.full_tensor(), moved


@pytest.mark.parametrize("name", ["heads", "gqa", "gqa_fused", "conv1d"])
def test_tp_heads_colwise_move_nothing(name):
    """TP x2 shards whole heads: every rank orthogonalizes its own heads, zero bytes over the TP axis."""
    want = reference_run(name)
    blocks = len(CASES[name][2])
    for got, moved in run_ranks(_body, 2, name, "tp", timeout=180):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        for sent, received, computed in moved:
            assert (sent, received) == (0, 0)
            assert computed == blocks // 2  # its own heads only


@pytest.mark.parametrize("name", ["gqa", "uneven"])
def test_tp_streaming_commits(name):
    """commit="streaming": each weight committed once its blocks are known good, in place or gathered."""
    want = reference_run(name)
    for got, moved in run_ranks(_body, 2, name, "tp", {"commit": "streaming"}, timeout=180):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        assert all((m[0] == 0) == (name == "gqa") for m in moved)


def test_tp_block_cut_by_a_shard_is_gathered():
    """split_sizes=[12, 10, 10] under TP x2: block 1 straddles the ranks, so the weight is gathered (bytes move)
    and split on its one owner; the result is still the single-device one."""
    want = reference_run("uneven")
    out = run_ranks(_body, 2, "uneven", "tp", timeout=180)
    for got, _ in out:
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert all(sum(m[0] for m in moved) > 0 for _, moved in out)
    for step in range(STEPS):
        assert sum(moved[step][2] for _, moved in out) == 1  # the whole weight, once, on its owner


# (case, layout, world, matrices computed over all ranks per step, whether nothing moves)
DIST = [
    ("gqa", "fsdp", 2, 8, True),  # 4 whole heads per rank: in place
    ("qkv", "fsdp", 2, 1, False),  # rank 1 holds k and v, not its chunk of a (k, v) stack: gathered whole
    ("uneven", "fsdp", 3, 1, False),
    ("gqa", "fsdp_tp", 4, 8, False),  # columns sharded: each heads stack gathered on one owner
    ("conv1d", "fsdp_tp", 4, 6, False),
    ("gqa", "fsdp_tp_heads", 4, 8, True),  # 2 whole heads per rank over both axes
    ("uneven", "fsdp_tp_heads", 4, 1, False),
    ("gqa", "hsdp", 4, 8, False),  # whole heads per shard, but replicas: one owner per stack, results back
]


@pytest.mark.parametrize(("name", "layout", "world", "matrices", "zero"), DIST)
def test_fsdp_and_fsdp_tp_equal_one_process(name, layout, world, matrices, zero):
    want = reference_run(name)
    out = run_ranks(_body, world, name, layout, timeout=180)
    for got, _ in out:
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    for step in range(STEPS):
        assert sum(moved[step][2] for _, moved in out) == matrices
        assert (sum(moved[step][0] + moved[step][1] for _, moved in out) == 0) == zero
