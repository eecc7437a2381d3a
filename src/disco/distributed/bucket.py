"""One ``map`` on this rank, run bucket by bucket in five named phases.

* **pack**: this rank's pieces of a bucket are made (``Job.make``), cast to the wire dtype and sent to their
  owners with one all-to-all, up to ``prefetch_count`` buckets ahead of the one being computed;
* **exchange**: the owner waits for the bucket's pieces and views each one in the receive buffer;
* **compute**: the owner builds each stack of whole tensors just before its spec call (its own piece and the
  received ones written in place, ``Partial`` pieces summed) and keeps the results it must return;
* **return**: the owner sends each holder its piece of each result (or the whole result) with the result's
  status, one all-to-all; a holder hands a result to ``Job.consume`` only if its status is ``OK``;
* **settle**: every rank agrees on the map's failures (``agreement.settle``: the same ``StepError`` everywhere);
  results computed in place, which no owner vouched for, are consumed only after that.

The status protocol: in the return all-to-all, each owner -> holder segment is the holder's result pieces, flat,
in bucket order, followed by one status element per result, in the results' own dtype (``Status``: 0, 1 and 2
are exact in every float format). A holder thus learns from its owner, not by scanning the values, that a result
raised or is not finite. Those ``len(results)`` elements per segment are counted in ``EngineStats.status_bytes_*``,
apart from the payload bytes that the planner's lower bound describes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from ..ops.specs import Spec
from . import agreement
from .agreement import Outcomes
from .config import DistributedConfig
from .engine import (
    EngineStats,
    Job,
    Out,
    consumed,
    cut_stacks,
    handed,
    input_dtype_of,
    n_matrices,
    result_dtype_of,
    run_spec,
    run_stacked,
)
from .program import Exchange, Program
from .resolve import comm_dtype_for

Pieces = dict[int, list[tuple[int, Tensor]]]  # job -> (source rank, its piece), as received by the owner


class Status(IntEnum):
    """A result's status on its owner, sent with it (the codes ``agreement.settle`` agrees on)."""

    OK = 0
    NONFINITE = 1  # the spec returned a NaN or an infinity
    FAILED = 2  # the spec, or the making of the owner's own piece, raised


@dataclass(frozen=True)
class Comm:
    """The process group a run exchanges over and this rank's place in it."""

    group: ProcessGroup | None
    ranks: list[int]  # global ranks, in group order
    rank: int
    grank: dict[int, int]  # global rank -> group rank


@dataclass
class InFlight:
    """An all-to-all under way: its handle, its receive buffer and how many elements each group rank sends."""

    work: Any
    buf: Tensor
    splits: list[int]

    def segments(self) -> list[Tensor]:
        """Wait for it; the receive buffer cut into one flat view per source group rank."""
        self.work.wait()
        return split(self.buf, self.splits)


