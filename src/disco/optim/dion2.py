r"""Dion2: orthogonalize only the rows of the momentum with the largest norms (Ahn et al., arXiv 2512.16928).

Per matrix ``W`` (``m x n``, rows: output neurons) with gradient ``G``::

    M <- M + G                                         # accumulated; decayed only where selected (error feedback)
    S <- the k = ceil(fraction m) rows of M with the largest l2 norms        (selection_scope="global")
    O <- norm_factor(k, n) * polar(M[S, :])            # k x n only; Muon's factor of the k x n submatrix
    W[S] <- (1 - lr wd) W[S] - lr O                    # only the selected rows change (weight decay included)
    M[S] <- ef_decay * M[S]

Rows are the side selected (the output neurons). ``selection_scope="local"``: each of the ``R`` row shards
selects its own ``ceil(fraction * r)`` rows, ``r`` the largest shard's row count (a smaller shard pads with zero
rows, which leave the polar factor of the others unchanged); ``k = R ceil(fraction r)``. Layout-dependent by
design; on one device equal to ``"global"``.

Distributed, composed from the engine's movements (no whole matrix gathered anywhere but on its one owner):

1. row norms: local sums of squares, ``all_reduce(over=1)`` (the column shards). ``"global"``: each rank writes
   its rows' norms into an ``m``-vector of zeros and ``all_reduce(over=0)`` sums it (``8 m`` bytes), so every
   rank selects the same ``S``. ``"local"`` needs no more.
2. the submatrix. ``"global"``: each rank places its selected rows into a ``k x n_local`` tensor of zeros at
   their positions in ``S``, the row-shard axes marked ``Partial`` (a chunked layout cannot describe an arbitrary
   row subset), so ``engine.map(..., out="input")`` sums the pieces on one owner per matrix, orthogonalizes
   there once and returns each holder its columns of ``O``; each rank keeps its selected rows. ``"local"``: the
   selected rows are an even ``Shard(0)`` of the ``k x n`` submatrix, mapped like Muon's whole matrix.

Values moved per matrix (``R`` row shards, to the owner and back): ``"global"`` ``(R - 1) k n_local`` each way
(about Muon's ``m n`` at ``R = 1 / fraction``); ``"local"`` ``(R - 1) k n_local / R`` each way, the fraction
of Muon's. Only 2-D weights (route the rest to Muon / AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..distributed.engine import Job, local_piece
from ..distributed.layout import PARTIAL, REPLICATE, Layout, Placement
from . import validation
from .base import SpectralOptimizer
from .contract import Group, Rule, Settings, check_choice, check_range, register_rule
from .rules import Commit, Item, OrthogonalizationSettings, StepContext

SCOPES = ("global", "local")


def selected_rows(fraction: float, rows: int) -> int:
    return min(rows, math.ceil(fraction * rows)) if rows else 0


def sub_layout(lay: Layout, k: int) -> Layout:
    """The layout of the ``k x n`` selected submatrix: ``Partial`` over the row shards, columns as the weight's."""
    placements: list[Placement] = []
    for pl in lay.placements:
        if pl.is_shard and pl.dim == 0:
            placements.append(PARTIAL)
        elif pl.is_shard:
            placements.append(pl)
        else:
            placements.append(REPLICATE)
    return lay.with_placements(placements, shape=(k, lay.shape[1]))


def local_sub_layout(lay: Layout, per_shard: int) -> Layout:
    """``selection_scope="local"``: every row shard contributes ``per_shard`` rows (its own selection, zero-padded),
    so the ``R per_shard x n`` submatrix is evenly ``Shard(0)``-ed over the same mesh axes."""
    placements: list[Placement] = []
    for pl in lay.placements:
        if pl.is_shard and pl.dim == 0:
            placements.append(Placement("shard", 0))
        elif pl.is_shard:
            placements.append(pl)
        else:
            placements.append(REPLICATE)
    shards = math.prod(lay.mesh_shape[a] for a in lay.shard_axes(0))
    return lay.with_placements(placements, shape=(shards * per_shard, lay.shape[1]))


def _local_plan(lay: Layout, rank: int, sq: Tensor, fraction: float) -> tuple[int, Tensor, Tensor, Layout]:
    """(rows per shard, local rows selected, their positions in this rank's piece, the submatrix's layout)."""
    group = lay.axis_group(rank, lay.shard_axes(0))
    per_shard = selected_rows(fraction, max(lay.local_shape(r)[0] for r in group))
    sub = local_sub_layout(lay, per_shard)
    assert sub.local_shape(rank)[0] == per_shard, (sub.describe(), rank)
    mine = min(per_shard, sq.shape[0])
    local = torch.sort(torch.topk(sq, mine).indices).values if mine else sq.new_zeros(0, dtype=torch.long)
    return per_shard, local, torch.arange(mine), sub


@dataclass(frozen=True)
class Dion2Settings(OrthogonalizationSettings):
    """The settings of a ``dion2`` group (module docstring).

    Attributes:
        fraction: rows selected per step, in ``(0, 1]``. Default ``0.25``.
        ef_decay: the selected rows' momentum decay, in ``[0, 1]``. Default ``0.95``.
        selection_scope: ``"global"`` (default, layout-invariant) or ``"local"`` (per row shard).
        norm_factor, backend, backend_steps, coefficients, eps, compute_dtype: the LMO of the ``k x n``
            submatrix (:class:`~disco.optim.rules.OrthogonalizationSettings`; ``norm_factor`` default
            ``"original"``, Muon's).
    """

    fraction: float = 0.25
    ef_decay: float = 0.95
    selection_scope: str = "global"
    norm_factor: str = "original"

    def check(self, at: str) -> None:
        super().check(at)
        check_range(self, "fraction", at, lo=1e-9, hi=1.0)
        check_range(self, "ef_decay", at, lo=0.0, hi=1.0)
        check_choice(self, "selection_scope", at, SCOPES)


