"""Train one optimizer: build model and optimizer, run the steps, log, evaluate and checkpoint."""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeGuard

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from disco.optim.qkclip import QKClip
from disco.optim.registry import OptimizerSpec, get_optimizer_spec
from disco.train.checkpoint import (
    checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
    step_of,
    write_settings,
)
from disco.train.config import TrainConfig
from disco.train.data import BatchSampler, eval_batches
from disco.train.model import GPT
from disco.train.parallel import World, all_mean, barrier, parallelize
from disco.train.report import MetricsLog
from disco.train.trackers import open_tracker


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


class _TracksNorms(Protocol):
    """What ``--track-norms-every`` needs of an optimizer (``disco.optim.base.SpectralOptimizer`` has it)."""

    def calculate_norm_at_next_step(self) -> None: ...

    def get_norms_at_current_step(self) -> dict[str, Tensor]: ...


def _tracks_norms(opt: torch.optim.Optimizer) -> TypeGuard[_TracksNorms]:
    return hasattr(opt, "calculate_norm_at_next_step")


def build_optimizer(cfg: TrainConfig, spec: OptimizerSpec, model: nn.Module, world: World) -> torch.optim.Optimizer:
    kwargs = dict(cfg.optimizer_kwargs.get(spec.name) or {})
    accepted = inspect.signature(spec.build).parameters
    if "mesh" in accepted:
        kwargs.setdefault("mesh", world.mesh)
    if "parallel" in accepted:
        kwargs.setdefault("parallel", world.parallel)
    if cfg.split_heads and "split_heads" in accepted:
        kwargs.setdefault("split_heads", True)
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


class Interrupted(Exception):
    """Raised after the checkpoint that a SIGINT / SIGTERM asked for has been written."""

    def __init__(self, optimizer: str, step: int, path: Path | None, signum: int):
        self.optimizer, self.step, self.path, self.signum = optimizer, step, path, signum
        self.signal_name = signal.Signals(signum).name
        where = f"saved at step {step} in {path}" if path else "not started yet"
        super().__init__(f"stopped by {self.signal_name}: {optimizer} {where}")


