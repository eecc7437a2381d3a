"""The training configuration: a dataclass, filled from a YAML file and then from the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from disco.train.model import GPTConfig

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "tiny_cpu"


@dataclass
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "muon", "disco"])
    steps: int = 300
    batch_size: int = 16  # global: split over the data-parallel ranks
    seq_len: int = 128
    lr: dict[str, float] = field(default_factory=dict)  # per optimizer; default: the registry's default_lr
    weight_decay: float = 0.0
    optimizer_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per optimizer, to its builder
    init: str | None = None  # a disco.init scheme for every optimizer (default: what the optimizer asks for)
    warmup_steps: int = 10  # linear warmup, then constant, then linear cooldown to 10% ...
    cooldown_frac: float = 0.3  # ... over this last fraction of the steps
    grad_clip: float = 0.0  # 0: no clipping
    seed: int = 0
    data: str | None = None  # a text file; None: the pydoc_data topics corpus
    val_fraction: float = 0.1
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 1
    track_norms_every: int = 0  # 0: off
    ckpt_every: int = 0  # 0: only at the end
    out: str = "runs/default"
    resume: bool = False
    parallel: str = "none"
    tp_size: int = 2  # for fsdp+tp
    dp_shard: int = 0  # for hsdp: the shard group size (0: world // 2 when the world is >= 4, else world)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    compile: bool = False


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    data = dict(data)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    model_known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(data) - known
    unknown |= {f"model.{k}" for k in data.get("model") or {} if k not in model_known}
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
    data["model"] = GPTConfig(**(data.get("model") or {}))
    if isinstance(data.get("optimizers"), str):
        data["optimizers"] = split_names(data["optimizers"])
    return TrainConfig(**data)


def split_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def resolve_config_path(name: str) -> Path:
    """A path as given, else relative to ``disco/train/``, else a bare name in ``disco/train/configs/``."""
    for candidate in (Path(name), Path(__file__).parent / name, CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    options = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {name!r} not found (built-in configs: {options})")


def load_config(name: str = DEFAULT_CONFIG) -> TrainConfig:
    import yaml

    with resolve_config_path(name).open() as f:
        return config_from_dict(yaml.safe_load(f) or {})
