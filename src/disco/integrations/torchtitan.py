"""TorchTitan integration: Disco inside TorchTitan's optimizer container, and Disco kwargs from its configs.

**TorchTitan 0.3.0** configures optimizers as ``OptimizersContainer.Config(param_groups=[ParamGroupConfig(
pattern, optimizer_name, optimizer_kwargs), ...], implementation=...)`` and resolves ``optimizer_name`` through a
fixed table (``Adam``, ``AdamW``, ``DistMuon``). :class:`DiscoOptimizersContainer` is its subclass that also
knows ``"Disco"``; its ``Config`` is built by TorchTitan itself (``config.optimizer.build(model_parts=...)``)::

    from disco.integrations.torchtitan import DiscoOptimizersContainer, disco_optimizer_config
    from torchtitan.components.optimizer import ParamGroupConfig

    config.optimizer = disco_optimizer_config(lr=0.02, vector_algorithm="adamw")   # one catch-all Disco group
    # or mix, first match wins as in TorchTitan:
    config.optimizer = DiscoOptimizersContainer.Config(param_groups=[
        ParamGroupConfig(pattern=r"tok_embeddings|lm_head", optimizer_name="AdamW", optimizer_kwargs={"lr": 3e-3}),
        ParamGroupConfig(pattern=r".*", optimizer_name="Disco", optimizer_kwargs={"lr": 0.02}),
    ])

Per model part (pipeline stage) the container builds **one** :class:`disco.Disco` over every parameter that a
``"Disco"`` group's pattern claims, routed by :func:`disco.create_disco_param_groups` (so norm gains and biases
get ``bias_rms``, or ``vector_algorithm``, instead of a matrix LMO; embeddings, the head, transposed layers
and ties are recognised as everywhere in Disco), and TorchTitan's own optimizers for the other names. The
container keeps TorchTitan's flat, FQN-keyed ``state_dict`` / ``load_state_dict`` (its ``CheckpointManager``
saves and reshards Disco's DTensor momentum like AdamW's state), works with its ``LRSchedulersContainer``
(each Disco group's ``lr`` is scheduled) and passes ``optimizer_factory_kwargs_by_name["Disco"]`` (e.g.
``distributed_config``) to ``Disco``. ``parallel_dims`` is optional (``build(model_parts=...,
parallel_dims=...)``): TorchTitan's trainer passes none, and Disco reads each parameter's layout from its
DTensor mesh and placements.

A ``"Disco"`` group's ``optimizer_kwargs`` take Disco's hyperparameters and routing keys (table below);
anything else is an error. Several ``"Disco"`` groups in one part share one optimizer, each keeping its own
hyperparameters. Patterns are matched as TorchTitan does (``re.search`` on each name, first match wins), except
that a pattern must claim a parameter in *some* model part rather than in every one, so stage-specific
patterns work under pipeline parallelism.

:func:`create_disco_optimizer_kwargs_from_optimizer_config` turns a config into the ``optimizer_kwargs`` of
:func:`disco.create_disco_param_groups`. It accepts TorchTitan 0.3.0's ``OptimizersContainer.Config`` (its one
``"Disco"`` group, or its only group: ``default_adamw(lr=...)`` gives AdamW's ``lr`` / ``eps`` /
``weight_decay``, with a warning), a single ``ParamGroupConfig``, a mapping, or any object with attributes
(older TorchTitan ``config.optimizer`` sections). Read:

=================================  ====================  ====================================================
key                                default               note
=================================  ====================  ====================================================
``name`` / ``optimizer_name``      ``"Disco"``           anything but ``Disco`` warns (Disco is built anyway)
``lr``                             required
``eps``                            ``1e-7``
``weight_decay``                   ``0.0``
``momentum``                       ``0.95``
``nesterov``                       ``True``              ``False`` when ``is_light`` is set and this is unset
``norm_factor``                    ``"spectral"``
``backend``                        ``"gram_newtonschulz5"``
``backend_steps``                  ``5``
``is_light``                       ``False``
``extra_param_group_split_rules``  ``[]``                a list of dicts, or its JSON string
``name_of_embedding``              ``"tok_embeddings"``
``vector_algorithm``               unset                 forwarded only when set (a routing key)
``name_of_output``                 unset                 forwarded only when set (a routing key)
``coefficients``                   unset                 forwarded only when set (a Newton-Schulz table)
``compute_dtype``                  unset                 forwarded only when set (a dtype or its name)
``commit``                         unset                 forwarded only when set (``"streaming"``: one update
                                                         held at a time; see ``disco.Disco``)
=================================  ====================  ====================================================
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..dummy_parallel_dims import DummyParallelDims
from ..groups import create_disco_param_groups
from ..optim.contract import rule_class
from ..optim.defaults import DISCO_DEFAULTS as _DISCO

__all__ = [
    "DISCO_DEFAULTS",
    "DISCO_OPTIMIZER_NAMES",
    "build_disco_optimizer",
    "create_disco_optimizer_kwargs_from_optimizer_config",
    "disco_classes",
    "disco_optimizer_config",
    "resolve_name",
]

_MISSING = object()

# Disco's own defaults (one source: disco.optim.defaults), less the lr the config must give.
DISCO_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in _DISCO.as_dict().items() if k != "lr"},
    "name_of_embedding": "tok_embeddings",
}

#: ``ParamGroupConfig.optimizer_name`` values that :class:`DiscoOptimizersContainer` builds as Disco.
DISCO_OPTIMIZER_NAMES = ("Disco",)

_OPTIONAL = ("vector_algorithm", "name_of_output", "coefficients", "compute_dtype", "commit")
_KNOWN = frozenset({"lr", "extra_param_group_split_rules", *DISCO_DEFAULTS, *_OPTIONAL})
# Keys of the kwargs that are group hyperparameters (what differs between two "Disco" groups of one part).
_GROUP_KEYS = (
    "lr",
    "eps",
    "weight_decay",
    "momentum",
    "nesterov",
    "norm_factor",
    "backend",
    "backend_steps",
    "is_light",
    "coefficients",
    "compute_dtype",
    "commit",
)
_ELEMENTWISE_KEYS = ("lr", "weight_decay")  # what an AdamW / Lion group routed inside Disco takes from them


def _get(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, _MISSING)
    return getattr(config, key, _MISSING)


def _is_param_group_config(obj: Any) -> bool:
    """TorchTitan 0.3.0's ``ParamGroupConfig`` (or anything shaped like it)."""
    return not isinstance(obj, Mapping) and all(
        hasattr(obj, a) for a in ("pattern", "optimizer_name", "optimizer_kwargs")
    )


