"""The status each result travels back with (``disco.distributed.bucket``), on 2 real gloo ranks.

A holder hands a result to ``Job.consume`` only when its owner's status says ok; it never looks at the values.
Oracles: a result that raised, one that is NaN, and ones that are non-finite with finite leading entries (an
overflowing sum, a NaN tail) are committed by no rank and raise the same ``StepError`` (``failed`` or
``nonfinite``) on every rank, while the good results of the same map are committed everywhere; a result that is
finite but was computed from a piece whose ``make()`` raised on its owner is refused from its status alone; the
status bytes are counted apart from the payload, which stays at the planner's figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from dist_harness import run_ranks
from torch import Tensor, nn

from disco.distributed import Job, build_engine, create_dtensor_config
from disco.distributed.agreement import StepError

SHAPE = (8, 6)  # row-sharded over 2 ranks: 4 rows each
BAD = 2  # the index of the tensor that goes wrong


@dataclass(frozen=True)
class Doubling:
    """``2 * X`` on whole tensors, or a way of going wrong (``how``)."""

    how: str = "ok"  # "ok" | "raise" | "nan" | "overflow" | "nan_tail" | "robust" (NaN inputs read as 0)
    needs_whole: bool = True

    def __call__(self, stack: Tensor) -> Tensor:
        if self.how == "raise":
            raise RuntimeError("doubling exploded")
        if self.how == "nan":
            return torch.full_like(stack, math.nan)
        if self.how == "overflow":  # every entry finite; their sum is not, so the owner finds it non-finite
            return torch.full_like(stack, 3e38)
        out = 2 * (torch.nan_to_num(stack, nan=0.0) if self.how == "robust" else stack)
        if self.how == "nan_tail":  # a finite first entry, a NaN last one
            out.reshape(out.shape[0], -1)[:, -1] = math.nan
        return out

    def cost(self, shape: tuple[int, ...]) -> float:
        return float(math.prod(shape))

    def batch_ndim(self, shape: tuple[int, ...]) -> int:
        return 0

    def result_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape


def _full(i: int) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))


def _body(rank, world_size, how, out, fail_make_on_owner):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    params = [nn.Parameter(distribute_tensor(_full(i), mesh, [Shard(0)], src_data_rank=None)) for i in range(3)]
    engine = build_engine(params, create_dtensor_config())
    local = [p.to_local().detach() for p in params]
    specs = [Doubling(), Doubling(), Doubling(how)]
    owners = engine.assign([Job(i, t, s) for i, (t, s) in enumerate(zip(local, specs))], out=out)
    owner = next(r for r, ixs in owners.items() if BAD in ixs)

    def boom() -> Tensor:
        raise RuntimeError("make exploded")

    committed: dict[int, Tensor] = {}
    jobs = [
        Job(
            i,
            t,
            s,
            make=boom if i == BAD and fail_make_on_owner and rank == owner else None,
            consume=lambda r, i=i: committed.setdefault(i, r.clone()),
        )
        for i, (t, s) in enumerate(zip(local, specs))
    ]
    engine.stats.reset()
    error = None
    try:
        engine.map(jobs, out=out)
    except StepError as e:
        error = (str(e), e.failed, e.nonfinite, e.consumed)
    st = engine.stats
    plan = engine.plan  # type: ignore[attr-defined]
    planned = plan.bytes_per_rank(element_size=4)[rank]
    return {
        "owned": owners.get(rank, []),
        "error": error,
        "committed": committed,
        "local": local,
        "bytes": (st.bytes_sent, st.bytes_received, planned["sent"], planned["received"]),
        "status_bytes": (st.status_bytes_sent, st.status_bytes_received),
    }


def _want(i: int, rank: int, out: str) -> Tensor:
    whole = 2 * _full(i)
    return whole if out == "replicated" else whole.chunk(2)[rank]


@pytest.mark.dist
@pytest.mark.parametrize("out", ["input", "replicated"])
@pytest.mark.parametrize(
    ("how", "field"),
    [("raise", "failed"), ("nan", "nonfinite"), ("overflow", "nonfinite"), ("nan_tail", "nonfinite")],
)
def test_a_bad_result_is_committed_nowhere_and_raised_alike(how, field, out):
    got = run_ranks(_body, 2, how, out, False, timeout=90, pg_timeout=60)
    for rank, r in enumerate(got):
        assert r["error"] is not None
        text, failed, nonfinite, consumed = r["error"]
        assert (failed, nonfinite) == (([BAD], []) if field == "failed" else ([], [BAD]))
        assert consumed  # the good results were handed before the verdict
        assert BAD not in r["committed"]
        for i in (0, 1):
            assert torch.equal(r["committed"][i], _want(i, rank, out))
    assert got[0]["error"] == got[1]["error"]


@pytest.mark.dist
def test_a_finite_result_of_a_failed_make_is_refused_by_its_status():
    """The owner's own piece could not be made: its NaN stand-in goes through a spec that reads NaN as 0, so the
    result is finite and only its status says it failed. No rank commits it; every rank raises ``failed``."""
    got = run_ranks(_body, 2, "robust", "input", True, timeout=90, pg_timeout=60)
    for rank, r in enumerate(got):
        text, failed, nonfinite, consumed = r["error"]
        assert failed == [BAD] and nonfinite == [] and "make exploded" in text
        assert BAD not in r["committed"]
        assert all(torch.equal(r["committed"][i], _want(i, rank, "input")) for i in (0, 1))
    assert got[0]["error"] == got[1]["error"]


@pytest.mark.dist
@pytest.mark.parametrize("out", ["input", "replicated"])
def test_status_bytes_are_counted_apart_from_the_planned_payload(out):
    got = run_ranks(_body, 2, "ok", out, False, timeout=90)
    for rank, r in enumerate(got):
        assert r["error"] is None
        assert all(torch.equal(r["committed"][i], _want(i, rank, out)) for i in range(3))
        sent, received, planned_sent, planned_received = r["bytes"]
        assert (sent, received) == (planned_sent, planned_received)
        # One float32 status per result returned: each tensor's owner returns it to the other rank.
        owned = len(r["owned"])
        assert r["status_bytes"] == (4 * owned, 4 * (3 - owned))
    assert got[0]["status_bytes"] == got[1]["status_bytes"][::-1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_record_flags_exactly_the_non_finite_members(dtype):
    from disco.distributed.agreement import Outcomes

    stack = torch.full((4, 64, 64), 1.0, dtype=dtype)
    # a finite member whose sum exceeds fp16's range (131072 > 65504): fp16 must be summed wider
    stack[1] = 32.0 if dtype == torch.float16 else torch.finfo(dtype).max / 2**14
    stack[2, 3, 5] = float("nan")
    stack[3, 0, 0] = float("-inf")
    outcomes = Outcomes()
    outcomes.record([10, 11, 12, 13], stack)
    assert outcomes.nonfinite == {12, 13}
