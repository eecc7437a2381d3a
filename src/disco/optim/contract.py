"""The rule contract: typed settings, declared capabilities, one registry.

A rule serves one or more ``algorithm`` names and declares, in one place:

* its **settings**: a frozen dataclass (subclass of :class:`Settings`) of every group key it reads, with
  defaults and ranges. A group is parsed once when it is added: a key that the group's rule does not read is
  refused (``ValueError`` naming the group, its first parameter, the key, the accepted keys and the closest
  one); values are type-checked (``TypeError``) and range-checked (``ValueError``) there, not at the first step.
  Keys filled in from the optimizer's defaults are not the user's choice for this group and are not refused
  (a ``Dion`` optimizer's ``mu`` in one of its AdamW groups);
* its **capabilities**: whether it can run ahead in backward (``overlap_with_backward``), whether it can
  stream commits (``commit="streaming"``), which weight constraints and views (``transposed``) it supports.
  What a rule lacks is refused at construction, never skipped;
* its state (``init_state``), its step (``compute`` -> commit) and its hooks (``check``, ``bind``,
  ``end_step``), see :class:`Rule`.

Registering is one decorator on the rule class; nothing else in the library names a rule or its algorithms::

    @register_rule
    class ToyRule(Rule):
        algorithms = ("toy",)
        settings = ToySettings
        ...
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..distributed.engine import Engine, Job
    from .rules import Commit, Item, StepContext

Group = dict[str, Any]

#: Keys of a group that are not settings: its parameters, their names and other names (tied weights), its rule.
STRUCTURE_KEYS = frozenset({"params", "param_names", "algorithm", "tied_with"})
NONFINITE = ("raise", "skip")
#: ``commit``: ``"atomic"`` (hold every update until every rule computed) or ``"streaming"`` (commit each
#: parameter as soon as its update is known good: one update held at a time).
COMMITS = ("atomic", "streaming")
WEIGHT_CONSTRAINTS = ("spectral_clip", "stiefel", "hyperball")


@dataclass(frozen=True)
class Settings:
    """What every rule reads.

    Attributes:
        lr: learning rate, ``>= 0``. Default ``1e-3``.
        weight_decay: decoupled weight decay, ``>= 0``. Default ``0.0``.
        nonfinite: ``"raise"`` (default: a NaN / inf gradient raises on every rank, nothing changes) or
            ``"skip"`` (the step is skipped on every rank).
        commit: ``"atomic"`` (default) or ``"streaming"`` (rules that declare ``streams``).
        transposed: the weight is stored ``fan_in x fan_out`` (GPT-2's ``Conv1D``). Default ``False``; rules
            that do not declare the ``"transposed"`` view refuse ``True``.
        weight_constraint: ``None`` (default), ``"spectral_clip"``, ``"stiefel"`` or ``"hyperball"``
            (rules that declare it; ``disco.optim.constraints``). sigma_min, sigma_max, radius: its bounds.
    """

    #: group key -> field: another name a group may give a field (copied to the field's key when the group is
    #: added, unless the group gives both)
    aliases: ClassVar[Mapping[str, str]] = {}

    lr: float = 1e-3
    weight_decay: float = 0.0
    nonfinite: str = "raise"
    commit: str = "atomic"
    transposed: bool = False
    weight_constraint: str | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    radius: float | None = None

    def check(self, at: str) -> None:
        """Ranges and names (types are checked by :func:`parse_settings`); subclasses call ``super().check``."""
        _range(self, "lr", at, lo=0.0)
        _range(self, "weight_decay", at, lo=0.0)
        _choice(self, "nonfinite", at, NONFINITE)
        _choice(self, "commit", at, COMMITS)
        _choice(self, "weight_constraint", at, (None, *WEIGHT_CONSTRAINTS))
        _range(self, "sigma_min", at, lo=0.0)
        _range(self, "sigma_max", at, lo=1e-30)
        _range(self, "radius", at, lo=1e-30)
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min > self.sigma_max:
            raise ValueError(f"{at}: sigma_min={self.sigma_min!r} exceeds sigma_max={self.sigma_max!r}")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


S = TypeVar("S", bound=Settings)


class Rule:
    """One family of algorithms. Subclasses set the class attributes and override what they need.

    A step is split so that it is atomic: ``compute`` may communicate and may raise but changes nothing;
    ``commit`` (what ``compute`` returns) only writes local pieces. The optimizer commits every rule only after
    every rule computed, so a failure anywhere leaves every parameter and all state as they were. The one
    exception is opt-in: a rule that ``streams`` may commit the parameters of ``commit="streaming"`` groups
    inside ``compute``, each as soon as its result is known good, listing them in ``ctx.streamed``.
    """

    #: the ``algorithm`` names this rule serves
    algorithms: ClassVar[tuple[str, ...]] = ()
    #: the settings of its groups (``settings_for`` may choose per algorithm)
    settings: ClassVar[type[Settings]] = Settings
    #: ``compute`` treats each parameter on its own, so it may run per bucket from gradient hooks
    runs_ahead: ClassVar[bool] = False
    #: ``compute`` communicates (else staying in ``step()`` under overlap loses nothing: it is local work)
    exchanges: ClassVar[bool] = True
    #: ``commit="streaming"`` is honoured
    streams: ClassVar[bool] = False
    #: the ``weight_constraint`` values honoured
    weight_constraints: ClassVar[frozenset[str]] = frozenset()
    #: the matrix views honoured (``"transposed"``)
    views: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def settings_for(cls, algorithm: str) -> type[Settings]:
        return cls.settings

    @classmethod
    def can_run_ahead(cls, settings: Settings) -> bool:
        """Whether a group with these settings may compute in backward (``runs_ahead`` refined per group)."""
        return cls.runs_ahead

    def check_group(self, group: Group, settings: Settings, at: str) -> None:
        """Checks that need the parameters (their shapes), once per group at construction."""
        return None

    def init_state(self, settings: Settings, p: Tensor) -> dict[str, Any]:
        return {}

    def check(self, items: Sequence[Item]) -> str | None:
        """This rank's reason not to step (misuse seen locally), or None; voted on by every rank."""
        return None

    def bind(self, engine: Engine, items: Sequence[Item], ctx: StepContext) -> None:
        """Once the engine knows the layouts: finish state that depends on them (e.g. a piece of a seeded start)."""
        return None

    def planned_jobs(self, items: Sequence[Item]) -> list[Job]:
        """The jobs the engine may plan at construction, so that ``assignments`` is known before a step."""
        return []

    def compute(self, items: Sequence[Item], ctx: StepContext) -> Commit:
        raise NotImplementedError

    def end_step(self, items: Sequence[Item], all_groups: Sequence[Group]) -> None:
        """After every rule committed; ``items`` are this rule's parameters in the optimizer."""
        return None


#: algorithm name -> the rule class that serves it (one instance per optimizer and class)
RULES: dict[str, type[Rule]] = {}

R = TypeVar("R", bound=type[Rule])


def register_rule(cls: R) -> R:
    """Class decorator: serve ``cls.algorithms`` with ``cls``. A name served by another class is refused."""
    if not cls.algorithms:
        raise ValueError(f"{cls.__qualname__} declares no algorithms")
    for name in cls.algorithms:
        old = RULES.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"algorithm {name!r} is already served by {old.__module__}.{old.__qualname__}")
    for name in cls.algorithms:
        RULES[name] = cls
    return cls


