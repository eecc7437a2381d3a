"""The planned engine: one packed all-to-all per bucket to the owners, one back, overlapped with compute.

``PlanEngine`` reads every parameter's layout once (and makes the ranks agree on them), then plans each distinct
set of jobs the first time ``map`` sees it (``disco.distributed.planner``: pure, so every rank plans the same)
and caches the plan with its exchange tables. Every ``map`` first checks, with one 8-byte-per-rank all-gather,
that every rank maps the same jobs (tensors, specs, layouts, dtypes): a disagreement raises the same error on
every rank instead of exchanging mismatched pieces. The run itself, bucket by bucket (pack, exchange, compute,
return, settle) and the status each result travels back with, is ``disco.distributed.bucket``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.specs import Spec
from .agreement import check_step, digest, first_difference
from .bucket import BucketRun, Comm
from .config import DistributedConfig
from .engine import EngineStats, Job, Out, Over, ReduceOp, input_dtype_of, result_dtype_of, spec_of
from .layout import REPLICATE, Layout
from .planner import Plan, make_plan
from .program import Program, make_exchange
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
        self._comm = Comm(self.group, ranks, self.rank, self._grank)
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
            ranks = lay.axis_group(self.rank, _axes_over(lay, over))
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
        results = tuple(str(result_dtype_of(s, self._wire(j, s), j.tensor.device)) for j, s in zip(jobs, specs))
        return (*items, (out, results))

    def _wire(self, job: Job, spec: Spec) -> torch.dtype:
        """``job``'s wire dtype, as ``BucketRun.wire_of`` chooses it."""
        t = job.tensor
        partial = self._effective_layout(job).partial_count > 1
        return comm_dtype_for(t, self.config, None if partial else input_dtype_of(spec, t.dtype, t.device))

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
    def map(self, jobs: Sequence[Job], spec: Spec | None = None, *, out: Out = "input") -> list[Tensor]:
        """Run each job's spec on its whole tensor, once, on one owner; see the module docstring of ``engine``."""
        if out not in ("input", "replicated"):
            raise ValueError(f"map: out must be 'input' or 'replicated', got {out!r}")
        specs = [spec_of(j, spec) for j in jobs]
        mapped = [k for k, (job, s) in enumerate(zip(jobs, specs)) if self._exchanged(s, job, out)]
        signature: tuple[Any, ...] | None = None
        try:
            signature = self._signature([jobs[k] for k in mapped], [specs[k] for k in mapped], out)
        except ValueError as e:
            self._agree_on(None, str(e))  # raises on every rank, with this rank's reason
        self._agree_on(signature)
        assert signature is not None
        prog = self._program(signature, [specs[k] for k in mapped], out)
        self._current = prog
        self._job_index = [jobs[k].index for k in mapped]
        return BucketRun(self._comm, self.config, self.stats, self.names, prog, jobs, specs, mapped, out).run()


def _axes_over(lay: Layout, over: Over) -> tuple[int, ...]:
    """The mesh axes of ``lay`` that ``all_reduce(over=...)`` reduces over."""
    if over == "replicas":
        return lay.replica_axes()
    if over == "shards":
        return lay.shard_axes()
    if isinstance(over, int):
        return lay.shard_axes(over)
    raise ValueError(f"all_reduce: over must be 'replicas', 'shards' or a tensor dim, got {over!r}")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