class StopSignals:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step (it then checkpoints).

    A second Ctrl-C quits at once (``KeyboardInterrupt``, no checkpoint). Only the main thread can install
    signal handlers; elsewhere this does nothing. Under several ranks the request is agreed on every step
    (``requested``), so that all ranks stop after the same step and write the checkpoint together.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self.sigints = 0  # torchrun sends SIGTERM on top of the terminal's SIGINT: only a 2nd SIGINT quits
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.sigints += signum == signal.SIGINT
        if self.sigints >= 2:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            if os.environ.get("RANK", "0") == "0":
                print(
                    f"\n[disco] {signal.Signals(signum).name}: stopping after this step to write a checkpoint"
                    " (Ctrl-C again quits without it)",
                    file=sys.stderr,
                    flush=True,
                )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def requested(self, world: World) -> int:
        """The signal number if any rank was asked to stop (collective when there are several ranks)."""
        if world.world_size == 1:
            return self.signum
        t = torch.tensor([self.signum], dtype=torch.int32, device=world.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """On rank 0: a tqdm bar when stderr is a terminal (and tqdm is installed); otherwise a plain line every
    ``every`` steps (0: every tenth of the run) with the loss, the speed, the elapsed time and an ETA."""

    def __init__(self, tag: str, total: int, initial: int, world: World, every: int = 0, tokens_per_step: int = 0):
        self.bar: Any = None
        self.tag, self.total, self.initial, self.enabled = tag, total, initial, world.is_main
        self.every, self.tokens_per_step = every or max(1, total // 10), tokens_per_step
        self.start = time.perf_counter()
        self.last: dict[str, Any] = {}
        self.printed = (initial, 0.0)  # step and training seconds at the last line
        if self.enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, desc=f"{tag:>8}", dynamic_ncols=True, leave=True)

    def update(self, step: int, record: dict[str, Any] | None, train_s: float = 0.0) -> None:
        """After each step; ``record`` when the loop logged one, ``train_s``: training seconds so far."""
        if not self.enabled:
            return
        if record:
            self.last = {**self.last, **record}
            if "val_loss" in record:
                self.last["val_step"] = step
        if self.bar is not None:
            self.bar.update(1)
            if record:
                post = {"loss": f"{record['train_loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                if "val_loss" in self.last:
                    post["val"] = f"{self.last['val_loss']:.3f}"
                self.bar.set_postfix(post, refresh=False)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(step - self.initial, 1) * (self.total - step)
            parts = [f"[{self.tag}] step {step}/{self.total} ({100 * step // self.total}%)"]
            if "train_loss" in self.last:
                parts.append(f"loss {self.last['train_loss']:.4f}")
            if "val_loss" in self.last:
                stale = f" (step {self.last['val_step']})" if self.last["val_step"] != step else ""
                parts.append(f"val {self.last['val_loss']:.4f}{stale}")
            last_step, seconds = self.printed[0], train_s - self.printed[1]
            if self.tokens_per_step and seconds > 0:
                parts.append(f"{(step - last_step) * self.tokens_per_step / seconds:.0f} tok/s")
            self.printed = (step, train_s)
            print(" ".join(parts) + f" | {_clock(elapsed)} elapsed, ETA {_clock(eta)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _start_over(cfg: TrainConfig, name: str, run_dir: Path, ckpt_root: Path, log: MetricsLog, lr: float) -> None:
    """Rank 0, new run: drop an earlier run's checkpoints (a later --resume must not pick them up) and metrics."""
    old = checkpoints(ckpt_root, complete=False)
    if old:
        print(
            f"[{name}] starting over in {run_dir}: removing {len(old)} checkpoint(s) of an earlier run up to step"
            f" {step_of(old[-1])} (pass --resume to continue a run instead)",
            flush=True,
        )
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    log.reset()
    write_settings(cfg, name, lr)


def train_optimizer(
    cfg: TrainConfig,
    name: str,
    world: World,
    train: Tensor,
    val: Tensor,
    resume_from: Path | None = None,
    stop: StopSignals | None = None,
    tag: str | None = None,
) -> dict[str, Any]:
    """Train a fresh model with optimizer ``name`` (or continue ``resume_from``); returns its summary row.

    Writes ``<out>/<name>/metrics.jsonl`` and checkpoints; raises ``Interrupted`` after checkpointing when
    ``stop`` saw a signal.
    """
    spec = get_optimizer_spec(name)
    tag = tag or name
    run_dir = Path(cfg.out) / name
    ckpt_root = run_dir / "ckpt"
    model = build_model(cfg, spec, world)
    fwd = parallelize(model, world)
    opt = build_optimizer(cfg, spec, model, world)
    qk_clip = QKClip(model, cfg.qk_clip_tau, mesh=world.mesh) if cfg.qk_clip_tau > 0 else None
    lr = float(cfg.lr.get(spec.name, spec.default_lr))
    dp = {"dp_rank": world.dp_rank, "dp_size": world.dp_size}
    sampler = BatchSampler(train, cfg.seq_len, cfg.batch_size, seed=cfg.seed, **dp)
    val_batches = eval_batches(val, cfg.seq_len, cfg.batch_size, cfg.eval_batches, seed=cfg.seed + 1, **dp)
    train_batches = eval_batches(train, cfg.seq_len, cfg.batch_size, cfg.eval_batches, seed=cfg.seed + 2, **dp)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=world.is_main)

    step, prior_wall, train_s = 0, 0.0, 0.0
    if resume_from is not None:
        template = {"step": torch.tensor(0), "wall_s": torch.tensor(0.0), "train_s": torch.tensor(0.0)}
        extra = load_checkpoint(resume_from, model, opt, {**template, "data_rng": sampler.get_state()})
        step, prior_wall, train_s = int(extra["step"]), float(extra["wall_s"]), float(extra["train_s"])
        sampler.set_state(extra["data_rng"])
        dropped = log.truncate_after(step)
        if world.is_main:
            more = f", dropped {dropped} line(s) after it" if dropped else ""
            left = f"{cfg.steps - step} to go" if step < cfg.steps else "already finished: evaluating only"
            print(
                f"[{tag}] resuming from {resume_from} (step {step} of {cfg.steps}, {left}); appending to"
                f" {log.path}{more}",
                flush=True,
            )
    elif world.is_main:
        if cfg.resume:
            print(f"[{tag}] no checkpoint in {ckpt_root}: starting at step 0", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        _start_over(cfg, name, run_dir, ckpt_root, log, lr)
    barrier(world)

    start = time.perf_counter()

    def wall() -> float:
        return prior_wall + time.perf_counter() - start

    def checkpoint() -> Path:
        path = step_dir(ckpt_root, step)
        extra = {"step": torch.tensor(step), "wall_s": torch.tensor(wall()), "train_s": torch.tensor(train_s)}
        save_checkpoint(path, model, opt, {**extra, "data_rng": sampler.get_state()})
        barrier(world)
        if world.is_main:
            prune_checkpoints(ckpt_root, cfg.keep_checkpoints)
        return path

    tokens_per_step = cfg.batch_size * cfg.seq_len
    light = keeps_momentum_in_grad(opt)
    tracked = opt if cfg.track_norms_every > 0 and _tracks_norms(opt) else None
    track = tracked is not None
    tracker = open_tracker(cfg, name) if world.is_main else None
    progress = Progress(tag, cfg.steps, step, world, cfg.print_every, tokens_per_step)
    last = {"step": step, "train_s": train_s}
    val_loss = float("nan")
    start_step = step
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            loss = batch_loss(fwd, *sampler.next(), cfg, world.device)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            mult = lr_multiplier(step + 1, cfg.steps, cfg.warmup_steps, cfg.cooldown_frac)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * mult
            track_now = track and (step + 1) % cfg.track_norms_every == 0
            if track_now and tracked is not None:
                tracked.calculate_norm_at_next_step()
            opt.step()
            if qk_clip is not None:
                qk_clip.step()
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
                lr_now = opt.param_groups[0]["lr"]
                record = {"step": step, "train_loss": train_loss, "lr": lr_now, "tokens_per_s": speed, "wall_s": wall()}
                if qk_clip is not None:
                    record.update(qk_clip.summary())  # max_logit(_layers) before this step's clip, clipped_heads
                if track_now and tracked is not None:
                    norms = tracked.get_norms_at_current_step()
                    record["norms"] = {k: _scalar(v) for k, v in norms.items()}
                if evaluate_now:
                    val_loss = record["val_loss"] = evaluate(fwd, val_batches, cfg, world)
                log.write(record)
                if tracker is not None:
                    tracker.log(record)
            else:
                train_s += time.perf_counter() - t0
            progress.update(step, record, train_s)
            signum = stop.requested(world) if stop is not None and step < cfg.steps else 0
            if signum:
                progress.close()
                raise Interrupted(name, step, checkpoint(), signum)
            if cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0 and step < cfg.steps:
                checkpoint()
    finally:
        progress.close()
        if tracker is not None:
            tracker.close()
    if step > start_step or resume_from is None:
        checkpoint()
    if val_loss != val_loss:  # nothing trained in this call (resumed a finished run)
        val_loss = evaluate(fwd, val_batches, cfg, world)
    total_tokens = step * tokens_per_step
    result = {
        "lr": lr,
        "final_train_loss": evaluate(fwd, train_batches, cfg, world),
        "final_val_loss": val_loss,
        "steps": step,
        "wall_s": wall(),
        "tokens_per_s": total_tokens / max(train_s, 1e-9),
    }
    barrier(world)
    return result
