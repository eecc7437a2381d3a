"""Overlap with backward: a bucket's exchange and orthogonalization start from gradient hooks.

Opt in with ``opt.overlap_with_backward(bucket_bytes=...)`` (on every rank, after the optimizer is built); the
results are those of the plain ``step()`` in every case, because ``step()`` commits the work done in backward
only when every rank agrees that it was done on the gradients that are still there, and otherwise recomputes.

Buckets. The parameters of the rules whose ``compute`` is per parameter (the LMO rule of Disco / Muon / Scion,
NorMuon's, and Dion's) are taken in reverse registration order, the order in which backward
produces gradients, and cut into buckets of at most ``bucket_bytes`` (global shape times element size, so every
rank forms the same buckets; checked with one agreement collective). Light-mode groups (``is_light``: the
momentum lives in ``p.grad``), element-wise groups and parameters with ``requires_grad=False`` stay in ``step()``.

Readiness. A post-accumulate-grad hook on each bucketed parameter counts it ready for this backward:

* plain tensors (one process, or Disco's DDP mode ``average_gradients=True`` over replicated parameters without
  a wrapper): autograd calls the hook once the gradient is accumulated into ``p.grad``;
* FSDP2 (``fully_shard``): autograd accumulates into the *unsharded* parameter; FSDP's ``post_backward``
  reduce-scatters, assigns (or adds into) the sharded ``p.grad`` and then calls the sharded parameter's
  post-accumulate-grad hooks itself (``foreach_reduce`` in ``torch.distributed.fsdp._fully_shard``), so the hook
  sees the final sharded gradient (HSDP's replica all-reduce included);
* torch ``DistributedDataParallel``: the hook sees the *local* gradient; the reducer writes the averaged one
  later, which changes the gradient's version, so every step falls back (correct, no gain, a warning). Build
  such models without the wrapper and pass ``create_auto_config(average_gradients=True)``: that is the DDP mode.

Buckets fire in bucket order only (a ready bucket waits for the earlier ones), so every rank issues the same
collectives in the same order; at the end of each backward (an autograd final callback) the buckets still
waiting fire with the gradients present then (a parameter without one is skipped, as ``step()`` skips it).
Firing a bucket runs what ``step()`` would run for it: one ``check_step`` (presence, non-finite gradients,
settings plus the phase ``"bucket k"``, local misuse), the gradient average (on copies: backward must not change
``p.grad``), and each rule's ``compute``; the commits are kept, nothing is written. An exception is captured
and raised by ``step()`` (errors inside the engine are agreed, so every rank raises it); no later bucket of
that backward fires. A rank whose phase differs (a bucket here, ``step()`` there) fails ``check_step``'s
settings agreement on every rank instead of exchanging mismatched tensors.

Gradient accumulation. A hook that fires again for a parameter whose bucket already fired (a second backward
before ``step()``) makes this step recompute everything: correct, but the work in backward is lost. Run the
earlier micro-batches under ``with opt.overlap_paused():`` (hooks do nothing there) so that buckets fire at the
last one only; under FSDP2, ``model.set_requires_gradient_sync(False)`` has the same effect (no reduce-scatter,
no hook). ``zero_grad()`` discards what backward computed.

``step()``. The local verdict (every bucket fired; each fired gradient, parameter and state tensor is the same
object at the same version; presence and settings unchanged; no groups added) is one more flag in ``step()``'s
own ``check_step`` (its non-finite vector has one entry more than there are parameters): if it is false on any
rank, every rank discards the precomputed results and runs the plain step; else every rank commits them, with
what is left (element-wise groups, ...) computed as usual. Non-finite gradients found in backward are reported
by that same check, so the ``nonfinite`` policy applies unchanged and nothing is written.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from ..distributed.engine import Engine, local_piece
from . import phases, validation
from .contract import RULES
from .rules import Commit, Item, Streamed

if TYPE_CHECKING:
    from .base import SpectralOptimizer

DEFAULT_BUCKET_BYTES = 16 * 2**20


@dataclass(frozen=True)
class OverlapConfig:
    """``bucket_bytes``: the most bytes of parameters per bucket (one parameter may exceed it alone); smaller
    buckets start earlier in backward but plan and agree more often (one small collective each)."""

    bucket_bytes: int = DEFAULT_BUCKET_BYTES

    def __post_init__(self) -> None:
        if isinstance(self.bucket_bytes, bool) or not isinstance(self.bucket_bytes, int) or self.bucket_bytes < 0:
            raise ValueError(f"bucket_bytes={self.bucket_bytes!r} must be an int >= 0")


@dataclass
class _Fired:
    """One bucket's work done in backward: what ``step()`` commits if nothing changed since."""

    bucket: int
    items: list[Item]  # the bucket's parameters that had a gradient
    settings: tuple[str, ...]
    seen: list[tuple[Tensor | None, int, int, list[tuple[str, Tensor, int]]]]  # grad, versions, state
    nonfinite: list[int]  # agreed: indices whose gradient is not finite on some rank (then nothing computed)
    commits: list[tuple[list[Item], Commit]] = field(default_factory=list)
    averaged: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (local p.grad, its average)
    assignments: dict[int, list[int]] = field(default_factory=dict)


