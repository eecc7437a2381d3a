"""The planner: which rank computes which whole tensor, in which buckets, at what cost in bytes.

Pure Python over layouts and costs, so a plan for any world size can be built and checked without processes.
Every tensor gets exactly one owner among the ranks of its mesh, chosen longest-processing-time first to balance
the per-rank cost; same-key, same-shape tensors form buckets so that an owner runs one batched kernel per bucket
and the executor makes one exchange each way per bucket. Tensors sharded only on batch dims (3-D expert stacks
sharded on the expert dim, with no replicated axis) need no exchange: each rank computes its own pieces.

A tensor's contributors (``Layout.senders``) are its shards and, on ``Partial`` axes, its summands: the owner
receives every one of them. Results return in the input layout (each holder its piece) or, with
``out="replicated"``, whole to every holder; ``result_numels`` counts what one result holds.

The owner rule: the least loaded rank of the tensor's mesh; among equally loaded ones, the one holding the
biggest piece (it moves the fewest bytes); then the lowest rank id. Speed (65,536 ranks, 1,000 tensors well
under a second): nothing runs per rank per tensor. A model's layouts share a handful of shapes and rank tuples,
so per-rank tables (local sizes, replica groups) are built once per *distinct* layout (``_Tables``); ranks that
own nothing yet stay grouped by (initial load, piece size) and are handed out lowest rank first (``_Pool``);
only ranks that own something sit in a heap; and the byte counts add one vector per distinct layout, then
correct the owners. ``tests/test_planner.py`` keeps the direct per-rank algorithm as the reference.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .layout import Layout, local_numels_table, rank_positions, replica_group_table


class _Mesh:
    """One distinct rank tuple (layouts often carry equal tuples as distinct objects): rank -> position."""

    __slots__ = ("ranks", "_where")

    def __init__(self, ranks: tuple[int, ...]) -> None:
        self.ranks = ranks
        # None: ranks are 0..n-1 in order, so a rank is its own position (no million-entry dict).
        self._where = None if ranks == tuple(range(len(ranks))) else rank_positions(ranks)

    def position(self, rank: int) -> int:
        return rank if self._where is None else self._where[rank]

    def __contains__(self, rank: int) -> bool:
        return 0 <= rank < len(self.ranks) if self._where is None else rank in self._where


class _Info:
    """Per-rank tables of one distinct layout, by mesh position, and the sums the byte counts need.

    Replica coordinates never change a piece, so every replica group (copy) holds the same pieces: per-copy
    sums are the totals over ``copies``, with no pass over the groups.
    """

    __slots__ = ("mesh", "numels", "groups", "copies", "total", "nonzero", "biggest")

    def __init__(self, lay: Layout, mesh: _Mesh) -> None:
        self.mesh = mesh
        self.numels = local_numels_table(lay.shape, lay.mesh_shape, lay.placements)
        self.groups = replica_group_table(lay.mesh_shape, lay.placements)  # position -> its copy, 0..copies-1
        self.copies = math.prod(lay.mesh_shape[a] for a in lay.replica_axes())
        self.total = sum(self.numels)
        self.nonzero = len(self.numels) - self.numels.count(0)
        self.biggest = max(self.numels, default=0)

    def numel_of(self, rank: int) -> int:
        return self.numels[self.mesh.position(rank)]


class _Tables:
    """The distinct layouts of a plan: ``which[i]`` indexes ``infos`` for tensor ``i``."""

    def __init__(self, layouts: Sequence[Layout]) -> None:
        by_id: dict[int, _Mesh] = {}  # id(ranks tuple): hashing a long tuple once per object, not per tensor
        by_value: dict[tuple[int, ...], _Mesh] = {}
        index: dict[tuple[Any, ...], int] = {}
        self.infos: list[_Info] = []
        self.which: list[int] = []
        self.meshes: list[_Mesh] = []
        for lay in layouts:
            mesh = by_id.get(id(lay.ranks))
            if mesh is None:
                mesh = by_value.get(lay.ranks)
                if mesh is None:
                    mesh = by_value[lay.ranks] = _Mesh(lay.ranks)
                    self.meshes.append(mesh)
                by_id[id(lay.ranks)] = mesh
            key = (lay.shape, lay.mesh_shape, lay.placements, id(mesh))
            j = index.setdefault(key, len(self.infos))
            if j == len(self.infos):
                self.infos.append(_Info(lay, mesh))
            self.which.append(j)

    def info(self, i: int) -> _Info:
        return self.infos[self.which[i]]


@dataclass
class Plan:
    ranks: tuple[int, ...]
    layouts: list[Layout]
    costs: list[float]
    owners: list[int]  # -1 for tensors computed in place on every rank ("local")
    buckets: list[list[int]]  # exchanged buckets, in execution order
    local_buckets: list[list[int]]  # in-place buckets (no communication)
    load: dict[int, float] = field(default_factory=dict)
    out: str = "input"  # "input" | "replicated"
    result_numels: list[int] | None = None  # per tensor, for out="replicated" (default: the tensor's numel)

    def returned_numel(self, i: int, rank: int) -> int:
        """Elements of tensor ``i``'s result that ``rank`` gets back from the owner."""
        if self.out == "replicated":
            return self._result_numel(i)
        return self.layouts[i].local_numel(rank)

    def _result_numel(self, i: int) -> int:
        return self.result_numels[i] if self.result_numels is not None else self.layouts[i].numel

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def assignments(self) -> dict[int, list[int]]:
        """rank -> indices of the tensors it computes (in-place tensors appear under every holder)."""
        out: dict[int, list[int]] = {r: [] for r in self.ranks}
        holders = self._local_holders()
        for i, o in enumerate(self.owners):  # in index order, so every list comes out sorted
            for r in [o] if o >= 0 else holders[i]:
                out[r].append(i)
        return out

    def ranks_with_work(self) -> int:
        """Ranks that compute at least one tensor (non-empty ``assignments``), without a list per rank."""
        working = {o for o in self.owners if o >= 0}
        for members in {id(m): m for m in self._local_holders().values()}.values():
            working.update(members)
        return len(working)

    def _local_holders(self) -> dict[int, list[int]]:
        """In-place tensor -> ranks holding a non-empty piece of it (one list per distinct layout)."""
        tables = _Tables(self.layouts)
        by_layout: dict[int, list[int]] = {}
        out: dict[int, list[int]] = {}
        for i, o in enumerate(self.owners):
            if o < 0:
                j = tables.which[i]
                if j not in by_layout:
                    info = tables.infos[j]
                    by_layout[j] = list(itertools.compress(info.mesh.ranks, info.numels))
                out[i] = by_layout[j]
        return out

    def receivers(self, i: int) -> list[int]:
        """Ranks that get tensor ``i``'s result from its owner: holders of a non-empty piece, or, with
        ``out="replicated"``, every rank of its mesh (empty holders too: all ranks then hold the same values)."""
        lay, o = self.layouts[i], self.owners[i]
        if self.out == "replicated":
            return [r for r in lay.ranks if r != o]
        return lay.receivers(o)

    def bytes_per_rank(self, element_size: int = 4, result_size: int | None = None) -> dict[int, dict[str, int]]:
        """Bytes each rank sends and receives per step (contributors in at ``element_size`` bytes an element,
        results back at ``result_size``, default the same)."""
        sent, received = self._traffic(_Tables(self.layouts), element_size, result_size)
        return {r: {"sent": s, "received": v} for r, s, v in zip(self.ranks, sent, received)}

    def _traffic(
        self, tables: _Tables, element_size: int, result_size: int | None = None
    ) -> tuple[list[int], list[int]]:
        """Bytes sent and received by each rank, in ``ranks`` order.

        As if no rank owned anything, every holder sends its piece to each owner in its replica group and gets
        its part of each result back: per distinct layout, one vector scaled by how many of its tensors have an
        owner in each group. Then each owner trades those holder terms for its own: it receives its group's other
        pieces and sends the results out. Pieces in and results back are counted apart (``g_*`` and ``r_*``),
        then weighed by their element sizes.
        """
        replicated = self.out == "replicated"
        per_copy: dict[int, list[int]] = {}  # distinct layout -> tensors with their owner in each copy
        back: dict[int, int] = {}  # distinct layout -> elements back to each holder, over its tensors
        for i, o in enumerate(self.owners):
            if o < 0:
                continue
            j, info = tables.which[i], tables.info(i)
            if j not in per_copy:
                per_copy[j] = [0] * info.copies
            per_copy[j][info.groups[info.mesh.position(o)]] += 1
            back[j] = back.get(j, 0) + (self._result_numel(i) if replicated else 1)
        n = len(self.ranks)
        g_sent, r_received = [0] * n, [0] * n  # holders: pieces out, results in
        g_received, r_sent = [0] * n, [0] * n  # owners: pieces in, results out
        plan_mesh = _Mesh(self.ranks)
        for j, counts in per_copy.items():
            info, m = tables.infos[j], back[j]
            if info.copies > 1:
                out = list(map(operator.mul, info.numels, map(counts.__getitem__, info.groups)))
            else:
                out = list(map(counts[0].__mul__, info.numels))
            into = [m] * len(info.numels) if replicated else list(map(m.__mul__, info.numels))
            if info.mesh.ranks == self.ranks:
                g_sent = list(map(operator.add, g_sent, out))
                r_received = list(map(operator.add, r_received, into))
            else:
                for r, s, v in zip(info.mesh.ranks, out, into):
                    p = plan_mesh.position(r)
                    g_sent[p] += s
                    r_received[p] += v
        for i, o in enumerate(self.owners):
            if o < 0:
                continue
            info = tables.info(i)
            k = info.mesh.position(o)
            v, p, held = info.numels[k], plan_mesh.position(o), info.total // info.copies
            g_sent[p] -= v  # the owner's own piece stays
            g_received[p] += held - v
            if replicated:
                res = self._result_numel(i)
                r_sent[p] += (len(info.numels) - 1) * res
                r_received[p] -= res
            else:
                r_sent[p] += info.total - v
                r_received[p] -= v
        rs = element_size if result_size is None else result_size
        sent = [element_size * a + rs * b for a, b in zip(g_sent, r_sent)]
        received = [element_size * a + rs * b for a, b in zip(g_received, r_received)]
        return sent, received

    def bytes_lower_bound(self, element_size: int = 4, result_size: int | None = None) -> int:
        """Fewest bytes any owner choice must move: every contributor's piece but the owner's in, results out
        (at ``result_size`` bytes an element; default ``element_size``)."""
        return self._lower_bound(_Tables(self.layouts), element_size, result_size)

    def _lower_bound(self, tables: _Tables, element_size: int, result_size: int | None = None) -> int:
        # The best owner holds the biggest piece: it need not receive it, nor (results in place) send it back.
        rs = element_size if result_size is None else result_size
        total = 0
        for i, o in enumerate(self.owners):
            if o < 0:
                continue
            lay, info = self.layouts[i], tables.info(i)
            pieces_in = lay.numel * lay.partial_count  # one copy's pieces cover the tensor once per summand
            if self.out == "replicated":
                back = (len(info.numels) - 1) * self._result_numel(i)
            else:
                back = info.total - info.biggest
            total += (pieces_in - info.biggest) * element_size + back * rs
        return total

    def collectives_per_step(self) -> int:
        """All-to-alls the executor runs per step: one per bucket and direction in which any data moves."""
        return self._collectives(_Tables(self.layouts))

    def _collectives(self, tables: _Tables) -> int:
        def gathers(i: int) -> bool:  # another holder of a non-empty piece in the owner's replica group
            info = tables.info(i)
            return info.nonzero // info.copies - (info.numel_of(self.owners[i]) > 0) > 0

        def returns(i: int) -> bool:
            info = tables.info(i)
            if self.out == "replicated":
                return len(info.numels) > 1
            return info.nonzero - (info.numel_of(self.owners[i]) > 0) > 0

        return sum(any(map(gathers, b)) + any(map(returns, b)) for b in self.buckets)

    def stats(self, element_size: int = 4, result_size: int | None = None) -> dict[str, float]:
        """The plan's figures; bytes with pieces at ``element_size`` bytes an element, results at ``result_size``
        (default the same)."""
        loads = list(map(self.load.get, self.ranks, itertools.repeat(0.0)))
        mean = sum(loads) / len(loads) if loads else 0.0
        total = sum(self.costs)
        tables = _Tables(self.layouts)
        sent, received = self._traffic(tables, element_size, result_size)
        return {
            "world_size": self.world_size,
            "tensors": len(self.layouts),
            "imbalance": (max(loads) / mean) if mean > 0 else 1.0,
            "redundancy": (sum(loads) / total) if total > 0 else 1.0,
            "bytes_total": sum(received),
            "bytes_lower_bound": self._lower_bound(tables, element_size, result_size),
            "bytes_per_rank_max": max(map(operator.add, sent, received), default=0),
            "collectives_per_step": self._collectives(tables),
            "buckets": len(self.buckets),
            "local_buckets": len(self.local_buckets),
        }

    def validate(self) -> None:
        """Every tensor computed exactly once: one owner inside its own mesh, or in place with no replica."""
        seen: dict[int, int] = {}
        for b in [*self.buckets, *self.local_buckets]:
            for i in b:
                seen[i] = seen.get(i, 0) + 1
        bad = [i for i in range(len(self.layouts)) if seen.get(i, 0) != 1]
        if bad:
            raise ValueError(f"plan does not bucket every tensor exactly once: tensors {bad[:10]}")
        tables = _Tables(self.layouts)
        for i, o in enumerate(self.owners):
            if o >= 0 and o not in tables.info(i).mesh:
                raise ValueError(f"tensor {i} owned by rank {o}, outside its mesh {self.layouts[i].ranks}")


