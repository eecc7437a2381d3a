"""The step shared by every optimizer here: a loop over update rules, over one engine.

Each group's ``algorithm`` names its rule in the registry (``disco.optim.contract.RULES``); the group's settings
are parsed into the rule's dataclass when the group is added (unknown keys, wrong types, out-of-range values and
capabilities the rule lacks are refused there). The optimizer builds the engine over all its parameters
(``disco.distributed.build_engine``), checks that every rank holds the same parameters, creates all state up
front, and steps in three phases (``disco.optim.phases``): admit (one collective), compute (every rule, through
the engine), commit (atomic, or streaming inside the compute); then it measures the norms it was asked for
(``disco.optim.tracking``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from .. import ops
from ..distributed.agreement import StepError
from ..distributed.config import DistributedConfig
from ..distributed.engine import Engine, Job, build_engine, local_piece
from . import checkpoint, phases, tracking, validation
from .contract import RULES, STRUCTURE_KEYS, Group, Rule, Settings, check_capabilities, parse_settings, rule_class
from .overlap import Overlap, OverlapConfig
from .rules import Item, Streamed


class SpectralOptimizer(Optimizer):
    """Base class; subclasses fix the defaults (``algorithm`` among them) of their groups.

    A group's keys are its rule's settings (``disco.optim.contract``): e.g. ``LMOSettings`` for Disco / Muon /
    Scion groups, ``ElementwiseSettings`` for AdamW groups (``eps`` given there is taken as ``adam_eps``).
    """

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], *, distributed_config: DistributedConfig | None = None
    ) -> None:
        self._seen: dict[int, str] = {}
        self._rules: dict[type[Rule], Rule] = {}
        self._parsed: dict[int, tuple[tuple[Any, ...], Settings]] = {}  # id(group) -> (its values, settings)
        self._engine_params: tuple[int, ...] = ()
        self._named: bool | None = None  # whether the groups name their parameters (all or none, as torch.optim)
        self._check_defaults(defaults)  # the arguments first, as torch.optim does, then the parameters
        super().__init__(params, defaults)
        self.distributed_config = distributed_config
        self._track_next: tuple[str, ...] | None | Literal[False] = False
        self._tracked: dict[str, Tensor] = {}
        self._overlap: Overlap | None = None  # overlap_with_backward()
        self._overlap_assignments: dict[int, list[int]] | None = None
        self._streamed: Streamed | None = None  # during a step: what streaming groups committed so far
        self._tracking = False
        self._updates: list[tuple[Item, Tensor]] = []  # the last commit's, for tracking
        self._init_state()
        self._engine = self._build_engine()

    # ---- groups and validation --------------------------------------------------------------------------
    def _check_defaults(self, defaults: dict[str, Any]) -> None:
        """The constructor's arguments, checked before its parameters (types, ranges, names): a message names
        the argument, its value and what is valid."""
        algo = defaults.get("algorithm")
        if not (isinstance(algo, str) and algo in RULES):
            return
        main = RULES[algo].settings_for(algo)
        checked = {main: set(defaults)}
        own = set(main.keys())
        for other in sorted(RULES):  # arguments for the optimizer's other groups (Dion's AdamW betas)
            cls = RULES[other].settings_for(other)
            accepted = set(cls.keys())
            keys = {k for k in defaults if k in accepted and k not in own}
            if keys and cls not in checked:
                checked[cls] = keys
        for cls, keys in checked.items():
            group = {k: defaults[k] for k in keys}
            for alias, key in cls.aliases.items():
                if alias in group:
                    group.setdefault(key, group[alias])
            parse_settings(cls, group, None, type(self).__name__)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        gi = len(self.param_groups)
        if not isinstance(param_group, dict):
            raise TypeError(f"group {gi}: param_group must be a dict, but got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(
                f"group {gi}: optimizer parameters need to be organized in ordered collections, but the ordering "
                "of tensors in sets will change between runs. Please use a list instead"
            )
        params = [params] if isinstance(params, Tensor) else list(params)
        names = param_group.get("param_names")
        named = [isinstance(p, tuple) for p in params]
        if any(named):  # named parameters, as torch.optim accepts
            if not all(named):
                raise ValueError(
                    f"group {gi}: all optimizer params should be with/without names. Some param names are missing: "
                    f"{named.count(True)} of {len(params)} parameters are (name, tensor) pairs; name all or none"
                )
            names, params = [n for n, _ in params], [p for _, p in params]
        for j, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"group {gi}: optimizer can only optimize Tensors, but parameter {j} is {type(p).__name__}"
                )
        self._check_named(gi, names is not None)
        if names is None:
            from ..groups.trainer import check_trainer_group  # transformers.Trainer's groups: refused if misrouted

            check_trainer_group(type(self).__name__, params, param_group, self.defaults)
            names = [f"group{gi}.param{k}" for k in range(len(params))]
        names = list(names)
        if len(names) != len(params):
            raise ValueError(f"group {gi}: {len(names)} param_names for {len(params)} params")
        seen = dict(self._seen)
        for j, (p, n) in enumerate(zip(params, names)):
            if id(p) in seen:
                what = (
                    "optimizer contains a parameter group with duplicate parameters"
                    if any(q is p for q in params[:j])
                    else "some parameters appear in more than one parameter group"
                )
                raise ValueError(
                    f"group {gi}: {what}: parameter {n!r} (shape {tuple(p.shape)}) is already in a group as "
                    f"{seen[id(p)]!r}; a parameter may belong to one group only, once"
                )
            seen[id(p)] = n
        where = validation.where(gi, names, params)
        algo = param_group.get("algorithm", self.defaults.get("algorithm"))
        explicit = set(param_group) - STRUCTURE_KEYS
        group = {**param_group, "params": params, "param_names": names, "algorithm": algo}
        if isinstance(algo, str) and algo in RULES:
            for alias, key in RULES[algo].settings_for(algo).aliases.items():
                if alias in explicit and key not in explicit:
                    group[key] = group[alias]
        for k, v in self.defaults.items():  # what torch.optim would fill in; the rule reads what it needs
            group.setdefault(k, v)
        settings = self._parse(group, where, explicit)
        validation.check_params(group, where, type(self).__name__)
        self._rule(group).check_group(group, settings, where)
        self._seen = seen
        super().add_param_group(group)
        if hasattr(self, "_engine"):  # added after construction: state now, a new engine at the next step()
            self._init_state()

    def _check_named(self, gi: int, named: bool) -> None:
        """Every group names its parameters or none does (``torch.optim``'s rule: ``state_dict`` keys)."""
        if self._named is None:
            self._named = named
        elif self._named != named:
            raise ValueError(
                f"group {gi}: all optimizer param groups should be with/without names. cannot add param group "
                f"{'with' if named else 'without'} names to the optimizer (the first group "
                f"{'names' if self._named else 'does not name'} its parameters: give (name, tensor) pairs or "
                "param_names in every group, or in none)"
            )

    def _parse(self, group: Group, where: str, explicit: set[str] | None) -> Settings:
        """The group's settings, checked against its rule (``explicit``: the keys given for this group)."""
        algo = group.get("algorithm")
        if not isinstance(algo, str):
            raise ValueError(f"{where}: algorithm={algo!r} must be a name; valid: {sorted(RULES)}")
        cls = rule_class(algo, where)
        settings = parse_settings(cls.settings_for(algo), group, explicit, where)
        check_capabilities(cls, settings, algo, where)
        return settings

    def settings_of(self, group: Group) -> Settings:
        """The parsed settings of ``group``, parsed again (and checked) only when one of its values changed
        (a schedule moves ``lr``; ``load_state_dict`` replaces the groups)."""
        values = tuple((k, _hashable(v)) for k, v in group.items() if k not in ("params", "param_names"))
        cached = self._parsed.get(id(group))
        if cached is not None and cached[0] == values:
            return cached[1]
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        settings = self._parse(group, validation.where(gi, group["param_names"], group["params"]), None)
        self._parsed[id(group)] = (values, settings)
        return settings

    def _rule(self, group: Group) -> Rule:
        cls = rule_class(str(group["algorithm"]))
        if cls not in self._rules:
            self._rules[cls] = cls()
        return self._rules[cls]

    def by_rule(self, items: Sequence[Item]) -> list[tuple[Rule, list[Item]]]:
        """``items`` split by rule, in the order the rules were first used (the same on every rank)."""
        out: dict[Rule, list[Item]] = {}
        for it in items:
            out.setdefault(self._rule(it.group), []).append(it)
        order = list(self._rules.values())
        return sorted(out.items(), key=lambda kv: order.index(kv[0]))

    def _items(self) -> list[Item]:
        out = []
        index = 0
        for group in self.param_groups:
            settings = self.settings_of(group)
            for p, n in zip(group["params"], group["param_names"]):
                out.append(Item(group, p, n, index, settings))
                index += 1
        return out

    # ---- state --------------------------------------------------------------------------------------------
    def _init_state(self) -> None:
        """Create every state tensor now (DCP needs the same keys on every rank from the start)."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p].update(self._rule(group).init_state(self.settings_of(group), p))

    def state_of(self, p: Tensor) -> dict[str, Any]:
        return self.state[p]  # type: ignore[no-any-return]  # torch types Optimizer.state as Any-valued

    def grad_of(self, p: Tensor) -> Tensor:
        """The local gradient, laid out like the parameter (``Partial`` gradients are reduced first)."""
        g = p.grad
        assert g is not None
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            g = g.redistribute(p.device_mesh, p.placements)
        return local_piece(g)

    @property
    def streamed(self) -> Streamed | None:
        return self._streamed

    @property
    def wants_updates(self) -> bool:
        return self._tracking

    # ---- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict with a format header in every group (``disco.optim.checkpoint``)."""
        return checkpoint.annotate_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Validate everything (format, algorithms, names, order, state keys, shapes, dtypes) before changing
        anything; every rank agrees on the outcome, so a bad checkpoint on one rank fails them all."""
        error = None
        try:
            checked = checkpoint.validate_state_dict(self, state_dict)
        except ValueError as e:
            error = str(e)
        self._engine.check_agreement([error or "valid"], "the loaded optimizer state")
        if error is not None:
            raise ValueError(error)
        super().load_state_dict(checked)
        checkpoint.restore_dtypes(self, checked)  # torch casts floating state to the parameter's dtype

    # ---- the engine ---------------------------------------------------------------------------------------
    def _build_engine(self) -> Engine:
        items = self._items()
        self._engine_params = tuple(id(it.param) for it in items)
        engine = build_engine([it.param for it in items], self.distributed_config, [it.name for it in items])
        # Global shapes: local pieces of a sharded parameter differ across ranks (the callbacks config knows none).
        shapes = [tuple(engine.layout(it.index).shape) if engine.has_layouts else "" for it in items]
        engine.check_agreement(
            [f"{it.name} {s} {it.param.dtype} {it.group['algorithm']}" for it, s in zip(items, shapes)],
            "the optimizer's parameters (name, global shape, dtype, algorithm, in order)",
        )
        if engine.has_layouts:
            self._check_replicas(engine, items)
        jobs: list[Job] = []
        for rule, mine in self.by_rule(items):
            rule.bind(engine, mine, self)
            jobs.extend(rule.planned_jobs(mine))
        engine.assign(jobs)  # so that ``assignments`` shows who computes what before the first step
        return engine

    @staticmethod
    def _check_replicas(engine: Engine, items: list[Item]) -> None:
        """Copies of a parameter (its replica axes: DDP, HSDP) must hold the same values: else the ranks list
        parameters in different orders or were never synchronized. One all-reduce of two numbers per parameter."""
        if not items:
            return
        layouts = [engine.layout(it.index) for it in items]
        if all(len(lay.axis_group(engine.current_rank, lay.replica_axes())) == 1 for lay in layouts):
            return
        hi = [_fingerprint(local_piece(it.param.detach())) for it in items]
        lo = [f.clone() for f in hi]
        engine.all_reduce(hi, layouts, over="replicas", op="max")
        engine.all_reduce(lo, layouts, over="replicas", op="min")
        bad = next((it for it, a, b in zip(items, hi, lo) if not torch.allclose(a, b, rtol=1e-6, atol=1e-6)), None)
        error = None
        if bad is not None:
            error = (
                f"parameter {validation.describe(bad.name, bad.param)} differs across its replicas: the ranks "
                "list the optimizer's parameters in different orders (or the replicas were not synchronized); "
                "pass the same parameters in the same order on every rank (named_parameters() lets it check)"
            )
        # Ranks outside the differing replica group saw nothing: agree, so that every rank fails alike.
        engine.check_agreement([error or "replicas agree"], "the parameters' replicas")
        if error is not None:
            raise ValueError(error)

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def assignments(self) -> dict[int, list[int]]:
        """rank -> indices of the parameters (over all groups, ``state_dict()``'s numbering) it orthogonalizes."""
        if self._overlap_assignments is not None:  # the last step committed buckets computed in backward
            return self._overlap_assignments
        return self._engine.assignments

    @property
    def current_rank(self) -> int:
        return self._engine.current_rank

    # ---- overlap with backward (disco.optim.overlap) ------------------------------------------------------
    def overlap_with_backward(self, enabled: bool = True, *, bucket_bytes: int | None = None) -> None:
        """Start each bucket's exchange and orthogonalization in backward, from gradient hooks; ``step()`` then
        commits that work if it is still valid on every rank, else recomputes: the results are the plain step's.

        Call it on every rank (collective: one agreement check of the buckets). ``bucket_bytes``: see
        ``OverlapConfig``. ``enabled=False`` removes the hooks. Accumulating gradients over several backwards:
        run all but the last under ``with opt.overlap_paused():`` (see ``disco.optim.overlap``).
        """
        if self._overlap is not None:
            self._overlap.close()
            self._overlap = None
        if enabled:
            config = OverlapConfig() if bucket_bytes is None else OverlapConfig(bucket_bytes=bucket_bytes)
            self._overlap = Overlap(self, config)

    @property
    def overlap(self) -> Overlap | None:
        """The overlap state (``committed`` / ``recomputed`` step counts, last ``reason``), or None when off."""
        return self._overlap

    def overlap_paused(self) -> contextlib.AbstractContextManager[None]:
        """Backwards run in this context start nothing (gradient accumulation: all micro-batches but the last)."""
        return self._overlap.paused() if self._overlap is not None else contextlib.nullcontext()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._overlap is not None:  # what backward computed is void
            self._overlap.reset()

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

    # ---- the step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One atomic step: every rank agrees first, computes everything, then commits, or raises the same error.

        Three phases (``disco.optim.phases``): *admit* (gradient presence, settings, local misuse and non-finite
        gradients agreed in one collective; non-finite gradients handled by each group's ``nonfinite`` policy),
        *compute* (plain gradients averaged if asked; every rule computes: the exchanges happen here, nothing is
        written), *commit* (every rule writes its local pieces); then tracked norms are measured. With
        ``overlap_with_backward()``, compute ran earlier for the buckets computed in backward: their commits are
        used when every rank agrees they are still valid (``disco.optim.overlap``), else recomputed here.

        Groups with ``commit="streaming"`` commit earlier: each parameter inside the compute, as soon as its update
        is known good (not on steps that track norms, nor for work done in backward): one update held at a time
        instead of one per parameter, the same results. A failure after the first such write raises
        ``StepError`` on every rank whatever the ``nonfinite`` policy, with ``applied`` listing what this rank wrote.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        armed, self._track_next = self._track_next, False  # armed for this step only, even if it fails
        self._tracked = {}
        items = self._items()
        ov = self._overlap
        if tuple(id(it.param) for it in items) != self._engine_params:
            # Groups were added: state for them, and a new engine (collective: every rank does the same).
            self._init_state()
            self._engine = self._build_engine()
            if ov is not None:
                ov.build()  # new buckets and hooks (collective too); what backward computed is void
        # Streaming groups commit inside their rule's compute, unless the updates are read after (tracking).
        self._streamed, self._tracking = (Streamed() if armed is False else None), armed is not False
        try:
            if self._step(items, ov):
                self._track_and_finish(items, armed)
            return loss
        finally:
            self._streamed, self._tracking = None, False
            if ov is not None:
                ov.reset()

    def _step(self, items: list[Item], ov: Overlap | None) -> bool:
        """Admit, compute, commit; False when the step was skipped (every rank alike)."""
        self._overlap_assignments = None
        captured = ov.error() if ov is not None else None  # raised before any collective: a rank may have left
        if isinstance(captured, StepError) and captured.nonfinite and not captured.failed:
            self._nonfinite(captured, items)
            return False
        if captured is not None:
            raise captured
        if ov is None or not ov.started:
            self._engine.stats.reset()
        verdict = phases.admit(self, items, ov)
        if verdict.nonfinite:
            self._nonfinite(StepError("non-finite (NaN / inf) gradients", nonfinite=verdict.nonfinite), items)
            return False
        if ov is not None:
            ov.record(committed=verdict.fired is not None)
        try:
            commits = phases.compute(self, verdict.rest, self)
        except Exception as e:
            # ``started`` is the same on every rank; ``applied`` also catches a local failure after local commits
            if self._streamed is not None and (self._streamed.started or self._streamed.applied):
                raise self._partially_applied(e, verdict.stepping) from e
            if not isinstance(e, StepError) or e.failed or not e.nonfinite:
                raise
            self._nonfinite(e, items)
            return False
        if verdict.fired is not None and ov is not None:
            self._overlap_assignments = _union(ov.assignments(), self._engine.assignments)
            commits.extend(phases.fired_commits(verdict.fired))
        self._updates = phases.commit(self, commits, verdict.stepping)
        return True

    def _track_and_finish(self, items: list[Item], armed: tuple[str, ...] | None | Literal[False]) -> None:
        if armed is not False:
            self._tracked = tracking.compute_norms(self._engine, self._tracked_entries(self._updates, armed))
        self._updates = []
        for rule, mine in self.by_rule(items):
            rule.end_step(mine, self.param_groups)

    def _local_error(self, items: list[Item], stepping: list[Item]) -> str | None:
        """This rank's reason to refuse the step (voted on by every rank in ``check_step``)."""
        for rule, mine in self.by_rule(items):
            reason = rule.check(mine)
            if reason:
                return reason
        for it in stepping:
            reason = validation.check_grad(it.name, it.param)
            if reason:
                return reason
        return None

    def _settings(self) -> list[str]:
        """What every rank must agree on each step: every group setting (lr and weight decay move with schedules)."""
        out = []
        for gi, group in enumerate(self.param_groups):
            for k in sorted(group):
                if k not in ("params", "param_names"):
                    out.append(f"group {gi} {k}={group[k]!r}")
        return out

    def _nonfinite(self, e: StepError, items: list[Item]) -> None:
        """Apply the groups' ``nonfinite`` policy: skip the whole step (nothing changed) only if every group
        with a non-finite tensor says ``"skip"``; else raise, naming the tensors."""
        bad = [items[i] for i in e.nonfinite]
        names = ", ".join(f"{it.name!r} (shape {tuple(it.param.shape)}, group {self._group(it)})" for it in bad[:8])
        if all(it.settings.nonfinite == "skip" for it in bad):
            warnings.warn(f"step skipped on every rank: {e} in {names}", RuntimeWarning, stacklevel=4)
            return
        raise StepError(
            f"{e} in {names}; nothing was changed. Set nonfinite='skip' on their group to skip such steps",
            nonfinite=e.nonfinite,
        ) from None

    def _partially_applied(self, e: Exception, stepping: list[Item]) -> StepError:
        """A failure after streaming groups committed some parameters: no policy can undo that, so it raises."""
        done = set(self._streamed.applied if self._streamed is not None else ())
        rest = [repr(it.name) for it in stepping if it.index not in done]
        shown = ", ".join(rest[:8]) + (", ..." if len(rest) > 8 else "")
        nonfinite, failed = (e.nonfinite, e.failed) if isinstance(e, StepError) else ([], [])
        return StepError(
            f"{e}; the step was partially applied (commit='streaming'): {len(done)} of {len(stepping)} parameters "
            f"took it on this rank, not {shown}. Load a checkpoint before stepping again (commit='atomic' changes "
            "nothing on failure)",
            nonfinite=nonfinite,
            failed=failed,
            applied=sorted(done),
        )

    def _group(self, it: Item) -> int:
        return next(gi for gi, g in enumerate(self.param_groups) if g is it.group)

    def _tracked_entries(
        self, updates: list[tuple[Item, Tensor]], norms: tuple[str, ...] | None
    ) -> list[tracking.Tracked]:
        entries = []
        for it, update in updates:
            norm_factor = str(getattr(it.settings, "norm_factor", "none"))
            chosen = norms or tracking.default_tracked_norms(norm_factor, it.param.dim())
            transposed = it.settings.transposed and it.param.dim() >= 2
            for key, t in (("update", update), ("param", local_piece(it.param.detach()))):
                entries.append(tracking.Tracked(key, it.name, it.index, t, tuple(chosen), transposed))
        return entries


def _union(*assignments: dict[int, list[int]]) -> dict[int, list[int]]:
    out: dict[int, set[int]] = {}
    for a in assignments:
        for r, ks in a.items():
            out.setdefault(r, set()).update(ks)
    return {r: sorted(ks) for r, ks in sorted(out.items())}


def _hashable(value: Any) -> Any:
    """A group value as something ``==`` compares to a bool (tensors by identity and version)."""
    if isinstance(value, Tensor):
        return ("tensor", id(value), value._version)
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def _fingerprint(t: Tensor) -> Tensor:
    """Two numbers that equal copies share: the sum and the sum of squares, in float64."""
    x = t.double()
    return torch.stack([x.sum(), x.pow(2).sum()]) if x.numel() else torch.zeros(2, dtype=torch.float64)
