"""Distributed checkpoints (``torch.distributed.checkpoint``) of model, optimizer, step and data RNG.

Layout: ``<out>/<optimizer>/ckpt/step_000300/`` (a DCP directory) and ``<out>/<optimizer>/config.json`` (the
settings the run started with, compared on ``--resume``). The same code serves one process and every
``--parallel`` mode: ``get_model_state_dict`` / ``get_optimizer_state_dict`` return DTensor shards under
FSDP2 / TP and plain tensors otherwise, and DCP reshards on load.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load  # = dcp.load (not re-exported)
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save  # = dcp.save (not re-exported)

from disco.train.config import TrainConfig, UsageError

_STEP_DIR = re.compile(r"step_(\d+)$")


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it "assumes" a single process when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def checkpoints(root: Path, complete: bool = True) -> list[Path]:
    """``step_N`` folders under ``root``, oldest first; ``complete``: only those with DCP's ``.metadata``."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.search(p.name) and p.is_dir()]
    return sorted((p for p in found if not complete or (p / ".metadata").exists()), key=step_of)


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint (one with DCP's ``.metadata``) with the highest step, if any."""
    done = checkpoints(root)
    return done[-1] if done else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints (``keep`` 0: keep all), and unfinished older ones."""
    done = checkpoints(root)
    if keep <= 0 or not done:
        return
    newest = step_of(done[-1])
    for p in checkpoints(root, complete=False):
        if (p in done[:-keep]) or (p not in done and step_of(p) < newest):
            shutil.rmtree(p, ignore_errors=True)


# ---- what a run was started with, and what --resume may change ------------------------------------------------

#: settings that change the trajectory: ``--resume`` refuses to continue a run with other values. ``steps``,
#: intervals, logging, ``--out`` and ``--parallel`` (DCP reshards) may change.
TRAJECTORY_KEYS = (
    "model", "batch_size", "seq_len", "lr", "weight_decay", "optimizer_kwargs", "init", "warmup_steps",
    "cooldown_frac", "grad_clip", "seed", "data", "val_fraction", "dtype", "qk_clip_tau", "split_heads",
)  # fmt: skip


def run_settings(cfg: TrainConfig, name: str, lr: float) -> dict[str, Any]:
    """The JSON form of ``cfg`` for optimizer ``name`` (its own lr and kwargs), as ``config.json`` stores it."""
    settings = dataclasses.asdict(cfg)
    settings.update(optimizer=name, lr=lr, optimizer_kwargs=cfg.optimizer_kwargs.get(name) or {})
    settings.pop("optimizers")
    as_read: dict[str, Any] = json.loads(json.dumps(settings, default=str))  # tuples -> lists, as read back
    return as_read


def settings_path(cfg: TrainConfig, name: str) -> Path:
    return Path(cfg.out) / name / "config.json"


def write_settings(cfg: TrainConfig, name: str, lr: float) -> None:
    settings_path(cfg, name).write_text(json.dumps(run_settings(cfg, name, lr), indent=2) + "\n")


def _check_same_settings(cfg: TrainConfig, name: str, lr: float) -> None:
    path = settings_path(cfg, name)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # a run from before config.json existed: nothing to compare against
    now = run_settings(cfg, name, lr)
    diff = [k for k in TRAJECTORY_KEYS if k in saved and saved[k] != now[k]]
    if diff:
        changes = "; ".join(f"{k} {json.dumps(saved[k])} -> {json.dumps(now[k])}" for k in diff)
        raise UsageError(
            f"--resume: {path.parent} was trained with other settings ({changes}): "
            "resume with the same settings, or start a new run with another --out"
        )


def plan_resume(cfg: TrainConfig) -> dict[str, Path | None]:
    """The checkpoint each optimizer of ``cfg`` resumes from (``None``: it starts at step 0).

    Without ``cfg.resume`` every optimizer starts over. With it, refuses (``UsageError``) when no optimizer has a
    checkpoint in ``cfg.out``, when a checkpoint is past ``cfg.steps``, or when the settings that shape the
    trajectory differ from the ones the run started with (``config.json``).
    """
    if not cfg.resume:
        return dict.fromkeys(cfg.optimizers)
    from disco.optim.registry import get_optimizer_spec

    found = {name: latest_checkpoint(Path(cfg.out) / name / "ckpt") for name in cfg.optimizers}
    if all(path is None for path in found.values()):
        where = Path(cfg.out) / (cfg.optimizers[0] if len(cfg.optimizers) == 1 else "{" + ",".join(found) + "}")
        raise UsageError(f"--resume: no checkpoint in {where}/ckpt; run without --resume to start a new run")
    for name, path in found.items():
        if path is None:
            continue
        if step_of(path) > cfg.steps:
            raise UsageError(f"--resume: {path} is past --steps {cfg.steps}; pass --steps {step_of(path)} or more")
        _check_same_settings(cfg, name, float(cfg.lr.get(name, get_optimizer_spec(name).default_lr)))
    return found


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
    """Collective: every rank calls it. ``extra`` holds the step, wall time and data RNG state."""
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "extra": extra,
    }
    with _quiet_single_process():
        dcp_save(state, checkpoint_id=str(path))


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
) -> dict[str, Any]:
    """Collective: load in place into ``model`` and ``optimizer``; returns ``extra`` filled from disk.

    ``extra`` is a template of the saved dict (same keys; tensors of the right shape).
    """
    state: dict[str, Any] = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "extra": dict(extra),
    }
    from ..optim.checkpoint import WeightsOnlyFileSystemReader, WeightsOnlyLoadPlanner

    with _quiet_single_process():
        # Nothing in a checkpoint is unpickled beyond tensors and plain values; a key the checkpoint lacks (the
        # optimizer's format header, absent from checkpoints written before it) is left as the template has it.
        planner = WeightsOnlyLoadPlanner(allow_partial_load=True)
        dcp_load(state, storage_reader=WeightsOnlyFileSystemReader(str(path)), planner=planner)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    loaded: dict[str, Any] = state["extra"]
    return loaded
