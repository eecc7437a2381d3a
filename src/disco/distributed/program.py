"""What the executor derives once from a plan, per rank: each bucket's exchange tables and the pieces' regions.

Pure (no communication): every rank builds its own view of the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops.specs import Spec
from .planner import Plan

Region = tuple[Any, ...]


def indexer(lists: tuple[list[int], ...]) -> Region:
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
class Exchange:
    """One bucket's exchange, seen from this rank (positions into the job list)."""

    members: list[int]
    send: dict[int, list[int]]  # dest group rank -> jobs whose piece I send there
    recv: dict[int, list[int]]  # src group rank -> jobs (owned by me) whose piece it sends
    owned: list[int]
    back_from: list[tuple[int, list[int]]]  # src group rank -> jobs whose result it returns to me
    gathers: bool  # whether any rank sends a piece to an owner
    returns: bool  # whether any owner sends a result back


@dataclass
class Program:
    """A plan for one set of jobs, with everything the executor derives from it once."""

    plan: Plan
    specs: list[Spec]
    result_shapes: list[tuple[int, ...]]
    exchanges: list[Exchange]
    regions: dict[tuple[int, int], Region] = field(default_factory=dict)

    def region(self, k: int, rank: int) -> Region:
        """The index of ``rank``'s piece within job ``k``'s whole tensor (cached)."""
        key = (k, rank)
        if key not in self.regions:
            self.regions[key] = indexer(self.plan.layouts[k].index_lists(rank))
        return self.regions[key]


def make_exchange(plan: Plan, members: list[int], rank: int, grank: dict[int, int]) -> Exchange:
    """Bucket ``members``' exchange as ``rank`` takes part in it (``grank``: global rank -> group rank)."""
    send: dict[int, list[int]] = {}
    recv: dict[int, list[int]] = {}
    back: dict[int, list[int]] = {}
    owned = []
    gathers = returns = False
    for k in members:
        lay, o = plan.layouts[k], plan.owners[k]
        gathers = gathers or bool(lay.senders(o))
        receivers = plan.receivers(k)
        returns = returns or bool(receivers)
        if o == rank:
            owned.append(k)
            for s in lay.senders(o):
                recv.setdefault(grank[s], []).append(k)
        else:
            if rank in lay.senders(o):
                send.setdefault(grank[o], []).append(k)
            if rank in receivers:
                back.setdefault(grank[o], []).append(k)
    return Exchange(members, send, recv, owned, sorted(back.items()), gathers, returns)
