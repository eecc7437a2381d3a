"""Split rules: the typed, validated form of ``extra_param_group_split_rules``' entries.

A rule is written as a dict, ``{"str_match": REGEX, SETTING: VALUE, ...}`` (the seed's form, also accepted as a
JSON string), or as a :class:`SplitRule`. Either way it is checked once, when the rules are compiled, so a typo
or a wrong type is reported naming the rule, before any parameter is routed.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from ..ops import BACKENDS, get_norm

if TYPE_CHECKING:
    from ..optim.contract import Rule, Settings

#: keys of ``optimizer_kwargs`` that only steer routing; ``create_disco_param_groups`` removes them.
ROUTING_KEYS = ("extra_param_group_split_rules", "vector_algorithm", "name_of_output")

#: Keys that routing itself writes into a group; a rule may not set them.
RESERVED_KEYS = ("params", "param_names", "tied_with")

#: Settings that name something (a norm, a backend, an algorithm): a string, or ``None`` for the default.
NAME_SETTINGS = ("algorithm", "norm_factor", "backend")


def _registry() -> Mapping[str, type[Rule]]:
    from .. import optim  # noqa: F401  (imports, and so registers, the built-in rules)
    from ..optim.contract import RULES

    return RULES


def _settings_classes() -> list[type[Settings]]:
    return [cls.settings_for(name) for name, cls in _registry().items()]


def known_algorithms() -> tuple[str, ...]:
    """Values of a group's ``algorithm``: every algorithm a registered rule serves."""
    return tuple(sorted(_registry()))


def vector_algorithms() -> tuple[str, ...]:
    """Algorithms ``vector_algorithm`` may name: those of the element-wise rules (rules that exchange nothing)."""
    return tuple(sorted(name for name, cls in _registry().items() if not cls.exchanges))


def group_settings() -> frozenset[str]:
    """Group settings a split rule may set: ``algorithm`` and every key (or alias) a registered rule reads.

    A key outside this set would reach the optimizer as a setting that nothing reads, so a rule refuses it as soon
    as the rules are compiled.
    """
    keys = {"algorithm"}
    for settings in _settings_classes():
        keys.update(settings.keys(), settings.aliases)
    return frozenset(keys)


def number_settings() -> frozenset[str]:
    """Settings whose type is a real number (a float field of some rule's settings), range-checked by the rule."""
    numbers_ = set()
    for settings in _settings_classes():
        for key, hint in typing.get_type_hints(settings).items():
            union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
            if float in (typing.get_args(hint) if union else (hint,)):
                numbers_.add(key)
    return frozenset(numbers_)


