"""The training configuration: a dataclass, filled from a YAML file and then from the command line.

Every bad value raises ``UsageError`` with a message that fits on one line; ``python -m disco train`` prints it
and exits with status 2 (no traceback). ``validate`` checks a whole config before any work starts.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from disco.train.model import GPTConfig

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "tiny_cpu"
INSTALL_TRAIN = 'pip install "disco-optim[train]"'
LOGGERS = ("none", "tensorboard", "wandb")


class UsageError(ValueError):
    """A bad input (option, config file, data file, environment): one line for the user, exit status 2."""


def require(module: str, purpose: str, install: str = INSTALL_TRAIN, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise a ``UsageError`` naming the package and the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{purpose} needs {package or module.split('.')[0]}, not installed: {install}") from None


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
    print_every: int = 0  # progress lines when stderr is not a terminal; 0: about ten per optimizer
    track_norms_every: int = 0  # 0: off
    ckpt_every: int = 100  # and always at the end, and on Ctrl-C / SIGTERM; 0: only those
    keep_checkpoints: int = 2  # the newest N checkpoints of each optimizer are kept; 0: all
    out: str = "runs/default"
    resume: bool = False
    log: str = "none"  # none | tensorboard | wandb (offline unless WANDB_MODE says otherwise)
    parallel: str = "none"
    tp_size: int = 2  # for fsdp+tp
    dp_shard: int = 0  # for hsdp: the shard group size (0: world // 2 when the world is >= 4, else world)
    threads: int = 0  # CPU threads per process; 0: the cores divided by the processes on this machine
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    compile: bool = False
    qk_clip_tau: float = 0.0  # > 0: QK-clip (MuonClip) caps each head's max logit after every step
    split_heads: bool = False  # muon, disco, scion: one LMO per attention head (and q, k, v apart if fused)


# ---- reading a config file ------------------------------------------------------------------------------------


def _check_type(where: str, value: Any, annotation: str) -> Any:
    """``value`` for a field annotated ``annotation`` (a string: ``from __future__ import annotations``)."""
    kinds = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    base = kinds[0].split("[")[0]
    if base == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if base == "list" and isinstance(value, str):
        return split_names(value, where)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "dict": isinstance(value, dict),
    }.get(base, True)
    if not ok:
        want = {
            "int": "a whole number",
            "float": "a number",
            "bool": "true or false",
            "str": "a string",
            "list": "a list of names or a comma-separated string",
            "dict": "a mapping",
        }[base]
        raise UsageError(f"{where}: expected {want}, got {value!r}")
    return float(value) if base == "float" else value


def config_from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping of settings (key: value), got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name: f for f in dataclasses.fields(GPTConfig)}
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise UsageError(f"{source}: model: expected a mapping (dim: 128, ...), got {model!r}")
    unknown = sorted(set(data) - set(fields)) + sorted(f"model.{k}" for k in model if k not in model_fields)
    if unknown:
        raise UsageError(f"{source}: unknown keys {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    values = {k: _check_type(f"{source}: {k}", v, str(fields[k].type)) for k, v in data.items() if k != "model"}
    model = {k: _check_type(f"{source}: model.{k}", v, str(model_fields[k].type)) for k, v in model.items()}
    if isinstance(values.get("lr"), dict):
        values["lr"] = {str(k): _check_type(f"{source}: lr.{k}", v, "float") for k, v in values["lr"].items()}
    return TrainConfig(model=GPTConfig(**model), **values)


def split_names(text: str, what: str = "names") -> list[str]:
    """``"a, b"`` -> ``["a", "b"]``; an empty name (``"a,,b"``, ``"a,"``) is refused, naming ``what``."""
    names = [n.strip() for n in text.split(",")]
    if not text.strip():
        return []
    if not all(names):
        raise UsageError(f"{what} {text!r}: an empty name (two commas in a row, or one at an end)")
    return names


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name: str) -> Path:
    """A path as given, else relative to ``disco/train/``, else a bare name in ``disco/train/configs/``."""
    for candidate in (Path(name), Path(__file__).parent / name, CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise UsageError(f"--config {name}: no such file or built-in config (built-in: {', '.join(builtin_configs())})")


def load_config(name: str = DEFAULT_CONFIG) -> TrainConfig:
    path = resolve_config_path(name)
    yaml = require("yaml", f"reading the config {path.name}", package="PyYAML")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"--config {path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read it ({e})") from None
    return config_from_dict(data if data is not None else {}, source=str(path))


# ---- checking a whole config ----------------------------------------------------------------------------------


def validate(cfg: TrainConfig) -> None:
    """Refuse what cannot train (before any work): sizes, counts, fractions, names, the device."""
    positive = {"steps": cfg.steps, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len}
    positive.update({"eval_batches": cfg.eval_batches, "tp_size": cfg.tp_size})
    for name, value in positive.items():
        if value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    counts = {"eval_every": cfg.eval_every, "log_every": cfg.log_every, "print_every": cfg.print_every}
    counts.update({"track_norms_every": cfg.track_norms_every, "ckpt_every": cfg.ckpt_every})
    counts.update({"keep_checkpoints": cfg.keep_checkpoints, "warmup_steps": cfg.warmup_steps})
    counts.update({"dp_shard": cfg.dp_shard, "threads": cfg.threads})
    for name, value in counts.items():
        if value < 0:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be 0 or more")
    if not 0 <= cfg.cooldown_frac <= 1:
        raise UsageError(f"cooldown_frac {cfg.cooldown_frac}: must be between 0 and 1")
    if not 0 < cfg.val_fraction < 1:
        raise UsageError(f"val_fraction {cfg.val_fraction}: must be between 0 and 1 (exclusive)")
    if cfg.grad_clip < 0 or cfg.weight_decay < 0:
        raise UsageError(f"grad_clip {cfg.grad_clip} / weight_decay {cfg.weight_decay}: must be 0 or more")
    if not cfg.qk_clip_tau >= 0 or cfg.qk_clip_tau == float("inf"):  # also NaN
        raise UsageError(f"--qk-clip-tau {cfg.qk_clip_tau}: must be a finite number, 0 (off) or more")
    for name, lr in cfg.lr.items():
        if not lr > 0:  # also NaN
            raise UsageError(f"--lr {name}={lr}: a learning rate must be positive")
    m = cfg.model
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "top_k"):
        if getattr(m, name) <= 0:
            raise UsageError(f"model.{name} {getattr(m, name)}: must be at least 1")
    if m.dim % m.n_heads or (m.dim // m.n_heads) % 2:
        raise UsageError(f"model.dim {m.dim} / n_heads {m.n_heads}: the head size must be a whole, even number")
    if m.n_experts and m.top_k > m.n_experts:
        raise UsageError(f"model.top_k {m.top_k}: larger than n_experts {m.n_experts}")
    choices = {"device": ("auto", "cpu", "cuda"), "dtype": ("float32", "bfloat16"), "log": LOGGERS}
    for name, valid in choices.items():
        if getattr(cfg, name) not in valid:
            raise UsageError(f"--{name} {getattr(cfg, name)}: valid: {', '.join(valid)}")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
            raise UsageError(f"--device cuda: CUDA is not available (torch {torch.__version__}, {build}); use cpu")