def unregister_rule(cls: type[Rule]) -> None:
    """Remove ``cls``'s algorithms (tests that register a temporary rule)."""
    for name in cls.algorithms:
        if RULES.get(name) is cls:
            del RULES[name]


def rule_class(algorithm: str, at: str = "") -> type[Rule]:
    if algorithm not in RULES:
        prefix = f"{at}: " if at else ""
        raise ValueError(f"{prefix}unknown algorithm {algorithm!r}; valid: {sorted(RULES)}")
    return RULES[algorithm]


def algorithms_where(test: Callable[[type[Rule]], bool]) -> list[str]:
    """The registered algorithm names whose rule passes ``test`` (for messages and the CLI)."""
    return sorted(name for name, cls in RULES.items() if test(cls))


# ---- parsing -----------------------------------------------------------------------------------------------------
def parse_settings(cls: type[S], group: Mapping[str, Any], explicit: set[str] | None, at: str) -> S:
    """The settings of ``group``; ``explicit``: the keys the user gave for this group (checked against ``cls``),
    ``None`` after construction (keys others add, like a scheduler's ``initial_lr``, are then ignored)."""
    accepted = cls.keys()
    if explicit is not None:
        unknown = sorted(k for k in explicit if k not in accepted and k not in cls.aliases and k not in STRUCTURE_KEYS)
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, [*accepted, *cls.aliases], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{at}: key {key!r} is not a setting of algorithm {group.get('algorithm')!r}{hint}; it accepts "
                f"{sorted(accepted)}"
            )
    values = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in group:
            values[f.name] = _constant(_typed(group[f.name], hints[f.name], f.name, at))
        elif f.default is not dataclasses.MISSING:
            values[f.name] = _constant(f.default)
    settings = cls(**values)
    settings.check(at)
    return settings


