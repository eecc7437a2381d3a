"""Layouts: where the pieces of one parameter live, as pure data (no process group needed).

A layout is the parameter's global shape, the ranks of its mesh (row-major) with the mesh shape, and one
placement per mesh axis. ``Shard`` follows ``torch.chunk`` (uneven and empty shards included); ``_StridedShard``
splits the dim into ``split_factor`` pieces first and takes the same chunk of each (FSDP2 over TP); ``Replicate``
and ``Partial`` keep the dim whole. The local piece of a rank is the outer product of one index list per tensor
dim, so shards of any placement can be cut out of, and written back into, the full tensor.

Axes come in three kinds: *replica* axes (``Replicate``: equal copies), *partial* axes (``Partial``: the tensor
is the sum, or mean, of the pieces along the axis) and *shard* axes. The pieces that make up the whole tensor
(its *contributors*, seen from one owner) are those on the owner's replica coordinates: every shard, and every
summand along partial axes.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property, lru_cache
from typing import Any


@dataclass(frozen=True)
class Placement:
    kind: str  # "shard" | "strided_shard" | "replicate" | "partial"
    dim: int = -1
    split_factor: int = 1
    op: str = "sum"  # partial only: "sum" | "avg"

    def __post_init__(self) -> None:
        if self.kind not in ("shard", "strided_shard", "replicate", "partial"):
            raise ValueError(f"unknown placement kind {self.kind!r}")
        if self.op not in ("sum", "avg"):
            raise ValueError(f"unsupported partial reduce op {self.op!r}; supported: 'sum', 'avg'")

    @property
    def is_shard(self) -> bool:
        return self.kind in ("shard", "strided_shard")

    @property
    def is_partial(self) -> bool:
        return self.kind == "partial"

    def __str__(self) -> str:
        if self.kind == "shard":
            return f"S({self.dim})"
        if self.kind == "strided_shard":
            return f"_S({self.dim},{self.split_factor})"
        if self.kind == "partial":
            return "P" if self.op == "sum" else "P(avg)"
        return "R"


REPLICATE = Placement("replicate")
PARTIAL = Placement("partial")


def shard(dim: int) -> Placement:
    return Placement("shard", dim)


def chunk_bound(length: int, n: int, k: int) -> tuple[int, int]:
    """Piece ``k`` of ``torch.chunk(length, n)`` padded to ``n`` pieces: ceil-sized pieces, then empty ones."""
    size = -(-length // n) if length else 0
    lo = min(k * size, length)
    return lo, min(lo + size, length)


def chunk_bounds(length: int, n: int) -> list[tuple[int, int]]:
    return [chunk_bound(length, n, k) for k in range(n)]


def chunk_lengths(length: int, n: int) -> list[int]:
    """The lengths of ``chunk_bounds(length, n)``, built from whole runs (full pieces, one remainder, empties):
    a mesh axis of a million ranks costs a few list operations, not a million ``chunk_bound`` calls."""
    size = -(-length // n) if length else 0
    if size == 0:
        return [0] * n
    full = length // size
    out = [size] * full
    if full < n:
        out.append(length - full * size)
        out.extend([0] * (n - full - 1))
    return out


def _piece_lengths(pl: Placement, length: int, n: int) -> list[int]:
    """Local length, per coordinate on an axis of ``n``, of a dim of ``length`` under shard placement ``pl``."""
    if pl.kind == "shard":
        return chunk_lengths(length, n)
    out = [0] * n  # strided: the same chunk of each of split_factor pieces
    for piece in chunk_lengths(length, pl.split_factor):
        out = list(map(operator.add, out, chunk_lengths(piece, n)))
    return out


def _take(index: list[int], n: int, k: int) -> list[int]:
    lo, hi = chunk_bound(len(index), n, k)
    return index[lo:hi]


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, ...]
    ranks: tuple[int, ...]  # mesh ranks, row-major
    mesh_shape: tuple[int, ...]
    placements: tuple[Placement, ...]

    def __post_init__(self) -> None:
        if math.prod(self.mesh_shape) != len(self.ranks):
            raise ValueError(f"mesh shape {self.mesh_shape} does not hold {len(self.ranks)} ranks")
        if len(self.placements) != len(self.mesh_shape):
            raise ValueError(f"{len(self.placements)} placements for a {len(self.mesh_shape)}-D mesh")
        for p in self.placements:
            if p.is_shard and not 0 <= p.dim < len(self.shape):
                raise ValueError(f"placement {p} shards dim {p.dim} of a {len(self.shape)}-D tensor")

    @classmethod
    def replicated(cls, shape: Sequence[int], ranks: Sequence[int]) -> Layout:
        return cls(tuple(shape), tuple(ranks), (len(ranks),), (REPLICATE,))

    @classmethod
    def sharded(cls, shape: Sequence[int], ranks: Sequence[int], dim: int = 0) -> Layout:
        return cls(tuple(shape), tuple(ranks), (len(ranks),), (shard(dim),))

    # Per-rank tables (in ``ranks`` order), shared by equal meshes and layouts (module-level caches keyed by small
    # tuples): planning for thousands of ranks asks for local sizes and group keys of every rank of every tensor,
    # and a model's thousand layouts usually share a handful of shapes and one rank tuple.
    @cached_property
    def _rank_pos(self) -> dict[int, int]:
        return rank_positions(self.ranks)

    @cached_property
    def _coords(self) -> tuple[tuple[int, ...], ...]:
        return _coords_table(self.mesh_shape)

    @cached_property
    def _local_numels(self) -> tuple[int, ...]:
        return local_numels_table(self.shape, self.mesh_shape, self.placements)

    @cached_property
    def _group_ids(self) -> tuple[int, ...]:
        return replica_group_table(self.mesh_shape, self.placements)

    @cached_property
    def _group_keys(self) -> tuple[tuple[int, ...], ...]:
        axes = self.replica_axes()
        return tuple(tuple(c[a] for a in axes) for c in self._coords)

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the fields only (layouts travel through all_gather_object), not the cached tables.
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def coord(self, rank: int) -> tuple[int, ...]:
        return self._coords[self._rank_pos[rank]]

    # ---- axes --------------------------------------------------------------------------------------------
    def replica_axes(self) -> tuple[int, ...]:
        """Mesh axes over which the tensor is replicated (equal copies)."""
        return tuple(a for a, p in enumerate(self.placements) if p.kind == "replicate")

    def partial_axes(self) -> tuple[int, ...]:
        """Mesh axes over which the tensor is a sum (or mean) of pieces."""
        return tuple(a for a, p in enumerate(self.placements) if p.is_partial)

    def shard_axes(self, dim: int | None = None) -> tuple[int, ...]:
        """Mesh axes that shard tensor dim ``dim`` (any dim when ``None``)."""
        return tuple(a for a, p in enumerate(self.placements) if p.is_shard and (dim is None or p.dim == dim))

    @property
    def is_partial(self) -> bool:
        return any(p.is_partial for p in self.placements)

    @property
    def partial_op(self) -> str:
        """``"sum"`` or ``"avg"``: how the pieces along the partial axes combine (one op per layout)."""
        ops = {p.op for p in self.placements if p.is_partial}
        if len(ops) > 1:
            raise ValueError(f"layout {self.describe()} mixes partial reduce ops {sorted(ops)}")
        return ops.pop() if ops else "sum"

    @property
    def partial_count(self) -> int:
        """Summands per element: the product of the partial axes' sizes (1 without partial axes)."""
        return math.prod(self.mesh_shape[a] for a in self.partial_axes())

    def axis_group(self, rank: int, axes: Sequence[int]) -> tuple[int, ...]:
        """Ranks that share ``rank``'s coordinates on every mesh axis except ``axes`` (``rank`` included), sorted."""
        mine = self.coord(rank)
        free = set(axes)
        keep = [a for a in range(len(self.mesh_shape)) if a not in free]
        return tuple(sorted(r for r, c in zip(self.ranks, self._coords) if all(c[a] == mine[a] for a in keep)))

    def derive(self, shape: Sequence[int], follows: dict[int, int]) -> Layout:
        """The layout of a tensor of ``shape`` whose dim ``d`` is sharded like this layout's dim ``follows[d]``.

        Every other axis becomes a replica axis. E.g. Dion's ``Q`` (``n x r``) of an ``m x n`` parameter follows
        its column sharding: ``layout.derive((n, r), {0: 1})``.
        """
        src = {v: k for k, v in follows.items()}
        placements = []
        for p in self.placements:
            if p.is_shard and p.dim in src:
                placements.append(Placement(p.kind, src[p.dim], p.split_factor))
            else:
                placements.append(REPLICATE)
        return Layout(tuple(shape), self.ranks, self.mesh_shape, tuple(placements))

    def with_placements(self, placements: Sequence[Placement], shape: Sequence[int] | None = None) -> Layout:
        """The same mesh with other placements (and optionally another shape)."""
        return Layout(tuple(self.shape if shape is None else shape), self.ranks, self.mesh_shape, tuple(placements))

    def index_lists(self, rank: int) -> tuple[list[int], ...]:
        """Global indices, per tensor dim, of the local piece of ``rank`` (in local order)."""
        idx = [list(range(s)) for s in self.shape]
        for axis, (pl, k) in enumerate(zip(self.placements, self.coord(rank))):
            n = self.mesh_shape[axis]
            if pl.kind == "shard":
                idx[pl.dim] = _take(idx[pl.dim], n, k)
            elif pl.kind == "strided_shard":
                cur = idx[pl.dim]
                pieces = [cur[lo:hi] for lo, hi in chunk_bounds(len(cur), pl.split_factor)]
                idx[pl.dim] = [i for piece in pieces for i in _take(piece, n, k)]
        return tuple(idx)

    def local_shape(self, rank: int) -> tuple[int, ...]:
        """Like ``index_lists`` but lengths only (chunking depends on lengths alone), O(mesh axes)."""
        lens = list(self.shape)
        for axis, (pl, k) in enumerate(zip(self.placements, self.coord(rank))):
            n = self.mesh_shape[axis]
            if pl.kind == "shard":
                lo, hi = chunk_bound(lens[pl.dim], n, k)
                lens[pl.dim] = hi - lo
            elif pl.kind == "strided_shard":
                pieces = [hi - lo for lo, hi in chunk_bounds(lens[pl.dim], pl.split_factor)]
                lens[pl.dim] = sum(b - a for p in pieces for a, b in [chunk_bound(p, n, k)])
        return tuple(lens)

    def local_numel(self, rank: int) -> int:
        return self._local_numels[self._rank_pos[rank]]

    def group_key(self, rank: int) -> tuple[int, ...]:
        """Coordinates on the replica axes: ranks with equal keys hold the pieces (shards, summands) of one copy."""
        return self._group_keys[self._rank_pos[rank]]

    def senders(self, owner: int) -> list[int]:
        """Ranks (besides ``owner``) whose pieces, with the owner's own, make up the whole tensor (contributors:
        every shard, and every summand along partial axes)."""
        key = self._group_ids[self._rank_pos[owner]]
        return [r for r, k, n in zip(self.ranks, self._group_ids, self._local_numels) if r != owner and n and k == key]

    def receivers(self, owner: int) -> list[int]:
        """Ranks (besides ``owner``) that hold a non-empty piece and need the result back."""
        return [r for r, n in zip(self.ranks, self._local_numels) if r != owner and n]

    def describe(self) -> str:
        pl = ",".join(str(p) for p in self.placements)
        return f"shape={list(self.shape)} mesh={list(self.mesh_shape)} ranks={list(self.ranks)} placements=({pl})"


