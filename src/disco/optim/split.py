r"""Split views: a 2-D weight orthogonalized as independent blocks of its output dim (fused QKV, attention heads).

A group of an LMO rule (``disco``, ``muon``, ``scion``) may say how each of its weights splits before the LMO:

* ``split_sizes=[q, k, v]``: blocks of these sizes along the output dim (they sum to it);
* ``num_heads=h``: ``h`` equal heads (``d_head = out / h``); with ``num_kv_heads=g`` and no ``split_sizes``, a fused
  GQA projection of ``h`` query heads then ``g`` key and ``g`` value heads (``d_head = out / (h + 2 g)``);
* both: the first block splits into ``num_heads`` heads, every later block into ``num_kv_heads`` (default
  ``num_heads``) heads: ``split_sizes=[q, k, v], num_heads=h, num_kv_heads=g`` is per-head GQA.

The update is the LMO of each block, with the norm factor of the block's shape::

    O = concat_j  LMO(U[rows of block j, :])           # (columns for a transposed weight, stored in x out)

Distributed: equal consecutive blocks are a stack ``(count, size, n)`` whose layout is derived from the weight's
(``stack_layouts``). When every rank's rows are exactly whole blocks of such a stack (heads sharded colwise by TP,
or rows by FSDP, on block boundaries), the stack is sharded only on its block dim and the engine computes each
rank's blocks in place: nothing moves over those axes. Otherwise (a block cut by a shard boundary) the weight is
mapped whole with a ``SplitLMOSpec``: gathered on one owner as Muon's, split there. Both give the same math.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..distributed.engine import Engine, Job
from ..distributed.layout import Layout, Placement
from ..ops.specs import LMOSpec, Spec, SplitLMOSpec, split_runs
from .contract import Group
from .validation import describe

SPLIT_KEYS = ("split_sizes", "num_heads", "num_kv_heads")


def has_split(s: Any) -> bool:
    return any(getattr(s, k, None) is not None for k in SPLIT_KEYS)


def honours_split(cls: type) -> bool:
    """A settings class serves a split only if it says so itself: a subclass that changes the step (PolarGrad,
    NorMuon, ...) does not inherit it."""
    return bool(cls.__dict__.get("splits", False))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_split_settings(s: Any, at: str, algorithm_hint: str = "") -> None:
    """Types and combinations of ``split_sizes`` / ``num_heads`` / ``num_kv_heads`` (no shapes needed)."""
    if not has_split(s):
        return
    if not honours_split(type(s)):
        raise ValueError(
            f"{at}: split_sizes / num_heads / num_kv_heads are honoured by the 'disco', 'muon' and 'scion' rules "
            f"only; this group's algorithm{algorithm_hint} changes the step and does not split its weights"
        )
    sizes = s.split_sizes
    if sizes is not None and (not isinstance(sizes, (list, tuple)) or not sizes or not all(map(_positive_int, sizes))):
        raise ValueError(f"{at}: split_sizes={sizes!r} must be a non-empty list of positive ints")
    for key in ("num_heads", "num_kv_heads"):
        value = getattr(s, key)
        if value is not None and not _positive_int(value):
            raise ValueError(f"{at}: {key}={value!r} must be a positive int")
    if s.num_kv_heads is not None and s.num_heads is None:
        raise ValueError(f"{at}: num_kv_heads={s.num_kv_heads} needs num_heads (the query heads)")


def output_dim(transposed: bool) -> int:
    """The output dim of a stored 2-D weight: 0, or 1 when stored ``fan_in x fan_out``."""
    return 1 if transposed else 0


def blocks_of(s: Any, shape: Sequence[int], name: str, p: Tensor | None = None) -> tuple[int, ...] | None:
    """The block sizes along the output dim of a weight of ``shape`` (``None``: no split); ValueError naming the
    parameter, its shape (and mesh) and the sizes when they do not divide the dim."""
    if not has_split(s):
        return None
    shape = tuple(shape)
    who = describe(name, p) if p is not None else f"{name!r} (shape {shape})"
    if len(shape) != 2:
        raise ValueError(f"parameter {who}: a split (split_sizes / num_heads) needs a 2-D weight")
    dim = output_dim(bool(s.transposed))
    out = shape[dim]
    h: int | None = s.num_heads
    g: int | None = s.num_kv_heads
    sizes: list[int] | None = [int(v) for v in s.split_sizes] if s.split_sizes is not None else None
    if sizes is not None and sum(sizes) != out:
        raise ValueError(
            f"parameter {who}: split_sizes={sizes} sum to {sum(sizes)}, not to its output dim {dim} of size {out}"
        )
    if h is None:
        return tuple(sizes or ())
    if sizes is None:
        heads = h + 2 * g if g is not None else h
        what = f"num_heads={h}" + (f" + 2 x num_kv_heads={g}" if g is not None else "")
        if out % heads:
            raise ValueError(
                f"parameter {who}: {what} ({heads} heads) does not divide its output dim {dim} of size {out}"
            )
        return (out // heads,) * heads
    blocks: list[int] = []
    for j, size in enumerate(sizes):
        n = h if j == 0 else (g if g is not None else h)
        key = "num_heads" if j == 0 else ("num_kv_heads" if g is not None else "num_heads")
        if size % n:
            raise ValueError(
                f"parameter {who}: {key}={n} does not divide block {j} of split_sizes={sizes} (size {size})"
            )
        blocks.extend([size // n] * n)
    return tuple(blocks)


def check_split_params(group: Group, s: Any, at: str) -> None:
    """At construction: every weight of a split group is 2-D and its blocks divide its output dim; a matrix norm;
    no weight constraint (it reads the whole matrix)."""
    if not has_split(s):
        return
    if ops.get_norm(s.norm_factor).kind != "matrix":
        raise ValueError(
            f"{at}: a split orthogonalizes blocks; norm_factor={s.norm_factor!r} is not a matrix norm (use "
            "'spectral', 'original', 'match_rms_adamw' or 'image_spectral')"
        )
    if s.weight_constraint is not None:
        raise ValueError(f"{at}: weight_constraint={s.weight_constraint!r} acts on the whole matrix: not with a split")
    for p, n in zip(group["params"], group["param_names"]):
        blocks_of(s, tuple(p.shape), n, p)


def split_spec(s: Any, shape: Sequence[int], base: LMOSpec) -> Spec:
    """``base`` for a weight without a split, else the ``SplitLMOSpec`` of its blocks (each block's LMO is
    ``base``'s settings on a 2-D block)."""
    blocks = blocks_of(s, shape, "weight")
    if blocks is None:
        return base
    return SplitLMOSpec(base, blocks)


# ---- the engine side: stacks of whole blocks, laid out like the weight -------------------------------------------
@dataclass(frozen=True)
class Stack:
    """A run of ``count`` equal blocks of ``size`` from ``start``, seen as a 3-D tensor laid out by ``layout``;
    ``local`` the positions, along the output dim of this rank's piece, of the rows it holds of them."""

    start: int
    count: int
    size: int
    layout: Layout
    local: tuple[int, ...]


def _stack_shape(shape: tuple[int, ...], axis: int, count: int, size: int) -> tuple[int, int, int]:
    return (count, size, shape[1]) if axis == 0 else (count, shape[0], size)


def _stack_placements(lay: Layout, axis: int) -> list[Placement]:
    """The weight's placements moved onto the stack: the output dim's shards onto the block dim (0), the other
    dim's onto its place in the stack; replicas and partials stay."""
    other, other_in_stack = 1 - axis, (2 if axis == 0 else 1)
    out = []
    for pl in lay.placements:
        if pl.is_shard and pl.dim == axis:
            out.append(Placement(pl.kind, 0, pl.split_factor))
        elif pl.is_shard and pl.dim == other:
            out.append(Placement(pl.kind, other_in_stack, pl.split_factor))
        else:
            out.append(pl)
    return out


@lru_cache(maxsize=256)
def stack_layouts(lay: Layout, axis: int, sizes: tuple[int, ...], rank: int) -> tuple[Stack, ...] | None:
    """The stacks of ``sizes`` with layouts derived from the weight's ``lay``, or ``None`` when some rank's rows are
    not exactly its chunk of whole blocks (then the weight is gathered whole). Checked once per distinct shard
    coordinate (ranks that differ only on replica / partial axes hold the same rows)."""
    other, other_in_stack = 1 - axis, (2 if axis == 0 else 1)
    placements = _stack_placements(lay, axis)
    shard_axes = lay.shard_axes()
    stacks = []
    for start, count, size in split_runs(sizes):
        end = start + count * size
        sub = lay.with_placements(placements, shape=_stack_shape(lay.shape, axis, count, size))
        seen: set[tuple[int, ...]] = set()
        for r in lay.ranks:
            key = tuple(lay.coord(r)[a] for a in shard_axes)
            if key in seen:
                continue
            seen.add(key)
            idx, sidx = lay.index_lists(r), sub.index_lists(r)
            rows = [i for i in idx[axis] if start <= i < end]
            want = [start + b * size + j for b in sidx[0] for j in range(size)]
            if rows != want or idx[other] != sidx[other_in_stack]:
                return None
        mine = tuple(k for k, i in enumerate(lay.index_lists(rank)[axis]) if start <= i < end)
        stacks.append(Stack(start, count, size, sub, mine))
    return tuple(stacks)


def _select(X: Tensor, axis: int, local: tuple[int, ...]) -> Tensor:
    if local and local == tuple(range(local[0], local[0] + len(local))):
        return X.narrow(axis, local[0], len(local))
    return X.index_select(axis, torch.tensor(local, dtype=torch.long, device=X.device))


def _to_stack(X: Tensor, st: Stack, axis: int) -> Tensor:
    """This rank's rows of ``st`` out of its piece ``X`` of the weight, as ``(blocks, size, n)`` (or ``(blocks, m,
    size)`` for the transposed view)."""
    sel = _select(X, axis, st.local)
    if axis == 0:
        return sel.reshape(-1, st.size, sel.shape[1])
    return sel.reshape(sel.shape[0], -1, st.size).permute(1, 0, 2)


def _from_stack(out: Tensor, R: Tensor, st: Stack, axis: int) -> None:
    """Write a stack's result ``R`` back into ``out`` (this rank's piece of the weight's result)."""
    if not st.local:
        return
    rows = R.reshape(-1, R.shape[2]) if axis == 0 else R.permute(1, 0, 2).reshape(R.shape[1], -1)
    index = torch.tensor(st.local, dtype=torch.long, device=out.device)
    out.index_copy_(axis, index, rows.to(out.dtype))


@dataclass
class _Expanded:
    job: Job
    stacks: tuple[Stack, ...] | None  # None: mapped whole (one position in the flat list)
    first: int  # its first position in the flat job list


def _sub_job(job: Job, st: Stack, spec: LMOSpec, axis: int, rank: int) -> Job:
    parent = job

    def make() -> Tensor:
        return _to_stack(parent.values(), st, axis)

    like = job.tensor.new_empty(()).expand(st.layout.local_shape(rank))  # a template: shape, dtype, device only
    return Job(job.index, like, spec, st.layout, make=make)


def map_split(engine: Engine, jobs: Sequence[Job]) -> list[Tensor]:
    """``engine.map(jobs)``, with each job of a ``SplitLMOSpec`` mapped as stacks of whole blocks where the layout
    allows (module docstring), else whole. A job's ``consume`` gets its assembled result once the map returned
    (every result known good) and ``map``'s empty tensor stands in its place, as ``engine.map`` does."""
    if not any(isinstance(j.spec, SplitLMOSpec) for j in jobs):
        return engine.map(jobs)
    rank = engine.current_rank
    flat: list[Job] = []
    plan: list[_Expanded] = []
    for job in jobs:
        spec = job.spec
        stacks = None
        if isinstance(spec, SplitLMOSpec) and engine.has_layouts and job.layout is None:
            stacks = stack_layouts(engine.layout(job.index), spec.axis, spec.sizes, rank)
        plan.append(_Expanded(job, stacks, len(flat)))
        if stacks is None:
            flat.append(job)
        else:
            assert isinstance(spec, SplitLMOSpec)
            # a 3-D stack is a batch of matrices to ``inner``: each block its own LMO and norm factor
            flat.extend(_sub_job(job, st, spec.inner, spec.axis, rank) for st in stacks)
    results = engine.map(flat)
    out: list[Tensor] = []
    for e in plan:
        if e.stacks is None:
            out.append(results[e.first])
            continue
        spec = e.job.spec
        assert isinstance(spec, SplitLMOSpec)
        parts = results[e.first : e.first + len(e.stacks)]
        dtype = next((r.dtype for r in parts if r.numel()), None) or spec.result_dtype(
            e.job.tensor.dtype, e.job.tensor.device
        )
        whole = torch.empty(e.job.tensor.shape, dtype=dtype, device=e.job.tensor.device)
        for st, R in zip(e.stacks, parts):
            _from_stack(whole, R, st, spec.axis)
        out.append(_consumed(e.job.consume, whole))
    return out


def _consumed(consume: Callable[[Tensor], object] | None, result: Tensor) -> Tensor:
    if consume is None or result.numel() == 0:
        return result
    consume(result)
    return result.new_empty(0)