def _is_local(lay: Layout, batch_ndim: int) -> bool:
    sharded_dims = {p.dim for p in lay.placements if p.is_shard}
    replicated = any(not p.is_shard and n > 1 for p, n in zip(lay.placements, lay.mesh_shape))
    return bool(sharded_dims) and max(sharded_dims) < batch_ndim and not replicated


class _Size:
    """Ranks of one layout that own nothing yet, with one initial load and one piece size (lowest rank first)."""

    __slots__ = ("size", "members", "next")

    def __init__(self, size: int, members: list[int]) -> None:
        self.size, self.members, self.next = size, sorted(members), 0


class _Pool:
    """The best rank that owns nothing yet, for one distinct layout, without looking at every rank.

    Such a rank's load is its initial load (in-place tensors), so ranks with equal initial load and equal piece
    size are interchangeable but for their id, and the best of them is the lowest one not taken yet. Ranks are
    only ever taken (a pointer moves past them), so over a whole plan each class is walked once.
    """

    def __init__(self, info: _Info, initial: dict[int, float] | None) -> None:
        ranks, numels = info.mesh.ranks, info.numels
        if initial is None:
            by = {(0.0, v): members for v, members in _group_by(ranks, numels).items()}
        else:
            by = _group_by(ranks, list(zip(map(initial.__getitem__, ranks), numels)))
        levels: dict[float, list[_Size]] = {}
        for (ld, v), members in sorted(by.items(), key=lambda kv: kv[0][1]):
            levels.setdefault(ld, []).append(_Size(v, members))
        # Best last, so exhausted ones pop off the end: lowest load, then (within a load) the biggest piece.
        self.levels = [(ld, levels[ld]) for ld in sorted(levels, reverse=True)]

    def best(self, taken: set[int]) -> tuple[float, int, int] | None:
        """``(load, -piece size, rank)`` of the best rank not in ``taken``, or None when all are taken."""
        while self.levels:
            ld, sizes = self.levels[-1]
            while sizes:
                cls = sizes[-1]
                members, k = cls.members, cls.next
                while k < len(members) and members[k] in taken:
                    k += 1
                cls.next = k
                if k < len(members):
                    return ld, -cls.size, members[k]
                sizes.pop()
            self.levels.pop()
        return None


