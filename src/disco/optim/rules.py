"""Update rules: one per family of algorithms, composed over the engine's movements.

A rule owns the per-parameter state of its groups and one step over the parameters that have a gradient::

    prepare  (local)      d_i = momentum(state_i, g_i)           # this rank's piece, made when the engine stacks it
    map      (engine)     o_i = spec_i(whole d_i)                # once per tensor, on its owner
    finish   (local)      M_i <- lerp(M_i, g_i); w_i <- apply(w_i, o_i)  # the commit, after every rule computed
                                                                 # (commit="streaming": inside map, per o_i)

``ElementwiseRule`` (AdamW, Lion, signSGD) has no map: every op is element-wise on local pieces. ``LMORule``
serves Muon, Scion and Disco, which differ only in data (norm, backend, momentum form, update form). Each rule
declares its settings and capabilities (``disco.optim.contract``); a new algorithm is one module with a
``@register_rule`` class (and a spec in ``disco.ops`` if it needs a new whole-tensor computation), nothing in
``disco.distributed``.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ..distributed.agreement import StepError
from ..distributed.engine import Engine, Job, local_piece
from ..ops.specs import LMOSpec
from . import constraints, elementwise, split, validation
from . import momentum as state_store
from .contract import Group, Rule, S, Settings, check_choice, check_range, register_rule


@dataclass(frozen=True)
class Item:
    """A parameter that takes part in this step: its group, its index over all groups (``state_dict()``'s) and
    its group's parsed settings (what rules read)."""

    group: Group
    param: Tensor
    name: str
    index: int
    settings: Settings

    def settings_as(self, cls: type[S]) -> S:
        """``settings``, typed as the settings class the calling rule declared."""
        assert isinstance(self.settings, cls), type(self.settings)
        return self.settings


@dataclass
class Streamed:
    """A step's commits made inside ``compute``. ``started``: a rule's map of jobs that commit as they come
    returned, or raised ``StepError`` after some rank committed (the same on every rank: it follows from agreed
    settings, gradient presence and ``settle``); ``applied``: the indices this rank wrote (may differ across
    ranks: a rank holding an empty piece writes nothing)."""

    started: bool = False
    applied: list[int] = field(default_factory=list)


class StepContext(Protocol):
    """What a rule may use of its optimizer during a step."""

    @property
    def engine(self) -> Engine: ...

    def state_of(self, p: Tensor) -> dict[str, Any]: ...

    def grad_of(self, p: Tensor) -> Tensor: ...

    @property
    def streamed(self) -> Streamed | None:
        """Where a rule records its commits inside ``compute`` (groups with ``commit="streaming"``); ``None``:
        this step holds every update until the commit (norm tracking armed, or work done ahead in backward)."""
        ...

    @property
    def wants_updates(self) -> bool:
        """The commit's returned updates are read (norm tracking): else a rule may return empty tensors."""
        ...


#: Applies a rule's step to parameters and state (local, cannot fail); returns each item's update direction.
Commit = Callable[[], list[Tensor]]
#: Writes one parameter's new momentum (local, cannot fail): what ``LMORule.prepare`` defers to the commit.
MomentumWrite = Callable[[], object]


@dataclass(frozen=True)
class ElementwiseSettings(Settings):
    """AdamW's settings. betas: ``(beta1, beta2)``, each in ``[0, 1)``, default ``(0.9, 0.95)``; adam_eps:
    added to the denominator, default ``1e-8`` (``eps`` given in the group itself is taken as ``adam_eps``)."""

    aliases: ClassVar[Mapping[str, str]] = {"eps": "adam_eps"}

    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8

    def check(self, at: str) -> None:
        super().check(at)
        check_range(self, "adam_eps", at, lo=0.0)
        for k, b in enumerate(self.betas):
            if not (math.isfinite(b) and 0.0 <= b < 1.0):
                raise ValueError(f"{at}: Invalid beta parameter at index {k}: {b!r}; betas[{k}] must be in [0, 1)")


@dataclass(frozen=True)
class LionSettings(ElementwiseSettings):
    """Lion's settings: ``betas`` default ``(0.9, 0.99)`` (interpolation, then momentum)."""

    aliases: ClassVar[Mapping[str, str]] = {}

    betas: tuple[float, float] = (0.9, 0.99)


@dataclass(frozen=True)
class SignSettings(Settings):
    """signSGD's settings: momentum, the EMA factor in ``[0, 1)``, default ``0.9``."""

    momentum: float = 0.9

    def check(self, at: str) -> None:
        super().check(at)
        check_range(self, "momentum", at, lo=0.0, hi=1.0, hi_open=True)


@register_rule
class ElementwiseRule(Rule):
    """AdamW, Lion and signSGD: local pieces only, no communication (``disco.optim.elementwise``)."""

    algorithms = tuple(elementwise.STEPS)
    exchanges = False
    streams = True  # each parameter's commit is local and holds no result: streaming changes nothing here
    views = frozenset({"transposed"})  # element-wise: the storage order does not matter
    weight_constraints = frozenset()
    _SETTINGS: ClassVar[dict[str, type[Settings]]] = {
        "adamw": ElementwiseSettings,
        "lion": LionSettings,
        "sign": SignSettings,
    }

    @classmethod
    def settings_for(cls, algorithm: str) -> type[Settings]:
        return cls._SETTINGS[algorithm]

    @classmethod
    def _algorithm(cls, settings: Settings) -> str:
        return next(name for name, c in cls._SETTINGS.items() if type(settings) is c)

    def init_state(self, settings: Settings, p: Tensor) -> dict[str, Any]:
        return elementwise.init_state(self._algorithm(settings), p)

    def compute(self, items: Sequence[Item], ctx: StepContext) -> Commit:
        def commit() -> list[Tensor]:
            updates = []
            for it in items:
                local = local_piece(it.param)
                before = local.clone() if ctx.wants_updates else None  # a parameter's copy only when norms are read
                algorithm = self._algorithm(it.settings)
                elementwise.step(algorithm, it.param, ctx.grad_of(it.param), ctx.state_of(it.param), it.settings)
                if before is None:
                    updates.append(local.new_empty(0))
                else:
                    updates.append((before - local) / max(it.settings.lr, 1e-30))
            return updates

        return commit


@dataclass(frozen=True)
class OrthogonalizationSettings(Settings):
    """How a rule orthogonalizes: the settings of its ``LMOSpec`` (Disco, Muon, Scion, NorMuon, Dion2).

    Attributes:
        norm_factor: a name of ``disco.ops.NORMS``. Default ``"spectral"``.
        backend: a name of ``disco.ops.BACKENDS``. Default ``"gram_newtonschulz5"``.
        backend_steps: iterations of an iterative backend, an int in ``[1, 100)``. Default ``5``.
        coefficients: a Newton-Schulz table: a name, an ``(a, b, c)`` triple or a list of them; ``None``: the
            backend's. Default ``None``.
        eps: added to the Frobenius norm before Newton-Schulz, ``>= 0``. Default ``1e-7``.
        compute_dtype: the dtype of the LMO (``None``: bf16 where matmuls are native, else fp32). Default ``None``.
    """

    norm_factor: str = "spectral"
    backend: str = "gram_newtonschulz5"
    backend_steps: int = 5
    coefficients: Any = None
    eps: float = 1e-7
    compute_dtype: torch.dtype | None = None

    def check(self, at: str) -> None:
        super().check(at)
        validation.check_orthogonalization(self, at)

    def lmo_spec(self, shape: Sequence[int], *, transposed: bool = False, **extra: Any) -> LMOSpec:
        """The spec that orthogonalizes a tensor of ``shape`` with these settings."""
        return LMOSpec.for_param(
            tuple(shape),
            transposed=transposed,
            norm=self.norm_factor,
            backend=self.backend,
            steps=self.backend_steps,
            coefficients=self.coefficients,
            eps=self.eps,
            compute_dtype=self.compute_dtype,
            **extra,
        )


@dataclass(frozen=True)
class LMOSettings(OrthogonalizationSettings):
    """The settings of an LMO group (Disco, Muon, Scion); ``LMORule``'s docstring has the math.

    Attributes:
        momentum: EMA factor ``beta`` in ``[0, 1)``. Default ``0.95``.
        nesterov: Nesterov direction. Default ``True``.
        update_rule: ``"decoupled"`` (default) or ``"frank_wolfe"`` (Scion's constrained form).
        scale: multiplies the LMO, ``>= 0``. Default ``1.0``.
        is_light: the momentum lives in ``p.grad``. Default ``False``.
        state_dtype: how the momentum is stored (``disco.optim.momentum``): ``None`` (default) in the
            parameter's dtype; a floating dtype (``torch.bfloat16``, or its name ``"bfloat16"``) in that dtype,
            the math in ``promote_types(grad dtype, float32)``; ``"int8_block"``: int8 with a float32 absmax scale
            per block of ``state_block`` entries of a row.
        state_block: entries per block of ``"int8_block"``, an int ``>= 1``. Default ``256``.
        norm_factor, backend, backend_steps, coefficients, eps, compute_dtype: the LMO
            (:class:`OrthogonalizationSettings`).

    ``torch.optim.Muon``'s names are aliases: ``adjust_lr_fn`` (``"original"`` or ``"match_rms_adamw"``) sets
    ``norm_factor``, ``ns_steps`` ``backend_steps`` and ``ns_coefficients`` ``coefficients``.
    """

    aliases: ClassVar[Mapping[str, str]] = {
        "adjust_lr_fn": "norm_factor",
        "ns_steps": "backend_steps",
        "ns_coefficients": "coefficients",
    }

    momentum: float = 0.95
    nesterov: bool = True
    update_rule: str = "decoupled"
    scale: float = 1.0
    is_light: bool = False
    state_dtype: torch.dtype | str | None = None
    state_block: int = state_store.DEFAULT_BLOCK
    # split views (``disco.optim.split``): the weight orthogonalized as blocks of its output dim
    splits: ClassVar[bool] = True  # not inherited: a subclass that changes the step declares it itself
    split_sizes: Any = None
    num_heads: int | None = None
    num_kv_heads: int | None = None

    def check(self, at: str) -> None:
        super().check(at)
        split.check_split_settings(self, at)
        check_range(self, "momentum", at, lo=0.0, hi=1.0, hi_open=True)
        check_range(self, "scale", at, lo=0.0)
        check_choice(self, "update_rule", at, ("decoupled", "frank_wolfe"))
        if self.is_light and self.nesterov:
            raise ValueError(f"{at}: is_light=True keeps no separate gradient, so nesterov must be False")
        state_store.check_state_settings(self, at)
        if self.is_light and self.nonfinite == "skip":
            raise ValueError(
                f"{at}: is_light=True keeps the momentum in p.grad, where a skipped non-finite gradient stays: "
                "nonfinite='skip' needs is_light=False"
            )


@register_rule
class LMORule(Rule):
    r"""Momentum, then the group's LMO of the whole matrix, then a decoupled or Frank-Wolfe update.

    .. math::
        M \leftarrow \beta M + (1-\beta) G,\qquad U = \mathrm{lerp}(G, M, \beta)\ \text{(Nesterov) or } M,
        \qquad O = \mathrm{LMO}(U),\qquad
        W \leftarrow (1 - \eta\lambda) W - \eta s O\ \text{ or }\ W \leftarrow (1-\eta) W - \eta s O

    Settings: :class:`LMOSettings`; a ``weight_constraint`` (``disco.optim.constraints``) is applied to the
    updated weight; without one the update is written in place as above.
    """

    algorithms: ClassVar[tuple[str, ...]] = ("disco", "muon", "scion")
    settings = LMOSettings
    runs_ahead = True
    streams = True
    weight_constraints = frozenset(constraints.CONSTRAINTS)
    views = frozenset({"transposed"})

    def __init__(self) -> None:
        self._light_stepped = False
        self._light_grads: dict[int, weakref.ref[Tensor]] = {}  # id(p) -> p.grad left by the last light step
        # id(p) -> p.grad._version expected now: in-place changes outside backward (zero_grad(set_to_none=False))
        # move the version without the accumulate hook seeing it.
        self._light_versions: dict[int, int] = {}
        self._light_tampered: dict[int, bool] = {}
        self._hooked: set[int] = set()

    @classmethod
    def can_run_ahead(cls, settings: Settings) -> bool:
        # light mode keeps the momentum in p.grad, which backward is still writing
        return cls.runs_ahead and not (isinstance(settings, LMOSettings) and settings.is_light)

    def check_group(self, group: Group, settings: Settings, at: str) -> None:
        assert isinstance(settings, LMOSettings)
        validation.check_matrix_params(group, settings, at)
        split.check_split_params(group, settings, at)
        state_store.check_group_blocks(group, settings.state_dtype, settings.state_block, at)

    def init_state(self, settings: Settings, p: Tensor) -> dict[str, Any]:
        assert isinstance(settings, LMOSettings)
        extra = constraints.init_state(settings, p)
        if settings.is_light:
            self._watch_light(p)
            return extra
        return {**state_store.init_momentum(p, settings.state_dtype, settings.state_block), **extra}

    def planned_jobs(self, items: Sequence[Item]) -> list[Job]:
        return [Job(it.index, local_piece(it.param), self.spec(it.settings_as(LMOSettings), it.param)) for it in items]

    @staticmethod
    def spec(s: LMOSettings, p: Tensor) -> LMOSpec:
        # result held in the compute dtype until the commit: half the bytes in bf16
        return s.lmo_spec(p.shape, transposed=s.transposed, result_in_compute_dtype=True)

    @staticmethod
    def prepare(
        it: Item, ctx: StepContext, out_dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Callable[[], Tensor], MomentumWrite | None]:
        """The LMO's input, as a template (the gradient: same shape, dtype, device) and the function that computes
        it when the engine stacks it, and the momentum update ``finish`` applies. Nothing is written now.
        ``out_dtype``: the dtype the engine casts the input to (its spec's ``input_dtype``): made in it directly.

        Nesterov's ``lerp(G, M', beta)`` with ``M' = lerp(M, G, 1 - beta)`` is ``lerp(G, M, beta^2)``: one pass
        that leaves ``M`` untouched, so the commit updates it in place (``lerp_``) and no ``M'`` is kept. A
        ``state_dtype`` momentum is read and written by row blocks in the compute dtype (``disco.optim.momentum``).
        """
        s = it.settings_as(LMOSettings)
        beta = s.momentum
        g = ctx.grad_of(it.param)
        if s.is_light:
            # p.grad holds beta/(1-beta) * M_prev + G, so (1 - beta) * p.grad is the EMA momentum M.
            return g, lambda: g * (1 - beta), None
        mom = state_store.Momentum(ctx.state_of(it.param), g, s.state_dtype, s.state_block)

        def write() -> None:
            state_store.write_momentum(g, mom, beta)

        like = g if s.nesterov or mom.buf is None or s.state_dtype is not None else mom.buf
        return like, lambda: state_store.direction(g, mom, beta, s.nesterov, out_dtype), write

    @staticmethod
    def _decay(s: LMOSettings) -> float:
        """The factor on ``W`` before the update: ``1 - lr`` (Frank-Wolfe) or ``1 - lr wd`` (decoupled)."""
        return 1 - s.lr if s.update_rule == "frank_wolfe" else 1 - s.lr * s.weight_decay

    @classmethod
    def finish(cls, it: Item, ctx: StepContext, O: Tensor, momentum: MomentumWrite | None) -> None:
        if momentum is not None:
            momentum()
        s = it.settings_as(LMOSettings)
        # one read-modify-write of the weight (bitwise mul_ then add_); a bf16 O is widened block by block
        state_store.update_weight(local_piece(it.param), O, cls._decay(s), -s.lr * s.scale)

    @classmethod
    def updated(cls, it: Item, O: Tensor) -> Tensor:
        """``finish``'s new weight, out of place (the local piece), for a constraint to read."""
        s = it.settings_as(LMOSettings)
        W = local_piece(it.param).mul(cls._decay(s))
        return W.add_(O.to(W.dtype), alpha=-s.lr * s.scale)

    def constrain(self, items: Sequence[Item], ctx: StepContext, directions: Sequence[Tensor]) -> list[Tensor | None]:
        """The constrained new weights of the items whose group has a ``weight_constraint`` (else ``None``)."""
        if not any(it.settings.weight_constraint for it in items):
            return [None] * len(items)
        weights = [self.updated(it, O) if it.settings.weight_constraint else None for it, O in zip(items, directions)]
        return constraints.constrained_weights(items, ctx, weights)

    def apply(self, it: Item, ctx: StepContext, O: Tensor, momentum: MomentumWrite | None, W: Tensor | None) -> None:
        """``finish``, or (a constrained weight ``W`` given) the momentum and ``W`` written."""
        if W is None:
            self.finish(it, ctx, O, momentum)
            return
        if momentum is not None:
            momentum()
        local_piece(it.param).copy_(W)

    def compute(self, items: Sequence[Item], ctx: StepContext) -> Commit:
        settings = [it.settings_as(LMOSettings) for it in items]
        specs = [split.split_spec(s, it.param.shape, self.spec(s, it.param)) for it, s in zip(items, settings)]
        # each direction made in the dtype the engine would cast it to (bf16 compute: bf16), block by block
        prepared = [self.prepare(it, ctx, _input_dtype(spec, it.param)) for it, spec in zip(items, specs)]
        streamed = ctx.streamed
        jobs = []
        for it, (like, make, momentum), spec in zip(items, prepared, specs):
            consume = None
            if streamed is not None and it.settings.commit == "streaming":
                consume = functools.partial(self._commit_now, it, ctx, momentum, streamed)
            jobs.append(Job(it.index, like, spec, make=make, consume=consume))
        if torch.compiler.is_compiling():
            # Inductor's CPU backend crashes (KeyError: 'bufN', pytorch#196570) when the momentum lerp, a
            # row-norm LMO and the parameter add share one graph: keep them apart under torch.compile.
            torch._dynamo.graph_break()
        streaming = any(job.consume is not None for job in jobs)
        try:
            results = split.map_split(ctx.engine, jobs) if jobs else []
        except StepError as e:  # raised alike by every rank; ``consumed``: some rank committed already
            if streamed is not None and streaming and e.consumed:
                streamed.started = True
            raise
        if streamed is not None and streaming:
            streamed.started = True
        weights = self.constrain(items, ctx, results)  # streaming groups have no constraint (refused)

        def commit() -> list[Tensor]:
            for it, O, (_, _, momentum), W, job in zip(items, results, prepared, weights, jobs):
                if job.consume is None:
                    self.apply(it, ctx, O, momentum, W)
            return results

        return commit

    def _commit_now(
        self, it: Item, ctx: StepContext, momentum: MomentumWrite | None, streamed: Streamed, O: Tensor
    ) -> None:
        """A streaming group's commit, from inside ``map`` as soon as ``O`` is known good."""
        self.finish(it, ctx, O, momentum)
        streamed.applied.append(it.index)

    # ---- light mode: the momentum lives in p.grad, so the user must not zero it -------------------------------
    def _watch_light(self, p: Tensor) -> None:
        if isinstance(p, DTensor) or id(p) in self._hooked or not p.requires_grad:
            return  # FSDP writes sharded gradients itself, outside autograd's accumulation
        self._hooked.add(id(p))
        key = id(p)

        def accumulated(param: Tensor) -> None:
            g = param.grad
            if key in self._light_versions and g is not None:
                if g._version != self._light_versions[key] + 1:
                    self._light_tampered[key] = True
                self._light_versions[key] = g._version

        p.register_post_accumulate_grad_hook(accumulated)  # type: ignore[no-untyped-call]  # torch leaves it untyped

    def bind(self, engine: Engine, items: Sequence[Item], ctx: StepContext) -> None:
        constraints.bind(engine, items, ctx)

    def check(self, items: Sequence[Item]) -> str | None:
        advice = "do not zero gradients between steps in light mode (the optimizer rescales them itself)"
        if not self._light_stepped:
            return None
        for it in items:
            if not it.settings_as(LMOSettings).is_light:
                continue
            key, g = id(it.param), it.param.grad
            shape = tuple(it.param.shape)
            at = f"is_light=True keeps the momentum in p.grad, but the gradient of {it.name!r} (shape {shape})"
            if g is None:
                return f"{at} is missing after a step: {advice}"
            ref = self._light_grads.get(key)
            if ref is not None and ref() is not g:
                # backward accumulates into the existing p.grad in place; a new tensor means it was set to None
                return f"{at} was replaced since the last step (zero_grad(set_to_none=True)?): {advice}"
            if key in self._light_versions and (
                self._light_tampered.get(key) or g._version != self._light_versions[key]
            ):
                return f"{at} was changed in place outside backward (zero_grad(set_to_none=False)?): {advice}"
        return None

    def end_step(self, items: Sequence[Item], all_groups: Sequence[Group]) -> None:
        light = [it for it in items if it.settings_as(LMOSettings).is_light]
        for it in light:
            p = it.param
            if p.grad is not None:
                # p.grad = M / (1 - beta) now; leave beta/(1-beta) * M so the next backward yields the EMA.
                local_piece(p.grad).mul_(it.settings_as(LMOSettings).momentum)
                self._light_grads[id(p)] = weakref.ref(p.grad)
                if id(p) in self._hooked:
                    self._light_versions[id(p)] = p.grad._version
                    self._light_tampered[id(p)] = False
                self._light_stepped = True
        if light:
            # The user does not zero gradients in light mode: clear those of the other groups (element-wise or
            # not light), which would otherwise accumulate over steps.
            light_groups = {id(it.group) for it in light}
            for group in all_groups:
                if id(group) not in light_groups:
                    for p in group["params"]:
                        p.grad = None


def _input_dtype(spec: Any, p: Tensor) -> torch.dtype | None:
    """``spec.input_dtype`` for ``p``'s gradient where the spec has one (``None``: keep the direction's dtype).
    Read from ``p.grad``'s dtype and device (``grad_of`` may redistribute: called once, in ``prepare``)."""
    f = getattr(spec, "input_dtype", None)
    g = p.grad
    return None if f is None or g is None else f(g.dtype, g.device)