def _is_container_config(obj: Any) -> bool:
    """TorchTitan 0.3.0's ``OptimizersContainer.Config``: a list of ``ParamGroupConfig``."""
    groups = getattr(obj, "param_groups", None)
    return (
        not isinstance(obj, Mapping)
        and isinstance(groups, (list, tuple))
        and all(_is_param_group_config(g) for g in groups)
    )


def _is_disco_name(name: Any) -> bool:
    """``"Disco"`` in any case (``"disco"`` too): the routed Disco of the container."""
    return isinstance(name, str) and name.lower() in {n.lower() for n in DISCO_OPTIMIZER_NAMES}


def disco_classes() -> dict[str, Any]:
    """Disco's other optimizer classes by lower-case name (``"muon"``: :class:`disco.Muon`, ``"dion"``...), as
    ``disco.optim`` exports them; a ``ParamGroupConfig`` naming one (any case) gets that class over its
    parameters, unrouted (its pattern chooses them, as for TorchTitan's own optimizers)."""
    from .. import optim
    from ..optim.base import SpectralOptimizer

    out = {}
    for attr in optim.__all__:
        cls = getattr(optim, attr)
        if isinstance(cls, type) and issubclass(cls, SpectralOptimizer) and not _is_disco_name(attr):
            out[attr.lower()] = cls
    return out


def _known_name(name: str) -> str:
    try:
        return resolve_name(name)[0]
    except ValueError:
        return name


_TORCHTITAN_NAMES = ("Adam", "AdamW", "DistMuon")  # TorchTitan 0.3.0's _resolve_optimizer_factory table


def resolve_name(name: str) -> tuple[str, Any]:
    """``(canonical name, Disco class or None)`` for a ``ParamGroupConfig.optimizer_name`` in any case:
    ``"Disco"`` (routed), one of :func:`disco_classes`, or one of TorchTitan's own (``"adamw"`` -> ``"AdamW"``).

    Raises:
        ValueError: an unknown name, listing the valid ones (TorchTitan itself raises a bare
            ``NotImplementedError``).
    """
    if _is_disco_name(name):
        return DISCO_OPTIMIZER_NAMES[0], None
    classes = disco_classes()
    key = name.lower() if isinstance(name, str) else ""
    if key in classes:
        return classes[key].__name__, classes[key]
    for known in _TORCHTITAN_NAMES:
        if known.lower() == key:
            return known, None
    valid = [*DISCO_OPTIMIZER_NAMES, *(c.__name__ for c in classes.values()), *_TORCHTITAN_NAMES]
    raise ValueError(f"ParamGroupConfig optimizer_name {name!r} is unknown; valid (any case): {', '.join(valid)}")


