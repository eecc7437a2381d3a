"""The executor: one packed all-to-all per bucket to the owners, one back, overlapped with compute."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .config import DistributedConfig
from .engine import EngineStats, Job, MapFn, _n_matrices
from .layout import REPLICATE, Layout
from .planner import Plan, make_plan
from .resolve import comm_dtype_for, group_for, resolve_layouts


def _indexer(lists: tuple[list[int], ...]) -> tuple:
    """Index that selects the outer product of per-dim index lists (slices where contiguous)."""
    contiguous = [not lst or lst == list(range(lst[0], lst[0] + len(lst))) for lst in lists]
    if all(contiguous):
        return tuple(slice(lst[0], lst[0] + len(lst)) if lst else slice(0, 0) for lst in lists)
    adv = [d for d, c in enumerate(contiguous) if not c]
    if len(adv) == 1:
        return tuple(
            torch.tensor(lst, dtype=torch.long) if d == adv[0] else slice(lst[0], lst[0] + len(lst))
            for d, lst in enumerate(lists)
        )
    n = len(lists)
    return tuple(
        torch.tensor(lst, dtype=torch.long).view([-1 if k == d else 1 for k in range(n)]) for d, lst in enumerate(lists)
    )


@dataclass
class _Exchange:
    """Static description of one bucket's exchange, seen from this rank."""

    members: list[int]  # param indices of the bucket, in order
    send_gather: dict[int, list[int]]  # dest group rank -> params whose piece I send there
    recv_gather: dict[int, list[int]]  # src group rank -> params (owned by me) whose piece it sends
    owned: list[int]