K = TypeVar("K", bound=Hashable)


def _group_by(ranks: Sequence[int], keys: Sequence[K]) -> dict[K, list[int]]:
    """``key -> ranks with that key``, in ``ranks`` order; a pass at C speed per key when keys are few (the
    usual handful of piece sizes), else one Python pass."""
    distinct = set(keys)
    if len(distinct) <= 16:
        return {k: list(itertools.compress(ranks, map(k.__eq__, keys))) for k in distinct}
    by: dict[K, list[int]] = {}
    for r, k in zip(ranks, keys):
        by.setdefault(k, []).append(r)
    return by


def _initial_loads(
    load: dict[int, float], local: list[int], tables: _Tables, layouts: Sequence[Layout], costs: Sequence[float]
) -> None:
    """Add each in-place tensor's share of its cost to every holder, summed in tensor order as by a per-rank
    loop (so equal ranks get bit-equal loads), but once per *kind* of rank: ranks holding equal pieces of every
    in-place layout get equal loads."""
    kinds = dict.fromkeys(load, 0)  # rank -> kind; kind 0 holds nothing in place
    pieces: list[dict[int, int]] = [{}]  # kind -> {distinct layout: piece size}
    for j in dict.fromkeys(tables.which[i] for i in local):
        info = tables.infos[j]
        step: dict[tuple[int, int], int] = {}  # (kind so far, piece of this layout) -> kind
        for r, v in zip(info.mesh.ranks, info.numels):
            if v:  # an empty piece adds exactly 0.0
                kind = kinds[r]
                new = step.get((kind, v))
                if new is None:
                    new = step[kind, v] = len(pieces)
                    pieces.append({**pieces[kind], j: v})
                kinds[r] = new
    shares = [0.0] * len(pieces)
    for kind, held in enumerate(pieces):
        for i in local:
            v = held.get(tables.which[i], 0)
            if v:
                shares[kind] += costs[i] * v / max(layouts[i].numel, 1)
    for r, kind in kinds.items():
        if kind:
            load[r] += shares[kind]


