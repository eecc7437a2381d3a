"""Optimizer checkpoints: a format header on save, a full check of the loaded state before anything changes.

``SpectralOptimizer.state_dict()`` is torch's, plus ``disco_format`` (:data:`FORMAT_VERSION`) in every parameter
group; the groups already carry ``algorithm`` and ``param_names``. The header lives in the groups, not at the top
level, because ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps only ``state`` and
``param_groups`` (and copies every group key), so it survives DCP and ``torch.save``; it is a plain ``int``.

``load_state_dict()`` is :func:`load_state_dict`: :func:`validate_state_dict`, then torch's load, then
:func:`restore_dtypes` (torch casts floating state to the parameter's dtype). The validation checks, against the
optimizer as it is (its groups and the state created at construction): the format version, the number of
groups, per group the algorithm, the parameter names in order and their number, per parameter the state keys,
and each state tensor's kind (plain or DTensor, with its mesh and placements), global shape and dtype, ``step``
a scalar. A mismatch raises ``ValueError`` naming the group, the parameter (name and shape) and what differs;
nothing has changed then. The loaded hyperparameters go through the same validation as the constructor's; keys
the checkpoint lacks (a checkpoint from an older disco) keep the optimizer's values.

A ``torch.optim.Muon`` state dict (no ``algorithm``; ``ns_steps``, ``ns_coefficients``) is converted for Muon
groups: ``ns_steps`` -> ``backend_steps``, ``ns_coefficients`` -> ``coefficients``, ``adjust_lr_fn`` ->
``norm_factor`` (as ``disco.Muon`` maps it); the settings torch has no word for (``backend``, ``compute_dtype``)
stay the optimizer's, and a parameter torch never stepped (no buffer yet) starts from a zero buffer, as torch's
would.

Untrusted files: read ``torch.save`` checkpoints with ``torch.load(path, weights_only=True)`` (the state dicts
here hold tensors, numbers, strings, tuples, ``None`` and dtypes only). ``torch.distributed.checkpoint.load``
unpickles its ``.metadata`` with ``pickle`` and non-tensor values with ``torch.load(weights_only=False)``;
:class:`WeightsOnlyLoadPlanner` and :class:`WeightsOnlyFileSystemReader` close both.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.distributed.checkpoint import metadata as _dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.tensor import DTensor

from .validation import describe

if TYPE_CHECKING:
    from .base import SpectralOptimizer

#: version of the layout ``state_dict()`` writes; ``load_state_dict`` refuses a newer one.
FORMAT_VERSION = 1
#: the group key that holds it.
FORMAT_KEY = "disco_format"

#: ``torch.optim.Muon`` group key -> ``disco.Muon`` group key (``adjust_lr_fn`` also sets ``norm_factor``).
TORCH_MUON_KEYS = {"ns_steps": "backend_steps", "ns_coefficients": "coefficients"}
_TORCH_MUON_SIGNATURE = ("lr", "momentum", "nesterov", "ns_coefficients", "ns_steps")


def annotate_state_dict(opt: SpectralOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Add the format header to what ``Optimizer.state_dict()`` returned (its group dicts are fresh copies)."""
    for group in state_dict["param_groups"]:
        group[FORMAT_KEY] = FORMAT_VERSION
    return state_dict


def load_state_dict(
    opt: SpectralOptimizer, state_dict: Mapping[str, Any], load: Callable[[dict[str, Any]], None]
) -> None:
    """``opt.load_state_dict(state_dict)``, with ``load`` torch's ``Optimizer.load_state_dict``: validate (nothing
    changes on an error), load, then give each state tensor back its checked dtype. torch casts every floating
    state tensor to its parameter's dtype, which would turn a float32 momentum of a bf16 parameter (Dion's
    ``momentum_dtype``, or any rule keeping state in higher precision) into bf16."""
    checked = validate_state_dict(opt, state_dict)
    load(checked)
    restore_dtypes(opt, checked)


