"""TorchTitan integration: turn a TorchTitan-style optimizer config into Disco kwargs and optimizers.

TorchTitan is not a dependency: the config is duck-typed (any object with attributes, or a mapping). Read:

=================================  ====================  ====================================================
attribute                          default               note
=================================  ====================  ====================================================
``name``                           ``"Disco"``           anything but ``Disco`` warns (Disco is built anyway)
``lr``                             required
``eps``                            ``1e-7``
``weight_decay``                   ``0.0``
``momentum``                       ``0.95``
``nesterov``                       ``True``              ``False`` when ``is_light`` is set and this is unset
``norm_factor``                    ``"spectral"``
``backend``                        ``"newtonschulz5"``
``backend_steps``                  ``5``
``is_light``                       ``False``
``extra_param_group_split_rules``  ``[]``                a list of dicts, or its JSON string
``name_of_embedding``              ``"tok_embeddings"``
``vector_algorithm``               unset                 forwarded only when set (a routing key)
``name_of_output``                 unset                 forwarded only when set (a routing key)
=================================  ====================  ====================================================

TorchTitan 0.3.0 gives an optimizer builder no ``ParallelDims``, so ``parallel_dims`` is optional everywhere:
``None`` becomes a :class:`~disco.dummy_parallel_dims.DummyParallelDims`. Disco reads each parameter's layout
from the parameter (DTensor mesh and placements), so nothing is lost.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..dummy_parallel_dims import DummyParallelDims
from ..groups import create_disco_param_groups
from ..optim.defaults import DISCO_DEFAULTS as _DISCO

_MISSING = object()

# Disco's own defaults (one source: disco.optim.defaults), less the lr the config must give.
DISCO_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in _DISCO.as_dict().items() if k != "lr"},
    "name_of_embedding": "tok_embeddings",
}

_OPTIONAL_ROUTING = ("vector_algorithm", "name_of_output")


def _get(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, _MISSING)
    return getattr(config, key, _MISSING)


def create_disco_optimizer_kwargs_from_optimizer_config(
    optimizer_config: Any, parallel_dims: Any = None
) -> dict[str, Any]:
    """The ``optimizer_kwargs`` for :func:`disco.groups.create_disco_param_groups` from a TorchTitan-style
    optimizer config (see the module docstring for the attributes read and their defaults)."""
    name = _get(optimizer_config, "name")
    if name is not _MISSING and name is not None and str(name).lower() != "disco":
        warnings.warn(
            f"optimizer_config.name={name!r}: building Disco with the config's hyperparameters anyway "
            "(route parameters to other algorithms with extra_param_group_split_rules' 'algorithm')",
            UserWarning,
            stacklevel=2,
        )
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
    for key in _OPTIONAL_ROUTING:
        value = _get(optimizer_config, key)
        if value is not _MISSING and value is not None:
            kwargs[key] = value
    return kwargs


def build_disco_optimizer(
    model_parts: nn.Module | Sequence[nn.Module], optimizer_config: Any, parallel_dims: Any = None
) -> list[Any]:
    """One :class:`disco.optim.disco.Disco` per model part (e.g. per pipeline stage), each over that part's
    routed parameter groups. Returns the list of optimizers in ``model_parts`` order."""
    from ..optim.disco import Disco  # lazily: keeps this module importable without the optimizers

    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    kwargs = create_disco_optimizer_kwargs_from_optimizer_config(optimizer_config, parallel_dims)
    optimizers = []
    for part in parts:
        groups, cleaned = create_disco_param_groups(part, kwargs)
        optimizers.append(Disco(groups, **cleaned))
    return optimizers