class _BucketContext:
    """The optimizer as a rule sees it, with averaged copies standing in for the gradients."""

    def __init__(self, opt: SpectralOptimizer, grads: dict[int, Tensor]) -> None:
        self._opt = opt
        self._grads = grads

    @property
    def engine(self) -> Engine:
        return self._opt.engine

    def state_of(self, p: Tensor) -> dict[str, Any]:
        return self._opt.state_of(p)

    @property
    def streamed(self) -> Streamed | None:
        return None  # work done ahead is held until step() validates it

    @property
    def wants_updates(self) -> bool:
        return self._opt.wants_updates  # read by the commit, which runs inside step()

    def grad_of(self, p: Tensor) -> Tensor:
        local = self._grads.get(id(p))
        if local is None:
            return self._opt.grad_of(p)
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            whole = DTensor.from_local(local, g.device_mesh, g.placements, shape=g.shape, stride=g.stride())
            return local_piece(whole.redistribute(p.device_mesh, p.placements))
        return local


def overlappable(opt: SpectralOptimizer, items: Sequence[Item]) -> list[Item]:
    """The items whose rule declares it can run ahead (it computes each parameter on its own, so a bucket computes
    what a step would). Element-wise rules stay in ``step()``: their work is local, nothing to overlap. Any other
    rule is refused, naming the group: overlap is never silently skipped."""
    out = []
    for it in items:
        rule = type(opt._rule(it.group))
        if rule.can_run_ahead(it.settings):
            out.append(it)
        elif rule.exchanges:
            ahead = sorted(name for name, c in RULES.items() if c.runs_ahead)
            raise ValueError(
                f"overlap_with_backward: parameter {validation.describe(it.name, it.param)} in a group of algorithm "
                f"{it.group['algorithm']!r} cannot compute ahead in backward"
                + (" (is_light=True keeps the momentum in p.grad, which backward writes)" if rule.runs_ahead else "")
                + f"; algorithms that can: {ahead}"
            )
    return [it for it in out if it.param.requires_grad]


def make_buckets(engine: Engine, items: Sequence[Item], bucket_bytes: int) -> list[list[Item]]:
    """Reverse registration order, cut at ``bucket_bytes`` of global size (the same on every rank)."""
    buckets: list[list[Item]] = []
    size = 0
    for it in reversed(items):
        shape = engine.layout(it.index).shape if engine.has_layouts else tuple(it.param.shape)
        nbytes = math.prod(shape) * it.param.element_size()
        if not buckets or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(it)
        size += nbytes
    return buckets


def _version(t: Tensor) -> int:
    return int(local_piece(t)._version)


