"""Train one optimizer: build model and optimizer, run the steps, log, evaluate and checkpoint."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from disco.optim.registry import OptimizerSpec, get_optimizer_spec
from disco.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, step_dir
from disco.train.config import TrainConfig
from disco.train.data import BatchSampler, eval_batches
from disco.train.model import GPT
from disco.train.parallel import World, all_mean, barrier, parallelize
from disco.train.report import MetricsLog


def lr_multiplier(step: int, steps: int, warmup: int, cooldown_frac: float) -> float:
    """Warmup-stable-decay: linear warmup, constant, linear decay to 10% over the last ``cooldown_frac``."""
    if warmup > 0 and step <= warmup:
        return step / warmup
    cooldown = int(cooldown_frac * steps)
    start = steps - cooldown
    if cooldown > 0 and step > start:
        return 0.1 + 0.9 * (steps - step) / cooldown
    return 1.0


def apply_init(model: nn.Module, scheme: str) -> None:
    """Re-initialise the hidden matrices (``layers.*``, 2-D and 3-D) with ``disco.init.build_init_fn(scheme)``.

    Runs before any parallelism, from the seeded default generator, so every rank gets the same weights.
    Embedding, head and norms keep the model's own init.
    """
    from disco.init import build_init_fn

    init_fn = build_init_fn(scheme)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("layers.") and p.ndim >= 2:
                init_fn(p)


def build_model(cfg: TrainConfig, spec: OptimizerSpec, world: World) -> GPT:
    torch.manual_seed(cfg.seed)  # same initial weights for every optimizer and on every rank
    model = GPT(dataclasses.replace(cfg.model, max_seq_len=cfg.seq_len))
    scheme = cfg.init or spec.init
    if scheme:
        apply_init(model, scheme)
    return model.to(world.device)


def build_optimizer(cfg: TrainConfig, spec: OptimizerSpec, model: nn.Module, world: World) -> torch.optim.Optimizer:
    kwargs = dict(cfg.optimizer_kwargs.get(spec.name) or {})
    accepted = inspect.signature(spec.build).parameters
    if "mesh" in accepted:
        kwargs.setdefault("mesh", world.mesh)
    if "parallel" in accepted:
        kwargs.setdefault("parallel", world.parallel)
    lr = float(cfg.lr.get(spec.name, spec.default_lr))
    opt = spec.build(model, lr=lr, weight_decay=cfg.weight_decay, **kwargs)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])  # the schedule scales each group's own lr
    return opt


def keeps_momentum_in_grad(opt: torch.optim.Optimizer) -> bool:
    """``is_light`` optimizers keep their momentum in ``p.grad``: the loop must not zero the gradients."""
    return bool(getattr(opt, "is_light", False)) or any(g.get("is_light") for g in opt.param_groups)


def _scalar(x: Any) -> float:
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x.item() if isinstance(x, Tensor) else x)


def batch_loss(fwd: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, device: torch.device) -> Tensor:
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
        logits = fwd(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(fwd: nn.Module, batches: list[tuple[Tensor, Tensor]], cfg: TrainConfig, world: World) -> float:
    fwd.eval()
    total = sum(batch_loss(fwd, x, y, cfg, world.device).item() for x, y in batches)
    fwd.train()
    return all_mean(total / len(batches), world)


class Progress:
    """tqdm on rank 0 when stderr is a terminal; otherwise a plain line every tenth of the run."""

    def __init__(self, name: str, total: int, initial: int, world: World):
        self.bar, self.name, self.total, self.enabled = None, name, total, world.is_main
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=f"{name:>8}", dynamic_ncols=True, leave=True)

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if record:
                post = {"loss": f"{record['train_loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                if "val_loss" in record:
                    post["val"] = f"{record['val_loss']:.3f}"
                self.bar.set_postfix(post, refresh=False)
        elif self.enabled and record and (step % max(1, self.total // 10) == 0 or "val_loss" in record):
            val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
            print(
                f"[{self.name}] step {step}/{self.total} loss {record['train_loss']:.4f}{val} "
                f"{record['tokens_per_s']:.0f} tok/s",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_optimizer(cfg: TrainConfig, name: str, world: World, train: Tensor, val: Tensor) -> dict[str, Any]:
    """Train a fresh model with optimizer ``name``; returns its summary row (and writes its metrics)."""
    spec = get_optimizer_spec(name)
    run_dir = Path(cfg.out) / name
    ckpt_root = run_dir / "ckpt"
    model = build_model(cfg, spec, world)
    fwd = parallelize(model, world)
    opt = build_optimizer(cfg, spec, model, world)
    dp = {"dp_rank": world.dp_rank, "dp_size": world.dp_size}
    sampler = BatchSampler(train, cfg.seq_len, cfg.batch_size, seed=cfg.seed, **dp)
    val_batches = eval_batches(val, cfg.seq_len, cfg.batch_size, cfg.eval_batches, seed=cfg.seed + 1, **dp)
    train_batches = eval_batches(train, cfg.seq_len, cfg.batch_size, cfg.eval_batches, seed=cfg.seed + 2, **dp)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=world.is_main)

    step, prior_wall, train_s = 0, 0.0, 0.0
    latest = latest_checkpoint(ckpt_root) if cfg.resume else None
    if latest is not None:
        template = {"step": torch.tensor(0), "wall_s": torch.tensor(0.0), "train_s": torch.tensor(0.0)}
        extra = load_checkpoint(latest, model, opt, {**template, "data_rng": sampler.get_state()})
        step, prior_wall, train_s = int(extra["step"]), float(extra["wall_s"]), float(extra["train_s"])
        sampler.set_state(extra["data_rng"])
        log.truncate_after(step)
        if world.is_main:
            print(f"[{name}] resumed from {latest} at step {step}")
    else:
        log.reset()
    barrier(world)

    def checkpoint() -> None:
        extra = {"step": torch.tensor(step), "wall_s": torch.tensor(wall()), "train_s": torch.tensor(train_s)}
        save_checkpoint(step_dir(ckpt_root, step), model, opt, {**extra, "data_rng": sampler.get_state()})

    start = time.perf_counter()

    def wall() -> float:
        return prior_wall + time.perf_counter() - start

    tokens_per_step = cfg.batch_size * cfg.seq_len
    light = keeps_momentum_in_grad(opt)
    track = cfg.track_norms_every > 0 and hasattr(opt, "calculate_norm_at_next_step")
    progress = Progress(name, cfg.steps, step, world)
    last = {"step": step, "train_s": train_s}
    val_loss = float("nan")
    start_step = step
    while step < cfg.steps:
        t0 = time.perf_counter()
        loss = batch_loss(fwd, *sampler.next(), cfg, world.device)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        mult = lr_multiplier(step + 1, cfg.steps, cfg.warmup_steps, cfg.cooldown_frac)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
        track_now = track and (step + 1) % cfg.track_norms_every == 0
        if track_now:
            opt.calculate_norm_at_next_step()  # type: ignore[attr-defined]
        opt.step()
        if not light:
            opt.zero_grad(set_to_none=True)
        step += 1
        evaluate_now = step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
        record: dict[str, Any] | None = None
        if track_now or evaluate_now or step % max(1, cfg.log_every) == 0:
            train_loss = all_mean(loss.item(), world)  # .item() also waits for the GPU
            train_s += time.perf_counter() - t0
            speed = (step - last["step"]) * tokens_per_step / max(train_s - last["train_s"], 1e-9)
            last = {"step": step, "train_s": train_s}
            lr = opt.param_groups[0]["lr"]
            record = {"step": step, "train_loss": train_loss, "lr": lr, "tokens_per_s": speed, "wall_s": wall()}
            if track_now:
                norms = opt.get_norms_at_current_step()  # type: ignore[attr-defined]
                record["norms"] = {k: _scalar(v) for k, v in norms.items()}
            if evaluate_now:
                val_loss = record["val_loss"] = evaluate(fwd, val_batches, cfg, world)
            log.write(record)
        else:
            train_s += time.perf_counter() - t0
        progress.update(step, record)
        if cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0 and step < cfg.steps:
            checkpoint()
    progress.close()
    if step > start_step or latest is None:
        checkpoint()
    if val_loss != val_loss:  # nothing trained in this call (resumed a finished run)
        val_loss = evaluate(fwd, val_batches, cfg, world)
    total_tokens = step * tokens_per_step
    result = {
        "final_train_loss": evaluate(fwd, train_batches, cfg, world),
        "final_val_loss": val_loss,
        "steps": step,
        "wall_s": wall(),
        "tokens_per_s": total_tokens / max(train_s, 1e-9),
    }
    barrier(world)
    return result
