"""Step 2 of routing: classified parameters -> parameter groups, through the split rules, then the roles.

A parameter that a rule matches joins that rule's group (the first matching rule wins); any other one takes its
role's automatic route (:data:`AUTO_ROUTES`). Tied and transposed weights get groups of their own.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .roles import DEFAULT_OUTPUT_NAMES, ClassifiedParam, Role, as_names, classify_parameters
from .rules import SplitRule, compile_split_rules, validate_overrides, vector_algorithms

#: The automatic routes: each route's group settings (vectors' are chosen per call, see ``vector_algorithm``).
AUTO_ROUTES: dict[str, dict[str, Any]] = {
    "default": {},
    "conv": {"norm_factor": "conv_spectral"},
    "embedding": {"norm_factor": "embed_sqrt", "backend": "identity"},
    "output": {"norm_factor": "unembed_sqrt", "backend": "identity"},
    "vector": {"norm_factor": "bias_rms", "backend": "identity"},
}

#: The automatic route of each role: hidden matrices and expert stacks share the default group.
ROUTE_OF_ROLE = {
    Role.VECTOR: "vector",
    Role.EMBEDDING: "embedding",
    Role.OUTPUT: "output",
    Role.CONV: "conv",
    Role.HIDDEN: "default",
    Role.EXPERTS: "default",
}


@dataclass
class RoutingNotes:
    """What routing warns about: choices made without the user's word, or words that chose nothing.

    Args:
        unmatched_rules: the rules (as :attr:`SplitRule.where` names them) that match no trainable parameter.
        heads_by_shape: parameters routed as the output head by their shape alone.
        convs_by_dims: parameters routed as convolution weights by their number of dims alone.
        tied: one line per automatically routed tied weight: its names and the route taken.
    """

    unmatched_rules: list[str] = field(default_factory=list)
    heads_by_shape: list[str] = field(default_factory=list)
    convs_by_dims: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)

    def note_automatic(self, item: ClassifiedParam, route: str) -> None:
        """Record what is worth a warning about ``item``, routed automatically to ``route``."""
        if item.guessed and item.role is Role.OUTPUT:
            self.heads_by_shape.append(item.name)
        if item.guessed and item.role is Role.CONV:
            self.convs_by_dims.append(item.name)
        if item.tied_with:
            tied_head = item.role is Role.OUTPUT and item.is_embedding
            what = "the output head (tied to an embedding)" if tied_head else f"a {route} weight"
            self.tied.append(f"{' = '.join(item.aliases)} -> {what}")

    def warn(self, stacklevel: int) -> None:
        """Issue the warnings, attributed ``stacklevel`` frames up (the caller of the public function)."""
        for where in self.unmatched_rules:
            warnings.warn(f"{where} matches no trainable parameter", UserWarning, stacklevel=stacklevel)
        if self.heads_by_shape:
            warnings.warn(
                "routed as output head by shape (out_features == an embedding's vocabulary size), not by name: "
                f"{self.heads_by_shape}; set 'name_of_output' or add an extra_param_group_split_rules entry to be "
                "explicit",
                UserWarning,
                stacklevel=stacklevel,
            )
        if self.convs_by_dims:
            warnings.warn(
                f"routed as convolution weights (conv_spectral) by their >= 4 dims only: {self.convs_by_dims}",
                UserWarning,
                stacklevel=stacklevel,
            )
        if self.tied:
            warnings.warn(
                f"tied weights, each routed once: {'; '.join(self.tied)} (a weight shared by an embedding and the "
                "output head takes the head's route); add an extra_param_group_split_rules entry matching one of "
                "the names to choose another",
                UserWarning,
                stacklevel=stacklevel,
            )


class _GroupCollector:
    """Parameter groups in the order of their first parameter; empty ones never exist."""

    def __init__(self) -> None:
        self._groups: dict[Hashable, tuple[dict[str, Any], list[torch.Tensor], list[str]]] = {}

    def add(self, key: Hashable, overrides: Mapping[str, Any], item: ClassifiedParam) -> None:
        """Add ``item`` to the group of ``key`` (a rule's or a route's) with ``overrides`` as its settings; a
        transposed weight and each tied weight go to a group of their own."""
        settings = dict(overrides)
        if item.transposed and "transposed" not in settings:
            settings["transposed"] = True
        if settings.get("transposed") and item.param.dim() not in (2, 3):
            raise ValueError(
                f"parameter {item.name!r} with shape {tuple(item.param.shape)}: 'transposed' needs a matrix (2-D, "
                "or a 3-D stack)"
            )
        key = (key, bool(settings.get("transposed")))
        if item.tied_with:  # a group of its own, marked with its other names
            settings["tied_with"] = item.tied_with
            key = (key, "tied", item.name)
        group = self._groups.setdefault(key, (settings, [], []))
        group[1].append(item.param)
        group[2].append(item.name)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": ps, "param_names": ns, **settings} for settings, ps, ns in self._groups.values()]


def route_parameters(
    classified: Sequence[ClassifiedParam], rules: Sequence[SplitRule], vector_algorithm: str | None = None
) -> tuple[list[dict[str, Any]], RoutingNotes]:
    """Route classified parameters into parameter groups: the first matching rule, else the role's route.

    Args:
        classified: the parameters (:func:`classify_parameters`), in model order.
        rules: the split rules, in priority order.
        vector_algorithm: an element-wise algorithm for the automatically routed vectors, or ``None`` for
            ``bias_rms``.

    Returns:
        ``(param_groups, notes)``: the groups in the order of their first parameter, and what to warn about.

    Raises:
        ValueError: a parameter that is no matrix would be ``transposed``.
    """
    collector = _GroupCollector()
    notes = RoutingNotes()
    hits = [0] * len(rules)
    vector_settings = {"algorithm": vector_algorithm} if vector_algorithm else AUTO_ROUTES["vector"]
    for item in classified:
        rule = next((i for i, r in enumerate(rules) if r.matches(item.aliases)), None)
        if rule is not None:
            hits[rule] += 1
            collector.add(("rule", rule), rules[rule].overrides, item)
            continue
        route = ROUTE_OF_ROLE[item.role]
        notes.note_automatic(item, route)
        collector.add(route, vector_settings if item.role is Role.VECTOR else AUTO_ROUTES[route], item)
    notes.unmatched_rules = [rule.where for rule, n in zip(rules, hits) if n == 0]
    return collector.param_groups(), notes


def create_disco_param_groups(
    model: nn.Module, optimizer_kwargs: dict[str, Any], *, only: Collection[str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Route ``model``'s trainable parameters into parameter groups; see :mod:`disco.groups`.

    Classifies the parameters (:func:`classify_parameters`), routes them through the split rules and the roles'
    routes (:func:`route_parameters`), and warns about guesses, ties and rules that match nothing.

    Args:
        model: the model; read in full to recognise embeddings, heads, layer types and ties.
        optimizer_kwargs: the optimizer's keyword arguments plus the routing-only keys (:data:`ROUTING_KEYS`);
            not modified.
        only: route just the parameters with one of these names (``model.named_parameters()``'s, or any name
            of a tied weight), e.g. those a TorchTitan ``ParamGroupConfig`` pattern claimed.

    Returns:
        ``(param_groups, cleaned_kwargs)``, ``cleaned_kwargs`` being a copy of ``optimizer_kwargs`` without the
        routing-only keys, ready for ``Disco(param_groups, **cleaned_kwargs)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"create_disco_param_groups needs an nn.Module, got {type(model).__name__}")
    kwargs = dict(optimizer_kwargs)
    rules = compile_split_rules(kwargs.pop("extra_param_group_split_rules", None))
    vector_algorithm = kwargs.pop("vector_algorithm", None)
    output_names = as_names(kwargs.pop("name_of_output", None), DEFAULT_OUTPUT_NAMES)
    if vector_algorithm is not None and vector_algorithm not in vector_algorithms():
        raise ValueError(f"unknown vector_algorithm {vector_algorithm!r}; valid: {list(vector_algorithms())}")
    validate_overrides(kwargs, "optimizer_kwargs")
    classified = classify_parameters(
        model, name_of_embedding=kwargs.get("name_of_embedding"), name_of_output=output_names, only=only
    )
    param_groups, notes = route_parameters(classified, rules, vector_algorithm)
    notes.warn(stacklevel=3)  # this function's caller: here <- warn <- warnings.warn
    return param_groups, kwargs


def split_vector_params(
    param_group: dict[str, Any], vector_overrides: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Split a plain parameter group (e.g. one of Hugging Face ``Trainer``'s weight-decay groups, which mix
    matrices with biases and norm gains) into its matrices and its 0-D / 1-D tensors.

    The vectors get ``vector_overrides`` (default ``{"norm_factor": "bias_rms", "backend": "identity"}``, as
    :func:`create_disco_param_groups` routes them); every other key of the group is kept on both parts. A group
    that already chose a norm or an algorithm for its members (``norm_factor`` or ``algorithm`` set), or that
    holds no vector, is returned unchanged (as the one element of the list). ``param_names``, when present,
    are split alongside. A group of vectors only comes back as one group with ``vector_overrides`` added.

    Args:
        param_group: a torch parameter group; ``params`` may be tensors, ``(name, tensor)`` pairs or a
            generator (read once, into a list).
        vector_overrides: the vectors' settings.
    """
    if "norm_factor" in param_group or "algorithm" in param_group:
        return [param_group]
    params = param_group["params"]
    if not isinstance(params, (torch.Tensor, list, tuple)):  # a generator (model.parameters()): read it once
        param_group = {**param_group, "params": list(params)}
        params = param_group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    named = bool(params) and all(isinstance(p, tuple) for p in params)
    names = param_group.get("param_names")
    tensors = [p[1] if named else p for p in params]
    vec = [i for i, t in enumerate(tensors) if t.dim() < 2]
    if not vec:
        return [param_group]
    vec_set = set(vec)
    mat = [i for i in range(len(params)) if i not in vec_set]
    rest = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
    vector = dict(AUTO_ROUTES["vector"]) if vector_overrides is None else dict(vector_overrides)
    out = []
    for idx, extra in ((mat, {}), (vec, vector)):
        if idx:
            g = {**rest, **extra, "params": [params[i] for i in idx]}
            if names is not None:
                g["param_names"] = [list(names)[i] for i in idx]
            out.append(g)
    return out
