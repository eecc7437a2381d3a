"""The planner: which rank computes which whole tensor, in which buckets, at what cost in bytes.

Pure Python over layouts and costs, so a plan for any world size can be built and checked without processes.
Every tensor gets exactly one owner among the ranks of its mesh, chosen longest-processing-time first to balance
the per-rank cost; same-key, same-shape tensors form buckets so that an owner runs one batched kernel per bucket
and the executor makes one exchange each way per bucket. Tensors sharded only on batch dims (3-D expert stacks
sharded on the expert dim, with no replicated axis) need no exchange: each rank computes its own pieces.

A tensor's contributors (``Layout.senders``) are its shards and, on ``Partial`` axes, its summands: the owner
receives every one of them. Results return in the input layout (each holder its piece) or, with
``out="replicated"``, whole to every holder; ``result_numels`` counts what one result holds.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from .layout import Layout


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
            return self.result_numels[i] if self.result_numels is not None else self.layouts[i].numel
        return self.layouts[i].local_numel(rank)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def assignments(self) -> dict[int, list[int]]:
        """rank -> indices of the tensors it computes (in-place tensors appear under every holder)."""
        out: dict[int, list[int]] = {r: [] for r in self.ranks}
        for i, o in enumerate(self.owners):
            if o >= 0:
                out[o].append(i)
            else:
                for r in self.layouts[i].ranks:
                    if self.layouts[i].local_numel(r):
                        out[r].append(i)
        for v in out.values():
            v.sort()
        return out

    def receivers(self, i: int) -> list[int]:
        """Ranks that get tensor ``i``'s result from its owner: holders of a non-empty piece, or, with
        ``out="replicated"``, every rank of its mesh (empty holders too: all ranks then hold the same values)."""
        lay, o = self.layouts[i], self.owners[i]
        if self.out == "replicated":
            return [r for r in lay.ranks if r != o]
        return lay.receivers(o)

    def bytes_per_rank(self, element_size: int = 4) -> dict[int, dict[str, int]]:
        """Bytes each rank sends and receives per step (contributors in, results back)."""
        out = {r: {"sent": 0, "received": 0} for r in self.ranks}
        for i, o in enumerate(self.owners):
            if o < 0:
                continue
            lay = self.layouts[i]
            for s in lay.senders(o):
                n = lay.local_numel(s) * element_size
                out[s]["sent"] += n
                out[o]["received"] += n
            for r in self.receivers(i):
                n = self.returned_numel(i, r) * element_size
                out[o]["sent"] += n
                out[r]["received"] += n
        return out

    def bytes_lower_bound(self, element_size: int = 4) -> int:
        """Fewest bytes any owner choice must move: every contributor's piece but the owner's in, results out."""
        total = 0
        for i, o in enumerate(self.owners):
            if o < 0:
                continue
            lay = self.layouts[i]
            holders = [lay.local_numel(r) for r in lay.ranks]
            # One copy's pieces cover the tensor once per summand (partial_count times).
            pieces_in = lay.numel * lay.partial_count
            if self.out == "replicated":
                back = (len(lay.ranks) - 1) * self.returned_numel(i, o)
                best = min(pieces_in - lay.local_numel(c) for c in lay.ranks) + back
            else:
                back = sum(holders)
                best = min(pieces_in - lay.local_numel(c) + back - lay.local_numel(c) for c in lay.ranks)
            total += best * element_size
        return total

    def collectives_per_step(self) -> int:
        """All-to-alls the executor runs per step: one per bucket and direction in which any data moves."""
        n = 0
        for b in self.buckets:
            n += any(self.layouts[i].senders(self.owners[i]) for i in b)
            n += any(self.receivers(i) for i in b)
        return n

    def stats(self, element_size: int = 4) -> dict[str, float]:
        loads = [self.load.get(r, 0.0) for r in self.ranks]
        mean = sum(loads) / len(loads) if loads else 0.0
        total = sum(self.costs)
        per_rank = self.bytes_per_rank(element_size)
        return {
            "world_size": self.world_size,
            "tensors": len(self.layouts),
            "imbalance": (max(loads) / mean) if mean > 0 else 1.0,
            "redundancy": (sum(loads) / total) if total > 0 else 1.0,
            "bytes_total": sum(v["received"] for v in per_rank.values()),
            "bytes_lower_bound": self.bytes_lower_bound(element_size),
            "bytes_per_rank_max": max((v["received"] + v["sent"] for v in per_rank.values()), default=0),
            "collectives_per_step": self.collectives_per_step(),
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
        for i, o in enumerate(self.owners):
            if o >= 0 and o not in self.layouts[i].ranks:
                raise ValueError(f"tensor {i} owned by rank {o}, outside its mesh {self.layouts[i].ranks}")


def _is_local(lay: Layout, batch_ndim: int) -> bool:
    sharded_dims = {p.dim for p in lay.placements if p.is_shard}
    replicated = any(not p.is_shard and n > 1 for p, n in zip(lay.placements, lay.mesh_shape))
    return bool(sharded_dims) and max(sharded_dims) < batch_ndim and not replicated


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
        costs: compute cost per tensor (e.g. ``batch * m * n * min(m, n)``).
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
    rank_set = set(ranks)
    for i, lay in enumerate(layouts):
        if not set(lay.ranks) <= rank_set:
            raise ValueError(f"tensor {i} ({lay.describe()}) lives on ranks outside the group {sorted(rank_set)}")
    owners = [-1] * n
    load = {r: 0.0 for r in ranks}
    local = [i for i in range(n) if out == "input" and _is_local(layouts[i], batch_ndims[i])]
    local_set = set(local)
    for i in local:
        lay = layouts[i]
        for r in lay.ranks:
            load[r] += costs[i] * lay.local_numel(r) / max(lay.numel, 1)
    # Longest processing time first; ties keep the key/shape order so a bucket spreads over the ranks.
    order = sorted((i for i in range(n) if i not in local_set), key=lambda i: (-costs[i], i))
    heap = [(load[r], r) for r in ranks]  # in-place tensors already added load
    for i in order:
        cand = set(layouts[i].ranks)
        popped = []
        while True:
            ld, r = heapq.heappop(heap)
            if r in cand and ld == load[r]:
                break
            if ld == load[r]:
                popped.append((ld, r))
        # Among equally loaded candidates, the one holding the biggest piece moves the fewest bytes.
        while heap and heap[0][0] == ld:
            ld2, r2 = heapq.heappop(heap)
            if ld2 != load[r2]:
                continue
            if r2 in cand and layouts[i].local_numel(r2) > layouts[i].local_numel(r):
                popped.append((ld, r))
                r = r2
            else:
                popped.append((ld2, r2))
        owners[i] = r
        load[r] += costs[i]
        heapq.heappush(heap, (load[r], r))
        for item in popped:
            heapq.heappush(heap, item)

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
        ranks=tuple(ranks),
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
