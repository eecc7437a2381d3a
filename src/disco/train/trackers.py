"""Optional experiment trackers for ``--log tensorboard | wandb``: losses, lr, speed and the tracked norms.

TensorBoard writes to ``<out>/tensorboard/<optimizer>/`` (``tensorboard --logdir <out>/tensorboard`` compares the
optimizers). W&B makes one run per optimizer, grouped by the ``--out`` folder, in offline mode unless
``WANDB_MODE`` says otherwise (``wandb sync <out>/wandb/offline-run-*`` uploads later); ``WANDB_PROJECT``
names the project (default ``disco``). Only rank 0 logs.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Protocol

from disco.train.config import TrainConfig, require

_NEEDS = {  # --log value -> (module to import, package, install command)
    "tensorboard": ("torch.utils.tensorboard", "tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "wandb", "pip install wandb"),
}


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` record as flat scalar tags: ``loss/train``, ``loss/val``, ``lr``, ``norms/<key>``, and
    with QK-clip ``qk_clip/max_logit``, ``qk_clip/clipped_heads``, ``qk_clip/max_logit/<layer>``."""
    out = {"loss/train": record["train_loss"], "lr": record["lr"], "tokens_per_s": record["tokens_per_s"]}
    if "val_loss" in record:
        out["loss/val"] = record["val_loss"]
    out.update({f"norms/{k}": v for k, v in (record.get("norms") or {}).items()})
    for key in ("max_logit", "clipped_heads"):
        if key in record:
            out[f"qk_clip/{key}"] = record[key]
    out.update({f"qk_clip/max_logit/{k}": v for k, v in (record.get("max_logit_layers") or {}).items()})
    return {k: float(v) for k, v in out.items()}


def check_tracker(kind: str) -> None:
    """Fail before any work (``UsageError`` with the install command) when the tracker's package is missing."""
    if kind in _NEEDS:
        module, package, install = _NEEDS[kind]
        require(module, f"--log {kind}", install, package)


class TensorBoardTracker:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, cfg: TrainConfig, name: str):
        import wandb

        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        config = {**dataclasses.asdict(cfg), "optimizer": name}
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "disco"),
            name=name,
            group=out.resolve().name,
            dir=str(out),
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]  # a str: wandb checks it against its modes
            config=config,
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_tracker(cfg: TrainConfig, name: str) -> Tracker | None:
    """The tracker ``cfg.log`` asks for, for optimizer ``name`` (``None`` for ``none``)."""
    if cfg.log == "tensorboard":
        return TensorBoardTracker(Path(cfg.out) / "tensorboard" / name)
    if cfg.log == "wandb":
        return WandbTracker(cfg, name)
    return None
