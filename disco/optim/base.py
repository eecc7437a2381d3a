"""The step skeleton shared by Disco, Muon and Scion: momentum -> engine.map(LMO) -> apply.

Matrix-like parameters (any group whose ``algorithm`` is an LMO algorithm) go through the distribution engine,
which hands the LMO whole tensors; element-wise algorithms (AdamW, Lion, sign) update local pieces in place.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Hashable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from .. import ops
from ..distributed.engine import LocalEngine, local_piece
from . import elementwise

LMO_ALGORITHMS = ("disco", "muon", "scion")
ELEMENTWISE_ALGORITHMS = tuple(elementwise.STEPS)
ALGORITHMS = LMO_ALGORITHMS + ELEMENTWISE_ALGORITHMS
# Norms that read the whole tensor (so a sharded tensor must be gathered first).
_LOCAL_NORMS = ("sign", "none")
_SPECTRAL_FAMILY = ("spectral", "original", "match_rms_adamw", "image_spectral", "conv_spectral")


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def default_tracked_norms(norm: str, ndim: int) -> tuple[str, ...]:
    """The operator norms logged for a parameter: each LMO's own dual pairing, plus the max entry."""
    if ndim < 2:
        return ("rms", "supremum")
    if norm.startswith("embed"):
        return ("l1_to_rms", "supremum")
    if norm.startswith("unembed"):
        return ("rms_to_inf", "supremum")
    return ("rms_to_rms", "supremum")


