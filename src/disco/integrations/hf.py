"""Hugging Face Transformers: Disco's routing and the Muon recipe for any ``PreTrainedModel``, and ``Trainer``.

Nothing here imports ``transformers``: a model is read through ``torch.nn`` and, where it has them, the
``get_input_embeddings()`` / ``get_output_embeddings()`` methods every ``PreTrainedModel`` provides. So the
embeddings and the output head are found by what the model says they are, not by our own layer names
(``transformer.wte``, ``lm_head``, ``cls.predictions.decoder``, ``embed_out``...). Layers stored
``fan_in x fan_out`` (GPT-2's ``Conv1D``) are recognised by :mod:`disco.groups` and flagged ``transposed=True``;
a tied embedding / head (GPT-2 ties ``wte`` and ``lm_head``) is routed once and marked ``tied_with``.

Two recipes, each one line:

- **Disco** (:func:`disco_param_groups`): hidden matrices under the spectral norm, embeddings ``embed_sqrt``,
  the head ``unembed_sqrt``, vectors ``bias_rms`` (a tied embedding / head takes the head's route);
- **Muon** (:func:`muon_param_groups`): hidden matrices orthogonalized, AdamW on the embeddings, the head and
  every vector (biases, norm gains), as in Muon's reference recipe.

With ``transformers.Trainer``::

    from disco.integrations import hf
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=hf.trainer_optimizer(model, "muon", lr=0.02))

The plain ``optimizer_cls_and_kwargs=(disco.Disco, {...})`` (or ``Muon``, ``Scion``, ``NorMuon``, ``Dion``...)
gives the optimizer ``Trainer``'s own groups, without names: a group that holds a weight they would route wrong
(GPT-2's ``Conv1D``, a tied, embedding or head weight, an unrouted vector) is refused before any step, naming
the weight and this fix (:mod:`disco.groups.trainer`).

``trainer_optimizer`` returns ``(optimizer class, kwargs)`` whose ``params`` are the routed groups (``Trainer``
uses a ``params`` entry of the kwargs instead of its own weight-decay groups); build it once per ``Trainer``
(``Trainer`` pops ``params`` from the dict). ``Trainer``'s own scheduler (``lr_scheduler_type``, warmup)
scales each group's ``lr``; its ``learning_rate`` and ``weight_decay`` arguments are not used by these groups:
pass ``lr=`` / ``weight_decay=`` here.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from ..groups import create_disco_param_groups

__all__ = [
    "RECIPES",
    "disco_param_groups",
    "embedding_and_head_names",
    "muon_param_groups",
    "routing_kwargs",
    "trainer_optimizer",
]

#: ``trainer_optimizer`` recipes.
RECIPES = ("disco", "muon")

_EMBED_TYPES = (nn.Embedding, nn.EmbeddingBag)


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    name: str  # torch leaves named_modules' return type out
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _get(model: nn.Module, method: str) -> nn.Module | None:
    fn = getattr(model, method, None)
    if not callable(fn):
        return None
    try:
        out = fn()
    except (NotImplementedError, AttributeError):  # base classes without the layer
        return None
    return out if isinstance(out, nn.Module) else None


def embedding_and_head_names(model: nn.Module) -> tuple[list[str], str | None]:
    """``(embedding module paths, output head module path or None)`` of ``model``.

    Embeddings: every ``nn.Embedding`` / ``nn.EmbeddingBag`` plus ``model.get_input_embeddings()`` when it is
    another kind of module; the head: ``model.get_output_embeddings()`` when the model has one (a ``...LMHead``
    model does; a base model returns ``None``).
    """
    embeds = [n for n, m in model.named_modules() if isinstance(m, _EMBED_TYPES)]
    inp = _module_name(model, _get(model, "get_input_embeddings"))
    if inp is not None and inp not in embeds:
        embeds.append(inp)
    head = _module_name(model, _get(model, "get_output_embeddings"))
    return embeds, head


def routing_kwargs(model: nn.Module, optimizer_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``optimizer_kwargs`` (a copy) with ``name_of_embedding`` and ``name_of_output`` set from ``model``'s own
    ``get_input_embeddings()`` / ``get_output_embeddings()``, unless already given."""
    kwargs = dict(optimizer_kwargs or {})
    head = embedding_and_head_names(model)[1]
    inp = _module_name(model, _get(model, "get_input_embeddings"))
    if inp and "name_of_embedding" not in kwargs:
        kwargs["name_of_embedding"] = inp
    if head and "name_of_output" not in kwargs:
        kwargs["name_of_output"] = [head, "output", "lm_head"]
    return kwargs