def _select_group(config: Any) -> Any:
    groups = list(config.param_groups)
    disco = [g for g in groups if _is_disco_name(g.optimizer_name)]
    if len(disco) == 1:
        return disco[0]
    if not disco and len(groups) == 1:
        return groups[0]
    names = [f"{g.optimizer_name}:{g.pattern}" for g in groups]
    raise ValueError(
        f"optimizer config has {len(disco)} 'Disco' param groups among {names}: one set of Disco kwargs needs "
        "exactly one (or a config with a single group); to honour several patterns build the optimizer with "
        "disco.integrations.torchtitan.DiscoOptimizersContainer.Config(param_groups=...)"
    )


def _dtype(value: Any) -> Any:
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"compute_dtype={value!r} is not a torch dtype")
        return dtype
    return value


def create_disco_optimizer_kwargs_from_optimizer_config(
    optimizer_config: Any, parallel_dims: Any = None
) -> dict[str, Any]:
    """The ``optimizer_kwargs`` for :func:`disco.groups.create_disco_param_groups` from a TorchTitan optimizer
    config (see the module docstring for the forms accepted, the keys read and their defaults).

    ``parallel_dims`` (TorchTitan's ``ParallelDims``, or ``None`` for a :class:`DummyParallelDims`) is passed
    through as Disco's ``parallel_dims``; its ``world_size`` must match the initialised process group's.
    """
    strict = False
    name: Any = _get(optimizer_config, "name")
    if _is_container_config(optimizer_config):
        optimizer_config = _select_group(optimizer_config)
    if _is_param_group_config(optimizer_config):
        name = optimizer_config.optimizer_name
        strict = _is_disco_name(name)
        if not isinstance(optimizer_config.optimizer_kwargs, Mapping):
            raise ValueError(f"ParamGroupConfig.optimizer_kwargs must be a mapping, got {optimizer_config!r}")
        optimizer_config = dict(optimizer_config.optimizer_kwargs)
        if strict:
            unknown = sorted(set(optimizer_config) - _KNOWN)
            if unknown:
                raise ValueError(
                    f"unknown keys {unknown} in the optimizer_kwargs of a 'Disco' param group; valid: {sorted(_KNOWN)}"
                )
    if name is not _MISSING and name is not None and str(name).lower() != "disco":
        warnings.warn(
            f"optimizer name {name!r}: building Disco with the config's hyperparameters anyway "
            "(route parameters to other algorithms with extra_param_group_split_rules' 'algorithm')",
            UserWarning,
            stacklevel=2,
        )
    _check_parallel_dims(parallel_dims)
    lr = _get(optimizer_config, "lr")
    if lr is _MISSING:
        raise ValueError("optimizer_config has no 'lr'")
    kwargs: dict[str, Any] = {
        "parallel_dims": DummyParallelDims() if parallel_dims is None else parallel_dims,
        "lr": float(lr),
    }
    for key, default in DISCO_DEFAULTS.items():
        value = _get(optimizer_config, key)
        kwargs[key] = default if value is _MISSING or value is None else value
    if kwargs["is_light"] and _get(optimizer_config, "nesterov") in (_MISSING, None):
        kwargs["nesterov"] = False  # is_light keeps no separate gradient for Nesterov
    for key in ("eps", "weight_decay", "momentum"):
        kwargs[key] = float(kwargs[key])
    kwargs["backend_steps"] = int(kwargs["backend_steps"])
    kwargs["nesterov"], kwargs["is_light"] = bool(kwargs["nesterov"]), bool(kwargs["is_light"])

    rules = _get(optimizer_config, "extra_param_group_split_rules")
    if rules is _MISSING or rules is None or rules == "":
        rules = []
    elif isinstance(rules, str):
        try:
            rules = json.loads(rules)
        except json.JSONDecodeError as e:
            raise ValueError(f"extra_param_group_split_rules is not valid JSON: {e}") from None
    if isinstance(rules, Mapping):
        rules = [rules]
    kwargs["extra_param_group_split_rules"] = [dict(r) for r in rules]
    for key in _OPTIONAL:
        value = _get(optimizer_config, key)
        if value is not _MISSING and value is not None:
            kwargs[key] = _dtype(value) if key == "compute_dtype" else value
    return kwargs