def restore_dtypes(opt: SpectralOptimizer, checked: Mapping[str, Any]) -> None:
    """After ``Optimizer.load_state_dict(checked)``: state tensors whose dtype torch changed get the checked one."""
    ids = [pid for g in checked["param_groups"] for pid in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip(ids, params):
        loaded = opt.state.get(p, {})
        for key, value in checked["state"].get(pid, {}).items():
            now = loaded.get(key)
            if isinstance(value, Tensor) and isinstance(now, Tensor) and now.dtype != value.dtype:
                loaded[key] = value.to(device=now.device)


def validate_state_dict(opt: SpectralOptimizer, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``state_dict`` against ``opt`` (see the module docstring); return what ``Optimizer.load_state_dict``
    should load: a new dict (the input and ``opt`` are left as they are), converted from ``torch.optim.Muon`` if
    it came from there, with the header removed and the groups' missing keys filled from ``opt``."""
    saved_groups, state = _structure(state_dict)
    origin = _origin(saved_groups)
    if origin == "torch.optim.Muon":
        saved_groups, state = _from_torch_muon(opt, saved_groups, state)
    elif origin == "foreign":
        keys = sorted({str(k) for entry in state.values() if isinstance(entry, Mapping) for k in entry})
        raise ValueError(
            "the state dict does not come from a disco optimizer: it has no format version and its group 0 has no "
            f"'algorithm' (group keys {sorted(str(k) for k in saved_groups[0])}, state keys {keys}); "
            f"{type(opt).__name__} loads its own state dicts and torch.optim.Muon's"
        )
    live_groups = opt.param_groups
    if len(saved_groups) != len(live_groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} parameter group(s) "
            f"({[g.get('algorithm') for g in saved_groups]}), this optimizer {len(live_groups)} "
            f"({[g['algorithm'] for g in live_groups]})"
        )
    listed: dict[Any, str] = {}
    groups = []
    for gi, (saved, live) in enumerate(zip(saved_groups, live_groups)):
        groups.append(_check_group(opt, gi, saved, live, state, listed))
    unlisted = [k for k in state if k not in listed]
    if unlisted:
        raise ValueError(
            f"the state dict has state for {len(unlisted)} entr{'y' if len(unlisted) == 1 else 'ies'} that no "
            f"group lists (keys {unlisted[:5]}{', ...' if len(unlisted) > 5 else ''})"
        )
    out = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    out.update(state=state, param_groups=groups)
    return out


# ---- the checks -------------------------------------------------------------------------------------------------
def _structure(state_dict: Any) -> tuple[list[Mapping[str, Any]], dict[Any, Any]]:
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        got = sorted(map(str, state_dict)) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(f"not an optimizer state dict (need 'state' and 'param_groups'; got {got})")
    state, groups = state_dict["state"], state_dict["param_groups"]
    if not isinstance(state, Mapping) or not isinstance(groups, Sequence) or isinstance(groups, str):
        raise ValueError("not an optimizer state dict: 'state' must be a dict and 'param_groups' a list")
    if not groups:
        raise ValueError("not an optimizer state dict: it has no parameter groups")
    for gi, g in enumerate(groups):
        if not isinstance(g, Mapping) or not isinstance(g.get("params"), Sequence):
            raise ValueError(f"not an optimizer state dict: param_groups[{gi}] has no 'params' list")
    return list(groups), dict(state)


def _origin(groups: Sequence[Mapping[str, Any]]) -> str:
    """``"disco"`` (with a header, checked here), ``"old disco"``, ``"torch.optim.Muon"`` or ``"foreign"``."""
    versions = [g.get(FORMAT_KEY) for g in groups]
    if any(v is not None for v in versions):
        for gi, v in enumerate(versions):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"group {gi}: format version {FORMAT_KEY}={v!r} is invalid (an int >= 1 expected)")
            if v > FORMAT_VERSION:
                raise ValueError(
                    f"group {gi}: the state dict has format version {v}, newer than this disco reads "
                    f"({FORMAT_VERSION}): load it with the disco that wrote it or a newer one"
                )
        if len(set(versions)) > 1:
            raise ValueError(f"the groups of the state dict disagree on the format version: {versions}")
        return "disco"
    if groups and all("algorithm" in g for g in groups):
        return "old disco"
    if groups and all(all(k in g for k in _TORCH_MUON_SIGNATURE) and "algorithm" not in g for g in groups):
        return "torch.optim.Muon"
    return "foreign"


