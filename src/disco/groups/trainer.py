"""Hugging Face ``Trainer``'s own parameter groups: refused where they would route a parameter wrong.

``transformers.Trainer.create_optimizer`` calls ``optimizer_cls(groups, **kwargs)`` with its two weight-decay
groups of bare tensors: no names, so an optimizer cannot tell an embedding, the output head, a weight tied
between them or a layer stored ``fan_in x fan_out`` (GPT-2's ``Conv1D``) from a hidden ``fan_out x fan_in``
matrix, and would give them a hidden matrix's update (for ``Conv1D`` the inverse size, for the tied ``wte`` a
spectral update). The optimizer gets no model, but ``Trainer`` has one: when an unnamed group is added from
inside ``create_optimizer`` (found on the call stack: the cheapest signal that is always there, whatever the
``transformers`` version), the model is read from that frame, its parameters are classified as
:func:`disco.groups.classify_parameters` does, and a group holding one that the plain group would route wrong is
refused with the fix: ``disco.integrations.hf.trainer_optimizer``. Groups of hidden matrices only (and vectors
in a group that routes vectors) pass, so a model without embeddings still trains with the plain class.

Nothing here imports ``transformers``; outside ``Trainer.create_optimizer`` it costs one walk up a few frames.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from torch import Tensor, nn

from .roles import Role, classify_parameters

__all__ = ["FIX", "check_trainer_group", "trainer_model"]

#: what a refusal tells the user to write instead (``{cls}``: the optimizer's class name)
FIX = (
    "optimizer_cls_and_kwargs=disco.integrations.hf.trainer_optimizer(model, 'muon', optimizer=disco.{cls}, "
    "lr=...), which routes by the model's own names (recipe 'muon': AdamW on the embeddings, the head and the "
    "vectors; recipe 'disco': Disco's norms for them)"
)

_DEPTH = 24  # frames from add_param_group up to Trainer.create_optimizer: about 7 in transformers 4.4x-5.x
_VECTOR_NORMS = ("bias_rms", "sign")


def _is_trainer(obj: Any) -> bool:
    return any(c.__name__ == "Trainer" and c.__module__.startswith("transformers.") for c in type(obj).__mro__)


def trainer_model(depth: int = _DEPTH) -> nn.Module | None:
    """The model of the ``transformers.Trainer`` whose ``create_optimizer`` is on the call stack, else None."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code.co_name == "create_optimizer" and _is_trainer(frame.f_locals.get("self")):
            model = frame.f_locals.get("opt_model")
            if not isinstance(model, nn.Module):
                model = getattr(frame.f_locals["self"], "model", None)
            return model if isinstance(model, nn.Module) else None
        frame = frame.f_back
    return None


def check_trainer_group(
    optimizer: str, params: Sequence[Tensor], group: dict[str, Any], defaults: dict[str, Any]
) -> None:
    """Refuse an unnamed group built by ``Trainer.create_optimizer`` that holds a parameter it would route wrong.

    Args:
        optimizer: the optimizer's class name, for the message.
        params: the group's tensors (unnamed).
        group: the group as given (its ``norm_factor`` / ``algorithm`` say whether vectors are routed).
        defaults: the optimizer's defaults (what the group's missing keys become).

    Raises:
        ValueError: naming the first such parameter by its name in the model, its shape and why, and the fix.
    """
    model = trainer_model()
    if model is None or not params:
        return
    ids = {id(p) for p in params}
    vectors_routed = _routes_vectors(group, defaults)
    for c in classify_parameters(model):
        if id(c.param) not in ids:
            continue
        why = None
        if c.transposed:
            why = f"it is stored fan_in x fan_out by {_owner_type(model, c.name)} (the update would be transposed)"
        elif c.tied_with:
            why = f"it is tied with {', '.join(c.tied_with)} (embedding and head share it)"
        elif c.role in (Role.EMBEDDING, Role.OUTPUT):
            why = f"it is the model's {'embedding' if c.role is Role.EMBEDDING else 'output head'}"
        elif c.role is Role.VECTOR and not vectors_routed:
            why = "it is a vector (bias or norm gain), which this group's matrix update does not take"
        if why is not None:
            raise ValueError(
                f"{optimizer}: transformers.Trainer passed its own parameter groups, without names, so "
                f"{c.name!r} (shape {tuple(c.param.shape)}) would get a hidden matrix's update, but {why}; "
                f"use {FIX.format(cls=optimizer)}"
            )


def _routes_vectors(group: dict[str, Any], defaults: dict[str, Any]) -> bool:
    from ..optim.contract import RULES

    algo = group.get("algorithm", defaults.get("algorithm"))
    rule = RULES.get(algo) if isinstance(algo, str) else None
    if rule is not None and not rule.exchanges:  # element-wise (AdamW, Lion): any shape
        return True
    return group.get("norm_factor", defaults.get("norm_factor")) in _VECTOR_NORMS


def _owner_type(model: nn.Module, name: str) -> str:
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return type(owner).__name__
