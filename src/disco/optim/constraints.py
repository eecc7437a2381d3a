"""Per-group weight constraints, applied to the updated weight of an LMO group (Muon, Scion, Disco, NorMuon).

Settings (``disco.optim.contract.Settings``): ``weight_constraint`` (``None``, ``"spectral_clip"``,
``"stiefel"``, ``"hyperball"``), ``sigma_min`` (default 0), ``sigma_max`` and ``radius``
(default ``None``: the norm factor
``sqrt(fan_out / fan_in)`` of the matrix view, ``transposed`` groups' fans swapped). A rule computes the updated
weight ``W' = (1 - lr wd) W - lr s O`` out of place (local pieces), ``constrained_weights`` constrains it, and
the rule's commit copies the result into the parameter:

* ``spectral_clip`` / ``stiefel`` need the whole matrix: ``engine.map`` of ``disco.ops.ConstraintSpec`` on the
  pieces of ``W'`` (one owner per matrix, the result's rows sent back; no redundancy, no SVD);
* ``hyperball`` keeps ``||W||_F`` at its value when the optimizer was built (state ``init_norm``, float64):
  local sums of squares plus one coalesced all-reduce over the shard axes, nothing gathered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..distributed.engine import Engine, Job, local_piece
from ..ops.constraints import ConstraintSpec

if TYPE_CHECKING:
    from .contract import Settings
    from .rules import Item, StepContext

CONSTRAINTS = ("spectral_clip", "stiefel", "hyperball")
MATRIX_CONSTRAINTS = ("spectral_clip", "stiefel")


def kind(it: Item) -> str | None:
    return it.settings.weight_constraint


def init_state(settings: Settings, p: Tensor) -> dict[str, Any]:
    if settings.weight_constraint == "hyperball":
        return {"init_norm": torch.full((), math.nan, dtype=torch.float64, device=p.device)}
    return {}


def _global_shape(engine: Engine, it: Item) -> tuple[int, ...]:
    return tuple(engine.layout(it.index).shape) if engine.has_layouts else tuple(it.param.shape)


def _sum_squares(engine: Engine, items: Sequence[Item], pieces: Sequence[Tensor]) -> list[Tensor]:
    """``||X||_F^2`` of each whole tensor, in float64, from its local pieces: one coalesced all-reduce."""
    sums = [x.double().pow(2).sum().reshape(1) for x in pieces]
    if items and engine.has_layouts:
        engine.all_reduce(sums, [engine.layout(it.index) for it in items], over="shards", op="sum")
    return sums


def bind(engine: Engine, items: Sequence[Item], ctx: StepContext) -> None:
    """Measure the initial Frobenius norm of every hyperball weight that has none yet (collective)."""
    todo = [it for it in items if kind(it) == "hyperball" and math.isnan(float(ctx.state_of(it.param)["init_norm"]))]
    if not todo:
        return
    if not engine.has_layouts:
        raise ValueError("weight_constraint='hyperball' needs an engine that knows the layouts (not callbacks)")
    for it, s in zip(todo, _sum_squares(engine, todo, [local_piece(it.param.detach()) for it in todo])):
        ctx.state_of(it.param)["init_norm"].fill_(float(s.sqrt()))


def spec(s: Settings, shape: Sequence[int]) -> ConstraintSpec:
    """The whole-matrix constraint of a group for a parameter of global ``shape``."""
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) >= 4 else (shape[-2], shape[-1])
    if s.transposed and len(shape) in (2, 3):
        rows, cols = cols, rows  # stored fan_in x fan_out
    default = math.sqrt(rows / cols)
    assert s.weight_constraint is not None
    return ConstraintSpec(
        s.weight_constraint,
        radius=default if s.radius is None else s.radius,
        sigma_min=s.sigma_min or 0.0,
        sigma_max=default if s.sigma_max is None else s.sigma_max,
        view="flatten" if len(shape) >= 4 else "native",
    )


def constrained_weights(
    items: Sequence[Item], ctx: StepContext, weights: Sequence[Tensor | None]
) -> list[Tensor | None]:
    """The constrained local pieces of the updated ``weights`` (``None`` where an item has no constraint).

    May communicate (one ``engine.map`` for the whole-matrix constraints, one all-reduce for the hyperball);
    writes nothing.
    """
    engine = ctx.engine
    out: list[Tensor | None] = [None] * len(items)
    whole = [k for k, it in enumerate(items) if kind(it) in MATRIX_CONSTRAINTS]
    if whole:
        jobs = []
        for k in whole:
            w = weights[k]
            assert w is not None
            jobs.append(Job(items[k].index, w, spec(items[k].settings, _global_shape(engine, items[k]))))
        for k, res in zip(whole, engine.map(jobs)):
            out[k] = res
    ball = [k for k, it in enumerate(items) if kind(it) == "hyperball"]
    if ball:
        pieces = [weights[k] for k in ball]
        sums = _sum_squares(engine, [items[k] for k in ball], [w for w in pieces if w is not None])
        for k, w, s in zip(ball, pieces, sums):
            assert w is not None
            r0 = ctx.state_of(items[k].param)["init_norm"].to(s.device)
            ratio = torch.where(s > 0, r0 / s.sqrt().clamp_min(1e-300), torch.ones_like(s))
            out[k] = (w.double() * ratio).to(w.dtype)
    return out