class Constant(float):
    """A float setting that ``torch.compile`` treats as a constant: the graph holds its value and a guard on it
    (a new value recompiles), as torch.optim's own float ``lr``, instead of a symbolic input.

    Why: Dynamo traces a plain float that changed between calls (a schedule's ``lr``, a step count) as a
    symbolic input, and torch 2.13's inductor then bakes the value it had at compile time into a Scalar argument
    (``add_(alpha=)``, ``addcdiv_(value=)``, ``lerp_(weight=)``) whenever the same float also feeds a tensor op,
    under a cache key that does not hold the value (pytorch/pytorch#194976, #197889): later steps silently used
    an earlier learning rate. Dynamo specializes float subclasses (``float(x) == value`` guards), so every setting
    parsed here is one. Arithmetic on it gives plain floats: it is written out below because Dynamo's own
    delegation to ``float``'s slots fails when the other operand is symbolic (a size under dynamic shapes).
    """

    __slots__ = ()


def _delegate(op: Callable[..., Any], reflected: bool = False) -> Callable[..., Any]:
    def method(self: Constant, *other: Any) -> Any:
        return op(*other, float(self)) if reflected else op(float(self), *other)

    return method


_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow,
}  # fmt: skip
_OTHER: dict[str, Callable[..., Any]] = {
    "neg": operator.neg, "pos": operator.pos, "abs": operator.abs, "eq": operator.eq, "ne": operator.ne,
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
}  # fmt: skip
for _name, _binary in _BINARY.items():
    setattr(Constant, f"__{_name}__", _delegate(_binary))
    setattr(Constant, f"__r{_name}__", _delegate(_binary, reflected=True))
for _name, _op in _OTHER.items():
    setattr(Constant, f"__{_name}__", _delegate(_op))


def _constant(value: Any) -> Any:
    """``value`` with its floats (alone or in a tuple) as :class:`Constant`."""
    if type(value) is float:
        return Constant(value)
    if type(value) is tuple:
        return tuple(_constant(v) for v in value)
    return value