@lru_cache(maxsize=64)
def _coords_table(mesh_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Mesh coordinates in row-major order (the order of ``Layout.ranks``)."""
    return tuple(itertools.product(*(range(n) for n in mesh_shape)))


@lru_cache(maxsize=32)
def rank_positions(ranks: tuple[int, ...]) -> dict[int, int]:
    """``rank -> index in ranks``, shared by every layout over an equal rank tuple (read it, never write it)."""
    return {r: i for i, r in enumerate(ranks)}


@lru_cache(maxsize=32)
def local_numels_table(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: tuple[Placement, ...]
) -> tuple[int, ...]:
    """``local_numel`` by mesh position (row-major, the order of ``Layout.ranks``); the rank ids do not matter.

    Axis by axis, each distinct local shape reached so far splits into the few distinct shapes the axis makes of
    it (``chunk_lengths`` has at most three runs), so the work per rank is one list step, not a ``local_shape``
    call: 1,000,000 ranks take well under a second.
    """
    if not math.prod(mesh_shape):
        return ()
    states: list[tuple[int, ...]] = [tuple(shape)]  # distinct local shapes after the axes so far
    ids = [0]  # per mesh position so far: index into states
    for pl, n in zip(placements, mesh_shape):
        nxt: dict[tuple[int, ...], int] = {}
        rows: list[list[int]] = []  # per state: the next state of each coordinate on this axis
        for lens in states:
            if not pl.is_shard:
                rows.append([nxt.setdefault(lens, len(nxt))] * n)
                continue
            lengths = _piece_lengths(pl, lens[pl.dim], n)
            to = {v: nxt.setdefault((*lens[: pl.dim], v, *lens[pl.dim + 1 :]), len(nxt)) for v in set(lengths)}
            rows.append([to[v] for v in lengths])
        states = list(nxt)
        ids = rows[0] if ids == [0] else [j for i in ids for j in rows[i]]
    numels = [math.prod(s) for s in states]
    return tuple(map(numels.__getitem__, ids))


@lru_cache(maxsize=32)
def replica_group_table(mesh_shape: tuple[int, ...], placements: tuple[Placement, ...]) -> tuple[int, ...]:
    """By mesh position: the row-major index of its coordinates on the replica axes (equal ids: equal
    ``group_key``, the ranks that hold the pieces of one copy)."""
    ids = [0]
    for pl, n in zip(placements, mesh_shape):
        if pl.kind == "replicate":
            ids = [g * n + k for g in ids for k in range(n)]
        else:
            ids = [g for g in ids for _ in range(n)]
    return tuple(ids)