def make_plan(
    layouts: Sequence[Layout],
    costs: Sequence[float],
    keys: Sequence[Hashable],
    *,
    ranks: Sequence[int],
    batch_ndims: Sequence[int] | None = None,
    bucket_size: int | None = None,
    out: str = "input",
    result_numels: Sequence[int] | None = None,
) -> Plan:
    """Build and validate a plan.

    Args:
        layouts: one per tensor.
        costs: compute cost per tensor (e.g. ``batch * m * n * min(m, n)``), finite and non-negative.
        keys: bucket key per tensor (tensors with equal key and shape share a batched kernel).
        ranks: the ranks of the process group that runs the plan.
        batch_ndims: leading dims per tensor that are independent (expert stacks); sharding only those dims
            makes the tensor computable in place.
        bucket_size: most tensors per exchange (``None``: one exchange per key and shape).
        out: ``"input"`` (results return in the input layout) or ``"replicated"`` (whole, to every holder).
        result_numels: elements of one result per tensor, for ``out="replicated"`` (default: its numel).
    """
    if out not in ("input", "replicated"):
        raise ValueError(f"out must be 'input' or 'replicated', got {out!r}")
    n = len(layouts)
    batch_ndims = list(batch_ndims) if batch_ndims is not None else [0] * n
    ranks = tuple(ranks)
    rank_set = set(ranks)
    tables = _Tables(layouts)
    outside = {id(m) for m in tables.meshes if not rank_set.issuperset(m.ranks)}
    for i, lay in enumerate(layouts):
        if id(tables.info(i).mesh) in outside:
            raise ValueError(f"tensor {i} ({lay.describe()}) lives on ranks outside the group {sorted(rank_set)}")
    owners = [-1] * n
    load = dict.fromkeys(ranks, 0.0)
    local = [i for i in range(n) if out == "input" and _is_local(layouts[i], batch_ndims[i])]
    local_set = set(local)
    if local:
        _initial_loads(load, local, tables, layouts, costs)
    # Longest processing time first; equal costs bucket by bucket (key and shape, in order of first appearance), so
    # that a bucket spreads over the ranks: interleaved (fc0, proj0, fc1, proj1, ...), one rank got every fc and
    # the other every proj, and each computed its bucket while the other waited for it.
    first: dict[tuple[Hashable, tuple[int, ...]], int] = {}
    bucket = [first.setdefault((keys[i], tuple(layouts[i].shape)), i) for i in range(n)]
    order = sorted((i for i in range(n) if i not in local_set), key=lambda i: (-costs[i], bucket[i], i))
    initial = dict(load) if local else None
    pools = {j: _Pool(tables.infos[j], initial) for j in dict.fromkeys(tables.which[i] for i in order)}
    heaps: dict[int, list[tuple[float, int]]] = {id(m): [] for m in tables.meshes}  # per mesh: ranks that own
    taken: set[int] = set()
    for i in order:
        info = tables.info(i)
        best = pools[tables.which[i]].best(taken)
        heap = heaps[id(info.mesh)]
        while heap and heap[0][0] != load[heap[0][1]]:
            heapq.heappop(heap)  # stale: that rank has owned more since
        ties: set[int] = set()  # owning ranks at the lowest load among them: compare, then put back
        if heap and (best is None or heap[0][0] <= best[0]):
            ld = heap[0][0]
            while heap and heap[0][0] == ld:
                r = heapq.heappop(heap)[1]
                if load[r] == ld and r not in ties:
                    ties.add(r)
                    cand = (ld, -info.numel_of(r), r)
                    if best is None or cand < best:
                        best = cand
        if best is None:
            raise ValueError(f"tensor {i} ({layouts[i].describe()}) has no rank to own it")
        o = best[2]
        for r in ties - {o}:
            heapq.heappush(heap, (load[r], r))
        owners[i] = o
        taken.add(o)
        load[o] += costs[i]
        for mesh in tables.meshes:
            if o in mesh:
                heapq.heappush(heaps[id(mesh)], (load[o], o))

    def group(idx: list[int]) -> list[list[int]]:
        by: dict[tuple[Hashable, tuple[int, ...]], list[int]] = {}
        for i in idx:
            by.setdefault((keys[i], layouts[i].shape), []).append(i)
        out: list[list[int]] = []
        for members in by.values():
            step = bucket_size or len(members)
            out.extend(members[k : k + step] for k in range(0, len(members), step))
        return out

    plan = Plan(
        ranks=ranks,
        layouts=list(layouts),
        costs=list(costs),
        owners=owners,
        buckets=group([i for i in range(n) if i not in local_set]),
        local_buckets=group(local),
        load=load,
        out=out,
        result_numels=list(result_numels) if result_numels is not None else None,
    )
    plan.validate()
    return plan
