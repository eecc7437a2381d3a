"""The engine: the whole vocabulary an optimizer uses to compute on tensors whose pieces live on many ranks.

An optimizer registers its parameters once (the engine reads their layouts) and then speaks in movements:

* ``map(jobs, spec, out=...)``: each job is a local piece of a tensor with a layout (by default its
  parameter's). Sharded or replicated pieces are gathered to one owner per tensor, ``Partial`` pieces are summed
  (or averaged) there; the owner runs ``spec`` once per bucket of same-shape tensors; the result comes back in
  the input layout (``out="input"``: each holder gets its piece, ``Partial`` axes come back reduced) or whole to
  every holder (``out="replicated"``).
* ``all_reduce(tensors, layouts, over=..., op=...)``: small coalesced reductions of local pieces over a
  layout's replica axes (``over="replicas"``), the axes that shard tensor dim ``d`` (``over=d``) or every
  shard axis (``over="shards"``).
* ``check_step`` / ``check_agreement``: every rank holds the same thing, or every rank raises the same error
  (``disco.distributed.agreement``); a failure inside ``map`` (an exception, a non-finite result) is raised on
  every rank as the same ``StepError`` before any result is returned.
* ``Job.consume``: a job's result is handed to a function as soon as it is final on this rank and good on its
  owner, and not kept (``map`` returns an empty tensor in its place), so that a caller committing from
  ``consume`` holds one stack's results at a time. A failed or non-finite result is never handed: its owner
  sends each result with its status (ok, non-finite, failed: ``disco.distributed.bucket``), which each holder
  reads before handing; results with no owner to vouch for them (pieces computed in place on each rank, user
  callbacks) wait for every rank's verdict. Failures are still raised at the end of ``map``; what was consumed
  before stays consumed.
* ``stats``, ``assignments``, ``current_rank``, ``layout(index)``.

The engine never names an algorithm: it calls ``spec(stack)``, ``spec.cost(shape)``, ``spec.batch_ndim(shape)``,
``spec.result_shape(shape)``, ``spec.needs_whole`` and, if the spec has them, ``spec.result_dtype(dtype, device)``
(results narrower than the wire travel back as they are) and ``spec.input_dtype(dtype, device)`` (each piece is
cast to it before it is sent or stacked, on every engine: a bf16 direction travels in bf16, exactly).
``LocalEngine`` is the single-process twin (the oracle); ``disco.distributed.executor.PlanEngine`` runs a plan over
a process group; ``disco.distributed.callbacks`` drives user functions. ``build_engine`` picks one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ..ops.specs import Spec
from .agreement import Outcomes, StepError, settle
from .layout import Layout

if TYPE_CHECKING:
    from .config import DistributedConfig

#: ``stack_bytes="auto"`` on accelerators (not measured here: no GPU in this project's CI).
GPU_STACK_BYTES = 64 * 2**20

Out = Literal["input", "replicated"]
Over = Literal["replicas", "shards"] | int
ReduceOp = Literal["sum", "avg", "max", "min"]


@dataclass(frozen=True, eq=False)
class Job:
    """One tensor to map: ``tensor`` is this rank's local piece of tensor ``index`` (a registered parameter).

    ``spec`` overrides the ``spec`` given to ``map``; ``layout`` overrides the parameter's layout (a tensor
    derived from the parameter, e.g. ``Partial`` products or state of another shape). ``make`` computes the
    piece when the engine needs it (``tensor`` is then only a template of its shape, dtype and device, e.g. the
    gradient it derives from): the local engine makes each stack's pieces just before its spec call and drops
    them after, so that an optimizer's directions never all live at once. ``consume``: see the module docstring.
    """

    index: int
    tensor: Tensor
    spec: Spec | None = None
    layout: Layout | None = None
    make: Callable[[], Tensor] | None = None
    consume: Callable[[Tensor], object] | None = None

    def values(self) -> Tensor:
        """The piece itself: ``make()`` if given (called once per use), else ``tensor``."""
        return self.make() if self.make is not None else self.tensor


@dataclass
class EngineStats:
    """Counters on this rank since the last ``reset()`` (an optimizer resets them at the start of each step)."""

    matrices_computed: int = 0
    tensors_computed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    # One status element per returned result (``disco.distributed.bucket``), apart from the payload above, which
    # is what the planner's lower bound counts.
    status_bytes_sent: int = 0
    status_bytes_received: int = 0
    collectives: int = 0  # collectives that move data (all-to-alls, all-reduces)
    checks: int = 0  # agreement collectives (a few bytes per rank)
    compute_s: float = 0.0  # seconds inside ``spec(stack)`` calls
    batches: list[tuple[int, ...]] = field(default_factory=list)  # the stack shape of each spec call
    #: called as ``observer(spec, stack)`` before each spec call: the public hook for tests and benchmarks.
    observers: list[Callable[[Spec, Tensor], None]] = field(default_factory=list)

    def reset(self) -> None:
        self.matrices_computed = self.tensors_computed = 0
        self.bytes_sent = self.bytes_received = self.collectives = self.checks = 0
        self.status_bytes_sent = self.status_bytes_received = 0
        self.compute_s = 0.0
        self.batches = []


class Engine(Protocol):
    """What ``disco.optim`` sees of the distribution layer (see the module docstring)."""

    @property
    def stats(self) -> EngineStats: ...

    @property
    def current_rank(self) -> int: ...

    @property
    def has_layouts(self) -> bool:
        """``False``: ``layout()`` and ``all_reduce()`` refuse (the callbacks config)."""
        ...

    @property
    def assignments(self) -> dict[int, list[int]]: ...

    def layout(self, index: int) -> Layout: ...

    def map(self, jobs: Sequence[Job], spec: Spec | None = None, *, out: Out = "input") -> list[Tensor]: ...

    def assign(self, jobs: Sequence[Job], spec: Spec | None = None, *, out: Out = "input") -> dict[int, list[int]]: ...

    def all_reduce(
        self, tensors: Sequence[Tensor], layouts: Sequence[Layout], *, over: Over = "replicas", op: ReduceOp = "sum"
    ) -> None: ...

    def check_step(
        self, present: Sequence[bool], nonfinite: Sequence[bool], settings: Sequence[str], error: str | None
    ) -> list[int]:
        """One collective before a step: gradient presence and settings agree, a rank's local ``error`` is raised
        everywhere (``StepError``); returns the indices whose gradient is non-finite on some rank. Entries of
        ``nonfinite`` past ``len(present)`` are the caller's votes, OR-ed over ranks and returned the same way."""
        ...

    def check_agreement(self, items: Sequence[str], what: str) -> None: ...