def _where(gi: int, live: Mapping[str, Any]) -> str:
    names, params = live["param_names"], live["params"]
    shown = ", ".join(describe(n, p) for n, p in zip(names[:3], params[:3]))
    return f"group {gi} ({live['algorithm']}) [{shown}{', ...' if len(params) > 3 else ''}]"


def _check_group(
    opt: SpectralOptimizer,
    gi: int,
    saved: Mapping[str, Any],
    live: Mapping[str, Any],
    state: dict[Any, Any],
    listed: dict[Any, str],
) -> dict[str, Any]:
    at = _where(gi, live)
    names: list[str] = list(live["param_names"])
    params: list[Tensor] = list(live["params"])
    if saved.get("algorithm") != live["algorithm"]:
        raise ValueError(
            f"{at}: the state dict's group {gi} has algorithm {saved.get('algorithm')!r}, this one "
            f"{live['algorithm']!r}"
        )
    ids = list(saved["params"])
    saved_names = saved.get("param_names")
    if saved_names is not None:
        saved_names = list(saved_names)
        if len(saved_names) != len(ids):
            raise ValueError(f"{at}: the state dict lists {len(ids)} params but {len(saved_names)} param_names")
        for k, (mine, theirs) in enumerate(zip(names, saved_names)):
            if mine != theirs:
                hint = ""
                if mine in saved_names:
                    hint = f"; the state dict has {mine!r} at position {saved_names.index(mine)}"
                raise ValueError(
                    f"{at}: parameter {k} is {describe(mine, params[k])} here but {theirs!r} in the state dict"
                    f"{hint} (parameters are matched by name and order)"
                )
    if len(ids) != len(params):
        more = (
            f"this optimizer also has {describe(names[len(ids)], params[len(ids)])}"
            if len(ids) < len(params)
            else f"the state dict also has {saved_names[len(params)]!r}"
            if saved_names
            else "the state dict has more"
        )
        raise ValueError(f"{at}: the state dict's group has {len(ids)} parameters, this one {len(params)}: {more}")
    for pid, name, p in zip(ids, names, params):
        if pid in listed:
            raise ValueError(f"{at}: the state dict lists parameter id {pid!r} twice ({listed[pid]!r} and {name!r})")
        listed[pid] = name
        _check_state(opt.state.get(p, {}), state.get(pid), f"{at}, parameter {describe(name, p)}")
    merged = {k: v for k, v in live.items() if k != "params"}
    merged.update((k, v) for k, v in saved.items() if k != FORMAT_KEY)
    merged["param_names"] = names
    merged["params"] = ids
    trial = {**merged, "params": params}
    try:
        opt._parse(trial, at, None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the state dict's settings are invalid: {e}") from None
    return merged


def _check_state(mine: Mapping[str, Any], theirs: Any, at: str) -> None:
    if theirs is None:
        theirs = {}
    if not isinstance(theirs, Mapping):
        raise ValueError(f"{at}: its state in the state dict is a {type(theirs).__name__}, not a dict")
    missing = [k for k in mine if k not in theirs]
    extra = [str(k) for k in theirs if k not in mine]
    if mine and not theirs:
        raise ValueError(f"{at}: the state dict has no state for it (expected {sorted(mine)})")
    if missing or extra:
        parts = ([f"missing {sorted(missing)}"] if missing else []) + ([f"unexpected {sorted(extra)}"] if extra else [])
        raise ValueError(f"{at}: state keys differ: {'; '.join(parts)} (expected {sorted(mine)})")
    for key, want in mine.items():
        _check_value(key, want, theirs[key], at)


def _check_value(key: str, want: Any, got: Any, at: str) -> None:
    what = f"{at}: state {key!r}"
    if not isinstance(want, Tensor):
        if type(got) is not type(want):
            raise ValueError(f"{what} is a {type(got).__name__} in the state dict, expected a {type(want).__name__}")
        return
    if not isinstance(got, Tensor):
        raise ValueError(f"{what} is a {type(got).__name__} in the state dict, expected a tensor")
    if want.dim() == 0 and got.dim() != 0:
        raise ValueError(f"{what} must be a scalar (0-d tensor); the state dict has shape {tuple(got.shape)}")
    if isinstance(want, DTensor) != isinstance(got, DTensor):
        if isinstance(want, DTensor):
            raise ValueError(
                f"{what} is a plain tensor in the state dict, but this optimizer keeps it as a DTensor like its "
                f"parameter (placements {tuple(map(str, want.placements))}): load sharded state through "
                "torch.distributed.checkpoint (get_/set_optimizer_state_dict) so that it is resharded"
            )
        raise ValueError(f"{what} is a DTensor in the state dict, but this optimizer keeps a plain tensor")
    if tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"{what} has shape {tuple(got.shape)} in the state dict, expected {tuple(want.shape)}")
    if got.dtype != want.dtype:
        raise ValueError(f"{what} has dtype {got.dtype} in the state dict, expected {want.dtype}")
    if (
        isinstance(want, DTensor)
        and isinstance(got, DTensor)
        and (got.device_mesh != want.device_mesh or tuple(got.placements) != tuple(want.placements))
    ):
        raise ValueError(
            f"{what} is laid out on mesh {got.device_mesh.mesh.tolist()} with placements "
            f"{tuple(map(str, got.placements))} in the state dict, expected mesh {want.device_mesh.mesh.tolist()}"
            f" with placements {tuple(map(str, want.placements))}"
        )


