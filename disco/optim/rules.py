"""Update rules: one per family of algorithms, composed over the engine's movements.

A rule owns the per-parameter state of its groups and one step over the parameters that have a gradient::

    prepare  (local)      d_i = momentum(state_i, g_i)           # this rank's piece only
    map      (engine)     o_i = spec_i(whole d_i)                # once per tensor, on its owner
    finish   (local)      w_i <- apply(w_i, o_i)                 # this rank's piece only

``ElementwiseRule`` (AdamW, Lion, signSGD) has no map: every op is element-wise on local pieces. ``LMORule``
serves Muon, Scion and Disco, which differ only in data (norm, backend, momentum form, update form). A new
algorithm adds a spec in ``disco.ops`` and a rule here (registered in ``RULES``), and nothing in
``disco.distributed``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .. import ops
from ..distributed.engine import Engine, Job, local_piece
from ..ops.specs import LMOSpec
from . import elementwise

Group = dict[str, Any]


@dataclass(frozen=True)
class Item:
    """A parameter that takes part in this step: its group, its index over all groups (``state_dict()``'s)."""

    group: Group
    param: Tensor
    name: str
    index: int


class StepContext(Protocol):
    """What a rule may use of its optimizer during a step."""

    @property
    def engine(self) -> Engine: ...

    def state_of(self, p: Tensor) -> dict[str, Any]: ...

    def grad_of(self, p: Tensor) -> Tensor: ...


class UpdateRule(Protocol):
    """One family of algorithms (see the module docstring)."""

    def validate(self, group: Group, where: str) -> None: ...

    def init_state(self, group: Group, p: Tensor) -> dict[str, Any]: ...

    def step(self, items: Sequence[Item], ctx: StepContext) -> list[Tensor]:
        """Update every item in place; return each item's update direction (local piece, for tracking)."""
        ...

    def end_step(self, groups: Sequence[Group], all_groups: Sequence[Group]) -> None:
        """After every rule stepped: ``groups`` are this rule's, ``all_groups`` the optimizer's."""
        ...


class ElementwiseRule:
    """AdamW, Lion and signSGD: local pieces only, no communication (``disco.optim.elementwise``)."""

    def validate(self, group: Group, where: str) -> None:
        return None

    def init_state(self, group: Group, p: Tensor) -> dict[str, Any]:
        return elementwise.init_state(str(group["algorithm"]), p)

    def step(self, items: Sequence[Item], ctx: StepContext) -> list[Tensor]:
        updates = []
        for it in items:
            local = local_piece(it.param)
            before = local.clone()
            elementwise.step(
                str(it.group["algorithm"]), it.param, ctx.grad_of(it.param), ctx.state_of(it.param), it.group
            )
            updates.append((before - local) / max(float(it.group["lr"]), 1e-30))
        return updates

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
    ``"frank_wolfe"``), ``scale`` (multiplies the LMO), ``is_light`` (the momentum lives in ``p.grad``).
    """

    def __init__(self) -> None:
        self._light_stepped = False
        self._light_grads: dict[int, weakref.ref[Tensor]] = {}  # id(p) -> p.grad left by the last light step

    def validate(self, group: Group, where: str) -> None:
        try:
            norm = ops.get_norm(group["norm_factor"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if group["backend"] not in ops.BACKENDS:
            raise ValueError(f"{where}: unknown backend {group['backend']!r}; valid: {ops.backend_names()}")
        if group.get("is_light") and group.get("nesterov"):
            raise ValueError(f"{where}: is_light=True keeps no separate gradient, so nesterov must be False")
        for p, n in zip(group["params"], group["param_names"]):
            if norm.kind != "elementwise" and p.dim() < 2:
                raise ValueError(
                    f"parameter {n!r} with shape {tuple(p.shape)} is in a group with norm_factor "
                    f"{group['norm_factor']!r}, which needs a matrix (2-D or more); route it to 'bias_rms', "
                    "'sign' or an element-wise algorithm ('adamw', 'lion')"
                )

    def init_state(self, group: Group, p: Tensor) -> dict[str, Any]:
        if group.get("is_light"):
            return {}
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    @staticmethod
    def spec(group: Group, p: Tensor) -> LMOSpec:
        return LMOSpec.for_param(
            tuple(p.shape),
            norm=group["norm_factor"],
            backend=group["backend"],
            steps=int(group["backend_steps"]),
            coefficients=group.get("coefficients"),
            eps=group.get("eps"),
            compute_dtype=group.get("compute_dtype"),
        )

    def prepare(self, it: Item, ctx: StepContext) -> Tensor:
        """Update the momentum in place; return the local direction the LMO reads."""
        beta: float = it.group["momentum"]
        g = ctx.grad_of(it.param)
        if it.group.get("is_light"):
            # p.grad holds beta/(1-beta) * M_prev + G, so (1 - beta) * p.grad is the EMA momentum M.
            return g * (1 - beta)
        buf = local_piece(ctx.state_of(it.param)["momentum_buffer"])
        buf.lerp_(g.to(buf.dtype), 1 - beta)
        if it.group.get("nesterov"):
            return g.lerp(buf.to(g.dtype), beta)
        return buf.clone()

    @staticmethod
    def finish(it: Item, O: Tensor) -> None:
        lr, wd = it.group["lr"], it.group["weight_decay"]
        local = local_piece(it.param)
        if it.group.get("update_rule", "decoupled") == "frank_wolfe":
            local.mul_(1 - lr)
        elif wd:
            local.mul_(1 - lr * wd)
        local.add_(O.to(local.dtype), alpha=-lr * it.group.get("scale", 1.0))

    def step(self, items: Sequence[Item], ctx: StepContext) -> list[Tensor]:
        self._check_light(items)
        jobs = [Job(it.index, self.prepare(it, ctx), self.spec(it.group, it.param)) for it in items]
        results = ctx.engine.map(jobs) if jobs else []
        for it, O in zip(items, results):
            self.finish(it, O)
        return results

    def _check_light(self, items: Sequence[Item]) -> None:
        for it in items:
            ref = self._light_grads.get(id(it.param))
            if it.group.get("is_light") and ref is not None and ref() is not it.param.grad:
                # backward accumulates into the existing p.grad in place; a new tensor means it was set to None
                raise RuntimeError(
                    f"is_light=True keeps the momentum in p.grad, but the gradient of {it.name!r} (shape "
                    f"{tuple(it.param.shape)}) was replaced since the last step (zero_grad(set_to_none=True)?): "
                    "do not call zero_grad() between steps in light mode"
                )

    def check_light_presence(self, groups: Sequence[Group]) -> None:
        """A light parameter without a gradient after a light step lost its momentum: refuse."""
        if not self._light_stepped:
            return
        for g in groups:
            if g.get("is_light"):
                for p, n in zip(g["params"], g["param_names"]):
                    if p.grad is None:
                        raise RuntimeError(
                            f"is_light=True keeps the momentum in p.grad, but {n!r} (shape {tuple(p.shape)}) has "
                            "no gradient after a step: do not call zero_grad() between steps in light mode"
                        )

    def end_step(self, groups: Sequence[Group], all_groups: Sequence[Group]) -> None:
        light = [g for g in groups if g.get("is_light")]
        for group in light:
            for p in group["params"]:
                if p.grad is not None:
                    # p.grad = M / (1 - beta) now; leave beta/(1-beta) * M so the next backward yields the EMA.
                    local_piece(p.grad).mul_(group["momentum"])
                    self._light_grads[id(p)] = weakref.ref(p.grad)
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