@register_rule
class Dion2Rule(Rule):
    """The ``dion2`` algorithm (module docstring). Settings: :class:`Dion2Settings`."""

    algorithms = ("dion2",)
    settings = Dion2Settings
    runs_ahead = True

    def check_group(self, group: Group, settings: Settings, at: str) -> None:
        validation.check_matrices(group, at, "Dion2 (it selects rows of 2-D out x in weights)", exactly_2d=True)

    def init_state(self, settings: Settings, p: Tensor) -> dict[str, Any]:
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def compute(self, items: Sequence[Item], ctx: StepContext) -> Commit:
        engine, rank = ctx.engine, ctx.engine.current_rank
        lays = [engine.layout(it.index) for it in items]
        B = []
        for it in items:
            M = local_piece(ctx.state_of(it.param)["momentum_buffer"])
            B.append(M + ctx.grad_of(it.param).to(M.dtype))
        sq = [b.double().pow(2).sum(dim=1) for b in B]
        engine.all_reduce(sq, lays, over=1, op="sum")  # whole row norms of this rank's rows
        rows = [torch.tensor(lay.index_lists(rank)[0], dtype=torch.long) for lay in lays]
        settings = [it.settings_as(Dion2Settings) for it in items]
        glob = [k for k, s in enumerate(settings) if s.selection_scope == "global"]
        norms = []
        for k in glob:
            full = sq[k].new_zeros(lays[k].shape[0])
            full[rows[k]] = sq[k]
            norms.append(full)
        if glob:
            engine.all_reduce(norms, [lays[k] for k in glob], over=0, op="sum")
        full_of = dict(zip(glob, norms))
        # (rows of this rank's piece of the submatrix, local rows selected, their positions there, its layout)
        plans: list[tuple[int, Tensor, Tensor, Layout]] = []
        for j, (s, lay) in enumerate(zip(settings, lays)):
            fraction = s.fraction
            if j in full_of:
                k = selected_rows(fraction, lay.shape[0])
                order = torch.sort(full_of[j], descending=True, stable=True).indices[:k]
                S = torch.sort(order).values
                pos_of = torch.full((lay.shape[0],), -1, dtype=torch.long)
                pos_of[S] = torch.arange(k)
                pos = pos_of[rows[j]]
                local = torch.nonzero(pos >= 0).flatten()
                plans.append((k, local, pos[local], sub_layout(lay, k)))
            else:
                plans.append(_local_plan(lay, rank, sq[j], fraction))
        jobs = []
        for it, s, lay, b, (piece, local, pos, sub) in zip(items, settings, lays, B, plans):
            Z = b.new_zeros(piece, b.shape[1])
            Z[pos] = b[local]
            jobs.append(Job(it.index, Z, s.lmo_spec((sub.shape[0], lay.shape[1])), sub))
        O = engine.map(jobs, out="input") if jobs else []

        def commit() -> list[Tensor]:
            updates = []
            for it, s, b, o, (_, local, pos, _) in zip(items, settings, B, O, plans):
                lr, wd = s.lr, s.weight_decay
                b[local] *= s.ef_decay
                local_piece(ctx.state_of(it.param)["momentum_buffer"]).copy_(b)
                X = local_piece(it.param)
                update = torch.zeros_like(X)
                update[local] = o[pos].to(X.dtype)
                X[local] = X[local] * (1 - lr * wd) - lr * update[local]
                updates.append(update)
            return updates

        return commit


class Dion2(SpectralOptimizer):
    r"""Dion2 (Ahn et al., arXiv 2512.16928): Muon on the ``fraction`` of rows with the largest momentum norms.

    .. math::
        M \leftarrow M + G,\quad S = \mathrm{top}_k \|M_{i,:}\|,\quad
        W_S \leftarrow (1 - \eta\lambda) W_S - \eta\, s\, \mathrm{polar}(M_S),\quad M_S \leftarrow \mu M_S

    with ``k = ceil(fraction * rows)`` and ``s`` the norm factor of the ``k x n`` submatrix (``"original"``:
    ``sqrt(max(1, k/n))``, as Muon). Groups may say ``algorithm="adamw"`` / ``"lion"`` (``betas``, ``adam_eps``)
    or ``"muon"`` (``momentum``, ``nesterov``) for the other parameters.

    Args:
        lr: 0.02. fraction: rows selected per step, 0.25. ef_decay: the selected rows' momentum decay, 0.95.
        weight_decay: decoupled, on the selected rows, 0.0. selection_scope: ``"global"`` (layout-invariant) or
        ``"local"`` (per row shard). norm_factor, backend, ns_steps, compute_dtype: the LMO of the submatrix.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        fraction: float = 0.25,
        ef_decay: float = 0.95,
        weight_decay: float = 0.0,
        selection_scope: str = "global",
        *,
        norm_factor: str = "original",
        backend: str = "gram_newtonschulz5",
        ns_steps: int = 5,
        compute_dtype: torch.dtype | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        distributed_config: Any = None,
        nonfinite: str = "raise",
    ) -> None:
        defaults: dict[str, Any] = dict(
            algorithm="dion2",
            lr=lr,
            fraction=fraction,
            ef_decay=ef_decay,
            weight_decay=weight_decay,
            selection_scope=selection_scope,
            norm_factor=norm_factor,
            backend=backend,
            backend_steps=ns_steps,
            coefficients=None,
            eps=1e-7,
            compute_dtype=compute_dtype,
            betas=tuple(betas),
            adam_eps=adam_eps,
            momentum=0.95,
            nesterov=False,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults, distributed_config=distributed_config)