def local_piece(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local piece, a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def n_matrices(shape: Sequence[int], batch_ndim: int) -> int:
    return math.prod(shape[:batch_ndim]) if batch_ndim else 1


def spec_of(job: Job, spec: Spec | None) -> Spec:
    s = job.spec if job.spec is not None else spec
    if s is None:
        raise ValueError(f"job for tensor {job.index} has no spec and map() was given none")
    return s


def run_spec(
    spec: Spec, stack: Tensor, stats: EngineStats, outcomes: Outcomes | None = None, positions: Sequence[int] = ()
) -> Tensor:
    """``spec(stack)``, timed into ``stats.compute_s`` and recorded in ``stats.batches``.

    With ``outcomes``, an exception or a non-finite result is recorded for the job ``positions`` instead of
    raised (an exception's result is an all-NaN stand-in of the result's shape), so the rank keeps taking part in
    the collectives that follow and every rank learns of it in ``settle``; a holder learns it from the status its
    owner sends with the result, not from the values.
    """
    stack = as_input(spec, stack)
    for observe in stats.observers:
        observe(spec, stack)
    stats.batches.append(tuple(stack.shape))
    t0 = time.perf_counter()
    try:
        out = spec(stack)
    except Exception as e:
        if outcomes is None:
            raise
        outcomes.fail(positions, e)
        shape = (stack.shape[0], *spec.result_shape(tuple(stack.shape[1:])))
        out = torch.full(shape, math.nan, dtype=stack.dtype, device=stack.device)
    stats.compute_s += time.perf_counter() - t0
    if outcomes is not None:
        outcomes.record(positions, out)
    return out


def result_dtype_of(spec: Spec, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``spec.result_dtype(dtype, device)``; a spec without one is taken to return its input's dtype."""
    f = getattr(spec, "result_dtype", None)
    return dtype if f is None else f(dtype, device)


def input_dtype_of(spec: Spec, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``spec.input_dtype(dtype, device)``: the dtype a piece of ``dtype`` is cast to before it is sent or stacked
    (the direction in bf16 for a bf16 compute dtype); a spec without one keeps ``dtype``."""
    f = getattr(spec, "input_dtype", None)
    return dtype if f is None else f(dtype, device)


def as_input(spec: Spec, t: Tensor) -> Tensor:
    """``t`` cast to ``spec``'s input dtype (itself when it is in it): every engine casts at this point, so a
    distributed step that sends the cast pieces equals one process bit for bit."""
    return t.to(input_dtype_of(spec, t.dtype, t.device))


def handed(job: Job, result: Tensor, ok: bool, outcomes: Outcomes, position: int) -> Tensor:
    """What ``map`` returns for ``job``: ``result``, or, when the job has ``consume`` and the result is ``ok``,
    an empty tensor once ``consume(result)`` ran (an exception there is recorded under ``position``: the rank
    stays in the collectives that follow and ``settle`` raises it everywhere)."""
    if job.consume is None or not ok:
        return result
    outcomes.consumed = True  # from here on a failure leaves the step partially applied
    try:
        return consumed(job, result)
    except Exception as e:
        outcomes.fail([position], e)
        return result


def consumed(job: Job, result: Tensor) -> Tensor:
    """``job.consume(result)`` if it has one; what ``map`` returns in its place (an empty tensor)."""
    if job.consume is None:
        return result
    job.consume(result)
    return result.new_empty(0)


def cut_stacks(
    members: list[int], item_bytes: int, stack_bytes: int | str | None, device: torch.device
) -> list[list[int]]:
    """``members`` (same shape and dtype, ``item_bytes`` each) cut into stacks of at most ``stack_bytes``
    (``"auto"``: ``auto_stack_bytes(device)``; ``None``: one stack)."""
    budget = auto_stack_bytes(device) if stack_bytes == "auto" else stack_bytes
    per = max(1, len(members)) if budget is None else max(1, int(budget) // max(item_bytes, 1))
    return [members[k : k + per] for k in range(0, len(members), per)]


def auto_stack_bytes(device: torch.device) -> int:
    """``stack_bytes="auto"``: 0 on CPU (one tensor per call: batching saves no matmul time there and each stacked
    byte holds about three more in flight; ``python -m disco bench step --stack-bytes``), ``GPU_STACK_BYTES`` on
    accelerators, where batching small matrices fills the device."""
    return 0 if device.type == "cpu" else GPU_STACK_BYTES


def stacked(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.stack``, but a lone tensor is a view (no copy: specs never write into their input)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


def run_stacked(
    spec: Spec,
    members: list[int],
    piece: Callable[[int], Tensor],
    like: Tensor,
    stack_bytes: int | str | None,
    stats: EngineStats,
    outcomes: Outcomes,
    positions: Callable[[int], int],
    put: Callable[[int, Tensor], object],
) -> None:
    """``spec`` over the pieces of ``members`` (all shaped, typed and placed like ``like``), in stacks of at most
    ``stack_bytes``; ``piece(k)`` is called when its stack is built and ``put(k, result)`` as soon as it is
    computed, so only one stack's pieces live at a time. Counts the tensors and matrices in ``stats``; failures
    go to ``outcomes`` under ``positions(k)``."""
    shape = tuple(like.shape)
    for chunk in cut_stacks(members, like.numel() * like.element_size(), stack_bytes, like.device):
        pieces = stacked([as_input(spec, piece(k)) for k in chunk])  # cast one piece at a time
        res = run_spec(spec, pieces, stats, outcomes, [positions(k) for k in chunk])
        del pieces
        for k, r in zip(chunk, res):
            put(k, r)
        del res, r  # else alive through the next stack's spec call
    stats.matrices_computed += len(members) * n_matrices(shape, spec.batch_ndim(shape))
    stats.tensors_computed += len(members)


class LocalEngine:
    """Everything on this process: same-spec, same-shape tensors stacked into batched calls of at most
    ``stack_bytes`` input bytes (``DistributedConfig.stack_bytes``; ``None``: unbounded)."""

    has_layouts = True

    def __init__(
        self, params: Sequence[Tensor], names: Sequence[str] | None = None, *, stack_bytes: int | str | None = "auto"
    ) -> None:
        self.stack_bytes = stack_bytes
        self.layouts = [Layout.replicated(tuple(p.shape), (0,)) for p in params]
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(params))]
        self.stats = EngineStats()
        self.current_rank = 0
        self._assigned: list[int] = []

    @property
    def assignments(self) -> dict[int, list[int]]:
        return {0: list(self._assigned)}

    def layout(self, index: int) -> Layout:
        return self.layouts[index]

    def assign(self, jobs: Sequence[Job], spec: Spec | None = None, *, out: Out = "input") -> dict[int, list[int]]:
        self._assigned = sorted({j.index for j in jobs if spec_of(j, spec).needs_whole})
        return self.assignments

    def map(self, jobs: Sequence[Job], spec: Spec | None = None, *, out: Out = "input") -> list[Tensor]:
        results: list[Tensor | None] = [None] * len(jobs)
        by: dict[tuple[Any, ...], list[int]] = {}
        for k, job in enumerate(jobs):
            if job.layout is not None and job.layout.partial_count > 1:
                raise ValueError(f"tensor {job.index}: a Partial layout needs a distributed engine")
            by.setdefault((spec_of(job, spec), tuple(job.tensor.shape), job.tensor.dtype), []).append(k)
        outcomes = Outcomes()

        def put(k: int, r: Tensor) -> None:
            results[k] = handed(jobs[k], r, outcomes.ok(k), outcomes, k)

        for (s, _, _), members in by.items():
            like = jobs[members[0]].tensor
            run_stacked(s, members, lambda k: jobs[k].values(), like, self.stack_bytes, self.stats, outcomes, int, put)
        self._assigned = sorted({j.index for j in jobs})
        settle(outcomes, None, [0], [j.index for j in jobs], self.names, collective=False)
        return results  # type: ignore[return-value]  # every slot was filled above

    def all_reduce(
        self, tensors: Sequence[Tensor], layouts: Sequence[Layout], *, over: Over = "replicas", op: ReduceOp = "sum"
    ) -> None:
        return None  # one process holds every piece: nothing to reduce

    def check_step(
        self, present: Sequence[bool], nonfinite: Sequence[bool], settings: Sequence[str], error: str | None
    ) -> list[int]:
        if error:
            raise StepError(f"step refused: {error}")
        return [i for i, bad in enumerate(nonfinite) if bad]

    def check_agreement(self, items: Sequence[str], what: str) -> None:
        return None


def build_engine(
    params: Sequence[Tensor], config: DistributedConfig | None, names: Sequence[str] | None = None
) -> Engine:
    """The engine for ``params`` (every parameter of an optimizer, in ``state_dict()`` order).

    ``config=None`` with DTensor parameters reads their layouts (``create_dtensor_config()``); ``None`` with plain
    tensors runs on this process alone.
    """
    if config is None and any(isinstance(p, DTensor) for p in params):
        from .config import create_dtensor_config

        config = create_dtensor_config()
    if config is None:
        return LocalEngine(params, names)
    if config.source == "local":
        return LocalEngine(params, names, stack_bytes=config.stack_bytes)
    if config.source == "callbacks":
        from .callbacks import CallbackEngine

        return CallbackEngine(params, config=config, names=names)
    from .executor import PlanEngine

    return PlanEngine(params, config=config, names=names)
