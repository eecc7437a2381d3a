r"""PolarGrad: the polar factor of the momentum scaled by its nuclear norm (Lau, Long, Su; arXiv 2505.21799).

Per matrix ``W`` (``m x n``) with gradient ``G``, the momentum-first form (the paper's default)::

    M <- lerp(M, G, 1 - momentum);  U <- lerp(G, M, momentum) if nesterov else M
    U = P H                                       # polar decomposition: P = polar(U) (the LMO, engine.map)
    nu = tr(H) = ||U||_* = <U, P>_F               # the nuclear norm, without an SVD
    W <- (1 - lr wd) W - lr nu P

and the polar-first form (``polar_first=True``)::

    G = P H;  nu = <G, P>_F;  M <- lerp(M, P, 1 - momentum);  W <- (1 - lr wd) W - lr nu M

Exactly what is implemented: ``P`` is the group's orthogonalization backend (Newton-Schulz, Polar Express,
SVD, ...) of the whole matrix; the LMO's norm factor is divided back out, so the step is the paper's
``nu P`` whatever ``norm_factor`` the group carries (the nuclear norm is the step's scale). With an
approximate backend ``nu = <U, P>`` is the nuclear norm of the polar factor actually used (``P`` is only
nearly orthogonal); with ``backend="svd"`` both are exact.

Distributed: ``P`` goes through ``engine.map`` (once per matrix, on its owner); ``nu`` is the sum of this
rank's local inner products ``<U_local, P_local>`` plus one all-reduce of one number per matrix over the axes
that shard it (coalesced over the parameters): no second gather. 3-D expert stacks are a batch of matrices
(one ``nu`` per expert); >= 4-D weights are ``out x prod(rest)``; ``transposed`` groups are supported (the
inner product does not depend on the storage order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..distributed.engine import Engine, Job, local_piece
from ..distributed.layout import Layout
from ..ops.specs import LMOSpec
from . import validation
from .base import SpectralOptimizer
from .contract import Group, Settings, register_rule
from .registry import register_optimizer
from .rules import Commit, Item, LMORule, LMOSettings, MomentumWrite, StepContext


@dataclass(frozen=True)
class PolarGradSettings(LMOSettings):
    """:class:`LMOSettings` (``nesterov`` defaults to ``False`` here, as in the paper) plus ``polar_first``
    (decompose the gradient, then average the polar factors; default ``False``: momentum first).

    ``norm_factor`` must be a matrix norm (the LMO is the polar factor); its factor is divided back out.
    ``update_rule`` must be ``"decoupled"``; light mode (``is_light``) is not available.
    """

    nesterov: bool = False
    polar_first: bool = False

    def check(self, at: str) -> None:
        super().check(at)
        check_polar_settings(self, at, "PolarGrad")
        if self.polar_first and self.nesterov:
            raise ValueError(
                f"{at}: polar_first=True averages polar factors, which has no Nesterov form: nesterov must be False"
            )
        if self.polar_first and self.state_dtype == "int8_block":  # its commit writes momentum_buffer itself
            raise ValueError(f"{at}: polar_first=True takes state_dtype None or a float dtype, not 'int8_block'")


def check_polar_settings(s: LMOSettings, at: str, name: str) -> None:
    """What PolarGrad and AdaMuon share: a matrix norm (the polar factor), decoupled updates, no light mode."""
    if ops.get_norm(s.norm_factor).kind != "matrix":
        raise ValueError(
            f"{at}: norm_factor={s.norm_factor!r} is not a matrix norm; {name} needs the polar factor of the whole "
            "matrix (its factor is divided back out): leave norm_factor unset or use 'spectral'"
        )
    if s.update_rule != "decoupled":
        raise ValueError(f"{at}: {name} takes update_rule='decoupled' only")
    if s.is_light:
        raise ValueError(f"{at}: {name} keeps its momentum in optimizer state: is_light must be False")


def lmo_factor(spec: LMOSpec, shape: Sequence[int]) -> float:
    """The scalar factor ``spec`` multiplies the polar factor of one matrix of a parameter of ``shape`` by."""
    shape = tuple(shape)
    if spec.view == "flatten":
        shape = (shape[0], math.prod(shape[1:]))
    elif spec.view == "transposed":
        shape = (*shape[:-2], shape[-1], shape[-2])
    return ops.norm_factor(spec.norm, shape)


def matrix_dims(spec: LMOSpec, p: Tensor) -> tuple[int, ...]:
    """The dims one matrix spans (all but a 3-D stack's expert dim): a per-matrix sum runs over these."""
    return tuple(range(spec.batch_ndim(tuple(p.shape)), p.dim()))


def matrix_numel(spec: LMOSpec, p: Tensor) -> int:
    """Elements of one whole matrix of ``p`` (``m n``)."""
    return math.prod(p.shape[d] for d in matrix_dims(spec, p))


def reduce_per_matrix(sums: list[Tensor], lays: list[Layout], dims: list[tuple[int, ...]], engine: Engine) -> None:
    """Complete per-matrix sums of local pieces in place: over every shard axis where the sum spans all dims
    (one number per matrix), over the axes of each summed dim where a stack keeps its expert dim."""
    whole = [k for k, ds in enumerate(dims) if len(ds) == len(lays[k].shape)]
    if whole:
        engine.all_reduce([sums[k] for k in whole], [lays[k] for k in whole], over="shards", op="sum")
    by: dict[int, list[int]] = {}
    for k, ds in enumerate(dims):
        if len(ds) != len(lays[k].shape):
            for d in ds:
                by.setdefault(d, []).append(k)
    for d, ks in sorted(by.items()):
        engine.all_reduce([sums[k] for k in ks], [lays[k] for k in ks], over=d, op="sum")


def per_matrix(x: Tensor, like: Tensor) -> Tensor:
    """``x`` (one value per matrix: a scalar, or one per expert) shaped to broadcast against ``like``."""
    return x.reshape(x.shape + (1,) * (like.dim() - x.dim()))


def stat_dtype(p: Tensor) -> torch.dtype:
    """The statistics' dtype: float32 at least (float64 for float64 parameters)."""
    return torch.promote_types(p.dtype, torch.float32)


@register_rule
class PolarGradRule(LMORule):
    """``algorithm="polargrad"``: the momentum's polar factor scaled by its nuclear norm (module docstring).
    Settings: :class:`PolarGradSettings`. Its commit needs an all-reduce after the map: no streaming."""

    algorithms = ("polargrad",)
    settings = PolarGradSettings
    streams = False

    def check_group(self, group: Group, settings: Settings, at: str) -> None:
        # before LMORule's check, whose advice (route vectors to 'bias_rms' or 'sign') does not apply here
        validation.check_matrices(group, at, "PolarGrad (it scales the polar factor of matrices)")
        super().check_group(group, settings, at)

    def _prepare(self, it: Item, ctx: StepContext) -> tuple[Tensor, Callable[[], Tensor] | None, MomentumWrite | None]:
        if it.settings_as(PolarGradSettings).polar_first:
            return ctx.grad_of(it.param), None, None  # the gradient itself is decomposed; read only
        return self.prepare(it, ctx)

    def compute(self, items: Sequence[Item], ctx: StepContext) -> Commit:
        engine = ctx.engine
        prepared = [self._prepare(it, ctx) for it in items]
        specs = [self.spec(it.settings_as(PolarGradSettings), it.param) for it in items]
        jobs = [Job(it.index, like, spec, make=make) for it, (like, make, _), spec in zip(items, prepared, specs)]
        results = engine.map(jobs) if jobs else []
        lays = [engine.layout(it.index) for it in items]
        dims = [matrix_dims(spec, it.param) for it, spec in zip(items, specs)]
        sums = []
        for it, (like, make, _), O, ds in zip(items, prepared, results, dims):
            dt = stat_dtype(it.param)
            U = make() if make is not None else like  # this rank's piece again: element-wise, nothing written yet
            sums.append((U.to(dt) * O.to(dt)).sum(dim=ds))
            del U
        reduce_per_matrix(sums, lays, dims, engine)
        updates: list[Tensor] = []
        new_momenta: list[Tensor | None] = []
        for it, O, s, spec in zip(items, results, sums, specs):
            c = lmo_factor(spec, it.param.shape)
            nu = per_matrix(s / c, O)  # <U, P> with P = O / c
            P = O.to(s.dtype) / c
            if it.settings_as(PolarGradSettings).polar_first:
                M = local_piece(ctx.state_of(it.param)["momentum_buffer"])
                M_new = M.to(s.dtype).lerp(P, 1 - it.settings_as(PolarGradSettings).momentum)
                new_momenta.append(M_new)
                updates.append((M_new * nu).to(O.dtype))
            else:
                new_momenta.append(None)
                updates.append((P * nu).to(O.dtype))
            del P
        weights = self.constrain(items, ctx, updates)

        def commit() -> list[Tensor]:
            for it, D, (_, _, momentum), M_new, W in zip(items, updates, prepared, new_momenta, weights):
                if M_new is not None:
                    local_piece(ctx.state_of(it.param)["momentum_buffer"]).copy_(M_new)
                self.apply(it, ctx, D, momentum, W)
            return updates

        return commit


class PolarGrad(SpectralOptimizer):
    r"""PolarGrad (arXiv 2505.21799): the polar factor of the momentum, scaled by the momentum's nuclear norm.

    ::

        M <- lerp(M, G, 1 - momentum);  U <- lerp(G, M, momentum) if nesterov else M
        P <- polar(U)  (backend, ns_steps);  nu <- <U, P>_F  (= ||U||_*)
        W <- (1 - lr * weight_decay) * W - lr * nu * P

    ``polar_first=True``: ``P <- polar(G)``, ``nu <- <G, P>``, ``M <- lerp(M, P, 1 - momentum)``, step
    ``nu * M``. The step grows with the gradient's scale (like SGD's), so ``lr`` is small next to Muon's.

    Args:
        params: parameters or groups; groups may say ``algorithm="adamw"`` / ``"lion"`` for non-matrix
            parameters.
        lr: learning rate. Default ``1e-3``.
        momentum: EMA factor. Default ``0.95``.
        weight_decay: decoupled weight decay. Default ``0.0``.
        nesterov: Nesterov direction (momentum-first only). Default ``False`` (the paper's).
        polar_first: decompose the gradient before the momentum. Default ``False``.
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
        weight_decay: float = 0.0,
        nesterov: bool = False,
        polar_first: bool = False,
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
            algorithm="polargrad",
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            polar_first=polar_first,
            backend_steps=ns_steps,
            coefficients=ns_coefficients,
            eps=ns_eps,
            nonfinite=nonfinite,
            backend=backend,
            compute_dtype=compute_dtype,
        )
        super().__init__(params, defaults, distributed_config=distributed_config)


@register_optimizer("polargrad", default_lr=0.2, doc="disco.PolarGrad on hidden matrices, AdamW (lr 3e-3) on the rest")
def build_polargrad(
    model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0, adamw_lr: float = 3e-3, **kwargs: Any
) -> torch.optim.Optimizer:
    from .builders import _hidden_and_adamw_side

    return PolarGrad(_hidden_and_adamw_side(model, adamw_lr), lr=lr, weight_decay=weight_decay, **kwargs)
