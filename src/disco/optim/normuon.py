r"""NorMuon: Muon, then a neuron-wise second-moment normalization of the orthogonalized update (arXiv 2510.05491).

Per matrix ``W`` (``m x n``: rows are output neurons) with gradient ``G``::

    M <- lerp(M, G, 1 - momentum);  U <- lerp(G, M, momentum) if nesterov else M        # as Muon
    O <- norm_factor * polar(U)                                    # the LMO: one owner per matrix (engine.map)
    v <- beta2 v + (1 - beta2) mean_j(O_ij^2)                      # v: (m,), per output row ("neuron")
    O' <- O / (sqrt(v) + eps)                                       # row-wise normalization
    O'' <- O' * ||O||_F / ||O'||_F                                  # the update's overall scale restored
    W <- (1 - lr wd) W - lr O''

Exactly what is implemented: the second moment ``v`` is taken of the LMO's output ``O`` (the polar factor times
the group's norm factor, e.g. Muon's ``sqrt(max(1, m/n))``); the normalized update is then rescaled so that its
Frobenius norm equals that of ``O``. The paper writes the same restoration as a learning-rate rescale
``0.2 lr sqrt(m n) / ||O'||_F``; with ``adjust_lr_fn="match_rms_adamw"`` (``||O||_F = 0.2 sqrt(m n)`` for an
exact polar factor) the two coincide.

Distributed: the polar factor goes through ``engine.map`` (computed once per matrix); everything after it is
local to each rank's rows, plus two small coalesced all-reduces: the row sums of ``O^2`` over the axes that
shard the columns (``m`` numbers per matrix at most), then the two squared Frobenius norms (computed from those
reduced row sums) over the axes that shard the rows. Nothing is gathered. ``v`` is state laid out like the
parameter's rows (``derived_zeros``), so DCP saves and reshards it. 3-D expert stacks are a batch of matrices
(rows: dim 1, one ``v`` row per expert); >= 4-D (conv) weights are ``out x prod(rest)``; a ``transposed``
group (weights stored ``fan_in x fan_out``, e.g. GPT-2's Conv1D) normalizes the columns, its output neurons.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..distributed.engine import Engine, Job, local_piece
from ..distributed.layout import Layout
from ..distributed.state import derived_zeros
from . import validation
from .base import SpectralOptimizer
from .contract import Group, Settings, check_range, register_rule
from .muon import muon_group_defaults
from .rules import Commit, Item, LMORule, LMOSettings, StepContext

DEFAULT_BETA2 = 0.95
DEFAULT_EPS = 1e-8


@dataclass(frozen=True)
class NorMuonSettings(LMOSettings):
    """:class:`LMOSettings` plus ``beta2`` (the second moment's EMA factor in ``[0, 1)``, default ``0.95``) and
    ``normuon_eps`` (added to its square root, ``>= 0``, default ``1e-8``; ``eps`` stays the LMO's)."""

    beta2: float = DEFAULT_BETA2
    normuon_eps: float = DEFAULT_EPS

    def check(self, at: str) -> None:
        super().check(at)
        check_range(self, "beta2", at, lo=0.0, hi=1.0, hi_open=True)
        check_range(self, "normuon_eps", at, lo=0.0)
        if self.update_rule != "decoupled":
            raise ValueError(f"{at}: NorMuon takes update_rule='decoupled' only")


def row_dims(s: Settings, p: Tensor) -> tuple[int, ...]:
    """Dims that index one output neuron: ``(expert, row)`` for a 3-D stack, ``(row,)`` otherwise; the last dim
    instead of the row dim for a ``transposed`` group (2-D / 3-D weights stored ``fan_in x fan_out``)."""
    if s.transposed and p.dim() in (2, 3):
        return (0, 2) if p.dim() == 3 else (1,)
    return (0, 1) if p.dim() == 3 else (0,)


def col_dims(s: Settings, p: Tensor) -> tuple[int, ...]:
    """Dims a neuron's mean runs over (the fan-in)."""
    rd = row_dims(s, p)
    return tuple(d for d in range(p.dim()) if d not in rd)


def _reduce(parts: list[Tensor], lays: list[Layout], dims: list[tuple[int, ...]], engine: Engine) -> None:
    """Sum each piece over the axes that shard each of its ``dims`` (coalesced per tensor dim)."""
    by: dict[int, list[int]] = {}
    for k, ds in enumerate(dims):
        for d in ds:
            by.setdefault(d, []).append(k)
    for d, ks in sorted(by.items()):
        engine.all_reduce([parts[k] for k in ks], [lays[k] for k in ks], over=d, op="sum")


def _stat_dtype(p: Tensor) -> torch.dtype:
    """The statistics' dtype: float32 at least (float64 for float64 parameters)."""
    return torch.promote_types(p.dtype, torch.float32)


@register_rule
class NorMuonRule(LMORule):
    """``algorithm="normuon"``: ``LMORule``'s momentum and LMO, then the row normalization (module docstring).
    Settings: :class:`NorMuonSettings`. Its commit reads every parameter's normalized result: no streaming."""

    algorithms = ("normuon",)
    settings = NorMuonSettings
    streams = False

    def check_group(self, group: Group, settings: Settings, at: str) -> None:
        super().check_group(group, settings, at)
        validation.check_matrices(group, at, "NorMuon (it normalizes the rows of matrices)")

    def init_state(self, settings: Settings, p: Tensor) -> dict[str, Any]:
        state = super().init_state(settings, p)
        rd = row_dims(settings, p)
        shape = tuple(p.shape[d] for d in rd)
        state["row_var"] = derived_zeros(p, shape, {k: d for k, d in enumerate(rd)}, dtype=_stat_dtype(p))
        return state

    def compute(self, items: Sequence[Item], ctx: StepContext) -> Commit:
        engine = ctx.engine
        prepared = [self.prepare(it, ctx) for it in items]
        jobs = [
            Job(it.index, like, self.spec(it.settings_as(NorMuonSettings), it.param), make=make)
            for it, (like, make, _) in zip(items, prepared)
        ]
        results = engine.map(jobs) if jobs else []
        lays = [engine.layout(it.index) for it in items]
        rdims = [row_dims(it.settings, it.param) for it in items]
        cdims = [col_dims(it.settings, it.param) for it in items]
        # Row sums of O^2 (float32 at least), local over this rank's columns, then summed over the column shards.
        rows = [o.to(torch.promote_types(o.dtype, torch.float32)).pow(2).sum(dim=cd) for o, cd in zip(results, cdims)]
        _reduce(rows, lays, cdims, engine)
        new_v, norms = [], []
        for it, lay, s, cd in zip(items, lays, rows, cdims):
            n = math.prod(lay.shape[d] for d in cd)
            beta2, eps = it.settings_as(NorMuonSettings).beta2, it.settings_as(NorMuonSettings).normuon_eps
            v = local_piece(ctx.state_of(it.param)["row_var"])
            v_new = v.to(s.dtype).lerp(s / n, 1 - beta2)
            inv = 1.0 / (v_new.sqrt() + eps)
            # ||O||^2 and ||O'||^2 of this rank's rows (each row's sum is already whole), summed over the neuron
            # dim (s's last): a 3-D stack keeps one pair per expert
            pair = torch.stack([s.sum(dim=-1), (s * inv.pow(2)).sum(dim=-1)])
            new_v.append((v_new, inv))
            norms.append(pair)
        _reduce(norms, lays, [(rd[-1],) for rd in rdims], engine)
        updates = []
        for o, (_, inv), pair, rd in zip(results, new_v, norms, rdims):
            a, b = pair[0], pair[1]
            ratio = torch.where(b > 0, (a / b.clamp_min(1e-300)).sqrt(), torch.ones_like(a))
            scale = inv * ratio.unsqueeze(-1) if len(rd) == 2 else inv * ratio
            shape = [o.shape[d] if d in rd else 1 for d in range(o.dim())]
            updates.append((o.to(scale.dtype) * scale.reshape(shape)).to(o.dtype))

        weights = self.constrain(items, ctx, updates)

        def commit() -> list[Tensor]:
            for it, O, (_, _, momentum), (v_new, _), W in zip(items, updates, prepared, new_v, weights):
                local_piece(ctx.state_of(it.param)["row_var"]).copy_(v_new)
                self.apply(it, ctx, O, momentum, W)
            return updates

        return commit


class NorMuon(SpectralOptimizer):
    r"""NorMuon (arXiv 2510.05491): Muon with a per-neuron (row) second-moment normalization of its update.

    ::

        M <- lerp(M, G, 1 - momentum);  U <- lerp(G, M, momentum) if nesterov else M
        O <- adjust(shape) * NS_{ns_steps}(U)
        v <- beta2 * v + (1 - beta2) * mean_j(O_ij^2)                 # per row i
        O' <- O / (sqrt(v) + eps);  O' <- O' * ||O||_F / ||O'||_F
        W <- (1 - lr * weight_decay) * W - lr * O'

    Args as ``disco.Muon`` (``adjust_lr_fn``: ``None``/``"original"`` = ``sqrt(max(1, rows/cols))``,
    ``"match_rms_adamw"`` = ``0.2 sqrt(max(rows, cols))``), plus ``beta2`` (0.95) and ``eps`` (1e-8, the
    normalization's; the Newton-Schulz epsilon is ``ns_eps``, 1e-7), ``state_dtype`` / ``state_block`` (the
    momentum's storage, as ``disco.Muon``; the row statistics ``v``, ``m`` numbers per ``m x n`` matrix, stay
    float32). Groups may say ``algorithm="adamw"`` /
    ``"lion"`` for non-matrix parameters; any group of any disco optimizer may say ``algorithm="normuon"``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        beta2: float = DEFAULT_BETA2,
        eps: float = DEFAULT_EPS,
        weight_decay: float = 0.1,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        ns_eps: float = 1e-7,
        distributed_config: Any = None,
        nonfinite: str = "raise",
        backend: str = "gram_newtonschulz5",
        compute_dtype: torch.dtype | None = None,
        state_dtype: torch.dtype | str | None = None,
        state_block: int = 256,
    ) -> None:
        defaults = muon_group_defaults(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=ns_eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            backend=backend,
            compute_dtype=compute_dtype,
            nonfinite=nonfinite,
        )
        defaults.update(
            algorithm="normuon", beta2=beta2, normuon_eps=eps, state_dtype=state_dtype, state_block=state_block
        )
        super().__init__(params, defaults, distributed_config=distributed_config)
