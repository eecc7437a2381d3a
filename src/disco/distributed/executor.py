"""The planned engine: one packed all-to-all per bucket to the owners, one back, overlapped with compute.

``PlanEngine`` reads every parameter's layout once (and makes the ranks agree on them), then plans each distinct
set of jobs the first time ``map`` sees it (``disco.distributed.planner``: pure, so every rank plans the same)
and caches the plan with its exchange tables. Every ``map`` first checks, with one 8-byte-per-rank all-gather,
that every rank maps the same jobs (tensors, specs, layouts, dtypes): a disagreement raises the same error on
every rank instead of exchanging mismatched pieces.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.specs import Spec
from .agreement import Outcomes, check_step, digest, first_difference, settle
from .config import DistributedConfig
from .engine import (
    EngineStats,
    Job,
    Out,
    Over,
    ReduceOp,
    consumed,
    cut_stacks,
    handed,
    n_matrices,
    result_dtype_of,
    run_spec,
    run_stacked,
    spec_of,
)
from .layout import REPLICATE, Layout
from .planner import Plan, make_plan
from .program import Exchange, Program, make_exchange
from .resolve import comm_dtype_for, group_for, resolve_layouts


class PlanEngine:
    """Runs plans over a process group; see ``disco.distributed.planner`` for who owns what."""

    has_layouts = True

    def __init__(
        self, params: Sequence[Tensor], *, config: DistributedConfig, names: Sequence[str] | None = None
    ) -> None:
        self.config = config
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(params))]
        self.stats = EngineStats()
        self.rank = dist.get_rank()
        self.current_rank = self.rank
        layouts = resolve_layouts(params, config)
        ranks = sorted({r for lay in layouts for r in lay.ranks} | {self.rank})
        self.group = group_for(ranks)
        self.group_ranks = ranks
        layouts = self._agree(layouts, ranks)
        if not config.split_replicas:
            layouts = [self._within_replica(lay) for lay in layouts]
            ranks = sorted({r for lay in layouts for r in lay.ranks} | {self.rank})
            self.group = group_for(ranks)
        self.group_ranks = ranks
        self._grank = {r: i for i, r in enumerate(ranks)}
        self.layouts = layouts
        self._programs: dict[tuple[Any, ...], Program] = {}
        self._digests: dict[tuple[Any, ...], int] = {}
        self._current: Program | None = None
        self._job_index: list[int] = []  # parameter index of each job of the current program

    # ---- layouts -----------------------------------------------------------------------------------------
    def _agree(self, layouts: list[Layout], ranks: list[int]) -> list[Layout]:
        """Make every rank of the group plan with the same layouts.

        A parameter may sit on a different sub-mesh on different ranks (FSDP over TP leaves non-TP parameters
        on each TP rank's own dp mesh): such copies are one tensor replicated over an extra mesh axis.
        """
        everyone: list[Any] = [None] * len(ranks)
        dist.all_gather_object(everyone, (layouts, self.names), group=self.group)
        if any(len(other) != len(layouts) for other, _ in everyone):
            counts = {r: len(other) for r, (other, _) in zip(ranks, everyone)}
            raise ValueError(f"optimizer ranks hold different numbers of parameters: {counts}")
        merged = []
        for i, lay in enumerate(layouts):
            variants = sorted({other[i] for other, _ in everyone}, key=lambda v: min(v.ranks))
            if len(variants) == 1:
                merged.append(lay)
                continue
            ok = all(
                v.shape == lay.shape and v.mesh_shape == lay.mesh_shape and v.placements == lay.placements
                for v in variants
            ) and len({r for v in variants for r in v.ranks}) == sum(len(v.ranks) for v in variants)
            if not ok:
                raise ValueError(
                    f"parameter {i} ({self.names[i]}) has incompatible layouts across ranks: "
                    + "; ".join(v.describe() for v in variants)
                )
            merged.append(
                Layout(
                    lay.shape,
                    tuple(r for v in variants for r in v.ranks),
                    (len(variants), *lay.mesh_shape),
                    (REPLICATE, *lay.placements),
                )
            )
        return merged

    def _within_replica(self, lay: Layout) -> Layout:
        """The same layout restricted to this rank's replica (replica axes dropped)."""
        key = lay.group_key(self.rank)
        ranks = [r for r in lay.ranks if lay.group_key(r) == key]
        axes = [a for a, p in enumerate(lay.placements) if p.kind != "replicate"]
        return Layout(
            lay.shape,
            tuple(ranks),
            tuple(lay.mesh_shape[a] for a in axes) or (1,),
            tuple(lay.placements[a] for a in axes) or (REPLICATE,),
        )

    def layout(self, index: int) -> Layout:
        return self.layouts[index]

    @property
    def plan(self) -> Plan:
        """The plan of the last mapped (or assigned) job set."""
        if self._current is None:
            raise RuntimeError("no job set planned yet: call map() or assign() first")
        return self._current.plan

    @property
    def assignments(self) -> dict[int, list[int]]:
        """rank -> parameter indices it computes in the last planned job set."""
        if self._current is None:
            return {r: [] for r in self.group_ranks}
        return {r: sorted(self._job_index[k] for k in ks) for r, ks in self._current.plan.assignments.items()}

    # ---- agreement ---------------------------------------------------------------------------------------
    def _all_gather_int(self, value: int) -> list[int]:
        mine = torch.tensor([value], dtype=torch.int64)
        everyone = [torch.zeros_like(mine) for _ in self.group_ranks]
        dist.all_gather(everyone, mine, group=self.group)
        self.stats.checks += 1
        return [int(t) for t in everyone]

    def check_agreement(self, items: Sequence[str], what: str) -> None:
        """Every rank holds the same ``items`` (strings, in order); else the same error on every rank."""
        if len(set(self._all_gather_int(digest(tuple(items))))) == 1:
            return
        everyone: list[Any] = [None] * len(self.group_ranks)
        dist.all_gather_object(everyone, list(items), group=self.group)
        raise RuntimeError(f"ranks disagree on {what}: " + first_difference(everyone, self.group_ranks))

    def check_step(
        self, present: Sequence[bool], nonfinite: Sequence[bool], settings: Sequence[str], error: str | None
    ) -> list[int]:
        self.stats.checks += 1
        return check_step(self.group, self.group_ranks, self.names, present, nonfinite, settings, error)

    # ---- all_reduce --------------------------------------------------------------------------------------
    def all_reduce(
        self, tensors: Sequence[Tensor], layouts: Sequence[Layout], *, over: Over = "replicas", op: ReduceOp = "sum"
    ) -> None:
        """Reduce local pieces in place over mesh axes of their layouts, coalesced per rank set and dtype.

        ``over``: ``"replicas"`` (the replica axes), ``"shards"`` (every shard axis) or a tensor dim ``d`` (the
        axes that shard ``d``). ``op``: ``"sum"``, ``"avg"``, ``"max"``, ``"min"``. Rank sets are visited in
        one global order, so ranks in overlapping sets never wait on each other in a cycle.
        """
        if len(tensors) != len(layouts):
            raise ValueError(f"all_reduce: {len(tensors)} tensors for {len(layouts)} layouts")
        if op not in ("sum", "avg", "max", "min"):
            raise ValueError(f"all_reduce: unknown op {op!r}; valid: 'sum', 'avg', 'max', 'min'")
        by: dict[tuple[tuple[int, ...], torch.dtype], list[int]] = {}
        for k, (t, lay) in enumerate(zip(tensors, layouts)):
            if self.rank not in lay.ranks:
                raise ValueError(f"all_reduce: rank {self.rank} is not in {lay.describe()}")
            if over == "replicas":
                axes = lay.replica_axes()
            elif over == "shards":
                axes = lay.shard_axes()
            elif isinstance(over, int):
                axes = lay.shard_axes(over)
            else:
                raise ValueError(f"all_reduce: over must be 'replicas', 'shards' or a tensor dim, got {over!r}")
            ranks = lay.axis_group(self.rank, axes)
            if len(ranks) > 1:
                by.setdefault((ranks, t.dtype), []).append(k)
        reduce_op = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        reduce_op["min"] = dist.ReduceOp.MIN
        for ranks, dtype in sorted(by, key=lambda key: (key[0], str(key[1]))):
            ks = by[(ranks, dtype)]
            flat = torch.cat([tensors[k].reshape(-1) for k in ks])
            dist.all_reduce(flat, op=reduce_op[op], group=group_for(ranks))
            if op == "avg":
                flat /= len(ranks)
            self.stats.collectives += 1
            self.stats.bytes_sent += flat.numel() * flat.element_size()
            offset = 0
            for k in ks:
                t = tensors[k]
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    # ---- planning ----------------------------------------------------------------------------------------
    def _effective_layout(self, job: Job) -> Layout:
        if job.layout is None:
            return self.layouts[job.index]
        return job.layout if self.config.split_replicas else self._within_replica(job.layout)

    def _program(self, signature: tuple[Any, ...], specs: list[Spec], out: Out) -> Program:
        prog = self._programs.get(signature)
        if prog is None:
            prog = self._make_program(signature, specs, out)
            self._programs[signature] = prog
        return prog

    def _make_program(self, signature: tuple[Any, ...], specs: list[Spec], out: Out) -> Program:
        layouts = [lay for _, _, lay, _ in signature[:-1]]
        keys = [(s, dtype) for (_, s, _, dtype) in signature[:-1]]
        result_shapes = []
        for i, s, lay, _ in signature[:-1]:
            rs = tuple(s.result_shape(lay.shape))
            if out == "input" and rs != tuple(lay.shape):
                raise ValueError(
                    f"map(out='input') of {self.names[i]}: the spec's result shape {rs} differs from the input "
                    f"shape {tuple(lay.shape)}; use out='replicated'"
                )
            result_shapes.append(rs)
        plan = make_plan(
            layouts,
            [s.cost(lay.shape) for s, lay in zip(specs, layouts)],
            keys,
            ranks=self.group_ranks,
            batch_ndims=[s.batch_ndim(lay.shape) for s, lay in zip(specs, layouts)],
            bucket_size=self.config.bucket_size,
            out=out,
            result_numels=[_numel(rs) for rs in result_shapes],
        )
        exchanges = [make_exchange(plan, b, self.rank, self._grank) for b in plan.buckets]
        return Program(plan, specs, result_shapes, exchanges)

    def assign(self, jobs: Sequence[Job], spec: Spec | None = None, *, out: Out = "input") -> dict[int, list[int]]:
        """Plan ``jobs`` without running them (no communication); sets ``assignments`` and ``plan``."""
        specs = [spec_of(j, spec) for j in jobs]
        mapped = [k for k, s in enumerate(specs) if self._exchanged(s, jobs[k], out)]
        signature = self._signature([jobs[k] for k in mapped], [specs[k] for k in mapped], out)
        self._current = self._program(signature, [specs[k] for k in mapped], out)
        self._job_index = [jobs[k].index for k in mapped]
        return self.assignments

    def _exchanged(self, spec: Spec, job: Job, out: Out) -> bool:
        lay = self._effective_layout(job)
        return spec.needs_whole or out == "replicated" or lay.partial_count > 1

    def _signature(self, jobs: Sequence[Job], specs: Sequence[Spec], out: Out) -> tuple[Any, ...]:
        items = []
        for job, s in zip(jobs, specs):
            lay = self._effective_layout(job)
            if tuple(job.tensor.shape) != lay.local_shape(self.rank):
                raise ValueError(
                    f"{self.names[job.index]}: local piece of shape {tuple(job.tensor.shape)} on rank {self.rank}, "
                    f"but its layout {lay.describe()} gives {lay.local_shape(self.rank)}"
                )
            items.append((job.index, s, lay, job.tensor.dtype))
        # The results' dtypes size the return buffers: ranks must agree on them (a spec may read the device).
        results = tuple(
            str(result_dtype_of(s, comm_dtype_for(j.tensor, self.config), j.tensor.device)) for j, s in zip(jobs, specs)
        )
        return (*items, (out, results))

    def _agree_on(self, signature: tuple[Any, ...] | None, error: str | None = None) -> None:
        """Every rank maps the same jobs (``signature``); a rank that could not build its own (``error``) votes 0."""
        mine = 0
        if signature is not None:
            if signature not in self._digests:
                self._digests[signature] = digest(signature) or 1  # 0 is the vote of a rank that failed
            mine = self._digests[signature]
        if len(set(self._all_gather_int(mine))) == 1 and mine:
            return
        everyone: list[Any] = [None] * len(self.group_ranks)
        if signature is None:
            shown = [f"error: {error}"]
        else:
            shown = [f"{self.names[i]}: {lay.describe()} {dtype} {s!r}" for i, s, lay, dtype in signature[:-1]]
            shown.append(f"out={signature[-1][0]}, result dtypes {signature[-1][1]}")
        dist.all_gather_object(everyone, shown, group=self.group)
        raise RuntimeError(
            "ranks disagree on the tensors of this step (parameters, order, settings, dtypes or gradient "
            "presence): " + first_difference(everyone, self.group_ranks)
        )

    # ---- execution ---------------------------------------------------------------------------------------
    def _a2a(
        self, chunks: dict[int, list[Tensor]], recv_sizes: dict[int, int], like: Tensor
    ) -> tuple[Any, Tensor, list[int]]:
        n = len(self.group_ranks)
        in_splits = [sum(t.numel() for t in chunks.get(g, [])) for g in range(n)]
        out_splits = [recv_sizes.get(g, 0) for g in range(n)]
        flat = [t.reshape(-1) for g in range(n) for t in chunks.get(g, [])]
        send = torch.cat(flat) if flat else like.new_empty(0)
        buf = like.new_empty(sum(out_splits))
        es = like.element_size()
        self.stats.bytes_sent += send.numel() * es
        self.stats.bytes_received += buf.numel() * es
        self.stats.collectives += 1
        work = dist.all_to_all_single(buf, send, out_splits, in_splits, group=self.group, async_op=True)
        return work, buf, out_splits

    def map(self, jobs: Sequence[Job], spec: Spec | None = None, *, out: Out = "input") -> list[Tensor]:
        """Run each job's spec on its whole tensor, once, on one owner; see the module docstring of ``engine``."""
        if out not in ("input", "replicated"):
            raise ValueError(f"map: out must be 'input' or 'replicated', got {out!r}")
        specs = [spec_of(j, spec) for j in jobs]
        results: list[Tensor | None] = [None] * len(jobs)
        mapped = [k for k, (job, s) in enumerate(zip(jobs, specs)) if self._exchanged(s, job, out)]
        signature: tuple[Any, ...] | None = None
        try:
            signature = self._signature([jobs[k] for k in mapped], [specs[k] for k in mapped], out)
        except ValueError as e:
            self._agree_on(None, str(e))  # raises on every rank, with this rank's reason
        self._agree_on(signature)
        assert signature is not None
        outcomes = Outcomes()
        exchanged = set(mapped)
        held: list[int] = []  # jobs whose results are consumed after settle
        for k, (job, s) in enumerate(zip(jobs, specs)):
            if k not in exchanged:  # element-wise: the local piece is all it needs
                results[k] = run_spec(s, _made(job, k, outcomes).unsqueeze(0), self.stats, outcomes, [k])[0]
                held.append(k)
        prog = self._program(signature, [specs[k] for k in mapped], out)
        self._current = prog
        self._job_index = [jobs[k].index for k in mapped]

        def put(k: int, r: Tensor, ok: bool) -> Tensor:
            p = mapped[k]  # an empty piece has nothing to commit, and no owner's verdict reached it: not handed
            return handed(jobs[p], r, ok and outcomes.ok(p) and r.numel() > 0, outcomes, p)

        consuming = [jobs[k].consume is not None for k in mapped]
        like = [jobs[k].tensor for k in mapped]
        make = lambda k: _made(jobs[mapped[k]], mapped[k], outcomes)  # noqa: E731
        mres = self._run(prog, like, make, out, outcomes, mapped, put, consuming)
        for k, r in zip(mapped, mres):
            results[k] = r
        held.extend(mapped[k] for bucket in prog.plan.local_buckets for k in bucket)
        self.stats.checks += 1
        settle(outcomes, self.group, self.group_ranks, [j.index for j in jobs], self.names)
        # Results computed in place (each rank its own pieces, no owner to vouch for them): consumed only now;
        # an empty piece has nothing to write.
        for k in held:
            if results[k].numel():  # type: ignore[union-attr]
                results[k] = consumed(jobs[k], results[k])  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def _run(
        self,
        prog: Program,
        like: list[Tensor],
        make: Callable[[int], Tensor],
        out: Out,
        outcomes: Outcomes,
        positions: list[int],
        put: Callable[[int, Tensor, bool], Tensor],
        consuming: list[bool],
    ) -> list[Tensor]:
        """Execute ``prog`` on this rank's pieces: ``make(k)`` makes piece ``k`` (shaped, typed and placed like
        ``like[k]``) when its bucket sends or stacks it, once (it records a failure instead of raising: ``_made``).
        Failures go to ``outcomes`` under ``positions``.

        Each result goes through ``put(k, result, ok)`` as soon as it is final here (``ok``: not received as
        all-NaN, checked for the ``consuming`` jobs only) and what it returns is kept, except for the jobs of
        ``plan.local_buckets`` (computed in place, sharded on batch dims only), which are kept as they are."""
        plan = prog.plan
        res_out: list[Tensor | None] = [None] * len(like)
        me = self.rank

        def compute(spec: Spec, stack: Tensor, ks: list[int]) -> Tensor:
            res = run_spec(spec, stack, self.stats, outcomes, [positions[k] for k in ks])
            for k in ks:
                self.stats.matrices_computed += n_matrices(
                    plan.layouts[k].shape, spec.batch_ndim(plan.layouts[k].shape)
                )
                self.stats.tensors_computed += 1
            return res

        for bucket in plan.local_buckets:  # sharded on batch dims only: each rank computes its own pieces
            by: dict[tuple[int, ...], list[int]] = {}
            for k in bucket:
                if like[k].numel():
                    by.setdefault(tuple(like[k].shape), []).append(k)
                else:
                    res_out[k] = like[k].new_empty(like[k].shape)
            for members in by.values():
                spec, first = prog.specs[members[0]], like[members[0]]
                run_stacked(
                    spec, members, make, first, self.config.stack_bytes, self.stats, outcomes, positions.__getitem__,
                    res_out.__setitem__,
                )  # fmt: skip

        gathers: deque[tuple[Any, Tensor, list[int]] | None] = deque()
        returns: deque[tuple[Any, Tensor, Exchange]] = deque()
        wires = [comm_dtype_for(like[ex.members[0]], self.config) for ex in prog.exchanges]
        device = like[0].device if like else torch.device("cpu")
        # Results travel back in their own dtype when it is narrower than the wire (a bf16 result of fp32 pieces:
        # exact, half the bytes); every rank knows it from the spec (agreed in the map's digest).
        rets = [
            _narrower(result_dtype_of(prog.specs[ex.members[0]], w, device), w) for ex, w in zip(prog.exchanges, wires)
        ]

        def issue_gather(b: int) -> tuple[Any, Tensor, list[int]] | None:
            ex, wire = prog.exchanges[b], wires[b]
            if not ex.gathers:
                return None
            chunks = {g: [make(k).to(wire) for k in ks] for g, ks in ex.send.items()}
            sizes = {g: sum(plan.layouts[k].local_numel(self.group_ranks[g]) for k in ks) for g, ks in ex.recv.items()}
            return self._a2a(chunks, sizes, torch.empty(0, dtype=wire, device=device))

        def finish_return(item: tuple[Any, Tensor, Exchange]) -> None:
            work, buf, ex = item
            work.wait()
            offset = 0
            got: list[tuple[int, Tensor]] = []
            for _, ks in ex.back_from:
                for k in ks:
                    n = plan.returned_numel(k, me)
                    shape = prog.result_shapes[k] if out == "replicated" else plan.layouts[k].local_shape(me)
                    got.append((k, buf[offset : offset + n].view(shape)))
                    offset += n
            # A failed result comes back all-NaN (``run_spec``); a good one is finite: its first entry tells.
            checked = [(k, t.reshape(-1)[:1]) for k, t in got if consuming[k] and t.numel()]
            firsts = torch.cat([f for _, f in checked]).isnan().tolist() if checked else []
            poisoned = {k: bad for (k, _), bad in zip(checked, firsts)}
            for k, t in got:
                res_out[k] = put(k, t, not poisoned.get(k, False))

        def received(g: tuple[Any, Tensor, list[int]], ex: Exchange) -> dict[int, list[tuple[int, Tensor]]]:
            """The owner's received pieces, by job: (source rank, a view into the bucket's buffer)."""
            work, buf, splits = g
            work.wait()
            offsets = [0]
            for s in splits:
                offsets.append(offsets[-1] + s)
            pieces: dict[int, list[tuple[int, Tensor]]] = {}
            for src, ks in ex.recv.items():
                off = offsets[src]
                r = self.group_ranks[src]
                for k in ks:
                    lay = plan.layouts[k]
                    n = lay.local_numel(r)
                    pieces.setdefault(k, []).append((r, buf[off : off + n].view(lay.local_shape(r))))
                    off += n
            return pieces

        def whole(ks: list[int], wire: torch.dtype, pieces: dict[int, list[tuple[int, Tensor]]]) -> Tensor:
            """The stack of ``ks``' whole tensors, built just before its spec call: this rank's piece and the
            received ones written in place (``Partial``: summed, or averaged)."""
            lays = [plan.layouts[k] for k in ks]
            partial = any(lay.partial_count > 1 for lay in lays)
            stack = (torch.zeros if partial else torch.empty)((len(ks), *lays[0].shape), dtype=wire, device=device)
            for m, (k, lay) in enumerate(zip(ks, lays)):
                row = stack[m]  # not iteration: unbind's views refuse in-place writes under grad mode
                if like[k].numel():
                    row[prog.region(k, me)] = make(k)
                for r, got in pieces.pop(k, ()):
                    if lay.partial_count > 1:
                        row[prog.region(k, r)] += got
                    else:
                        row[prog.region(k, r)] = got
                if lay.partial_count > 1 and lay.partial_op == "avg":
                    row /= lay.partial_count
            return stack

        def own_piece(k: int, result: Tensor) -> Tensor:
            """This owner's piece of its ``result``; a copy when it is kept until the commit and smaller than the
            whole (a view would keep the whole result alive)."""
            mine = result[prog.region(k, me)]
            return mine.clone() if mine.numel() < result.numel() and not consuming[k] else mine

        def send_results(ex: Exchange, results: dict[int, Tensor], ret: torch.dtype) -> tuple[Any, Tensor, Exchange]:
            """Owners send each receiver its piece (or the whole result); receivers take theirs in ``finish_return``.
            Only the packed send buffer outlives this call."""
            chunks: dict[int, list[Tensor]] = {}
            for k in ex.owned:
                for r in plan.receivers(k):
                    piece = results[k] if out == "replicated" else results[k][prog.region(k, r)]
                    chunks.setdefault(self._grank[r], []).append(piece)
            sizes = {g2: sum(plan.returned_numel(k, me) for k in ks) for g2, ks in ex.back_from}
            work, buf, _ = self._a2a(chunks, sizes, torch.empty(0, dtype=ret, device=device))
            if not self.config.async_gpu_parallelism:
                work.wait()
            return work, buf, ex

        prefetch = max(0, self.config.prefetch_count)
        issued = 0
        for b, ex in enumerate(prog.exchanges):
            while issued < len(prog.exchanges) and issued <= b + prefetch:
                gathers.append(issue_gather(issued))
                issued += 1
            g = gathers.popleft()
            wire = wires[b]
            # Per spec, the owner's whole tensors in stacks of at most stack_bytes (one shape and dtype per bucket),
            # each built, computed and dropped in turn; results kept only to be returned.
            pieces = received(g, ex) if g is not None else {}
            g = None
            by_spec: dict[Any, list[int]] = {}
            for k in ex.owned:
                by_spec.setdefault(prog.specs[k], []).append(k)
            results: dict[int, Tensor] = {}
            for s, owned in by_spec.items():
                item_bytes = _numel(plan.layouts[owned[0]].shape) * wire.itemsize
                for ks in cut_stacks(owned, item_bytes, self.config.stack_bytes, device):
                    res = compute(s, whole(ks, wire, pieces), ks).to(rets[b])
                    for m, k in enumerate(ks):
                        if ex.returns:
                            results[k] = res[m]
                        if out == "replicated":
                            res_out[k] = put(k, res[m], True)
                        elif like[k].numel():
                            res_out[k] = put(k, own_piece(k, res[m]), True)
                    del res
            del pieces
            if ex.returns:
                returns.append(send_results(ex, results, rets[b]))
            results = {}
            while len(returns) > max(1, prefetch + 1):
                finish_return(returns.popleft())
        while returns:
            finish_return(returns.popleft())
        for k, r_k in enumerate(res_out):
            if r_k is None:  # a holder of an empty piece
                res_out[k] = put(k, like[k].new_empty(like[k].shape), True)
        return res_out  # type: ignore[return-value]


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
    n = 1
    for d in shape:
        n *= d
    return n