def _typed(value: Any, hint: Any, key: str, at: str) -> Any:
    """``value`` as the field's type: numbers from ints, floats and 1-element tensors; else ``TypeError``."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in options:
        return None
    for t in options:
        if t is Any:
            return value
        if t is float and _is_number(value):
            return float(value.item() if isinstance(value, Tensor) else value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is str and isinstance(value, str):
            return value
        if t is torch.dtype and isinstance(value, torch.dtype):
            return value
        if typing.get_origin(t) is tuple and isinstance(value, (tuple, list)):
            args = typing.get_args(t)
            if len(value) == len(args) and all(_is_number(v) for v in value):
                if len({isinstance(v, Tensor) for v in value}) > 1:  # torch.optim refuses the mix too
                    raise ValueError(
                        f"{at}: {key}={value!r}: {key} must be either both floats or both Tensors (one number each)"
                    )
                return tuple(float(v.item() if isinstance(v, Tensor) else v) for v in value)
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(
            f"{at}: Tensor {key} must be 1-element, got a tensor of shape {tuple(value.shape)}; {key} must be "
            "a single number (a float, an int or a 1-element tensor)"
        )
    wanted = " or ".join(_type_name(t) for t in options)
    raise TypeError(f"{at}: {key}={value!r} has type {type(value).__name__}; it must be {wanted}")


def _is_number(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(t: Any) -> str:
    if t is type(None):
        return "None"
    if t is float:
        return "a number (a float, an int or a 1-element tensor)"
    if typing.get_origin(t) is tuple:
        return f"a tuple of {len(typing.get_args(t))} numbers"
    return "torch.dtype" if t is torch.dtype else getattr(t, "__name__", str(t))


def _range(s: Settings, key: str, at: str, *, lo: float, hi: float = math.inf, hi_open: bool = False) -> None:
    value = getattr(s, key)
    if value is None:
        return
    ok = math.isfinite(value) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        bound = f"[{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
        raise ValueError(f"{at}: Invalid {key} value: {value!r}; {key} must be a finite number in {bound}")


def _choice(s: Settings, key: str, at: str, valid: Sequence[Any]) -> None:
    if getattr(s, key) not in valid:
        raise ValueError(f"{at}: {key}={getattr(s, key)!r} is invalid; valid: {list(valid)}")


def check_range(s: Settings, key: str, at: str, *, lo: float, hi: float = math.inf, hi_open: bool = False) -> None:
    """``s.key`` is ``None`` or a finite number in ``[lo, hi]`` (``[lo, hi)`` with ``hi_open``), else ValueError."""
    _range(s, key, at, lo=lo, hi=hi, hi_open=hi_open)


def check_choice(s: Settings, key: str, at: str, valid: Sequence[Any]) -> None:
    _choice(s, key, at, valid)


def check_capabilities(cls: type[Rule], settings: Settings, algorithm: str, at: str) -> None:
    """Refuse what the rule does not honour: streaming commits, weight constraints, views."""
    if settings.commit == "streaming" and not cls.streams:
        raise ValueError(
            f"{at}: commit='streaming' is not available for algorithm {algorithm!r} (its commit reads every "
            f"parameter's result of the step); use commit='atomic' (streaming: "
            f"{algorithms_where(lambda c: c.streams)})"
        )
    constraint = settings.weight_constraint
    if constraint is not None and constraint not in cls.weight_constraints:
        raise ValueError(
            f"{at}: weight_constraint={constraint!r} is not supported by algorithm {algorithm!r}; it is by "
            f"{algorithms_where(lambda c: constraint in c.weight_constraints)}"
        )
    if constraint is not None and settings.commit == "streaming":
        raise ValueError(
            f"{at}: commit='streaming' is not available with weight_constraint={constraint!r} (the constraint "
            "reads the updated weight before it is written); use commit='atomic'"
        )
    if settings.transposed and "transposed" not in cls.views:
        raise ValueError(
            f"{at}: algorithm {algorithm!r} computes on the stored (fan_out x fan_in) layout; weights stored "
            f"fan_in x fan_out (transposed=True, e.g. GPT-2's Conv1D) are supported by "
            f"{algorithms_where(lambda c: 'transposed' in c.views)}"
        )