def split(flat: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """``flat`` cut into consecutive views of ``sizes`` elements."""
    views, offset = [], 0
    for n in sizes:
        views.append(flat[offset : offset + n])
        offset += n
    return views


def all_to_all(
    comm: Comm,
    stats: EngineStats,
    chunks: dict[int, list[Tensor]],
    recv: dict[int, int],
    like: Tensor,
    statuses: tuple[int, int] = (0, 0),
) -> InFlight:
    """Start one ``all_to_all_single``: ``chunks[g]`` (flattened, in order) to group rank ``g``, ``recv[g]``
    elements from it, in ``like``'s dtype and device. ``statuses``: how many of the elements sent and received
    are result statuses (counted apart from the payload)."""
    n = len(comm.ranks)
    in_splits = [sum(t.numel() for t in chunks.get(g, [])) for g in range(n)]
    out_splits = [recv.get(g, 0) for g in range(n)]
    flat = [t.reshape(-1) for g in range(n) for t in chunks.get(g, [])]
    send = torch.cat(flat) if flat else like.new_empty(0)
    buf = like.new_empty(sum(out_splits))
    es = like.element_size()
    stats.bytes_sent += (send.numel() - statuses[0]) * es
    stats.bytes_received += (buf.numel() - statuses[1]) * es
    stats.status_bytes_sent += statuses[0] * es
    stats.status_bytes_received += statuses[1] * es
    stats.collectives += 1
    work = dist.all_to_all_single(buf, send, out_splits, in_splits, group=comm.group, async_op=True)
    return InFlight(work, buf, out_splits)


class BucketRun:
    """``map(jobs)`` on this rank: the jobs at positions ``mapped`` follow ``prog`` (program position ``k`` is job
    ``mapped[k]``); the others need only their local piece and are computed in place. ``run()`` returns what
    ``map`` returns: each job's result, or an empty tensor where ``Job.consume`` took it."""

    def __init__(
        self,
        comm: Comm,
        config: DistributedConfig,
        stats: EngineStats,
        names: Sequence[str],
        prog: Program,
        jobs: Sequence[Job],
        specs: Sequence[Spec],
        mapped: list[int],
        out: Out,
    ) -> None:
        self.comm, self.config, self.stats, self.names = comm, config, stats, names
        self.prog, self.plan, self.out = prog, prog.plan, out
        self.jobs, self.specs, self.mapped = jobs, specs, mapped
        self.outcomes = Outcomes()
        self.results: list[Tensor | None] = [None] * len(jobs)  # by job position
        self.held: list[int] = []  # job positions consumed only after settle: no owner vouched for them
        self.like = [jobs[p].tensor for p in mapped]  # by program position, as everything below
        self.consuming = [jobs[p].consume is not None for p in mapped]
        self.device = self.like[0].device if self.like else torch.device("cpu")
        self.wires = [self.wire_of(ex.members) for ex in prog.exchanges]
        # Results travel back in their own dtype when it is narrower than the wire (a bf16 result of fp32 pieces:
        # exact, half the bytes); every rank knows it from the spec (agreed in the map's digest).
        self.rets = [
            _narrower(result_dtype_of(prog.specs[ex.members[0]], w, self.device), w)
            for ex, w in zip(prog.exchanges, self.wires)
        ]
        self.statuses: dict[int, Status] = {}  # this owner's results, as found right after their spec call
        self.gathers: deque[InFlight | None] = deque()  # packed buckets whose pieces are on their way
        self.packed = 0
        self.returns: deque[tuple[InFlight, Exchange]] = deque()  # results on their way back

    def wire_of(self, members: list[int]) -> torch.dtype:
        """The wire dtype of a bucket (its members share spec and dtype): the spec's input dtype (each piece is
        cast to it here as on one process), unless ``comm_dtype`` says otherwise or pieces are ``Partial`` (they
        are summed on the owner in their own dtype, as one process would hold the sum, and cast after)."""
        like = self.like[members[0]]
        partial = any(self.plan.layouts[k].partial_count > 1 for k in members)
        narrow = None if partial else input_dtype_of(self.prog.specs[members[0]], like.dtype, like.device)
        return comm_dtype_for(like, self.config, narrow)

    def run(self) -> list[Tensor]:
        self.compute_in_place()
        prefetch = max(0, self.config.prefetch_count)
        for b in range(len(self.prog.exchanges)):
            self.pack_ahead(b + prefetch)
            # One expression: nothing here keeps the bucket's pieces or results alive past its return.
            self.send_back(b, self.compute(b, self.exchange(b)))
            self.receive_back(keep=max(1, prefetch + 1))
        self.receive_back(keep=0)
        self.settle()
        return self.results  # type: ignore[return-value]  # every slot is filled once settle() returned

    # ---- pieces and results -------------------------------------------------------------------------------
    def made(self, p: int) -> Tensor:
        return _made(self.jobs[p], p, self.outcomes)

    def piece(self, k: int) -> Tensor:
        """This rank's piece of program position ``k``, made now (once per use)."""
        return self.made(self.mapped[k])

    def put(self, k: int, result: Tensor, ok: bool) -> None:
        """``result`` is final on this rank: handed to ``consume`` if ``ok`` here too (an empty piece has nothing to
        commit, and no owner's verdict reached it: not handed)."""
        p = self.mapped[k]
        good = ok and self.outcomes.ok(p) and result.numel() > 0
        self.results[p] = handed(self.jobs[p], result, good, self.outcomes, p)

    def status_of(self, k: int) -> Status:
        p = self.mapped[k]
        if p in self.outcomes.failed:
            return Status.FAILED
        return Status.NONFINITE if p in self.outcomes.nonfinite else Status.OK

    # ---- in place -----------------------------------------------------------------------------------------
    def compute_in_place(self) -> None:
        """Jobs that need no other rank's piece (element-wise specs, tensors sharded on batch dims only): each rank
        computes its own pieces, held until ``settle``."""
        exchanged = set(self.mapped)
        for p, spec in enumerate(self.specs):
            if p not in exchanged:
                self.results[p] = run_spec(spec, self.made(p).unsqueeze(0), self.stats, self.outcomes, [p])[0]
                self.held.append(p)
        for bucket in self.plan.local_buckets:
            self.compute_local_bucket(bucket)
            self.held.extend(self.mapped[k] for k in bucket)

    def compute_local_bucket(self, bucket: list[int]) -> None:
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k in bucket:
            if self.like[k].numel():
                by_shape.setdefault(tuple(self.like[k].shape), []).append(k)
            else:
                self.results[self.mapped[k]] = self.like[k].new_empty(self.like[k].shape)
        for members in by_shape.values():
            spec, first = self.prog.specs[members[0]], self.like[members[0]]
            run_stacked(
                spec, members, self.piece, first, self.config.stack_bytes, self.stats, self.outcomes,
                self.mapped.__getitem__, self.keep_local,
            )  # fmt: skip

    def keep_local(self, k: int, result: Tensor) -> None:
        self.results[self.mapped[k]] = result

    # ---- pack ---------------------------------------------------------------------------------------------
    def pack_ahead(self, last: int) -> None:
        """Start the gathers of the buckets up to ``last`` not started yet (``prefetch_count`` ahead)."""
        while self.packed < len(self.prog.exchanges) and self.packed <= last:
            self.gathers.append(self.pack(self.packed))
            self.packed += 1

    def pack(self, b: int) -> InFlight | None:
        """This rank's pieces of bucket ``b``, made, cast to the wire dtype and sent to their owners."""
        ex, wire = self.prog.exchanges[b], self.wires[b]
        if not ex.gathers:
            return None
        chunks = {g: [self.piece(k).to(wire) for k in ks] for g, ks in ex.send.items()}
        layouts, ranks = self.plan.layouts, self.comm.ranks
        sizes = {g: sum(layouts[k].local_numel(ranks[g]) for k in ks) for g, ks in ex.recv.items()}
        # shape: to owner g, this rank's pieces of the tensors g owns, flat, in bucket order (wire dtype); from
        # sender g, its pieces of the tensors this rank owns, the same way
        return all_to_all(self.comm, self.stats, chunks, sizes, torch.empty(0, dtype=wire, device=self.device))

    # ---- exchange -----------------------------------------------------------------------------------------
    def exchange(self, b: int) -> Pieces:
        """Bucket ``b``'s pieces received by this owner, by job: (source rank, a view into the receive buffer)."""
        gather = self.gathers.popleft()
        if gather is None:
            return {}
        segments = gather.segments()
        pieces: Pieces = {}
        for src, ks in self.prog.exchanges[b].recv.items():
            r = self.comm.ranks[src]
            lays = [self.plan.layouts[k] for k in ks]
            for k, lay, flat in zip(ks, lays, split(segments[src], [lay.local_numel(r) for lay in lays])):
                pieces.setdefault(k, []).append((r, flat.view(lay.local_shape(r))))
        return pieces

    # ---- compute ------------------------------------------------------------------------------------------
    def compute(self, b: int, pieces: Pieces) -> dict[int, Tensor]:
        """Bucket ``b``'s owned tensors, per spec, in stacks of at most ``stack_bytes`` (each built, computed and
        dropped in turn); returns the results to send back. The owner's own pieces are put as they come."""
        ex, wire = self.prog.exchanges[b], self.wires[b]
        by_spec: dict[Spec, list[int]] = {}
        for k in ex.owned:
            by_spec.setdefault(self.prog.specs[k], []).append(k)
        results: dict[int, Tensor] = {}
        for spec, owned in by_spec.items():
            item_bytes = _numel(self.plan.layouts[owned[0]].shape) * wire.itemsize
            for ks in cut_stacks(owned, item_bytes, self.config.stack_bytes, self.device):
                res = self.run_stack(spec, self.whole(ks, wire, pieces), ks).to(self.rets[b])
                for m, k in enumerate(ks):
                    if ex.returns:
                        results[k] = res[m]
                    self.put_own(k, res[m])
                del res
        return results

    def run_stack(self, spec: Spec, stack: Tensor, ks: list[int]) -> Tensor:
        """``spec(stack)``, counted; each result's status taken now, before any ``consume`` of the owner's own
        piece could record a failure of its own."""
        res = run_spec(spec, stack, self.stats, self.outcomes, [self.mapped[k] for k in ks])
        for k in ks:
            shape = self.plan.layouts[k].shape
            self.stats.matrices_computed += n_matrices(shape, spec.batch_ndim(shape))
            self.stats.tensors_computed += 1
            self.statuses[k] = self.status_of(k)
        return res

    def whole(self, ks: list[int], wire: torch.dtype, pieces: Pieces) -> Tensor:
        """The stack of ``ks``' whole tensors, built just before its spec call: this rank's piece and the received
        ones written in place (``Partial``: summed, or averaged)."""
        lays = [self.plan.layouts[k] for k in ks]
        partial = any(lay.partial_count > 1 for lay in lays)
        stack = (torch.zeros if partial else torch.empty)((len(ks), *lays[0].shape), dtype=wire, device=self.device)
        for m, (k, lay) in enumerate(zip(ks, lays)):
            row = stack[m]  # not iteration: unbind's views refuse in-place writes under grad mode
            if self.like[k].numel():
                row[self.prog.region(k, self.comm.rank)] = self.piece(k)
            for r, got in pieces.pop(k, ()):
                if lay.partial_count > 1:
                    row[self.prog.region(k, r)] += got
                else:
                    row[self.prog.region(k, r)] = got
            if lay.partial_count > 1 and lay.partial_op == "avg":
                row /= lay.partial_count
        return stack

    def put_own(self, k: int, result: Tensor) -> None:
        """The owner's own piece of ``result`` (the whole with ``out="replicated"``); a copy when it is kept until
        the commit and smaller than the whole (a view would keep the whole result alive)."""
        if self.out == "replicated":
            self.put(k, result, True)
        elif self.like[k].numel():
            mine = result[self.prog.region(k, self.comm.rank)]
            keep = mine.numel() < result.numel() and not self.consuming[k]
            self.put(k, mine.clone() if keep else mine, True)

    # ---- return -------------------------------------------------------------------------------------------
    def send_back(self, b: int, results: dict[int, Tensor]) -> None:
        """Bucket ``b``'s results to their holders, each followed by its status; only the packed send buffer
        outlives this call. ``receive_back`` takes them on the holders."""
        ex, ret = self.prog.exchanges[b], self.rets[b]
        if not ex.returns:
            return
        chunks: dict[int, list[Tensor]] = {}
        sent: dict[int, list[int]] = {}  # group rank -> the results it gets, in order
        for k in ex.owned:
            for r in self.plan.receivers(k):
                g = self.comm.grank[r]
                whole = self.out == "replicated"
                chunks.setdefault(g, []).append(results[k] if whole else results[k][self.prog.region(k, r)])
                sent.setdefault(g, []).append(k)
        statuses = self.statuses_of(list(sent.values()), ret)
        for g, status in zip(sent, statuses):
            chunks[g].append(status)
        me = self.comm.rank
        sizes = {g: sum(self.plan.returned_numel(k, me) for k in ks) + len(ks) for g, ks in ex.back_from}
        counts = (sum(len(ks) for ks in sent.values()), sum(len(ks) for _, ks in ex.back_from))
        # shape: to holder g, its pieces of the results it holds (the whole results with out="replicated"), flat,
        # in bucket order, then one status per result (result dtype); from each owner, the same for this rank
        flight = all_to_all(self.comm, self.stats, chunks, sizes, torch.empty(0, dtype=ret, device=self.device), counts)
        if not self.config.async_gpu_parallelism:
            flight.work.wait()
        self.returns.append((flight, ex))

    def statuses_of(self, groups: list[list[int]], dtype: torch.dtype) -> list[Tensor]:
        """The statuses of each group of results, as tensors of ``dtype`` (one host-to-device copy in all)."""
        codes = [float(self.statuses[k]) for ks in groups for k in ks]
        flat = torch.tensor(codes, dtype=torch.float32).to(device=self.device, dtype=dtype)
        return split(flat, [len(ks) for ks in groups])

    def receive_back(self, keep: int) -> None:
        """Take the results back until at most ``keep`` buckets' returns are in flight."""
        while len(self.returns) > keep:
            self.receive(*self.returns.popleft())

    def receive(self, flight: InFlight, ex: Exchange) -> None:
        """This holder's pieces of a bucket's results, put as they are; each handed on only if its status is ok."""
        segments = flight.segments()
        got: list[tuple[int, Tensor]] = []
        status_views: list[Tensor] = []
        for src, ks in ex.back_from:
            *flats, status = split(segments[src], [*(self.plan.returned_numel(k, self.comm.rank) for k in ks), len(ks)])
            got.extend((k, flat.view(self.result_shape(k))) for k, flat in zip(ks, flats))
            status_views.append(status)
        ok = self.read_statuses([k for _, ks in ex.back_from for k in ks], status_views)
        for k, result in got:
            self.put(k, result, ok.get(k, True))

    def read_statuses(self, ks: list[int], views: list[Tensor]) -> dict[int, bool]:
        """Whether each of ``ks``' results is ok, read only when one of them is consumed here (the others wait for
        ``settle``, and reading costs a device-to-host copy)."""
        if not any(self.consuming[k] for k in ks):
            return {}
        codes = torch.cat(views).tolist()
        return {k: int(code) == Status.OK for k, code in zip(ks, codes)}

    def result_shape(self, k: int) -> tuple[int, ...]:
        """The shape of what this rank gets back of result ``k``."""
        if self.out == "replicated":
            return self.prog.result_shapes[k]
        return self.plan.layouts[k].local_shape(self.comm.rank)

    # ---- settle -------------------------------------------------------------------------------------------
    def settle(self) -> None:
        """Every rank agrees on the map's failures (``StepError`` alike everywhere); then the results computed in
        place are consumed (an empty piece has nothing to write)."""
        for k, p in enumerate(self.mapped):
            if self.results[p] is None:  # a holder of an empty piece
                self.put(k, self.like[k].new_empty(self.like[k].shape), True)
        self.stats.checks += 1
        agreement.settle(self.outcomes, self.comm.group, self.comm.ranks, [j.index for j in self.jobs], self.names)
        for p in self.held:
            result = self.results[p]
            if result is not None and result.numel():
                self.results[p] = consumed(self.jobs[p], result)


def _made(job: Job, position: int, outcomes: Outcomes) -> Tensor:
    """``job.values()``; a failure is recorded instead of raised (this rank keeps to the collectives that follow,
    ``settle`` raises it everywhere) and the piece is NaN."""
    try:
        return job.values()
    except Exception as e:
        outcomes.fail([position], e)
        like = job.tensor
        return torch.full(like.shape, math.nan, dtype=like.dtype, device=like.device)


def _narrower(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The one with fewer bytes (``b`` on a tie): a float widened to a wider float is exact, so a result may travel
    in the narrower of its own dtype and the wire's without loss."""
    return a if a.itemsize < b.itemsize else b


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)
