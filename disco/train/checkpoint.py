"""Distributed checkpoints (``torch.distributed.checkpoint``) of model, optimizer, step and data RNG.

Layout: ``<out>/<optimizer>/ckpt/step_000300/`` (a DCP directory). The same code serves one process
and every ``--parallel`` mode: ``get_model_state_dict`` / ``get_optimizer_state_dict`` return DTensor
shards under FSDP2 / TP and plain tensors otherwise, and DCP reshards on load.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_STEP_DIR = re.compile(r"step_(\d+)$")


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it "assumes" a single process when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint (one with DCP's ``.metadata``) with the highest step, if any."""
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.search(p.name) and (p / ".metadata").exists()]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
    """Collective: every rank calls it. ``extra`` holds the step, wall time and data RNG state."""
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "extra": extra,
    }
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(path))


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
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return state["extra"]