class SpectralOptimizer(Optimizer):
    """Base class; subclasses fix the defaults and the update rule of the LMO groups.

    Group keys read by the LMO step: ``algorithm``, ``lr``, ``weight_decay``, ``momentum``, ``nesterov``,
    ``norm_factor``, ``backend``, ``backend_steps``, ``coefficients``, ``eps``, ``compute_dtype``,
    ``update_rule`` (``"decoupled"`` or ``"frank_wolfe"``), ``scale`` (multiplies the LMO), ``is_light``.
    Element-wise groups read ``lr``, ``weight_decay``, ``betas``, ``adam_eps`` (``eps`` given in an element-wise
    group is taken as ``adam_eps``), ``momentum``.
    """

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, distributed_config=None) -> None:
        self._seen: dict[int, str] = {}
        super().__init__(params, defaults)
        self.distributed_config = distributed_config
        self._track_next: tuple[str, ...] | None | bool = False
        self._tracked: dict[str, Tensor] = {}
        self._light_stepped = False
        self._light_grads: dict[int, weakref.ref] = {}  # id(p) -> p.grad left by the last light step
        self._init_state()
        self._engine = self._build_engine()

    # ---- groups and validation --------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        names = param_group.get("param_names")
        if params and all(isinstance(p, tuple) for p in params):  # named parameters, as torch.optim accepts
            names, params = [n for n, _ in params], [p for _, p in params]
        gi = len(self.param_groups)
        if names is None:
            names = [f"group{gi}.param{k}" for k in range(len(params))]
        names = list(names)
        if len(names) != len(params):
            raise ValueError(f"group {gi}: {len(names)} param_names for {len(params)} params")
        for p, n in zip(params, names):
            if id(p) in self._seen:
                raise ValueError(
                    f"parameter {n!r} (shape {tuple(p.shape)}) is already in another group as "
                    f"{self._seen[id(p)]!r}; a parameter may belong to one group only"
                )
            self._seen[id(p)] = n
        shown = ", ".join(f"{n!r} (shape {tuple(p.shape)})" for n, p in zip(names[:3], params[:3]))
        where = f"group {gi} [{shown}{', ...' if len(params) > 3 else ''}]"
        algo = param_group.get("algorithm", self.defaults.get("algorithm"))
        if algo not in ALGORITHMS:
            raise ValueError(f"{where}: unknown algorithm {algo!r}; valid: {sorted(ALGORITHMS)}")
        if algo in ELEMENTWISE_ALGORITHMS and "eps" in param_group and "adam_eps" not in param_group:
            param_group["adam_eps"] = param_group["eps"]
        param_group = {**param_group, "params": params, "param_names": names}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if algo in LMO_ALGORITHMS:
            try:
                spec = ops.get_norm(group["norm_factor"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if group["backend"] not in ops.BACKENDS:
                raise ValueError(f"{where}: unknown backend {group['backend']!r}; valid: {ops.backend_names()}")
            if group.get("is_light") and group.get("nesterov"):
                raise ValueError(f"group {gi}: is_light=True keeps no separate gradient, so nesterov must be False")
            for p, n in zip(params, names):
                if spec.kind != "elementwise" and p.dim() < 2:
                    raise ValueError(
                        f"parameter {n!r} with shape {tuple(p.shape)} is in a group with norm_factor "
                        f"{group['norm_factor']!r}, which needs a matrix (2-D or more); route it to 'bias_rms', "
                        "'sign' or an element-wise algorithm ('adamw', 'lion')"
                    )
        if hasattr(self, "_engine_keys"):  # added after construction: state now, the engine re-plans at step()
            self._init_state()

    def _algo(self, group: dict) -> str:
        return str(group.get("algorithm", self.defaults.get("algorithm")))

    def _lmo_params(self) -> list[tuple[dict, int, Tensor, str]]:
        """(group, position in group, param, name) for every parameter whose LMO reads the whole tensor."""
        out = []
        for group in self.param_groups:
            if self._algo(group) in LMO_ALGORITHMS and group["norm_factor"] not in _LOCAL_NORMS:
                for k, p in enumerate(group["params"]):
                    out.append((group, k, p, group["param_names"][k]))
        return out

    # ---- state --------------------------------------------------------------------------------------------
    def _init_state(self) -> None:
        """Create every state tensor now (DCP needs the same keys on every rank from the start)."""
        for group in self.param_groups:
            algo = self._algo(group)
            for p in group["params"]:
                st = self.state[p]
                if st:
                    continue
                if algo in LMO_ALGORITHMS:
                    if not group.get("is_light"):
                        st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    st.update(elementwise.init_state(algo, p))

    # ---- the engine ---------------------------------------------------------------------------------------
    def _lmo_key(self, group: dict, p: Tensor) -> Hashable:
        coeffs = group.get("coefficients")
        if isinstance(coeffs, list):
            coeffs = tuple(tuple(c) if isinstance(c, (list, tuple)) else c for c in coeffs)
        norm = group["norm_factor"]
        view = "flatten" if p.dim() >= 4 and norm != "conv_spectral" else "native"
        return (
            norm,
            group["backend"],
            int(group["backend_steps"]),
            coeffs,
            group.get("eps"),
            group.get("compute_dtype"),
            view,
        )

    @staticmethod
    def _batch_ndim(norm: str, p: Tensor) -> int:
        return 1 if p.dim() == 3 and norm != "conv_spectral" and ops.get_norm(norm).kind != "elementwise" else 0

    def _build_engine(self):
        items = self._lmo_params()
        keys = [self._lmo_key(g, p) for g, _, p, _ in items]
        self._engine_keys = keys
        batch = [self._batch_ndim(g["norm_factor"], p) for g, _, p, _ in items]
        config = self.distributed_config
        if config is None and any(isinstance(p, DTensor) for _, _, p, _ in items):
            from ..distributed.config import create_dtensor_config

            config = create_dtensor_config()
        if config is None:
            return LocalEngine(len(items), batch_ndims=batch)
        costs = []
        for _g, _, p, _ in items:
            shape = tuple(p.shape)
            if keys[len(costs)][-1] == "flatten":
                shape = (shape[0], math.prod(shape[1:]))
            costs.append(ops.orthogonalize_cost(shape) if len(shape) >= 2 else float(math.prod(shape)))
        if config.source == "callbacks":
            from ..distributed.callbacks import CallbackEngine

            return CallbackEngine(
                [p for _, _, p, _ in items], config=config, batch_ndims=batch, names=[n for *_, n in items]
            )
        from ..distributed.executor import PlanEngine

        return PlanEngine(
            [p for _, _, p, _ in items],
            costs=costs,
            keys=keys,
            batch_ndims=batch,
            config=config,
            names=[n for *_, n in items],
            ids=[self._flat_index[id(p)] for _, _, p, _ in items],
        )

    @property
    def _flat_index(self) -> dict[int, int]:
        """id(param) -> its index over all groups in order (the numbering of ``state_dict()``)."""
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    @property
    def engine(self):
        return self._engine

    @property
    def assignments(self) -> dict[int, list[int]]:
        """rank -> indices (into the whole-tensor LMO parameters, in group order) that the rank computes."""
        return self._engine.assignments

    @property
    def current_rank(self) -> int:
        return self._engine.current_rank

    @staticmethod
    def _run_lmo(key: Hashable, X: Tensor) -> Tensor:
        fields: tuple[Any, ...] = key  # type: ignore[assignment]
        norm, backend, steps, coeffs, eps, cdtype, view = fields
        kw: dict[str, Any] = dict(
            norm=norm, backend=backend, steps=steps, coefficients=coeffs, eps=eps, compute_dtype=cdtype
        )
        if view == "flatten":
            flat = X.reshape(X.shape[0], X.shape[1], -1)
            return ops.lmo(flat, param_ndim=2, **kw).reshape(X.shape)
        return ops.lmo(X, param_ndim=X.dim() - 1, **kw)

    # ---- norm tracking ------------------------------------------------------------------------------------
    def calculate_norm_at_next_step(self, norms: Iterable[str] | None = None) -> None:
        """Arm norm tracking for the next ``step()`` only; ``norms`` overrides the per-parameter choice."""
        if norms is not None:
            norms = tuple(norms)
            for n in norms:
                if n not in ops.OPERATOR_NORMS:
                    raise ValueError(f"unknown operator norm {n!r}; valid: {sorted(ops.OPERATOR_NORMS)}")
        self._track_next = norms if norms is not None else None

    def get_norms_at_current_step(self) -> dict[str, Tensor]:
        """Norms computed by the last armed step, keyed ``track_{update|param}_{norm}/{param name}``."""
        return dict(self._tracked)

    def _track(self, group: dict, p: Tensor, name: str, update: Tensor) -> None:
        norms = self._track_next or default_tracked_norms(group.get("norm_factor", "none"), p.dim())
        full_p, full_u = _full(p.detach()), _full(update)
        for kind, t in (("update", full_u), ("param", full_p)):
            for n in norms:  # type: ignore[union-attr]
                if t.dim() < 2 and n not in ("rms", "supremum"):
                    continue
                view = t.reshape(t.shape[0], -1) if t.dim() >= 4 else t
                val = ops.operator_norm(n, view if n != "supremum" or view.dim() >= 2 else view.view(1, -1))
                self._tracked[f"track_{kind}_{n}/{name}"] = val.amax().detach()

    # ---- the step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tracking = self._track_next is not False
        self._tracked = {}
        if self.distributed_config is not None and self.distributed_config.average_gradients:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            self._engine.average_gradients(grads)

        for group in self.param_groups:
            algo = self._algo(group)
            if algo in ELEMENTWISE_ALGORITHMS:
                for p, name in zip(group["params"], group["param_names"]):
                    if p.grad is None:
                        continue
                    before = p.detach().clone() if tracking else None
                    elementwise.step(algo, p, self._grad(p), self.state[p], group)
                    if tracking:
                        self._track(group, p, name, (before - p.detach()) / max(group["lr"], 1e-30))

        items = self._lmo_params()
        if [self._lmo_key(g, p) for g, _, p, _ in items] != self._engine_keys:
            # Groups were added or their LMO settings changed: re-plan (collective, as every rank does the same).
            self._init_state()
            self._engine = self._build_engine()
        present = [p.grad is not None for _, _, p, _ in items]
        self._check_light(items, present)
        self._engine.check_grads(present, [n for *_, n in items])
        jobs, targets = [], []
        for idx, (group, _, p, name) in enumerate(items):
            if p.grad is None:
                continue
            jobs.append((idx, self._momentum(group, p), self._lmo_key(group, p)))
            targets.append((group, p, name))
        results = self._engine.map(jobs, self._run_lmo) if jobs else []
        for (group, p, name), O in zip(targets, results):
            self._apply(group, p, O)
            if tracking:
                self._track(group, p, name, self._as_param(p, O))

        for group in self.param_groups:  # LMOs that need no gathering (sign, none)
            if self._algo(group) not in LMO_ALGORITHMS or group["norm_factor"] not in _LOCAL_NORMS:
                continue
            for p, name in zip(group["params"], group["param_names"]):
                if p.grad is None:
                    continue
                O = self._run_lmo(self._lmo_key(group, p), self._momentum(group, p).unsqueeze(0))[0]
                self._apply(group, p, O)
                if tracking:
                    self._track(group, p, name, self._as_param(p, O))
        self._finish_light()
        self._track_next = False
        return loss

    def _as_param(self, p: Tensor, local: Tensor) -> Tensor:
        if isinstance(p, DTensor):
            return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        return local

    def _grad(self, p: Tensor) -> Tensor:
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            g = g.redistribute(p.device_mesh, p.placements)  # e.g. Partial gradients
        return local_piece(g)  # type: ignore[arg-type]

    def _momentum(self, group: dict, p: Tensor) -> Tensor:
        """Update the momentum of ``p`` in place and return the local direction the LMO reads."""
        beta = group["momentum"]
        g = self._grad(p)
        if group.get("is_light"):
            # p.grad holds beta/(1-beta) * M_prev + G, so (1 - beta) * p.grad is the EMA momentum M.
            return g * (1 - beta)
        buf = local_piece(self.state[p]["momentum_buffer"])
        buf.lerp_(g.to(buf.dtype), 1 - beta)
        if group.get("nesterov"):
            return g.lerp(buf.to(g.dtype), beta)
        return buf.clone()

    def _apply(self, group: dict, p: Tensor, O: Tensor) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        scale = group.get("scale", 1.0)
        local = local_piece(p)
        if group.get("update_rule", "decoupled") == "frank_wolfe":
            local.mul_(1 - lr)
        elif wd:
            local.mul_(1 - lr * wd)
        local.add_(O.to(local.dtype), alpha=-lr * scale)

    def _check_light(self, items, present) -> None:
        light = [(n, p) for (g, _, p, n), has in zip(items, present) if g.get("is_light") and not has]
        if light and self._light_stepped:
            raise RuntimeError(
                f"is_light=True keeps the momentum in p.grad, but {light[0][0]!r} (shape {tuple(light[0][1].shape)}) "
                "has no gradient after a step: do not call zero_grad() between steps in light mode"
            )
        for (g, _, p, n), has in zip(items, present):
            ref = self._light_grads.get(id(p))
            if g.get("is_light") and has and ref is not None and ref() is not p.grad:
                # backward accumulates into the existing p.grad in place; a new tensor means it was set to None
                raise RuntimeError(
                    f"is_light=True keeps the momentum in p.grad, but the gradient of {n!r} (shape "
                    f"{tuple(p.shape)}) was replaced since the last step (zero_grad(set_to_none=True)?): do not "
                    "call zero_grad() between steps in light mode"
                )

    def _finish_light(self) -> None:
        light = [g for g in self.param_groups if self._algo(g) in LMO_ALGORITHMS and g.get("is_light")]
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
            for group in self.param_groups:
                if not any(group is g for g in light):
                    for p in group["params"]:
                        p.grad = None