# ---- torch.optim.Muon ---------------------------------------------------------------------------------------------
def _from_torch_muon(
    opt: SpectralOptimizer, groups: Sequence[Mapping[str, Any]], state: dict[Any, Any]
) -> tuple[list[Mapping[str, Any]], dict[Any, Any]]:
    from .muon import _ADJUST

    live_groups = opt.param_groups
    if len(groups) != len(live_groups):
        raise ValueError(
            f"the torch.optim.Muon state dict has {len(groups)} parameter group(s), this optimizer "
            f"{len(live_groups)} ({[g['algorithm'] for g in live_groups]})"
        )
    out: list[Mapping[str, Any]] = []
    state = dict(state)
    for gi, (g, live) in enumerate(zip(groups, live_groups)):
        at = _where(gi, live)
        if live["algorithm"] != "muon":
            raise ValueError(f"{at}: a torch.optim.Muon state dict loads into Muon groups only")
        adjust = g.get("adjust_lr_fn")
        if adjust not in _ADJUST:
            raise ValueError(
                f"{at}: the torch.optim.Muon state dict has adjust_lr_fn={adjust!r}; valid: {list(_ADJUST)}"
            )
        new = {TORCH_MUON_KEYS.get(k, k): v for k, v in g.items()}
        new.update(algorithm="muon", coefficients=tuple(g["ns_coefficients"]), norm_factor=_ADJUST[adjust])
        out.append(new)
        if len(g["params"]) == len(live["params"]):
            for pid, p in zip(g["params"], live["params"]):
                # torch creates the buffer at a parameter's first gradient: none yet is a zero buffer.
                mine = opt.state.get(p, {})
                if pid not in state and "momentum_buffer" in mine:
                    state[pid] = {"momentum_buffer": torch.zeros_like(mine["momentum_buffer"])}
    return out, state


# ---- torch.distributed.checkpoint without unpickling -------------------------------------------------------------
class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` reading non-tensor values with ``torch.load(weights_only=True)`` (DCP's uses
    ``weights_only=False``, which runs arbitrary code from the checkpoint)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        super().load_bytes(read_item, io.BytesIO(_weights_only(value)))


def _weights_only(value: io.BytesIO) -> bytes:
    """Re-serialize what ``torch.load(weights_only=True)`` accepts, so the parent's ``torch.load`` sees only that."""
    obj = torch.load(value, weights_only=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _MetadataUnpickler(pickle.Unpickler):
    """Only what a DCP ``.metadata`` file holds: DCP's metadata classes, paths, ``torch.Size``, dtypes, layouts."""

    ALLOWED = {
        ("torch", "Size"),
        ("torch", "device"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("collections", "OrderedDict"),
        *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
        *(("torch.distributed.checkpoint.metadata", n) for n in _dcp_metadata.__all__),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    }

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not dtype and (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"the checkpoint's .metadata refers to {module}.{name}, which a DCP metadata file does not hold: "
                "refusing to unpickle it"
            )
        return super().find_class(module, name)


class WeightsOnlyFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read by an unpickler that allows DCP's metadata classes only."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"the checkpoint's metadata is a {type(metadata).__name__}, not Metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