class PlanEngine:
    """Runs a ``Plan`` over a process group; see ``disco.distributed.planner`` for who owns what."""

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        costs: Sequence[float],
        keys: Sequence[Hashable],
        batch_ndims: Sequence[int],
        config: DistributedConfig,
        names: Sequence[str] | None = None,
        ids: Sequence[int] | None = None,
    ) -> None:
        self.config = config
        self.names = list(names) if names else None
        self.params = list(params)
        self.keys = list(keys)
        self.batch_ndims = list(batch_ndims)
        self.stats = EngineStats()
        self.rank = dist.get_rank()
        self.current_rank = self.rank
        layouts = resolve_layouts(params, config, ids)
        ranks = sorted({r for lay in layouts for r in lay.ranks} | {self.rank})
        self.group = group_for(ranks)
        layouts = self._agree(layouts, ranks)
        if not config.split_replicas:
            layouts = [self._within_replica(lay) for lay in layouts]
            ranks = sorted({r for lay in layouts for r in lay.ranks} | {self.rank})
            self.group = group_for(ranks)
        self.group_ranks = ranks
        self._grank = {r: i for i, r in enumerate(ranks)}
        self.plan: Plan = make_plan(
            layouts, costs, keys, ranks=ranks, batch_ndims=batch_ndims, bucket_size=config.bucket_size
        )
        self._regions: dict[tuple[int, int], tuple] = {}
        self._exchanges: dict[tuple[int, ...], _Exchange] = {}
        self._sends: dict[tuple[bool, tuple[int, ...]], bool] = {}

    def _agree(self, layouts: list[Layout], ranks: list[int]) -> list[Layout]:
        """Make every rank of the group plan with the same layouts.

        A parameter may sit on a different sub-mesh on different ranks (FSDP over TP leaves non-TP parameters
        on each TP rank's own dp mesh): such copies are one tensor replicated over an extra mesh axis.
        """
        everyone: list = [None] * len(ranks)
        dist.all_gather_object(everyone, layouts, group=self.group)
        if any(len(other) != len(layouts) for other in everyone):
            counts = {r: len(other) for r, other in zip(ranks, everyone)}
            raise ValueError(f"optimizer ranks hold different numbers of parameters: {counts}")
        merged = []
        for i, lay in enumerate(layouts):
            variants = sorted({other[i] for other in everyone}, key=lambda v: min(v.ranks))
            if len(variants) == 1:
                merged.append(lay)
                continue
            ok = all(
                v.shape == lay.shape and v.mesh_shape == lay.mesh_shape and v.placements == lay.placements
                for v in variants
            ) and len({r for v in variants for r in v.ranks}) == sum(len(v.ranks) for v in variants)
            if not ok:
                raise ValueError(
                    f"parameter {i} ({self.names[i] if self.names else i}) has incompatible layouts across ranks: "
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
        """The same layout restricted to this rank's replica (replicated axes dropped)."""
        key = lay.group_key(self.rank)
        ranks = [r for r in lay.ranks if lay.group_key(r) == key]
        axes = [a for a, p in enumerate(lay.placements) if p.is_shard]
        return Layout(
            lay.shape,
            tuple(ranks),
            tuple(lay.mesh_shape[a] for a in axes) or (1,),
            tuple(lay.placements[a] for a in axes) or (lay.placements[0],),
        )

    @property
    def assignments(self) -> dict[int, list[int]]:
        return self.plan.assignments

    def region(self, i: int, rank: int) -> tuple:
        key = (i, rank)
        if key not in self._regions:
            self._regions[key] = _indexer(self.plan.layouts[i].index_lists(rank))
        return self._regions[key]

    # ---- consistency -------------------------------------------------------------------------------------
    def check_grads(self, present: list[bool], names: Sequence[str]) -> None:
        """Every rank must agree on which parameters have a gradient; else fail everywhere, same message."""
        mask = torch.tensor([1 if p else 0 for p in present], dtype=torch.int32)
        total = mask.clone()
        dist.all_reduce(total, group=self.group)
        n = len(self.group_ranks)
        bad = [i for i, s in enumerate(total.tolist()) if s not in (0, n)]
        if bad:
            listed = ", ".join(f"{names[i]} ({int(total[i])}/{n} ranks)" for i in bad[:8])
            raise RuntimeError(
                f"gradients present on some ranks and missing on others for: {listed}; every rank must produce "
                "a gradient for a parameter, or none must"
            )

    def average_gradients(self, grads: Sequence[Tensor]) -> None:
        """Average plain replicated gradients over the group in one flat all-reduce (DDP without the wrapper)."""
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat /= len(self.group_ranks)
        self.stats.collectives += 1
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---- execution ---------------------------------------------------------------------------------------
    def _exchange(self, members: list[int]) -> _Exchange:
        key = tuple(members)
        if key not in self._exchanges:
            self._exchanges[key] = self._make_exchange(members)
        return self._exchanges[key]

    def _make_exchange(self, members: list[int]) -> _Exchange:
        send: dict[int, list[int]] = {}
        recv: dict[int, list[int]] = {}
        owned = []
        for i in members:
            lay, o = self.plan.layouts[i], self.plan.owners[i]
            if o == self.rank:
                owned.append(i)
                for s in lay.senders(o):
                    recv.setdefault(self._grank[s], []).append(i)
            elif self.rank in lay.senders(o):
                send.setdefault(self._grank[o], []).append(i)
        return _Exchange(members, send, recv, owned)

    def _a2a(self, chunks: dict[int, list[Tensor]], recv_sizes: dict[int, int], like: Tensor):
        n = len(self.group_ranks)
        in_splits = [sum(t.numel() for t in chunks.get(g, [])) for g in range(n)]
        out_splits = [recv_sizes.get(g, 0) for g in range(n)]
        flat = [t.reshape(-1) for g in range(n) for t in chunks.get(g, [])]
        send = torch.cat(flat) if flat else like.new_empty(0)
        out = like.new_empty(sum(out_splits))
        es = like.element_size()
        self.stats.bytes_sent += send.numel() * es
        self.stats.bytes_received += out.numel() * es
        self.stats.collectives += 1
        work = dist.all_to_all_single(out, send, out_splits, in_splits, group=self.group, async_op=True)
        return work, out, out_splits

    def map(self, jobs: Sequence[Job], fn: MapFn) -> list[Tensor]:
        self.stats.reset()
        pos = {i: j for j, (i, _, _) in enumerate(jobs)}
        local = {i: t for i, t, _ in jobs}
        key_of = {i: k for i, _, k in jobs}
        if any(key_of[i] != self.keys[i] for i in key_of):
            raise RuntimeError("parameter group settings changed after construction; rebuild the optimizer")
        out: list[Tensor | None] = [None] * len(jobs)
        some = next(iter(local.values()), None)
        if some is None:
            return []
        wire = comm_dtype_for(some, self.config)

        for bucket in self.plan.local_buckets:
            present = [i for i in bucket if i in local and local[i].numel()]
            by: dict[tuple, list[int]] = {}
            for i in present:
                by.setdefault(tuple(local[i].shape), []).append(i)
            for shape, ids in by.items():
                res = fn(self.keys[ids[0]], torch.stack([local[i] for i in ids]))
                for k, i in enumerate(ids):
                    out[pos[i]] = res[k]
                    self.stats.matrices_computed += _n_matrices(shape, self.batch_ndims[i])
            for i in bucket:
                if i in local and out[pos[i]] is None:
                    out[pos[i]] = local[i].clone()

        buckets = [[i for i in b if i in local] for b in self.plan.buckets]
        buckets = [b for b in buckets if b]
        exchanges = [self._exchange(b) for b in buckets]
        gathers: deque = deque()
        returns: deque = deque()
        issued = 0

        def issue_gather(k: int):
            ex = exchanges[k]
            chunks = {g: [local[i].to(wire) for i in ids] for g, ids in ex.send_gather.items()}
            sizes = {
                g: sum(self.plan.layouts[i].local_numel(self.group_ranks[g]) for i in ids)
                for g, ids in ex.recv_gather.items()
            }
            if not self._anyone_sends(ex.members, gather=True):
                return None
            return self._a2a(chunks, sizes, torch.empty(0, dtype=wire, device=some.device))

        def finish_return(item):
            work, buf, splits, ex_recv = item
            if work is not None:
                work.wait()
            offset = 0
            for _, ids in ex_recv:
                for i in ids:
                    n = self.plan.layouts[i].local_numel(self.rank)
                    out[pos[i]] = buf[offset : offset + n].view(local[i].shape)
                    offset += n

        prefetch = max(0, self.config.prefetch_count)
        for k, ex in enumerate(exchanges):
            while issued < len(exchanges) and issued <= k + prefetch:
                gathers.append(issue_gather(issued))
                issued += 1
            g = gathers.popleft()
            fulls: dict[int, Tensor] = {}
            for i in ex.owned:
                lay = self.plan.layouts[i]
                full = torch.empty(lay.shape, dtype=wire, device=some.device)
                if local[i].numel():
                    full[self.region(i, self.rank)] = local[i].to(wire)
                fulls[i] = full
            if g is not None:
                work, buf, splits = g
                work.wait()
                offsets = [0]
                for s in splits:
                    offsets.append(offsets[-1] + s)
                for src, ids in ex.recv_gather.items():
                    off = offsets[src]
                    r = self.group_ranks[src]
                    for i in ids:
                        lay = self.plan.layouts[i]
                        n = lay.local_numel(r)
                        fulls[i][self.region(i, r)] = buf[off : off + n].view(lay.local_shape(r))
                        off += n
            results: dict[int, Tensor] = {}
            if ex.owned:
                by_key: dict[Hashable, list[int]] = {}
                for i in ex.owned:
                    by_key.setdefault(self.keys[i], []).append(i)
                for key, ids in by_key.items():
                    res = fn(key, torch.stack([fulls[i] for i in ids])).to(wire)
                    for kk, i in enumerate(ids):
                        results[i] = res[kk]
                        if local[i].numel():
                            out[pos[i]] = res[kk][self.region(i, self.rank)]
                        self.stats.matrices_computed += _n_matrices(self.plan.layouts[i].shape, self.batch_ndims[i])
                        self.stats.tensors_computed += 1
            # Return: owners send each holder its piece; holders receive pieces of params owned elsewhere.
            chunks: dict[int, list[Tensor]] = {}
            for i in ex.owned:
                for r in self.plan.layouts[i].receivers(self.rank):
                    chunks.setdefault(self._grank[r], []).append(results[i][self.region(i, r)])
            recv_from: dict[int, list[int]] = {}
            for i in ex.members:
                o = self.plan.owners[i]
                if o != self.rank and local[i].numel():
                    recv_from.setdefault(self._grank[o], []).append(i)
            sizes = {g2: sum(self.plan.layouts[i].local_numel(self.rank) for i in ids) for g2, ids in recv_from.items()}
            ex_recv = sorted(recv_from.items())
            if self._anyone_sends(ex.members, gather=False):
                work, buf, splits = self._a2a(chunks, sizes, torch.empty(0, dtype=wire, device=some.device))
                if not self.config.async_gpu_parallelism:
                    work.wait()
                returns.append((work, buf, splits, ex_recv))
            while len(returns) > max(1, prefetch + 1):
                finish_return(returns.popleft())
        while returns:
            finish_return(returns.popleft())
        for j, res_j in enumerate(out):
            if res_j is None:  # a holder of an empty piece
                out[j] = jobs[j][1].clone()
        return out  # type: ignore[return-value]

    def _anyone_sends(self, members: list[int], *, gather: bool) -> bool:
        """Whether any rank moves data for this bucket (static: every rank answers the same)."""
        key = (gather, tuple(members))
        if key not in self._sends:
            self._sends[key] = self._moves_data(members, gather=gather)
        return self._sends[key]

    def _moves_data(self, members: list[int], *, gather: bool) -> bool:
        for i in members:
            lay, o = self.plan.layouts[i], self.plan.owners[i]
            if lay.senders(o) if gather else lay.receivers(o):
                return True
        return False
