r"""MuonBP: block-periodic orthogonalization (Khaled, Ozkara, Yu, Hong, Park; arXiv 2510.16981).

Muon orthogonalizes the whole momentum every step, which gathers every sharded matrix. MuonBP orthogonalizes
each rank's own block (the piece of the matrix it holds under FSDP / TP) most steps, and the whole matrix every
``period`` steps::

    M <- lerp(M, G, 1 - momentum);  U <- lerp(G, M, momentum) if nesterov else M
    t = steps taken so far (per parameter)
    t % period == 0:  W <- (1 - lr wd) W - lr f(m, n) polar(U)                          # full step, as Muon
    otherwise:        W_b <- (1 - lr_b wd) W_b - lr_b f(m_b, n_b) polar(U_b)   for each held block b
                      with lr_b = block_lr_ratio * lr

``f`` is the group's norm factor, taken from the whole matrix's shape on full steps and from the block's on block
steps (the paper's RMS matching is ``norm_factor="match_rms_adamw"``). The momentum's scale does not change the
polar factor, so the EMA form here gives the paper's directions (``M <- mu M + G``); the first step is a full one.

**The result depends on the layout by design** (as Dion2's ``selection_scope="local"``): a block step
orthogonalizes the blocks the parameter's layout makes, so FSDP x2, TP x2 and one process (one block: the whole
matrix) take different steps between full ones. Each block is the local piece of this rank: ``Shard`` rows
under FSDP / colwise TP, columns under rowwise TP, both under FSDP x TP; replicas (DDP, HSDP) hold equal pieces
and each computes its own, so block steps move zero bytes (``EngineStats`` counts none) and full steps move what
Muon moves. The step counter is per parameter, in its state (``"step"``), so checkpoints resume the phase.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed.engine import Job
from ..ops.specs import LMOSpec, PieceLMOSpec
from .base import SpectralOptimizer
from .contract import Settings, check_range, register_rule
from .registry import register_optimizer
from .rules import Commit, Item, LMORule, LMOSettings, StepContext


@dataclass(frozen=True)
class MuonBPSettings(LMOSettings):
    """:class:`LMOSettings` (Muon's) plus:

    Attributes:
        period: every ``period``-th step (the first included) orthogonalizes the whole matrix, the others each
            rank's block; an int ``>= 1`` (``1`` is Muon). Default ``5``.
        block_lr_ratio: the block steps' lr over ``lr`` (schedules that move ``lr`` move both), ``>= 0``.
            Default ``1.0``.
    """

    period: int = 5
    block_lr_ratio: float = 1.0

    def check(self, at: str) -> None:
        super().check(at)
        if isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1:
            raise ValueError(f"{at}: period={self.period!r} must be an int >= 1")
        check_range(self, "block_lr_ratio", at, lo=0.0)


def full_step(state: dict[str, Any], period: int) -> bool:
    """Whether this step orthogonalizes the whole matrix (the parameter's own step count, from 0)."""
    return int(state["step"].item()) % period == 0


def block_spec(spec: LMOSpec) -> PieceLMOSpec:
    """``spec`` on each rank's own piece (in place: nothing moves)."""
    return PieceLMOSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})


@register_rule
class MuonBPRule(LMORule):
    """``algorithm="muonbp"`` (module docstring). Settings: :class:`MuonBPSettings`. No weight constraints, no
    streaming commits and no work in backward (the block / full choice is per step)."""

    algorithms = ("muonbp",)
    settings = MuonBPSettings
    runs_ahead = False
    streams = False
    weight_constraints = frozenset()

    def init_state(self, settings: Settings, p: Tensor) -> dict[str, Any]:
        return {**super().init_state(settings, p), "step": torch.zeros((), dtype=torch.float32)}

    def compute(self, items: Sequence[Item], ctx: StepContext) -> Commit:
        prepared = [self.prepare(it, ctx) for it in items]
        full = [full_step(ctx.state_of(it.param), it.settings_as(MuonBPSettings).period) for it in items]
        jobs = []
        for it, (like, make, _), whole in zip(items, prepared, full):
            spec = self.spec(it.settings_as(MuonBPSettings), it.param)
            jobs.append(Job(it.index, like, spec if whole else block_spec(spec), make=make))
        results = ctx.engine.map(jobs) if jobs else []

        def commit() -> list[Tensor]:
            for it, O, (_, _, momentum), whole in zip(items, results, prepared, full):
                s = it.settings_as(MuonBPSettings)
                if not whole:  # the block step's lr, weight decay included
                    it = dataclasses.replace(it, settings=dataclasses.replace(s, lr=s.lr * s.block_lr_ratio))
                self.finish(it, ctx, O, momentum)
                ctx.state_of(it.param)["step"] += 1
            return results

        return commit


class MuonBP(SpectralOptimizer):
    r"""MuonBP (arXiv 2510.16981): Muon whose orthogonalization is blockwise (each rank's piece, zero bytes) on
    most steps and of the whole matrix every ``period`` steps.

    ::

        M <- lerp(M, G, 1 - momentum);  U <- lerp(G, M, momentum) if nesterov else M
        step % period == 0:  W <- (1 - lr wd) W - lr f(W) polar(U)
        else, per block b:   W_b <- (1 - lr_b wd) W_b - lr_b f(W_b) polar(U_b),  lr_b = block_lr_ratio lr

    The blocks are the pieces the parameter's layout gives each rank, so the result depends on the layout by
    design (module docstring); on one process the only block is the whole matrix.

    Args:
        params: parameters or groups; groups may say ``algorithm="adamw"`` / ``"lion"`` for non-matrix
            parameters, or ``"muon"``.
        lr: the full steps' learning rate. Default ``0.02``.
        momentum: EMA factor. Default ``0.95``.
        nesterov: Nesterov direction. Default ``True``.
        weight_decay: decoupled, with each step's lr. Default ``0.0``.
        period: full orthogonalization every ``period`` steps (the first included). Default ``5``.
        block_lr_ratio: the block steps' lr over ``lr``. Default ``1.0``.
        norm_factor: the LMO's factor, of the whole matrix or of the block. Default ``"original"``
            (``sqrt(max(1, rows/cols))``, Muon's); the paper's RMS matching is ``"match_rms_adamw"``.
        ns_steps, backend, compute_dtype, distributed_config, nonfinite: as ``disco.Muon``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        period: int = 5,
        block_lr_ratio: float = 1.0,
        *,
        norm_factor: str = "original",
        ns_steps: int = 5,
        backend: str = "gram_newtonschulz5",
        compute_dtype: torch.dtype | None = None,
        distributed_config: Any = None,
        nonfinite: str = "raise",
    ) -> None:
        defaults: dict[str, Any] = dict(
            algorithm="muonbp",
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            period=period,
            block_lr_ratio=block_lr_ratio,
            norm_factor=norm_factor,
            backend_steps=ns_steps,
            backend=backend,
            compute_dtype=compute_dtype,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults, distributed_config=distributed_config)


@register_optimizer(
    "muonbp",
    default_lr=0.02,
    doc="disco.MuonBP (full every 5 steps, else per shard) on hidden matrices, AdamW on the rest",
    layout_dependent=True,
)
def build_muonbp(
    model: nn.Module, *, lr: float, weight_decay: float = 0.0, adamw_lr: float = 3e-3, **kwargs: Any
) -> torch.optim.Optimizer:
    from .builders import _hidden_and_adamw_side

    return MuonBP(_hidden_and_adamw_side(model, adamw_lr), lr=lr, weight_decay=weight_decay, **kwargs)
