r"""AdaMuon: an element-wise second moment of the sign-stabilised polar factor, RMS-aligned (Si, Zhang, Shen;
arXiv 2507.11005).

Per matrix ``W`` (``m x n``) with gradient ``G``::

    M <- lerp(M, G, 1 - momentum);  U <- lerp(G, M, momentum) if nesterov else M       # as Muon
    O <- polar(sign(U))                               # sign-stabilised: the LMO of sign(U) (engine.map)
    V <- beta2 V + (1 - beta2) O * O                  # element-wise, laid out like W
    O' <- O / (sqrt(V) + eps)
    W <- (1 - lr wd) W - lr * rms_target * sqrt(m n) / ||O'||_F * O'      # RMS-aligned: rms(step) = rms_target

Exactly what is implemented: ``O`` is the group's orthogonalization backend of ``sign(U)`` with the LMO's norm
factor divided back out (the RMS alignment sets the step's scale, so ``norm_factor`` has no effect); ``V`` has no
bias correction, as in the paper (the alignment cancels it up to ``eps``); ``rms_target`` is the paper's 0.2
(Adam's typical update RMS, so AdamW's learning rates carry over). A matrix whose ``O'`` is all zero (a zero
gradient) takes a zero step.

Distributed: the polar factor goes through ``engine.map`` (once per matrix); the sign is taken of each rank's
piece before it travels (element-wise); ``V`` and ``O'`` are local to each rank's piece (``V`` is state laid out
like the parameter: DCP saves and reshards it); ``||O'||_F`` is the sum of local squares plus one all-reduce of
one number per matrix over the axes that shard it. Nothing is gathered twice. 3-D expert stacks are a batch of
matrices (one norm per expert); >= 4-D weights are ``out x prod(rest)``; ``transposed`` groups are supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..distributed.engine import Job, local_piece
from ..distributed.state import derived_zeros
from . import validation
from .base import SpectralOptimizer
from .contract import Group, Settings, check_range, register_rule
from .polargrad import (
    check_polar_settings,
    lmo_factor,
    matrix_dims,
    matrix_numel,
    per_matrix,
    reduce_per_matrix,
    stat_dtype,
)
from .registry import register_optimizer
from .rules import Commit, Item, LMORule, LMOSettings, StepContext

DEFAULT_BETA2 = 0.95
DEFAULT_EPS = 1e-8
DEFAULT_RMS = 0.2


@dataclass(frozen=True)
class AdaMuonSettings(LMOSettings):
    """:class:`LMOSettings` plus ``beta2`` (the second moment's EMA factor in ``[0, 1)``, default ``0.95``),
    ``adamuon_eps`` (added to its square root, ``>= 0``, default ``1e-8``; ``eps`` stays the LMO's) and
    ``rms_target`` (the step's RMS before ``lr``, ``> 0``, default ``0.2``).

    ``norm_factor`` must be a matrix norm and has no effect; ``update_rule`` must be ``"decoupled"``; light mode
    (``is_light``) is not available.
    """

    beta2: float = DEFAULT_BETA2
    adamuon_eps: float = DEFAULT_EPS
    rms_target: float = DEFAULT_RMS

    def check(self, at: str) -> None:
        super().check(at)
        check_range(self, "beta2", at, lo=0.0, hi=1.0, hi_open=True)
        check_range(self, "adamuon_eps", at, lo=0.0)
        check_range(self, "rms_target", at, lo=1e-30)
        check_polar_settings(self, at, "AdaMuon")


@register_rule
class AdaMuonRule(LMORule):
    """``algorithm="adamuon"``: ``LMORule``'s momentum, the polar factor of its sign, the element-wise second
    moment and the RMS alignment (module docstring). Settings: :class:`AdaMuonSettings`. Its commit needs an
    all-reduce after the map: no streaming."""

    algorithms = ("adamuon",)
    settings = AdaMuonSettings
    streams = False

    def check_group(self, group: Group, settings: Settings, at: str) -> None:
        # before LMORule's check, whose advice (route vectors to 'bias_rms' or 'sign') does not apply here
        validation.check_matrices(group, at, "AdaMuon (it orthogonalizes matrices)")
        super().check_group(group, settings, at)

    def init_state(self, settings: Settings, p: Tensor) -> dict[str, Any]:
        state = super().init_state(settings, p)
        state["second_moment"] = derived_zeros(p, tuple(p.shape), {d: d for d in range(p.dim())}, dtype=stat_dtype(p))
        return state

    def compute(self, items: Sequence[Item], ctx: StepContext) -> Commit:
        engine = ctx.engine
        prepared = [self.prepare(it, ctx) for it in items]
        specs = [self.spec(it.settings_as(AdaMuonSettings), it.param) for it in items]
        jobs = [
            Job(it.index, like, spec, make=_signed(make)) for it, (like, make, _), spec in zip(items, prepared, specs)
        ]
        results = engine.map(jobs) if jobs else []
        lays = [engine.layout(it.index) for it in items]
        dims = [matrix_dims(spec, it.param) for it, spec in zip(items, specs)]
        new_v, normalized, squares = [], [], []
        for it, O, spec, ds in zip(items, results, specs, dims):
            s = it.settings_as(AdaMuonSettings)
            V = local_piece(ctx.state_of(it.param)["second_moment"])
            P = O.to(V.dtype) / lmo_factor(spec, it.param.shape)
            V_new = V.lerp(P * P, 1 - s.beta2)
            On = P.div_(V_new.sqrt().add_(s.adamuon_eps))
            new_v.append(V_new)
            normalized.append(On)
            squares.append(On.pow(2).sum(dim=ds))
        reduce_per_matrix(squares, lays, dims, engine)
        updates = []
        for it, O, On, sq, spec in zip(items, results, normalized, squares, specs):
            s = it.settings_as(AdaMuonSettings)
            norm = sq.sqrt()
            target = s.rms_target * math.sqrt(matrix_numel(spec, it.param))
            # a zero O' (zero gradient) takes a zero step rather than 0/0
            k = torch.where(norm > 0, target / norm.clamp_min(1e-300), torch.zeros_like(norm))
            updates.append((On * per_matrix(k, On)).to(O.dtype))
        del normalized
        weights = self.constrain(items, ctx, updates)

        def commit() -> list[Tensor]:
            for it, D, (_, _, momentum), V_new, W in zip(items, updates, prepared, new_v, weights):
                local_piece(ctx.state_of(it.param)["second_moment"]).copy_(V_new)
                self.apply(it, ctx, D, momentum, W)
            return updates

        return commit


def _signed(make: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """``sign(make())``: the sign-stabilised input of the LMO, made per piece when the engine stacks it."""
    return lambda: torch.sign(make())


class AdaMuon(SpectralOptimizer):
    r"""AdaMuon (arXiv 2507.11005): Muon on the sign of the momentum, with an element-wise second moment of the
    orthogonalized update and an RMS-aligned step.

    ::

        M <- lerp(M, G, 1 - momentum);  U <- lerp(G, M, momentum) if nesterov else M
        O <- polar(sign(U));  V <- beta2 * V + (1 - beta2) * O * O;  O' <- O / (sqrt(V) + eps)
        W <- (1 - lr * weight_decay) * W - lr * rms * sqrt(m * n) / ||O'||_F * O'

    The step's RMS is ``lr * rms`` (0.2 by default, Adam's), so AdamW's learning rates carry over.

    Args:
        params: parameters or groups; groups may say ``algorithm="adamw"`` / ``"lion"`` for non-matrix
            parameters.
        lr: learning rate. Default ``1e-3``.
        momentum: EMA factor of the momentum. Default ``0.95``.
        beta2: EMA factor of the second moment. Default ``0.95``.
        eps: added to ``sqrt(V)``. Default ``1e-8``.
        weight_decay: decoupled weight decay. Default ``0.1``.
        nesterov: Nesterov direction. Default ``True``.
        rms: the step's RMS before ``lr`` (``rms_target``). Default ``0.2``.
        ns_steps: iterations of an iterative backend. Default ``5``.
        ns_coefficients: a Newton-Schulz table (``None``: the backend's). Default ``None``.
        ns_eps: added to the Frobenius norm before Newton-Schulz. Default ``1e-7``.
        distributed_config, nonfinite, backend, compute_dtype: as ``disco.Muon``.
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
        rms: float = DEFAULT_RMS,
        ns_steps: int = 5,
        *,
        ns_coefficients: Any = None,
        ns_eps: float = 1e-7,
        distributed_config: Any = None,
        nonfinite: str = "raise",
        backend: str = "gram_newtonschulz5",
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(
            algorithm="adamuon",
            lr=lr,
            momentum=momentum,
            beta2=beta2,
            adamuon_eps=eps,
            weight_decay=weight_decay,
            nesterov=nesterov,
            rms_target=rms,
            backend_steps=ns_steps,
            coefficients=ns_coefficients,
            eps=ns_eps,
            nonfinite=nonfinite,
            backend=backend,
            compute_dtype=compute_dtype,
        )
        super().__init__(params, defaults, distributed_config=distributed_config)


@register_optimizer("adamuon", default_lr=0.01, doc="disco.AdaMuon on hidden matrices, AdamW (lr 3e-3) on the rest")
def build_adamuon(
    model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0, adamw_lr: float = 3e-3, **kwargs: Any
) -> torch.optim.Optimizer:
    from .builders import _hidden_and_adamw_side

    return AdaMuon(_hidden_and_adamw_side(model, adamw_lr), lr=lr, weight_decay=weight_decay, **kwargs)
