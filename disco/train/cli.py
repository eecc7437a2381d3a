"""``python -m disco train``: compare optimizers on a small GPT, in one process or under torchrun.

Examples::

    python -m disco train                                   # tiny_cpu.yaml: AdamW vs Muon vs Disco
    python -m disco train --optimizers adamw --steps 50 --out runs/quick
    python -m disco train --config gpt_small_gpu --parallel fsdp
    torchrun --standalone --nproc_per_node=2 -m disco train --parallel ddp --steps 20
    python -m disco train --resume                          # continue from the last checkpoints

Outputs in ``--out``: ``<optimizer>/metrics.jsonl``, ``<optimizer>/ckpt/step_N/``, ``summary.json``, ``loss.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

import disco.optim  # noqa: F401  (importing the package registers its optimizers)
from disco.optim.registry import get_optimizer_spec, optimizer_names
from disco.train.config import DEFAULT_CONFIG, TrainConfig, load_config, split_names
from disco.train.data import load_text, train_val_split
from disco.train.loop import train_optimizer
from disco.train.parallel import PARALLEL_MODES, init_world, shutdown
from disco.train.report import format_table, plot_losses, write_summary


def run(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Train every optimizer of ``cfg`` in turn (same seed, same data order); returns the summary rows.

    Works in one process and on every rank of a torchrun job (or any initialised process group).
    Rank 0 prints the table and writes ``summary.json`` and ``loss.png``.
    """
    for name in cfg.optimizers:
        get_optimizer_spec(name)  # fail before any work on a typo
    world = init_world(cfg.parallel, cfg.device, cfg.tp_size, cfg.dp_shard)
    try:
        train, val = train_val_split(load_text(cfg.data), cfg.val_fraction)
        out = Path(cfg.out)
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            print(
                f"[disco] {', '.join(cfg.optimizers)} | {cfg.steps} steps | batch {cfg.batch_size} x {cfg.seq_len}"
                f" | {world.parallel} on {world.world_size} x {world.device.type} | {len(train)} train bytes"
            )
        results = {name: train_optimizer(cfg, name, world, train, val) for name in cfg.optimizers}
        if world.is_main:
            print("\n" + format_table(results))
            print(f"\nwrote {write_summary(out, results)}", end="")
            plot = plot_losses(out, list(results))
            print(f" and {plot}" if plot else "")
        return results
    finally:
        shutdown(world)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m disco train",
        description="Train a small byte-level GPT with several optimizers (same data order and seed) and compare.",
    )
    p.add_argument("--config", default=None, help=f"YAML file or built-in name (default: {DEFAULT_CONFIG})")
    p.add_argument("--optimizers", help="comma-separated registered names (see --list-optimizers)")
    p.add_argument("--list-optimizers", action="store_true", help="print the registered optimizers and exit")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", help="learning rate for every optimizer (0.01) or per optimizer (adamw=3e-3,muon=0.02)")
    p.add_argument("--data", help="a text file to train on (default: the pydoc_data topics corpus)")
    p.add_argument("--parallel", choices=PARALLEL_MODES)
    p.add_argument("--out", help="output folder")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoints")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--track-norms-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size (rows)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--tp-size", type=int)
    p.add_argument("--dp-shard", type=int)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = load_config(args.config or DEFAULT_CONFIG)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in ("optimizers", "lr") and getattr(args, f.name, None) is not None
    }
    cfg = dataclasses.replace(cfg, **overrides)
    if args.optimizers:
        cfg = dataclasses.replace(cfg, optimizers=split_names(args.optimizers))
    if args.lr:
        cfg = dataclasses.replace(cfg, lr={**cfg.lr, **parse_lr(args.lr, cfg.optimizers)})
    if args.optimizers:
        return cfg
    # names that come from a config file and are not registered (yet) are skipped, not fatal
    known = set(optimizer_names())
    missing = [n for n in cfg.optimizers if n not in known]
    if missing:
        print(f"[disco] skipping unregistered optimizers from the config: {', '.join(missing)}")
    return dataclasses.replace(cfg, optimizers=[n for n in cfg.optimizers if n in known])


def parse_lr(text: str, names: list[str]) -> dict[str, float]:
    """``"0.01"`` -> that lr for every name; ``"adamw=3e-3,muon=0.02"`` -> per name."""
    if "=" not in text:
        return dict.fromkeys(names, float(text))
    pairs = (item.split("=", 1) for item in split_names(text))
    return {name.strip(): float(value) for name, value in pairs}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_optimizers:
        for name in optimizer_names():
            spec = get_optimizer_spec(name)
            print(f"{name:10s} lr={spec.default_lr:<8g} {spec.doc}")
        return 0
    cfg = config_from_args(args)
    if not cfg.optimizers:
        print("[disco] no optimizer to train")
        return 2
    torch.set_float32_matmul_precision("high")
    run(cfg)
    return 0