def __getattr__(name: str) -> Any:
    # the seed-era constants, now read from the registry (a rule registered later is included)
    derived = {"ALGORITHMS": known_algorithms, "VECTOR_ALGORITHMS": vector_algorithms, "GROUP_SETTINGS": group_settings}
    if name in derived:
        return derived[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def validate_overrides(overrides: Mapping[str, Any], where: str) -> None:
    """Check the values of the settings routing reads: a known norm, backend and algorithm, a boolean ``transposed``.

    Args:
        overrides: group settings (a rule's, or the optimizer kwargs).
        where: how error messages name their source.

    Raises:
        ValueError: naming ``where``, the setting and its valid values.
    """
    if overrides.get("norm_factor") is not None:
        try:
            get_norm(overrides["norm_factor"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if overrides.get("backend") is not None and overrides["backend"] not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {overrides['backend']!r}; valid: {sorted(BACKENDS)}")
    if overrides.get("algorithm") is not None and overrides["algorithm"] not in known_algorithms():
        raise ValueError(f"{where}: unknown algorithm {overrides['algorithm']!r}; valid: {list(known_algorithms())}")
    if "transposed" in overrides and not isinstance(overrides["transposed"], bool):
        raise ValueError(f"{where}: 'transposed' must be True or False, got {overrides['transposed']!r}")


def _check_setting_names(overrides: Mapping[Any, Any], where: str) -> None:
    """Refuse keys a rule may not set: not strings, reserved for routing, or read by no optimizer."""
    for key in overrides:
        if not isinstance(key, str):
            raise TypeError(f"{where}: setting names are strings, got {key!r} ({type(key).__name__})")
    if any(key in overrides for key in RESERVED_KEYS):
        raise ValueError(f"{where}: a rule may not set 'params', 'param_names' or 'tied_with'")
    accepted = group_settings()
    unknown = sorted(key for key in overrides if key not in accepted)
    if unknown:
        raise ValueError(
            f"{where}: unknown setting(s) {unknown} (no optimizer reads them); a rule may set: "
            f"{', '.join(sorted(accepted))}"
        )


def _check_setting_types(overrides: Mapping[str, Any], where: str) -> None:
    """Refuse values of the wrong type for settings whose type is fixed (names, numbers)."""
    for key in NAME_SETTINGS:
        value = overrides.get(key)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{where}: {key!r} must be a name (a string), got {value!r} ({type(value).__name__})")
    for key in sorted(number_settings().intersection(overrides)):
        value = overrides[key]
        is_number = isinstance(value, (numbers.Real, torch.Tensor)) and not isinstance(value, bool)
        if value is not None and not is_number:
            raise TypeError(f"{where}: {key!r} must be a number, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class SplitRule:
    """One entry of ``extra_param_group_split_rules``: the parameters it matches and the settings they get.

    Construction validates the rule, so an instance is always usable. The parameters it matches form one group
    with ``overrides`` as its settings (the optimizer's defaults fill in the rest).

    Args:
        str_match: a regex, ``re.search``-ed against every name of a parameter (a tied weight has several); a
            string, or an already compiled pattern.
        overrides: the group settings, each one of :data:`GROUP_SETTINGS`; a name (``algorithm``,
            ``norm_factor``, ``backend``) must be known, a number setting a number, ``transposed`` a bool.
        label: how error messages and warnings name the rule; :func:`compile_split_rules` sets it to the rule's
            place in the list (``extra_param_group_split_rules[i] (str_match=...)``).

    Raises:
        TypeError: ``str_match`` is not a regex, ``overrides`` is not a mapping, or a setting has the wrong type.
        ValueError: the regex does not compile, or a setting is reserved, unknown or has an invalid value.
    """

    str_match: str | re.Pattern[str]
    overrides: Mapping[str, Any] = field(default_factory=dict, hash=False)
    label: str = field(default="", compare=False)
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = self.where
        if not isinstance(self.str_match, (str, re.Pattern)):
            raise TypeError(f"{where}: 'str_match' must be a regex string, got {type(self.str_match).__name__}")
        try:
            pattern = re.compile(self.str_match)
        except re.error as e:
            raise ValueError(f"{where}: invalid regex: {e}") from None
        if not isinstance(self.overrides, Mapping):
            raise TypeError(f"{where}: overrides must be a mapping, got {type(self.overrides).__name__}")
        _check_setting_names(self.overrides, where)
        _check_setting_types(self.overrides, where)
        validate_overrides(self.overrides, where)
        # frozen: set through object.__setattr__; a read-only copy, so the caller's dict can change freely
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        object.__setattr__(self, "pattern", pattern)

    @property
    def where(self) -> str:
        """The rule as messages name it."""
        return self.label or f"SplitRule(str_match={self.str_match!r})"

    @classmethod
    def from_dict(cls, rule: Mapping[str, Any], label: str = "") -> SplitRule:
        """Build a rule from the seed's form, ``{"str_match": REGEX, SETTING: VALUE, ...}``.

        Args:
            rule: the dict; ``str_match`` is required, every other key is a setting.
            label: how messages name the rule (see :class:`SplitRule`).
        """
        return cls(rule["str_match"], {k: v for k, v in rule.items() if k != "str_match"}, label)

    def matches(self, names: Iterable[str]) -> bool:
        """Whether the regex is found in any of ``names`` (every name of one parameter)."""
        return any(self.pattern.search(name) for name in names)


def compile_split_rules(rules: Any) -> list[SplitRule]:
    """Validate ``extra_param_group_split_rules`` into :class:`SplitRule` s, labelled by their place in the list.

    Args:
        rules: ``None``, a rule, a list of rules, or the JSON string of either; a rule is a dict with a
            ``str_match`` key or a :class:`SplitRule`.

    Raises:
        ValueError, TypeError: naming the first invalid rule (see :class:`SplitRule`).
    """
    if rules is None:
        return []
    if isinstance(rules, str):
        try:
            rules = json.loads(rules)
        except json.JSONDecodeError as e:
            raise ValueError(f"extra_param_group_split_rules is a string but not valid JSON: {e}") from None
    if isinstance(rules, (Mapping, SplitRule)):
        rules = [rules]
    if not isinstance(rules, (list, tuple)):
        raise TypeError(
            f"extra_param_group_split_rules must be a rule (a dict with a 'str_match' regex), a list of rules or "
            f"their JSON string, got {rules!r} ({type(rules).__name__})"
        )
    compiled = []
    for i, rule in enumerate(rules):
        if isinstance(rule, SplitRule):
            label = f"extra_param_group_split_rules[{i}] (str_match={rule.str_match!r})"
            compiled.append(dataclasses.replace(rule, label=label))
            continue
        if not isinstance(rule, Mapping) or "str_match" not in rule:
            raise ValueError(f"extra_param_group_split_rules[{i}] must be a dict with a 'str_match' regex: {rule!r}")
        label = f"extra_param_group_split_rules[{i}] (str_match={rule['str_match']!r})"
        compiled.append(SplitRule.from_dict(rule, label))
    return compiled
