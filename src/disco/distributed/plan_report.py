"""Per-rank figures of a plan, against their lower bounds: what ``python -m disco plan`` prints at scale.

For each rank: the matrices it owns (orthogonalizes), the orthogonalization FLOPs it runs, the bytes it sends and
receives per step, and its peak optimizer memory (momentum state of its shards plus the largest bucket's
transient buffers). Each is computed per distinct layout (a vector over the mesh) rather than per tensor and
rank, so 16k ranks and ~900 matrices take well under a second.

Lower bounds on the busiest rank, for any plan that orthogonalizes each matrix whole on one rank: FLOPs
``max(total / N, the costliest matrix)``; bytes ``max(2 Plan.bytes_lower_bound() / N, the costliest gather)``
(every byte is sent by one rank and received by another; the owner of a matrix receives every piece but its own
and sends the results back); memory ``max(total state / N, the state plus the largest matrix whole, in and out)``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .planner import Plan, _Tables


def newton_schulz_flops(shape: Sequence[int], steps: int = 5) -> float:
    """FLOPs of ``steps`` Gram Newton-Schulz iterations on a ``(..., m, n)`` stack (``k = min(m, n)``):
    per iteration ``A = X X^T`` (``2 k^2 l``), ``B = b A + c A^2`` (``2 k^3``), ``X <- a X + B X`` (``2 k^2 l``),
    ``l = max(m, n)``."""
    *batch, m, n = shape
    k, length = min(m, n), max(m, n)
    return float(math.prod(batch)) * steps * (4.0 * k * k * length + 2.0 * k**3)


@dataclass
class RankFigures:
    """Per-rank columns, in ``ranks`` order, and their lower bounds."""

    ranks: list[int]
    owned: list[int]
    flops: list[float]
    sent: list[int]
    received: list[int]
    peak_bytes: list[float]
    flops_lower_bound: float
    bytes_lower_bound: float
    memory_lower_bound: float

    def extend(self, other: RankFigures) -> None:
        """Append another stage's ranks (pipeline stages run disjoint rank sets); lower bounds take the worst."""
        for name in ("ranks", "owned", "flops", "sent", "received", "peak_bytes"):
            getattr(self, name).extend(getattr(other, name))
        self.flops_lower_bound = max(self.flops_lower_bound, other.flops_lower_bound)
        self.bytes_lower_bound = max(self.bytes_lower_bound, other.bytes_lower_bound)
        self.memory_lower_bound = max(self.memory_lower_bound, other.memory_lower_bound)

    def summary(self) -> dict[str, dict[str, float]]:
        """min / mean / max of each column, its lower bound and ``max / lower bound``."""
        traffic = [s + r for s, r in zip(self.sent, self.received)]
        columns: dict[str, tuple[Sequence[float], float]] = {
            "owned_matrices": (self.owned, math.nan),
            "flops": (self.flops, self.flops_lower_bound),
            "bytes_sent_received": (traffic, self.bytes_lower_bound),
            "peak_optimizer_bytes": (self.peak_bytes, self.memory_lower_bound),
        }
        out = {}
        for name, (values, bound) in columns.items():
            top = float(max(values))
            out[name] = {
                "min": float(min(values)),
                "mean": sum(values) / len(values),
                "max": top,
                "lower_bound": bound,
                "max_over_lower_bound": top / bound if bound > 0 else math.nan,
            }
        return out


def rank_figures(
    plan: Plan,
    *,
    element_size: int = 4,
    state_bytes: int = 4,
    flops: Callable[[Sequence[int]], float] = newton_schulz_flops,
) -> RankFigures:
    """Per-rank figures of ``plan``: pieces travel at ``element_size`` bytes an element, the momentum is kept at
    ``state_bytes`` (fp32: 4) for every element a rank holds."""
    tables = _Tables(plan.layouts)
    n = plan.world_size
    where = {r: k for k, r in enumerate(plan.ranks)}
    owned, flop = [0] * n, [0.0] * n
    state = [0.0] * n
    per_layout: dict[int, list[int]] = {}  # distinct layout -> its tensors
    for i, j in enumerate(tables.which):
        per_layout.setdefault(j, []).append(i)
    for j, members in per_layout.items():
        info = tables.infos[j]
        positions = [where[r] for r in info.mesh.ranks]
        in_place = [i for i in members if plan.owners[i] < 0]
        whole = plan.layouts[members[0]].numel
        share = sum(flops(plan.layouts[i].shape) for i in in_place) / whole if in_place else 0.0
        for p, numel in zip(positions, info.numels):
            state[p] += numel * len(members) * state_bytes
            if in_place and numel:
                owned[p] += len(in_place)
                flop[p] += share * numel  # each holder runs its own piece of an in-place stack
    for i, o in enumerate(plan.owners):
        if o >= 0:
            owned[where[o]] += 1
            flop[where[o]] += flops(plan.layouts[i].shape)
    sent, received = plan._traffic(tables, element_size)
    transient = [0.0] * n
    for bucket in plan.buckets:
        # an owner holds its matrices whole, in and out; every holder its pieces, going and coming back
        now = [0.0] * n
        counts = Counter(tables.which[i] for i in bucket)
        for j, count in counts.items():
            info = tables.infos[j]
            for r, numel in zip(info.mesh.ranks, info.numels):
                now[where[r]] += 2 * count * numel * element_size
        for i in bucket:
            now[where[plan.owners[i]]] += 2 * plan.layouts[i].numel * element_size
        transient = list(map(max, transient, now))
    every = [flops(lay.shape) for lay in plan.layouts]
    gathered = [i for i, o in enumerate(plan.owners) if o >= 0]
    gather = max((plan.layouts[i].numel - tables.info(i).biggest for i in gathered), default=0)
    whole = max((plan.layouts[i].numel for i in gathered), default=0)
    return RankFigures(
        ranks=list(plan.ranks),
        owned=owned,
        flops=flop,
        sent=sent,
        received=received,
        peak_bytes=[s + t for s, t in zip(state, transient)],
        flops_lower_bound=max(sum(every) / n, max(every, default=0.0)),
        bytes_lower_bound=max(2 * plan._lower_bound(tables, element_size) / n, 2.0 * gather * element_size),
        memory_lower_bound=sum(state) / n + 2.0 * whole * element_size,
    )


def plot_rank_load(figures: RankFigures, path: str, title: str) -> None:
    """Per-rank FLOPs and bytes (``path``, a PNG), each against its lower bound; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    traffic = [s + r for s, r in zip(figures.sent, figures.received)]
    for ax, values, bound, label in (
        (axes[0], figures.flops, figures.flops_lower_bound, "orthogonalization FLOPs per step"),
        (axes[1], traffic, figures.bytes_lower_bound, "bytes sent + received per step"),
    ):
        ax.plot(range(len(values)), values, lw=0.6, label="per rank")
        ax.axhline(bound, color="k", ls="--", lw=0.8, label="lower bound (busiest rank)")
        ax.set_xlabel("rank")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
