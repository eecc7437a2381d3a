"""Step 1 of routing: classify every trainable parameter into a :class:`Role`, from the whole model's structure.

The role says what the parameter *is* (a hidden matrix, an embedding, the output head, ...), independent of the
settings it will get; :mod:`disco.groups.routing` maps roles (and split rules) to settings. Two properties are
orthogonal to the role and recorded beside it: a tied weight (one tensor with several names) and a transposed
one (stored ``fan_in x fan_out``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_OUTPUT_NAMES = ("output", "lm_head")

#: Class names of layers whose 2-D ``weight`` is stored ``fan_in x fan_out`` (the transpose of ``nn.Linear``).
#: Matched against the names of the module's class and its bases, so no import of their library is needed.
#: ``Conv1D``: Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ImageGPT, DecisionTransformer...).
TRANSPOSED_MODULE_TYPES: set[str] = {"Conv1D"}

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBED_TYPES = (nn.Embedding, nn.EmbeddingBag)


class Role(enum.Enum):
    """What a parameter is, as far as its norm is concerned (the value is the role's name in tables)."""

    VECTOR = "vector"  # 0-D / 1-D: biases, norm gains
    EMBEDDING = "embedding"  # an nn.Embedding's weight, or one named by name_of_embedding
    OUTPUT = "output"  # the output head (by name, or guessed by shape)
    CONV = "conv"  # a convolution's weight (or any weight of 4 or more dims)
    HIDDEN = "hidden"  # any other 2-D matrix
    EXPERTS = "experts"  # any other 3-D weight: a stack of expert matrices


@dataclass(frozen=True, eq=False)
class ClassifiedParam:
    """One trainable parameter and what it is.

    Args:
        name: its first name (``model.named_parameters()``'s), under which it is routed.
        param: the tensor.
        aliases: every name of the tensor, ``name`` first (several for a tied weight).
        role: what it is.
        transposed: stored ``fan_in x fan_out`` by its module's type (:data:`TRANSPOSED_MODULE_TYPES`).
        is_embedding: it is (also) an embedding: an ``OUTPUT`` that is also an embedding is a tied head.
        guessed: the role comes from the shape alone (a head by its vocabulary-sized output, a conv by its 4 or
            more dims), not from a name or a module type, so routing warns about it.
    """

    name: str
    param: torch.Tensor
    aliases: tuple[str, ...]
    role: Role
    transposed: bool = False
    is_embedding: bool = False
    guessed: bool = False

    @property
    def tied_with(self) -> list[str]:
        """The tensor's other names (empty unless it is tied)."""
        return [a for a in self.aliases if a != self.name]


def is_transposed_module(module: nn.Module) -> bool:
    """Whether ``module`` stores its 2-D ``weight`` as ``fan_in x fan_out`` (:data:`TRANSPOSED_MODULE_TYPES`).

    Hugging Face's ``Conv1D`` also records ``nx`` (in) and ``nf`` (out); when a module has both, its weight must
    be ``nx x nf``, so a same-named layer of another library with another layout is not mistaken for it.

    Args:
        module: any module.
    """
    if not any(c.__name__ in TRANSPOSED_MODULE_TYPES for c in type(module).__mro__):
        return False
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    if isinstance(nx, int) and isinstance(nf, int):
        return tuple(weight.shape) == (nx, nf)
    return True


def as_names(value: str | Iterable[str] | None, default: Sequence[str]) -> list[str]:
    """``name_of_embedding`` / ``name_of_output`` as a list of names (``default`` when unset)."""
    if value is None:
        return list(default)
    if isinstance(value, str):
        return [value]
    return list(value)


def _component_re(names: Iterable[str]) -> re.Pattern[str] | None:
    """A regex for names that contain one of ``names`` as whole dotted components (``a.tok_embeddings.w``)."""
    names = [n for n in names if n]
    if not names:
        return None
    alt = "|".join(re.escape(n) for n in names)
    return re.compile(rf"(^|\.)({alt})(\.|$)")


class _ModelIndex:
    """What classification reads from the whole model: every name and owning module of each tensor, the
    transposed weights, the vocabulary sizes and the output head (named, or guessed by shape)."""

    def __init__(self, model: nn.Module, embedding_names: Sequence[str], output_names: Sequence[str]) -> None:
        self.names: dict[int, list[str]] = {}
        self.owners: dict[int, list[nn.Module]] = {}
        self.transposed: set[int] = set()
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for attr, p in module.named_parameters(recurse=False):
                full = f"{mod_name}.{attr}" if mod_name else attr
                aliases = self.names.setdefault(id(p), [])
                if full not in aliases:
                    aliases.append(full)
                self.owners.setdefault(id(p), []).append(module)
                if attr == "weight" and is_transposed_module(module):
                    self.transposed.add(id(p))
        self.embed_re = _component_re(embedding_names)
        self.output_names = list(output_names)
        self.guessed_head = self._guess_head(model)

    def is_embedding(self, p: torch.Tensor) -> bool:
        return any(isinstance(m, _EMBED_TYPES) for m in self.owners.get(id(p), [])) or self.is_embedding_by_name(p)

    def is_output_by_name(self, p: torch.Tensor) -> bool:
        dotted = [n for n in self.output_names if "." in n]
        for alias in self.names[id(p)]:
            parts = alias.split(".")
            if parts[-1] in self.output_names or (len(parts) > 1 and parts[-2] in self.output_names):
                return True
            if any(alias == n or alias.rpartition(".")[0] == n for n in dotted):
                return True  # a dotted module path (e.g. Hugging Face's get_output_embeddings()'s)
        return False

    def is_conv(self, p: torch.Tensor) -> bool:
        return any(isinstance(m, _CONV_TYPES) for m in self.owners.get(id(p), []))

    def _guess_head(self, model: nn.Module) -> int | None:
        """Without a head named as such, the last ``nn.Linear`` whose out_features is a vocabulary size."""
        if any(p.dim() == 2 and self.is_output_by_name(p) for p in model.parameters()):
            return None
        vocab_sizes = {m.num_embeddings for _, m in model.named_modules() if isinstance(m, _EMBED_TYPES)}
        if self.embed_re is not None:
            vocab_sizes |= {p.shape[0] for p in model.parameters() if p.dim() == 2 and self.is_embedding_by_name(p)}
        guessed = None
        for _, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.out_features in vocab_sizes:
                guessed = id(module.weight)
        return guessed

    def is_embedding_by_name(self, p: torch.Tensor) -> bool:
        return self.embed_re is not None and any(self.embed_re.search(a) for a in self.names[id(p)])

    def classify(self, name: str, p: torch.Tensor) -> ClassifiedParam:
        """The role of trainable parameter ``p`` (first name ``name``); the order of the tests is the priority."""
        aliases = tuple(self.names.get(id(p), [name]))
        is_embedding = self.is_embedding(p)
        by_name = p.dim() == 2 and self.is_output_by_name(p)
        is_head = by_name or (p.dim() == 2 and id(p) == self.guessed_head)
        guessed = False
        if p.dim() < 2:
            role = Role.VECTOR
        elif is_head and (not is_embedding or len(aliases) > 1):  # tied to an embedding: the head's route
            role, guessed = Role.OUTPUT, not by_name
        elif is_embedding:
            role = Role.EMBEDDING
        elif self.is_conv(p):
            role = Role.CONV
        elif p.dim() >= 4:
            role, guessed = Role.CONV, True
        else:
            role = Role.HIDDEN if p.dim() == 2 else Role.EXPERTS
        transposed = p.dim() >= 2 and id(p) in self.transposed
        return ClassifiedParam(name, p, aliases, role, transposed, is_embedding, guessed)


def classify_parameters(
    model: nn.Module,
    *,
    name_of_embedding: str | Iterable[str] | None = None,
    name_of_output: str | Iterable[str] | None = None,
    only: Collection[str] | None = None,
) -> list[ClassifiedParam]:
    """Classify ``model``'s trainable parameters, in model order (a tied tensor once, under its first name).

    Args:
        model: the whole model; it is read in full (embeddings, heads, layer types, ties) even with ``only``.
        name_of_embedding: dotted name component(s) of embedding weights that are no ``nn.Embedding``'s.
        name_of_output: the head's name(s) or dotted module path(s); default ``output`` / ``lm_head``.
        only: classify just the parameters with one of these names (any name of a tied weight).
    """
    index = _ModelIndex(model, as_names(name_of_embedding, ()), as_names(name_of_output, DEFAULT_OUTPUT_NAMES))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # deduplicated, first name
    if only is not None:
        wanted = set(only)
        params = [(n, p) for n, p in params if any(a in wanted for a in index.names.get(id(p), [n]))]
    return [index.classify(n, p) for n, p in params]
