"""``python -m disco train``: compare optimizers on a small GPT, in one process or under torchrun.

Examples::

    python -m disco train                                   # tiny_cpu.yaml: AdamW vs Muon vs Disco
    python -m disco train --optimizers adamw --steps 50 --out runs/quick
    python -m disco train --config gpt_small_gpu --parallel fsdp
    torchrun --standalone --nproc_per_node=2 -m disco train --parallel ddp --steps 20
    python -m disco train --resume                          # continue from the last checkpoints

Outputs in ``--out``: ``<optimizer>/metrics.jsonl``, ``<optimizer>/config.json``, ``<optimizer>/ckpt/step_N/``,
``summary.json``, ``loss.png`` (and ``tensorboard/<optimizer>/`` or ``wandb/`` with ``--log``).

A bad input is one line on stderr and exit status 2. Ctrl-C or SIGTERM writes a checkpoint, prints the command
that resumes, and exits with 130 / 143.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

import disco.optim  # noqa: F401  (importing the package registers its optimizers)
from disco.optim.registry import get_optimizer_spec, optimizer_names
from disco.train.checkpoint import plan_resume
from disco.train.config import (
    DEFAULT_CONFIG,
    INSTALL_TRAIN,
    LOGGERS,
    TrainConfig,
    UsageError,
    builtin_configs,
    load_config,
    split_names,
    validate,
)
from disco.train.data import check_long_enough, load_text, train_val_split
from disco.train.loop import Interrupted, StopSignals, train_optimizer
from disco.train.parallel import PARALLEL_MODES, World, init_world, shutdown
from disco.train.report import add_steps_to_reference, format_table, machine, plot_losses, plot_title, write_summary
from disco.train.trackers import check_tracker

PROG = "python -m disco train"


def run(cfg: TrainConfig, command: str | None = None) -> dict[str, dict[str, Any]]:
    """Train every optimizer of ``cfg`` in turn (same seed, same data order); returns the summary rows.

    Works in one process and on every rank of a torchrun job (or any initialised process group).
    Rank 0 prints the table and writes ``summary.json`` (with ``command``, the command line that ran, when given)
    and ``loss.png``. Raises ``UsageError`` for a bad
    config (before any work) and ``Interrupted`` after the checkpoint that a SIGINT / SIGTERM asked for.
    """
    validate(cfg)
    for name in cfg.optimizers:
        get_optimizer_spec(name)  # fail before any work on a typo
    check_tracker(cfg.log)
    train, val = train_val_split(load_text(cfg.data), cfg.val_fraction)
    check_long_enough(train, val, cfg.seq_len, f"--data {cfg.data}" if cfg.data else "the pydoc_data corpus")
    plans = plan_resume(cfg)  # refuses --resume without a checkpoint, or with other settings
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    world = init_world(cfg.parallel, cfg.device, cfg.tp_size, cfg.dp_shard, cfg.threads)
    try:
        if cfg.batch_size % world.dp_size:
            raise UsageError(f"--batch-size {cfg.batch_size}: not divisible by {world.dp_size} data-parallel ranks")
        if world.is_main:
            print(header(cfg, world, len(train)), flush=True)
        results = {}
        with StopSignals() as stop:
            for i, name in enumerate(cfg.optimizers):
                signum = stop.requested(world)  # a signal during the last step of the previous optimizer
                if signum:
                    raise Interrupted(name, 0, None, signum)
                tag = f"{name} {i + 1}/{len(cfg.optimizers)}" if len(cfg.optimizers) > 1 else name
                results[name] = train_optimizer(cfg, name, world, train, val, plans[name], stop, tag)
        if world.is_main:
            add_steps_to_reference(results, out)
            about = {**machine(), "threads": world.threads, "layout": world.layout, "device": world.device.type}
            print("\n" + format_table(results, cfg, about))
            print(f"\nwrote {write_summary(out, results, about, command)}", end="")
            plot = plot_losses(out, list(results), plot_title(cfg, list(results)))
            print(f" and {plot}" if plot else f"; skipped loss.png: matplotlib is not installed ({INSTALL_TRAIN})")
        return results
    finally:
        shutdown(world)


def header(cfg: TrainConfig, world: World, train_bytes: int) -> str:
    """The first line of a run: optimizers, steps, batch, the layout actually used, threads, data."""
    where = f"{world.parallel} on {world.world_size} x {world.device.type}"
    if world.parallel != "none":
        where += f": {world.layout}"
        if world.parallel == "hsdp" and not cfg.dp_shard:
            where += " (--dp-shard N sets the shard group)"
    how = "automatic: cores / processes here" if world.threads_auto else "--threads"
    return (
        f"[disco] {', '.join(cfg.optimizers)} | {cfg.steps} steps | batch {cfg.batch_size} x {cfg.seq_len}"
        f" | {where} | {world.threads} thread{'s' if world.threads != 1 else ''} per process ({how})"
        f" | {train_bytes} train bytes"
    )


# ---- the command line -----------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (and a pointer to ``--help``), not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train a small byte-level GPT with several optimizers (same data order and seed) and compare. "
        "Options override the --config file; every file goes under --out.",
        epilog="Exit status: 0 done; 2 a bad input (one line on stderr); 130 / 143 stopped by Ctrl-C / SIGTERM "
        "after writing a checkpoint (the command that resumes is printed).",
    )
    cfg = TrainConfig()
    builtin = ", ".join(builtin_configs())
    p.add_argument("--config", help=f"YAML file or built-in name ({builtin}; default: {DEFAULT_CONFIG})")
    p.add_argument("--optimizers", help="comma-separated registered names (see --list-optimizers)")
    p.add_argument("--list-optimizers", action="store_true", help="print the registered optimizers and exit")
    p.add_argument("--steps", type=_count, help="optimizer steps, for each optimizer")
    p.add_argument(
        "--lr",
        help="learning rate for every optimizer (0.01) or per optimizer (adamw=3e-3,muon=0.02); "
        "default: each optimizer's own (see --list-optimizers)",
    )
    p.add_argument("--data", help="a text file to train on, byte-level (default: the pydoc_data topics corpus)")
    p.add_argument("--parallel", choices=PARALLEL_MODES, help="layout under torchrun (one process: none)")
    p.add_argument("--out", help="output folder: metrics, checkpoints, summary.json, loss.png")
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue from the newest checkpoint of each optimizer in --out (refuses if there is none)",
    )
    p.add_argument("--eval-every", type=_count, help="validation loss every N steps (0: only at the end)")
    p.add_argument("--track-norms-every", type=_count, help="log the optimizer's tracked norms every N steps (0: off)")
    p.add_argument(
        "--ckpt-every",
        type=_count,
        help=f"checkpoint every N steps (default {cfg.ckpt_every}; 0: only at the end and on Ctrl-C / SIGTERM)",
    )
    p.add_argument(
        "--keep-checkpoints",
        type=_count,
        help=f"keep the newest N checkpoints of each optimizer (default {cfg.keep_checkpoints}; 0: all)",
    )
    p.add_argument("--log-every", type=_count, help="write a metrics.jsonl line every N steps")
    p.add_argument(
        "--print-every",
        type=_count,
        help="when stderr is not a terminal: a progress line every N steps (0: ten per optimizer)",
    )
    p.add_argument(
        "--log",
        choices=LOGGERS,
        help="also log losses, lr and tracked norms to TensorBoard (--out/tensorboard/<optimizer>) or W&B "
        "(offline unless WANDB_MODE is set; WANDB_PROJECT names the project)",
    )
    p.add_argument("--batch-size", type=_count, help="global batch size in rows (split over data-parallel ranks)")
    p.add_argument("--seq-len", type=_count, help="bytes per row")
    p.add_argument("--seed", type=_count, help="model init and data order (the same for every optimizer)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="bfloat16: autocast for the forward pass")
    p.add_argument("--tp-size", type=_count, help="--parallel fsdp+tp: ranks per tensor-parallel group")
    p.add_argument("--dp-shard", type=_count, help="--parallel hsdp: ranks per shard group (0: automatic)")
    p.add_argument(
        "--threads",
        type=_count,
        help="CPU threads per process (default 0: the cores divided by the processes on this machine; "
        "the header says how many); on a loaded machine 1 can be several times faster",
    )
    p.add_argument(
        "--qk-clip-tau",
        type=float,
        help="QK-clip (MuonClip): after each step scale the q/k rows of every head whose max attention logit"
        " exceeds TAU (e.g. 100; 0: off); max_logit and clipped_heads are logged (docs/qkclip.md)",
    )
    p.add_argument(
        "--split-heads",
        action="store_true",
        default=None,
        help="muon, disco, scion: orthogonalize each attention head on its own (q, k, v apart when fused)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = load_config(args.config or DEFAULT_CONFIG)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in ("optimizers", "lr") and getattr(args, f.name, None) is not None
    }
    cfg = dataclasses.replace(cfg, **overrides)
    if args.optimizers is not None:
        names = split_names(args.optimizers, "--optimizers")
        known = set(optimizer_names())
        unknown = [n for n in names if n not in known]
        if unknown:
            valid = ", ".join(sorted(known))
            raise UsageError(f"--optimizers: unknown {', '.join(map(repr, unknown))}; valid: {valid}")
        cfg = dataclasses.replace(cfg, optimizers=names)
    else:  # names that come from a config file and are not registered (yet) are skipped, not fatal
        known = set(optimizer_names())
        missing = [n for n in cfg.optimizers if n not in known]
        if missing:
            print(f"[disco] skipping unregistered optimizers from the config: {', '.join(missing)}")
        cfg = dataclasses.replace(cfg, optimizers=[n for n in cfg.optimizers if n in known])
    if not cfg.optimizers:
        raise UsageError(f"no optimizer to train: pass --optimizers (valid: {', '.join(optimizer_names())})")
    if args.lr is not None:
        cfg = dataclasses.replace(cfg, lr={**cfg.lr, **parse_lr(args.lr, cfg.optimizers)})
    return cfg


def parse_lr(text: str, names: list[str]) -> dict[str, float]:
    """``"0.01"`` -> that lr for every name; ``"adamw=3e-3,muon=0.02"`` -> per name."""

    def number(value: str, what: str) -> float:
        try:
            lr = float(value)
        except ValueError:
            lr = math.nan
        if not lr > 0 or math.isinf(lr):
            raise UsageError(f"--lr {text}: {what} {value.strip()!r} is not a positive number")
        return lr

    if "=" not in text:
        return dict.fromkeys(names, number(text, "the learning rate"))
    out = {}
    for item in split_names(text, "--lr"):
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep or name not in optimizer_names():
            raise UsageError(f"--lr {text}: {item!r} is not NAME=VALUE with a registered optimizer name")
        out[name] = number(value, f"the learning rate of {name}")
    return out


def command_line(argv: list[str]) -> str:
    """This run's command (for ``summary.json``): ``python -m disco train ...``, or under torchrun
    ``torchrun --nproc_per_node=N -m disco train ...``."""
    args = shlex.join(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        nproc = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        return f"torchrun --nproc_per_node={nproc} -m disco train {args}".rstrip()
    return f"{PROG} {args}".rstrip()


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run (``--resume`` added once)."""
    args = shlex.join([a for a in argv if a != "--resume"] + ["--resume"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        nproc = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        return f"torchrun --nproc_per_node={nproc} -m disco train {args}   (with your torchrun options)"
    return f"{PROG} {args}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        if args.list_optimizers:
            for name in optimizer_names():
                spec = get_optimizer_spec(name)
                print(f"{name:10s} lr={spec.default_lr:<8g} {spec.doc}")
            return 0
        cfg = config_from_args(args)
        torch.set_float32_matmul_precision("high")
        run(cfg, command_line(argv))
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if main_rank:
            print(f"[disco] {e}", flush=True)
            print(f"[disco] resume with: {resume_command(argv)}", flush=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (no checkpoint written since the last one)", file=sys.stderr)
        return 130
    return 0