def _seen(opt: SpectralOptimizer, it: Item) -> tuple[Tensor | None, int, int, list[tuple[str, Tensor, int]]]:
    """What ``compute`` read, to tell at ``step()`` whether it is still there: the gradient object (held, so that
    its id cannot be reused), its version, the parameter's version, every state tensor and its version."""
    g = it.param.grad
    state = [(k, v, _version(v)) for k, v in sorted(opt.state_of(it.param).items()) if isinstance(v, Tensor)]
    return g, _version(g) if g is not None else -1, _version(it.param), state


class Overlap:
    """The hooks, the buckets and what they computed in the current backward (see the module docstring)."""

    def __init__(self, opt: SpectralOptimizer, config: OverlapConfig) -> None:
        self.opt = opt
        self.config = config
        self.buckets: list[list[Item]] = []
        self._handles: list[RemovableHandle] = []
        self._key: tuple[int, ...] = ()
        self._paused = 0
        self._warned: set[str] = set()
        self.committed = 0  # steps that committed the work done in backward
        self.recomputed = 0  # steps that discarded it (``reason``: this rank's last cause; None: another rank's)
        self.reason: str | None = None
        self.build()

    # ---- setup ----------------------------------------------------------------------------------------------
    def build(self) -> None:
        """Buckets and hooks over the optimizer's current parameters (collective: one agreement check)."""
        self.close()
        opt = self.opt
        items = opt._items()
        self._key = tuple(id(it.param) for it in items)
        self._n = len(items)
        self.buckets = make_buckets(opt.engine, overlappable(opt, items), self.config.bucket_bytes)
        opt.engine.check_agreement(
            [" ".join(it.name for it in b) for b in self.buckets], "the overlap buckets (parameters in order)"
        )
        for b, bucket in enumerate(self.buckets):
            for j, it in enumerate(bucket):
                self._handles.append(it.param.register_post_accumulate_grad_hook(self._hook(b, j)))  # type: ignore[no-untyped-call]  # torch leaves it untyped
        self.reset()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.buckets = []

    def reset(self) -> None:
        """Forget this backward's work (after ``step()``, at ``zero_grad()``)."""
        self._ready: list[set[int]] = [set() for _ in self.buckets]
        self._next = 0
        self._fired: list[_Fired] = []
        self._stale: str | None = None
        self._error: Exception | None = None
        self._queued = False
        self.started = False  # whether a bucket fired since the last reset (step() then keeps the stats)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # ---- backward -------------------------------------------------------------------------------------------
    def _hook(self, b: int, j: int) -> Any:
        def hook(_param: Tensor) -> None:
            if self._paused or self._stale is not None or self._error is not None:
                return
            if b < self._next or j in self._ready[b]:
                name = self.buckets[b][j].name
                self._stale = f"the gradient of {name!r} was accumulated again after its bucket was ready"
                return
            if not self._queued:
                self._queued = True
                try:
                    torch.autograd.Variable._execution_engine.queue_callback(self._flush)
                except RuntimeError:  # not inside a backward: the buckets wait for the next hooks or step()
                    self._queued = False
            self._ready[b].add(j)
            while self._next < len(self.buckets) and len(self._ready[self._next]) == len(self.buckets[self._next]):
                self._fire()

        return hook

    def _flush(self) -> None:
        """End of a backward: the buckets still waiting fire with the gradients present now."""
        self._queued = False
        while self._next < len(self.buckets) and self._stale is None and self._error is None:
            self._fire()

    def _fire(self) -> None:
        k = self._next
        self._next += 1
        if self._error is not None or self._stale is not None:
            return
        try:
            self._compute(k)
        except Exception as e:  # must not escape into autograd; step() raises it
            self._error = e

    def _compute(self, k: int) -> None:
        """Bucket ``k``: admitted (``phases.agree`` with the phase ``"bucket k"``) and computed as ``step()`` would,
        on averaged copies of the gradients; the commits are kept, nothing is written."""
        opt, engine = self.opt, self.opt.engine
        if not self.started:
            self.started = True
            engine.stats.reset()
        items = [it for it in self.buckets[k] if it.param.grad is not None]
        error = next((r for r in (validation.check_grad(it.name, it.param) for it in items) if r), None)
        settings = opt._settings()
        phase = [*settings, f"overlap phase: bucket {k} of {len(self.buckets)}"]
        anywhere, _ = phases.agree(engine, self._n, items, items, error, phase)
        fired = _Fired(k, items, tuple(settings), [_seen(opt, it) for it in items], anywhere)
        self._fired.append(fired)
        if anywhere:
            return  # step() reports them (the same check flags them again) and applies the nonfinite policy
        grads: dict[int, Tensor] = {}
        config = opt.distributed_config
        if config is not None and config.average_gradients and items:
            copies = phases.average_gradients(engine, items, copies=True)  # backward must not change p.grad
            grads = {id(it.param): c for it, c in zip(items, copies)}
            fired.averaged = [(local_piece(it.param.grad), c) for it, c in zip(items, copies)]  # type: ignore[arg-type]  # items have a gradient
        ctx = _BucketContext(opt, grads)
        for rule, mine in opt.by_rule(items):
            fired.commits.append((mine, rule.compute(mine, ctx)))
            for r, ks in engine.assignments.items():
                fired.assignments.setdefault(r, []).extend(ks)

    # ---- step -------------------------------------------------------------------------------------------------
    def error(self) -> Exception | None:
        """The exception captured in backward (then this backward's work is dropped)."""
        e = self._error
        if e is not None:
            self.reset()
        return e

    def verdict(self, items: Sequence[Item], present: Sequence[bool], settings: Sequence[str]) -> list[_Fired] | None:
        """This rank's work from backward if ``step()`` may commit it, else None (why: ``self.reason``)."""
        self.reason = self._why_not(items, present, tuple(settings))
        if self.reason is not None:
            if self.reason.startswith("the gradient of") and self.reason not in self._warned:
                self._warned.add(self.reason)
                warnings.warn(
                    f"overlap_with_backward: {self.reason}; step() recomputed everything (see "
                    "disco.optim.overlap: accumulate under opt.overlap_paused(); torch DDP wrappers reduce "
                    "gradients after the hooks, use average_gradients=True without the wrapper)",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return None
        return self._fired

    def _why_not(self, items: Sequence[Item], present: Sequence[bool], settings: tuple[str, ...]) -> str | None:
        if tuple(id(it.param) for it in items) != self._key:
            return "the optimizer's parameters changed"
        if self._stale is not None:
            return self._stale
        if self._next < len(self.buckets):
            return f"bucket {self._next} did not fire in backward"
        for f in self._fired:
            if f.settings != settings:
                return "the settings changed after backward"
            if sum(present[it.index] for it in self.buckets[f.bucket]) != len(f.items):
                return "gradients appeared or disappeared after backward"
            for it, (g, gv, pv, state) in zip(f.items, f.seen):
                if it.param.grad is not g or g is None or _version(g) != gv:
                    return f"the gradient of {it.name!r} changed after its bucket fired"
                if _version(it.param) != pv:
                    return f"parameter {it.name!r} changed after its bucket fired"
                now = self.opt.state_of(it.param)
                if any(now.get(key) is not t or _version(t) != v for key, t, v in state):
                    return f"the state of {it.name!r} changed after its bucket fired"
        return None

    def record(self, committed: bool) -> None:
        if committed:
            self.committed += 1
        else:
            self.recomputed += 1

    def assignments(self) -> dict[int, list[int]]:
        """rank -> parameter indices it computed in the buckets of the last overlapped step."""
        out: dict[int, list[int]] = {}
        for f in self._fired:
            for r, ks in f.assignments.items():
                out.setdefault(r, []).extend(ks)
        return {r: sorted(set(ks)) for r, ks in sorted(out.items())}