def _check_parallel_dims(parallel_dims: Any) -> None:
    world = getattr(parallel_dims, "world_size", None)
    if not isinstance(world, int) or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if world != torch.distributed.get_world_size():
        raise ValueError(
            f"parallel_dims.world_size={world} but the default process group has "
            f"{torch.distributed.get_world_size()} ranks"
        )


def _canonical(name: str) -> str:
    """TorchTitan's ``canonical_fqn``: the activation-checkpoint wrapper segment dropped from a name."""
    return ".".join(p for p in name.split(".") if p != "_checkpoint_wrapped_module")


def _claim(model: nn.Module, param_group_configs: Sequence[Any]) -> list[tuple[Any, list[str]]]:
    """TorchTitan's assignment: each trainable parameter to the first config whose pattern ``re.search``-es its
    name. Configs that claim nothing in this part are left out (the caller checks every pattern claims
    something in some part)."""
    claimed: set[str] = set()
    out = []
    for pg in param_group_configs:
        pattern = re.compile(pg.pattern)
        hits = [n for n, p in model.named_parameters() if p.requires_grad and n not in claimed and pattern.search(n)]
        claimed.update(hits)
        if hits:
            out.append((pg, hits))
    return out


def _disco_groups(
    model: nn.Module, plan: Sequence[tuple[Any, list[str]]], parallel_dims: Any
) -> tuple[list[dict[str, Any]], list[str], dict[str, Any] | None]:
    """The routed groups of every "Disco" config of one part, each group's pattern, and the constructor kwargs
    (the first config's; a later config's hyperparameters that differ are set on its own groups)."""
    groups: list[dict[str, Any]] = []
    patterns: list[str] = []
    ctor: dict[str, Any] | None = None
    for pg, hits in plan:
        kwargs = create_disco_optimizer_kwargs_from_optimizer_config(pg, parallel_dims)
        routed, cleaned = create_disco_param_groups(model, kwargs, only=hits)
        if ctor is None:
            ctor = cleaned
        own = {k: cleaned[k] for k in _GROUP_KEYS if k in cleaned and cleaned[k] != ctor.get(k, _MISSING)}
        for g in routed:
            elementwise = not rule_class(str(g.get("algorithm", "disco"))).exchanges
            for k, v in own.items():
                if not elementwise or k in _ELEMENTWISE_KEYS:
                    g.setdefault(k, v)
            g["param_names"] = [_canonical(n) for n in g["param_names"]]
            if "tied_with" in g:
                g["tied_with"] = [_canonical(n) for n in g["tied_with"]]
            groups.append(g)
            patterns.append(pg.pattern)
    return groups, patterns, ctor


def build_disco_optimizer(
    model_parts: nn.Module | Sequence[nn.Module], optimizer_config: Any, parallel_dims: Any = None
) -> list[Any]:
    """One :class:`disco.optim.disco.Disco` per model part (e.g. per pipeline stage), each over all of that
    part's trainable parameters, routed. Returns the list of optimizers in ``model_parts`` order.

    ``optimizer_config``: any form :func:`create_disco_optimizer_kwargs_from_optimizer_config` takes, e.g.
    ``torchtitan.components.optimizer.default_adamw(lr=8e-4)`` (Disco with its ``lr``, warned). To mix Disco
    with TorchTitan's own optimizers by pattern, build :class:`DiscoOptimizersContainer` instead.
    """
    from ..optim.disco import Disco  # lazily: keeps this module importable without the optimizers

    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    kwargs = create_disco_optimizer_kwargs_from_optimizer_config(optimizer_config, parallel_dims)
    optimizers = []
    for part in parts:
        groups, cleaned = create_disco_param_groups(part, kwargs)
        optimizers.append(Disco(groups, **cleaned))
    return optimizers


def disco_optimizer_config(lr: float = _DISCO.lr, *, pattern: str = r".*", **kwargs: Any) -> Any:
    """A :class:`DiscoOptimizersContainer` ``Config`` with one ``"Disco"`` group over ``pattern`` (every
    parameter by default): Disco's counterpart of ``torchtitan.components.optimizer.default_adamw``.

    ``kwargs``: Disco's hyperparameters and routing keys (module docstring), e.g. ``momentum=0.95``,
    ``vector_algorithm="adamw"``, ``extra_param_group_split_rules=[...]``. Needs ``torchtitan``.
    """
    ParamGroupConfig = _torchtitan_optimizer_module().ParamGroupConfig

    unknown = sorted(set(kwargs) - _KNOWN)
    if unknown:
        raise ValueError(f"unknown Disco optimizer kwargs {unknown}; valid: {sorted(_KNOWN)}")
    group = ParamGroupConfig(pattern=pattern, optimizer_name="Disco", optimizer_kwargs={"lr": lr, **kwargs})
    return _container_class().Config(param_groups=[group])


