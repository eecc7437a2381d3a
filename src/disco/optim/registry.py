"""Optimizer registry: a name -> builder table for the training CLI and the benchmarks.

A builder turns a model into a ready optimizer::

    @register_optimizer("adamw", default_lr=1e-3, doc="torch.optim.AdamW, decay on matrices only")
    def build_adamw(model, *, lr, weight_decay=0.0, **kwargs):
        ...

Optimizer modules register themselves when ``disco.optim`` is imported; the CLI never names them.
A builder may also declare the keywords ``mesh`` (the training ``DeviceMesh`` or ``None``) and
``parallel`` (``"none"``, ``"ddp"``, ``"fsdp"``, ...) to learn the layout it runs under; it only gets
them when it names them explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Builder = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    build: Builder
    default_lr: float
    doc: str = ""
    init: str | None = None  # a ``disco.init`` scheme the optimizer wants its matrices initialised with
    layout_dependent: bool = False  # its steps depend on how parameters are sharded, by design (MuonBP)


_REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(
    name: str, *, default_lr: float, doc: str = "", init: str | None = None, layout_dependent: bool = False
) -> Callable[[Builder], Builder]:
    """Decorator: register ``build(model, *, lr, weight_decay=0.0, **kwargs) -> Optimizer`` as ``name``."""

    def decorator(build: Builder) -> Builder:
        old = _REGISTRY.get(name)
        same = old is not None and (old.build.__module__, old.build.__qualname__) == (
            build.__module__,
            build.__qualname__,
        )
        if old is not None and not same:
            raise ValueError(f"optimizer {name!r} is already registered by {old.build.__module__}")
        text = doc or (build.__doc__ or "")
        _REGISTRY[name] = OptimizerSpec(name, build, float(default_lr), text, init, layout_dependent)
        return build

    return decorator


def unregister_optimizer(name: str) -> None:
    """Remove ``name`` (for tests that register a temporary optimizer)."""
    _REGISTRY.pop(name, None)


def get_optimizer_spec(name: str) -> OptimizerSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(optimizer_names()) or '(none)'}")
    return _REGISTRY[name]


def optimizer_names() -> list[str]:
    return sorted(_REGISTRY)


def matrix_and_other_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (ndim >= 2, the rest), in module order."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]


@register_optimizer("adamw", default_lr=1e-3, doc="torch.optim.AdamW (betas 0.9/0.95), weight decay on matrices only")
def build_adamw(model: nn.Module, *, lr: float, weight_decay: float = 0.0, **kwargs: Any) -> torch.optim.Optimizer:
    matrices, others = matrix_and_other_params(model)
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]
    kwargs.setdefault("betas", (0.9, 0.95))
    # foreach kernels cannot mix DTensors with plain tensors (tensor parallelism leaves norms unsharded)
    if len({type(p) for p in matrices + others}) > 1:
        kwargs.setdefault("foreach", False)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **kwargs)
