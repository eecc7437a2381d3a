"""Update rules: one per family of algorithms, composed over the engine's movements.

A rule owns the per-parameter state of its groups and one step over the parameters that have a gradient::

    prepare  (local)      d_i = momentum(state_i, g_i)           # this rank's piece, made when the engine stacks it
    map      (engine)     o_i = spec_i(whole d_i)                # once per tensor, on its owner
    finish   (local)      M_i <- lerp(M_i, g_i); w_i <- apply(w_i, o_i)  # the commit, after every rule computed
                                                                 # (commit="streaming": inside map, per o_i)

``ElementwiseRule`` (AdamW, Lion, signSGD) has no map: every op is element-wise on local pieces. ``LMORule``
serves Muon, Scion and Disco, which differ only in data (norm, backend, momentum form, update form). A new
algorithm adds a spec in ``disco.ops`` and a rule here (registered in ``RULES``), and nothing in
``disco.distributed``.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ..distributed.agreement import StepError
from ..distributed.engine import Engine, Job, local_piece
from ..ops.specs import LMOSpec
from . import constraints, elementwise, validation

Group = dict[str, Any]


@dataclass(frozen=True)
class Item:
    """A parameter that takes part in this step: its group, its index over all groups (``state_dict()``'s)."""

    group: Group
    param: Tensor
    name: str
    index: int


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


class UpdateRule(Protocol):
    """One family of algorithms (see the module docstring).

    A step is split so that it is atomic: ``compute`` may communicate and may raise but changes nothing;
    ``commit`` (what ``compute`` returns) only writes local pieces. The optimizer commits every rule only after
    every rule computed, so a failure anywhere leaves every parameter and all state as they were. The one
    exception is opt-in: a rule may commit the parameters of ``commit="streaming"`` groups inside ``compute``,
    each as soon as its result is known good, listing them in ``ctx.streamed`` (when not ``None``).
    """

    def validate(self, group: Group, where: str) -> None: ...

    def init_state(self, group: Group, p: Tensor) -> dict[str, Any]: ...

    def check(self, items: Sequence[Item]) -> str | None:
        """This rank's reason not to step (misuse seen locally), or None; voted on by every rank."""
        ...

    def bind(self, engine: Engine, items: Sequence[Item], ctx: StepContext) -> None:
        """Once the engine knows the layouts: finish state that depends on them (e.g. a piece of a seeded start)."""
        ...

    def compute(self, items: Sequence[Item], ctx: StepContext) -> Commit: ...

    def end_step(self, groups: Sequence[Group], all_groups: Sequence[Group]) -> None:
        """After every rule committed: ``groups`` are this rule's, ``all_groups`` the optimizer's."""
        ...


class ElementwiseRule:
    """AdamW, Lion and signSGD: local pieces only, no communication (``disco.optim.elementwise``)."""

    def validate(self, group: Group, where: str) -> None:
        validation.check_elementwise(group, where)

    def init_state(self, group: Group, p: Tensor) -> dict[str, Any]:
        return elementwise.init_state(str(group["algorithm"]), p)

    def check(self, items: Sequence[Item]) -> str | None:
        return None

    def bind(self, engine: Engine, items: Sequence[Item], ctx: StepContext) -> None:
        return None

    def compute(self, items: Sequence[Item], ctx: StepContext) -> Commit:
        def commit() -> list[Tensor]:
            updates = []
            for it in items:
                local = local_piece(it.param)
                before = local.clone() if ctx.wants_updates else None  # a parameter's copy only when norms are read
                algo = str(it.group["algorithm"])
                elementwise.step(algo, it.param, ctx.grad_of(it.param), ctx.state_of(it.param), it.group)
                if before is None:
                    updates.append(local.new_empty(0))
                else:
                    updates.append((before - local) / max(float(it.group["lr"]), 1e-30))
            return updates

        return commit

    def end_step(self, groups: Sequence[Group], all_groups: Sequence[Group]) -> None:
        return None


class LMORule:
    r"""Momentum, then the group's LMO of the whole matrix, then a decoupled or Frank-Wolfe update.

    .. math::
        M \leftarrow \beta M + (1-\beta) G,\qquad U = \mathrm{lerp}(G, M, \beta)\ \text{(Nesterov) or } M,
        \qquad O = \mathrm{LMO}(U),\qquad
        W \leftarrow (1 - \eta\lambda) W - \eta s O\ \text{ or }\ W \leftarrow (1-\eta) W - \eta s O

    Group keys: ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``norm_factor``, ``backend``,
    ``backend_steps``, ``coefficients``, ``eps``, ``compute_dtype``, ``update_rule`` (``"decoupled"`` or
    ``"frank_wolfe"``), ``scale`` (multiplies the LMO), ``is_light`` (the momentum lives in ``p.grad``),
    ``weight_constraint`` (with ``sigma_min``, ``sigma_max``, ``radius``: ``disco.optim.constraints``, applied to
    the updated weight; without one the update is written in place as above).
    """

    def __init__(self) -> None:
        self._light_stepped = False
        self._light_grads: dict[int, weakref.ref[Tensor]] = {}  # id(p) -> p.grad left by the last light step
        # id(p) -> p.grad._version expected now: in-place changes outside backward (zero_grad(set_to_none=False))
        # move the version without the accumulate hook seeing it.
        self._light_versions: dict[int, int] = {}
        self._light_tampered: dict[int, bool] = {}
        self._hooked: set[int] = set()

    def validate(self, group: Group, where: str) -> None:
        validation.check_lmo(group, where)

    def init_state(self, group: Group, p: Tensor) -> dict[str, Any]:
        extra = constraints.init_state(group, p)
        if group.get("is_light"):
            self._watch_light(p)
            return extra
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format), **extra}

    @staticmethod
    def spec(group: Group, p: Tensor) -> LMOSpec:
        return LMOSpec.for_param(
            tuple(p.shape),
            transposed=bool(group.get("transposed", False)),
            norm=group["norm_factor"],
            backend=group["backend"],
            steps=int(group["backend_steps"]),
            coefficients=group.get("coefficients"),
            eps=group.get("eps"),
            compute_dtype=group.get("compute_dtype"),
            result_in_compute_dtype=True,  # held until the commit: half the bytes in bf16
        )

    @staticmethod
    def prepare(it: Item, ctx: StepContext) -> tuple[Tensor, Callable[[], Tensor], MomentumWrite | None]:
        """The LMO's input, as a template (the gradient: same shape, dtype, device) and the function that computes
        it when the engine stacks it, and the momentum update ``finish`` applies. Nothing is written now.

        Nesterov's ``lerp(G, M', beta)`` with ``M' = lerp(M, G, 1 - beta)`` is ``lerp(G, M, beta^2)``: one pass
        that leaves ``M`` untouched, so the commit updates it in place (``lerp_``) and no ``M'`` is kept.
        """
        beta: float = it.group["momentum"]
        g = ctx.grad_of(it.param)
        if it.group.get("is_light"):
            # p.grad holds beta/(1-beta) * M_prev + G, so (1 - beta) * p.grad is the EMA momentum M.
            return g, lambda: g * (1 - beta), None
        buf = local_piece(ctx.state_of(it.param)["momentum_buffer"])

        def write() -> Tensor:
            return buf.lerp_(g.to(buf.dtype), 1 - beta)

        if it.group.get("nesterov"):
            return g, lambda: g.lerp(buf.to(g.dtype), beta * beta), write
        return buf, lambda: buf.lerp(g.to(buf.dtype), 1 - beta), write

    @staticmethod
    def finish(it: Item, ctx: StepContext, O: Tensor, momentum: MomentumWrite | None) -> None:
        if momentum is not None:
            momentum()
        lr, wd = it.group["lr"], it.group["weight_decay"]
        local = local_piece(it.param)
        if it.group.get("update_rule", "decoupled") == "frank_wolfe":
            local.mul_(1 - lr)
        elif wd:
            local.mul_(1 - lr * wd)
        local.add_(O, alpha=-lr * it.group.get("scale", 1.0))  # a bf16 O is read as it is: no cast

    @staticmethod
    def updated(it: Item, O: Tensor) -> Tensor:
        """``finish``'s new weight, out of place (the local piece), for a constraint to read."""
        lr, wd = it.group["lr"], it.group["weight_decay"]
        local = local_piece(it.param)
        if it.group.get("update_rule", "decoupled") == "frank_wolfe":
            W = local.mul(1 - lr)
        elif wd:
            W = local.mul(1 - lr * wd)
        else:
            W = local.clone()
        return W.add_(O.to(W.dtype), alpha=-lr * it.group.get("scale", 1.0))

    def constrain(self, items: Sequence[Item], ctx: StepContext, directions: Sequence[Tensor]) -> list[Tensor | None]:
        """The constrained new weights of the items whose group has a ``weight_constraint`` (else ``None``)."""
        if not any(constraints.kind(it.group) for it in items):
            return [None] * len(items)
        weights = [self.updated(it, O) if constraints.kind(it.group) else None for it, O in zip(items, directions)]
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
        prepared = [self.prepare(it, ctx) for it in items]
        streamed = ctx.streamed
        jobs = []
        for it, (like, make, momentum) in zip(items, prepared):
            consume = None
            if streamed is not None and it.group.get("commit", "atomic") == "streaming":
                consume = functools.partial(self._commit_now, it, ctx, momentum, streamed)
            jobs.append(Job(it.index, like, self.spec(it.group, it.param), make=make, consume=consume))
        if torch.compiler.is_compiling():
            # Inductor's CPU backend crashes (KeyError: 'bufN', pytorch#196570) when the momentum lerp, a
            # row-norm LMO and the parameter add share one graph: keep them apart under torch.compile.
            torch._dynamo.graph_break()
        streaming = any(job.consume is not None for job in jobs)
        try:
            results = ctx.engine.map(jobs) if jobs else []
        except StepError as e:  # raised alike by every rank; ``consumed``: some rank committed already
            if streamed is not None and streaming and e.consumed:
                streamed.started = True
            raise
        if streamed is not None and streaming:
            streamed.started = True
        weights = self.constrain(items, ctx, results)  # streaming groups have no constraint (validation)

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

        p.register_post_accumulate_grad_hook(accumulated)  # type: ignore[no-untyped-call]

    def bind(self, engine: Engine, items: Sequence[Item], ctx: StepContext) -> None:
        constraints.bind(engine, items, ctx)

    def check(self, items: Sequence[Item]) -> str | None:
        advice = "do not zero gradients between steps in light mode (the optimizer rescales them itself)"
        if not self._light_stepped:
            return None
        for it in items:
            if not it.group.get("is_light"):
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

    def end_step(self, groups: Sequence[Group], all_groups: Sequence[Group]) -> None:
        light = [g for g in groups if g.get("is_light")]
        for group in light:
            for p in group["params"]:
                if p.grad is not None:
                    # p.grad = M / (1 - beta) now; leave beta/(1-beta) * M so the next backward yields the EMA.
                    local_piece(p.grad).mul_(group["momentum"])
                    self._light_grads[id(p)] = weakref.ref(p.grad)
                    if id(p) in self._hooked:
                        self._light_versions[id(p)] = p.grad._version
                        self._light_tampered[id(p)] = False
                    self._light_stepped = True
        if light:
            # The user does not zero gradients in light mode: clear those of the other groups (element-wise or
            # not light), which would otherwise accumulate over steps.
            for group in all_groups:
                if not any(group is g for g in light):
                    for p in group["params"]:
                        p.grad = None


#: algorithm name -> the rule class that serves it (one instance per optimizer and class).
RULES: dict[str, Callable[[], UpdateRule]] = {
    "disco": LMORule,
    "muon": LMORule,
    "scion": LMORule,
    **{name: ElementwiseRule for name in elementwise.STEPS},
}