def disco_param_groups(
    model: nn.Module, optimizer_kwargs: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Disco's routing of a Hugging Face model: :func:`disco.create_disco_param_groups` with the model's own
    embedding and head (:func:`routing_kwargs`). Returns ``(param_groups, cleaned_kwargs)``."""
    return create_disco_param_groups(model, routing_kwargs(model, optimizer_kwargs))


def muon_param_groups(
    model: nn.Module,
    *,
    adamw_lr: float = 3e-4,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """The Muon recipe for any model: AdamW (``adamw_*``) on the embeddings, the output head and every vector;
    the hidden matrices (2-D and 3-D, ``transposed`` where stored ``fan_in x fan_out``) in groups without a
    ``norm_factor``, so they take the optimizer's own (``disco.Muon``: ``"original"``; ``disco.Disco``:
    ``"spectral"``) and its ``lr`` / ``weight_decay``.

    Works with ``disco.Muon(groups, lr=...)`` and ``disco.Disco(groups, lr=...)``. Convolutions keep
    ``conv_spectral`` (Muon flattens them the same way). A weight tied between an embedding and the head is
    AdamW's, like both of its roles (no conflict; it is still marked ``tied_with``).
    """
    embeds, head = embedding_and_head_names(model)
    side = {
        "algorithm": "adamw",
        "lr": adamw_lr,
        "betas": tuple(adamw_betas),
        "adam_eps": adamw_eps,
        "weight_decay": adamw_weight_decay,
    }
    paths = [*embeds, *([head] if head else [])]
    rules = []
    if paths:
        alt = "|".join(re.escape(p) for p in paths if p)
        rules.append({"str_match": rf"^({alt})\.[^.]+$", **side})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tied weights", category=UserWarning)  # both roles: AdamW
        groups, _ = create_disco_param_groups(
            model, {"extra_param_group_split_rules": rules, "vector_algorithm": "adamw", "name_of_output": head}
        )
    out = []
    for g in groups:
        if g.get("algorithm") == "adamw":
            g = {**side, **{k: v for k, v in g.items() if k not in ("norm_factor", "backend")}}
        elif g.get("norm_factor") not in (None, "conv_spectral"):  # embed/unembed rows without a rule: AdamW too
            g = {**{k: v for k, v in g.items() if k not in ("norm_factor", "backend")}, **side}
        out.append(g)
    return out


def _optimizer_cls(name: str) -> Callable[..., Any]:
    from .. import Disco, Muon

    return {"disco": Disco, "muon": Muon}[name]


def trainer_optimizer(
    model: nn.Module, recipe: str = "muon", *, optimizer: Any = None, **optimizer_kwargs: Any
) -> tuple[Any, dict[str, Any]]:
    """``(optimizer class, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.

    ``recipe="muon"``: :func:`muon_param_groups` (``adamw_lr``, ``adamw_betas``, ``adamw_eps``,
    ``adamw_weight_decay`` go there) for ``disco.Muon``; ``recipe="disco"``: :func:`disco_param_groups` (routing
    keys such as ``extra_param_group_split_rules`` go there) for ``disco.Disco``. ``optimizer`` picks another
    class (``disco.Disco`` with the Muon recipe, ``disco.Scion``...). The other ``optimizer_kwargs`` are the
    optimizer's (``lr``, ``weight_decay``, ``momentum``...).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {list(RECIPES)}")
    kwargs = dict(optimizer_kwargs)
    if recipe == "muon":
        side = {k: kwargs.pop(k) for k in ("adamw_lr", "adamw_betas", "adamw_eps", "adamw_weight_decay") if k in kwargs}
        groups = muon_param_groups(model, **side)
    else:
        groups, kwargs = disco_param_groups(model, kwargs)
    cls = optimizer if optimizer is not None else _optimizer_cls(recipe)
    accepted = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        for key in ("name_of_embedding", "parallel_dims"):  # Disco's bookkeeping, not every optimizer takes it
            if key in kwargs and key not in accepted:
                kwargs.pop(key)
    return cls, {"params": groups, **kwargs}