def _torchtitan_optimizer_module() -> Any:
    try:
        import torchtitan.components.optimizer as module
    except ImportError as e:
        raise ImportError(
            f"this needs torchtitan 0.3.0 ({e}): pip install 'disco-optim[torchtitan]' (or 'torchtitan==0.3.0')"
        ) from e
    return module


#: ``DiscoOptimizersContainer`` (a module attribute resolved on first access: it subclasses TorchTitan's class).
_CONTAINER: Any = None


def _container_class() -> Any:
    """Define :class:`DiscoOptimizersContainer` on first use (it subclasses TorchTitan's, imported then)."""
    global _CONTAINER
    if _CONTAINER is not None:
        return _CONTAINER
    from dataclasses import dataclass

    from ..optim.disco import Disco

    OptimizersContainer: Any = _torchtitan_optimizer_module().OptimizersContainer

    class DiscoOptimizersContainer(OptimizersContainer):  # type: ignore[misc]  # torchtitan, imported lazily: Any
        """TorchTitan's ``OptimizersContainer`` that also builds ``"Disco"`` param groups (module docstring of
        :mod:`disco.integrations.torchtitan`): one routed :class:`disco.Disco` per model part, TorchTitan's
        optimizers for the other names, TorchTitan's flat checkpoint format and LR schedulers."""

        @dataclass(kw_only=True, slots=True)
        class Config(OptimizersContainer.Config):  # type: ignore[misc]  # torchtitan's class: Any here
            pass

        def __init__(self, config: Any, *, model_parts: list[nn.Module], parallel_dims: Any = None) -> None:
            impl_kwargs = self._build_impl_kwargs(config)
            factory_kwargs = {_known_name(k): v for k, v in config.optimizer_factory_kwargs_by_name.items()}
            self.optimizers = []
            self.model_parts = list(model_parts)
            self.parallel_dims = parallel_dims
            all_params: list[nn.Parameter] = []
            used: set[int] = set()
            for part_idx, model in enumerate(self.model_parts):
                plan = _claim(model, config.param_groups)
                used.update(id(pg) for pg, _ in plan)
                params = dict(model.named_parameters())
                disco_plan = [(pg, hits) for pg, hits in plan if _is_disco_name(pg.optimizer_name)]
                if disco_plan:
                    groups, patterns, ctor = _disco_groups(model, disco_plan, parallel_dims)
                    assert ctor is not None and groups  # every pattern claimed at least one parameter
                    optimizer = Disco(groups, **{**ctor, **factory_kwargs.get("Disco", {})})
                    self.optimizers.append(optimizer)
                    self._log_optimizer(optimizer, part_idx, patterns)
                    all_params.extend(p for g in groups for p in g["params"])
                by_name: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}
                for pg, hits in plan:
                    if _is_disco_name(pg.optimizer_name):
                        continue
                    opt_name, cls = resolve_name(pg.optimizer_name)
                    groups_of, patterns = by_name.setdefault(opt_name, ([], []))
                    groups_of.append(
                        {
                            "params": [params[n] for n in hits],
                            "param_names": [_canonical(n) for n in hits],
                            **({} if cls is not None else impl_kwargs),  # fused / foreach: torch.optim's keys
                            **pg.optimizer_kwargs,
                        }
                    )
                    patterns.append(pg.pattern)
                for opt_name, (groups_of, patterns) in by_name.items():
                    cls = resolve_name(opt_name)[1]
                    factory = cls if cls is not None else self._resolve_optimizer_factory(opt_name)
                    optimizer = factory(groups_of, **factory_kwargs.get(opt_name, {}))
                    self.optimizers.append(optimizer)
                    self._log_optimizer(optimizer, part_idx, patterns)
                    all_params.extend(p for g in groups_of for p in g["params"])
            for pg in config.param_groups:
                if id(pg) not in used:
                    raise ValueError(f"Optimizer param_groups pattern '{pg.pattern}' matched no parameters")
            self._validate_params(all_params)
            if config.implementation == "fused_opt_states_bf16":
                self._register_bf16_optimizer_state_hook()
            self._post_init(all_params)

    DiscoOptimizersContainer.__module__ = __name__
    _CONTAINER = DiscoOptimizersContainer
    return _CONTAINER


def __getattr__(name: str) -> Any:
    if name == "DiscoOptimizersContainer":  # needs torchtitan: defined on first access
        return _container_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
