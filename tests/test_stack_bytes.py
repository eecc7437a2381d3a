"""The stack budget (``DistributedConfig.stack_bytes``): how many same-shape tensors one spec call may stack.

``engine.stats.batches`` records the stack shape of every spec call of the last step; the budget changes only
how the work is cut, never the result (measured: parameters bit-identical across budgets, single-process and on
2 gloo ranks; asserted to 1e-6).
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

import disco
from disco.distributed import DistributedConfig, create_auto_config, create_dtensor_config, create_local_config
from disco.distributed.engine import GPU_STACK_BYTES, LocalEngine, auto_stack_bytes, build_engine, cut_stacks, stacked

CPU = torch.device("cpu")
WIDE, SQUARE = (64, 32), (32, 32)
SHAPES = [WIDE] * 6 + [SQUARE] * 2
ITEM = 64 * 32 * 4  # bytes of one fp32 64 x 32 parameter
TWO = 2 * ITEM  # a budget of two 64 x 32 (and four 32 x 32) tensors


# ----------------------------------------------------------------------------------- helpers of engine.py


def test_cut_stacks_arithmetic():
    members = list(range(7))
    assert cut_stacks(members, 100, None, CPU) == [members]  # unbounded: one stack
    assert cut_stacks(members, 100, 0, CPU) == [[k] for k in members]  # 0: one tensor per call
    assert cut_stacks(members, 100, 250, CPU) == [[0, 1], [2, 3], [4, 5], [6]]  # 2.5 items: 2 per stack
    assert cut_stacks(members, 100, 200, CPU) == [[0, 1], [2, 3], [4, 5], [6]]  # exactly 2 items
    assert cut_stacks(members, 100, 99, CPU) == [[k] for k in members]  # below one item: alone, never dropped
    assert cut_stacks(members, 100, 700, CPU) == [members]
    assert cut_stacks(members, 100, 10**12, CPU) == [members]
    assert cut_stacks(members, 0, 0, CPU) == [[k] for k in members]  # empty tensors: no division by zero
    # order preserved, members are positions (any ints), every member exactly once
    odd = [9, 3, 5, 1, 8]
    chunks = cut_stacks(odd, 10, 30, CPU)
    assert chunks == [[9, 3, 5], [1, 8]]
    assert [k for c in chunks for k in c] == odd


def test_auto_budget_by_device():
    assert auto_stack_bytes(CPU) == 0
    assert auto_stack_bytes(torch.device("cuda")) == GPU_STACK_BYTES  # a device object needs no GPU
    assert auto_stack_bytes(torch.device("meta")) == GPU_STACK_BYTES
    assert cut_stacks(list(range(5)), 100, "auto", CPU) == [[k] for k in range(5)]
    assert cut_stacks(list(range(5)), 100, "auto", torch.device("cuda")) == [list(range(5))]
    per = GPU_STACK_BYTES // (2**20)
    assert cut_stacks(list(range(per + 1)), 2**20, "auto", torch.device("cuda")) == [list(range(per)), [per]]


def test_stacked_is_a_view_for_one_tensor_and_a_stack_for_several():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    one = stacked([a])
    assert one.shape == (1, 3, 4) and one.data_ptr() == a.data_ptr()  # no copy
    two = stacked([a, b])
    assert two.shape == (2, 3, 4) and torch.equal(two[0], a) and torch.equal(two[1], b)


# ----------------------------------------------------------------------------------- config validation


@pytest.mark.parametrize("bad", [-1, True, False, 1.5, "big", "AUTO", [1]])
def test_invalid_stack_bytes_raise(bad):
    for make in (create_local_config, create_dtensor_config, create_auto_config):
        with pytest.raises(ValueError, match="stack_bytes"):
            make(stack_bytes=bad)
    with pytest.raises(ValueError, match="stack_bytes"):
        DistributedConfig(stack_bytes=bad)


@pytest.mark.parametrize("good", [0, 1, TWO, 2**40, None, "auto"])
def test_valid_stack_bytes_accepted(good):
    assert create_local_config(stack_bytes=good).stack_bytes == good
    assert create_dtensor_config(stack_bytes=good).stack_bytes == good


def test_default_is_auto_and_plain_muon_runs_one_tensor_per_call_on_cpu():
    assert DistributedConfig().stack_bytes == "auto"
    assert create_local_config().stack_bytes == "auto"
    params = make_params()
    assert build_engine(params, None).stack_bytes == "auto"  # type: ignore[attr-defined]
    opt = disco.Muon(params, lr=0.02, compute_dtype=torch.float32)  # distributed_config=None
    assert isinstance(opt.engine, LocalEngine) and opt.engine.stack_bytes == "auto"
    batches = step(opt, params, seed=1)
    assert batches == [(1, *WIDE)] * 6 + [(1, *SQUARE)] * 2


# ----------------------------------------------------------------------------------- LocalEngine via Muon


def make_params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def step(opt, params, seed: int) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    return list(opt.engine.stats.batches)


EXPECTED_LOCAL = {
    0: [(1, *WIDE)] * 6 + [(1, *SQUARE)] * 2,
    None: [(6, *WIDE), (2, *SQUARE)],
    TWO: [(2, *WIDE)] * 3 + [(2, *SQUARE)],  # the budget holds four 32 x 32: both in one stack
    ITEM + 1: [(1, *WIDE)] * 6 + [(2, *SQUARE)],
    "auto": [(1, *WIDE)] * 6 + [(1, *SQUARE)] * 2,
}


def run_local(stack_bytes, steps: int = 3):
    params = make_params()
    opt = disco.Muon(
        params, lr=0.02, compute_dtype=torch.float32, distributed_config=create_local_config(stack_bytes=stack_bytes)
    )
    assert isinstance(opt.engine, LocalEngine)
    per_step = [step(opt, params, seed=100 + k) for k in range(steps)]
    return [p.detach().clone() for p in params], per_step, opt


@pytest.mark.parametrize("stack_bytes", list(EXPECTED_LOCAL), ids=repr)
def test_local_engine_batches_follow_the_budget(stack_bytes):
    _, per_step, opt = run_local(stack_bytes, steps=2)
    for batches in per_step:  # reset at every step: the same list each time, not a growing one
        assert batches == EXPECTED_LOCAL[stack_bytes]
    assert opt.engine.stats.tensors_computed == len(SHAPES)
    assert opt.engine.stats.matrices_computed == len(SHAPES)
    opt.engine.stats.reset()
    assert opt.engine.stats.batches == []


def test_local_results_do_not_depend_on_the_budget():
    # measured: bit-identical on this CPU; 1e-6 leaves room for a BLAS whose batched kernels round differently
    runs = {sb: run_local(sb)[0] for sb in (0, None, TWO)}
    start = make_params()
    for sb in (None, TWO):
        for a, b in zip(runs[0], runs[sb]):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    assert all((a - s).abs().max() > 1e-3 for a, s in zip(runs[0], start))  # the steps moved every parameter


def test_stack_observer_sees_each_call():
    params = make_params()
    opt = disco.Muon(
        params, lr=0.02, compute_dtype=torch.float32, distributed_config=create_local_config(stack_bytes=TWO)
    )
    seen = []
    opt.engine.stats.observers.append(lambda spec, stack: seen.append(tuple(stack.shape)))
    step(opt, params, seed=1)
    assert seen == EXPECTED_LOCAL[TWO] == opt.engine.stats.batches


# ----------------------------------------------------------------------------------- PlanEngine on 2 ranks

EXPERTS = (4, 16, 64)  # 3-D stacks, sharded on the expert dim: each rank computes its own (2, 16, 64) pieces
DIST_SHAPES = SHAPES + [EXPERTS] * 3
DIST_BUDGETS = [0, None, TWO, "auto"]


def _dist_full(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in DIST_SHAPES]


def _body_plan_engine(rank, world_size, budgets, steps):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from disco.distributed.executor import PlanEngine

    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for sb in budgets:
        params = [nn.Parameter(distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)) for t in _dist_full(0)]
        cfg = create_dtensor_config(stack_bytes=sb)
        opt = disco.Muon(params, lr=0.02, compute_dtype=torch.float32, distributed_config=cfg)
        assert isinstance(opt.engine, PlanEngine)
        per_step = []
        for k in range(steps):
            for p, full in zip(params, _dist_full(100 + k)):
                p.grad = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
            opt.step()
            per_step.append(list(opt.engine.stats.batches))
        out[sb] = ([p.full_tensor() for p in params], per_step, opt.assignments)
    return out


def _reference(steps: int) -> list[torch.Tensor]:
    params = [nn.Parameter(t) for t in _dist_full(0)]
    cfg = create_local_config(stack_bytes=None)
    opt = disco.Muon(params, lr=0.02, compute_dtype=torch.float32, distributed_config=cfg)
    for k in range(steps):
        for p, full in zip(params, _dist_full(100 + k)):
            p.grad = full
        opt.step()
    assert sorted(opt.engine.stats.batches) == sorted([(6, *WIDE), (2, *SQUARE), (3, *EXPERTS)])
    return [p.detach() for p in params]


@pytest.mark.dist
def test_plan_engine_owner_stacks_respect_the_budget():
    steps = 2
    out = run_ranks(_body_plan_engine, 2, DIST_BUDGETS, steps, timeout=60)
    want = _reference(steps)
    piece = (2, *EXPERTS[1:])  # each rank's half of an expert stack
    local_item = 2 * 16 * 64 * 4  # bytes of that piece: the budget TWO holds two of them
    assert TWO // local_item == 2
    expected = {  # per rank: 3 of the 64 x 32 and 1 of the 32 x 32 owned (the plan splits them evenly)
        0: [(1, *piece)] * 3 + [(1, *WIDE)] * 3 + [(1, *SQUARE)],
        None: [(3, *piece), (3, *WIDE), (1, *SQUARE)],
        TWO: [(2, *piece), (1, *piece), (2, *WIDE), (1, *WIDE), (1, *SQUARE)],
    }
    expected["auto"] = expected[0]  # "auto" is 0 on CPU
    for rank, by_budget in enumerate(out):
        for sb in DIST_BUDGETS:
            params, per_step, assignments = by_budget[sb]
            owned = assignments[rank]
            assert sum(i < len(SHAPES) and SHAPES[i] == WIDE for i in owned) == 3
            for batches in per_step:
                assert sorted(batches) == sorted(expected[sb]), f"rank {rank}, stack_bytes={sb!r}: {batches}"
                if sb is not None and sb != "auto":
                    assert all(n * _item_bytes(shape) <= max(sb, _item_bytes(shape)) for n, *shape in batches)
            for got, ref in zip(params, want):
                torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    # every 64 x 32 and 32 x 32 parameter computed on exactly one owner
    owners = [set(i for i in by_budget[None][2][r] if i < len(SHAPES)) for r, by_budget in enumerate(out)]
    assert owners[0].isdisjoint(owners[1]) and owners[0] | owners[1] == set(range(len(SHAPES)))


def _item_bytes(shape) -> int:
    n = 4
    for d in shape:
        n *= d
    return n
