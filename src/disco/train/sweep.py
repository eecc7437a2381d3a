"""``python -m disco sweep``: learning rate x width (x depth) grids, to see whether a tuned lr transfers.

Example::

    python -m disco sweep --optimizers adamw,disco --widths 64,128,256 --lr-scale 0.25,0.5,1,2,4 \\
        --steps 150 --out runs/sweep

Every run trains a fresh model of the ``--config`` (default ``tiny_cpu``) with its width (``model.dim``) and depth
(``model.n_layers``) replaced, one optimizer at ``lr_scale`` times that optimizer's default lr (``python -m disco
train --list-optimizers``), with the same data, data order and seed as every other run. Outputs in ``--out``:

* ``sweep.jsonl``: one line per finished run (optimizer, width, depth, lr, lr_scale, final train / val loss,
  steps, tokens/s, wall_s, diverged); a run already there is skipped, so the same command continues a sweep;
* ``settings.json``: the settings every run shares (a later call with other settings is refused);
* ``sweep.png``: val loss against lr per optimizer and the best lr against width (needs matplotlib);
* ``runs/<run>/``: each run's ``metrics.jsonl``, ``config.json`` and ``run.log`` (its checkpoint is deleted).

Runs go to ``--jobs`` processes (default: one per CPU core, one thread each). Before any run, a calibration
times a few steps of each (optimizer, width, depth) and the sweep is refused when its estimate exceeds
``--budget`` minutes. A bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

import disco.optim  # noqa: F401  (importing the package registers its optimizers)
from disco.distributed.agreement import StepError
from disco.optim.registry import get_optimizer_spec, optimizer_names
from disco.train.config import DEFAULT_CONFIG, INSTALL_TRAIN, TrainConfig, UsageError, load_config, split_names
from disco.train.config import validate as validate_config
from disco.train.data import BatchSampler, check_long_enough, load_text, train_val_split
from disco.train.loop import batch_loss, build_model, build_optimizer, keeps_momentum_in_grad, train_optimizer
from disco.train.parallel import World, init_world
from disco.train.sweep_report import format_best, plot_sweep

PROG = "python -m disco sweep"
SETTINGS_KEYS = (
    "steps", "batch_size", "seq_len", "weight_decay", "optimizer_kwargs", "init", "warmup_steps", "cooldown_frac",
    "grad_clip", "seed", "data", "val_fraction", "eval_batches", "dtype", "device",
)  # fmt: skip
CALIBRATION_STEPS = 3  # timed, after one untimed warm-up step


@dataclass(frozen=True)
class Point:
    """One run of the grid."""

    optimizer: str
    width: int
    depth: int
    lr_scale: float

    @property
    def key(self) -> tuple[str, int, int, str]:
        return (self.optimizer, self.width, self.depth, f"{self.lr_scale:g}")

    @property
    def name(self) -> str:
        return f"{self.optimizer}_w{self.width}_d{self.depth}_x{self.lr_scale:g}"

    @property
    def lr(self) -> float:
        return get_optimizer_spec(self.optimizer).default_lr * self.lr_scale


@dataclass(frozen=True)
class Sweep:
    """A parsed command line: the shared training config, the grid and how to run it."""

    base: TrainConfig
    points: tuple[Point, ...]
    out: Path
    jobs: int
    budget_min: float
    threads: int


def point_config(base: TrainConfig, point: Point, out: Path) -> TrainConfig:
    """``base`` with the point's optimizer, lr, width and depth; evaluated at the end only, one checkpoint."""
    model = dataclasses.replace(base.model, dim=point.width, n_layers=point.depth)
    return dataclasses.replace(
        base,
        model=model,
        optimizers=[point.optimizer],
        lr={point.optimizer: point.lr},
        out=str(out / "runs" / point.name),
        eval_every=0,
        ckpt_every=0,
        keep_checkpoints=1,
        print_every=0,
        resume=False,
        log="none",
        parallel="none",
    )


def is_diverged(val_loss: float, vocab_size: int) -> bool:
    """Not finite, or no better than guessing every byte with equal odds (``ln(vocab_size)`` nats)."""
    return not math.isfinite(val_loss) or val_loss >= math.log(vocab_size)


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def run_point(base: TrainConfig, point: Point, out: Path, threads: int) -> dict[str, Any]:
    """Train one point in this process (``threads`` torch threads); returns its ``sweep.jsonl`` row.

    The run's own output goes to ``runs/<run>/run.log``. Non-finite gradients that the optimizer refuses
    (``StepError``) mark the run diverged; any other exception propagates.
    """
    torch.set_float32_matmul_precision("high")  # as the training CLI (a spawned worker starts without it)
    cfg = point_config(base, point, out)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    train, val = train_val_split(load_text(cfg.data), cfg.val_fraction)
    # threads passed on: left out, init_world gives every process all the cores (2 jobs x 2 threads on 2 cores
    # ran 15x slower than one job with one thread)
    world = init_world("none", cfg.device, threads=threads)
    error = None
    with (run_dir / "run.log").open("w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            result = train_optimizer(cfg, point.optimizer, world, train, val)
        except StepError as e:
            if e.failed or not e.nonfinite:
                raise
            error = f"StepError: {e}"
            result = dict.fromkeys(("final_train_loss", "final_val_loss", "steps", "wall_s", "tokens_per_s"))
    shutil.rmtree(run_dir / point.optimizer / "ckpt", ignore_errors=True)
    row: dict[str, Any] = {
        "optimizer": point.optimizer,
        "width": point.width,
        "depth": point.depth,
        "lr": point.lr,
        "lr_scale": point.lr_scale,
        # a non-finite number is written as null: strict JSON readers (jq, JavaScript) refuse NaN
        **{k: _finite(result[k]) for k in ("final_train_loss", "final_val_loss", "steps", "tokens_per_s", "wall_s")},
        "diverged": error is not None or is_diverged(result["final_val_loss"], cfg.model.vocab_size),
        "seed": cfg.seed,
    }
    if error:
        row["error"] = error
    return row


# ---- estimate -------------------------------------------------------------------------------------------------


def calibrate(sweep: Sweep, points: list[Point]) -> dict[tuple[str, int, int], float]:
    """Seconds one run of each (optimizer, width, depth) of ``points`` should take, from timed steps here.

    Builds the model and optimizer (timed), takes one untimed step, then ``CALIBRATION_STEPS`` timed ones, with
    the threads each run will get; a run is then build + steps x step time + the final evaluation (two passes
    of ``eval_batches`` forward-only batches, counted as one training step each).
    """
    train, _ = train_val_split(load_text(sweep.base.data), sweep.base.val_fraction)
    world = init_world("none", sweep.base.device, threads=sweep.threads)
    seconds = {}
    for opt, width, depth in dict.fromkeys((p.optimizer, p.width, p.depth) for p in points):
        cfg = point_config(sweep.base, Point(opt, width, depth, 1.0), sweep.out)
        seconds[(opt, width, depth)] = _seconds_per_run(cfg, opt, world, train)
    return seconds


def _seconds_per_run(cfg: TrainConfig, name: str, world: World, train: torch.Tensor) -> float:
    spec = get_optimizer_spec(name)
    t0 = time.perf_counter()
    model = build_model(cfg, spec, world)
    optim = build_optimizer(cfg, spec, model, world)
    build_s = time.perf_counter() - t0
    sampler = BatchSampler(train, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    light = keeps_momentum_in_grad(optim)
    cuda = world.device.type == "cuda"
    t1 = 0.0
    for i in range(CALIBRATION_STEPS + 1):
        if i == 1:  # the first step's one-off costs (allocations, kernel choice) are not a step's
            if cuda:
                torch.cuda.synchronize(world.device)
            t1 = time.perf_counter()
        loss = batch_loss(model, *sampler.next(), cfg, world.device)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        optim.step()
        if not light:
            optim.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(world.device)
    step_s = (time.perf_counter() - t1) / CALIBRATION_STEPS
    return build_s + (cfg.steps + 2 * cfg.eval_batches) * step_s


def estimate_minutes(per_run: list[float], jobs: int) -> float:
    """Greedy longest-first schedule of ``per_run`` seconds on ``jobs`` processes (assumed not to slow each
    other down), in minutes."""
    loads = [0.0] * max(1, jobs)
    for s in sorted(per_run, reverse=True):
        loads[loads.index(min(loads))] += s
    return max(loads) / 60


# ---- running --------------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise UsageError(f"{path}: line {i} is not JSON (a run interrupted while writing it? delete it)") from None
    return rows


def row_key(row: dict[str, Any]) -> tuple[str, int, int, str]:
    return (row["optimizer"], int(row["width"]), int(row["depth"]), f"{float(row['lr_scale']):g}")


def shared_settings(base: TrainConfig) -> dict[str, Any]:
    """The settings every run of one sweep must share (width and depth are the grid's)."""
    settings = {k: getattr(base, k) for k in SETTINGS_KEYS}
    settings["model"] = {k: v for k, v in dataclasses.asdict(base.model).items() if k not in ("dim", "n_layers")}
    as_read: dict[str, Any] = json.loads(json.dumps(settings, default=str))
    return as_read


def check_settings(out: Path, base: TrainConfig, rows: list[dict[str, Any]]) -> None:
    """Refuse when ``settings.json`` (of the runs already in ``sweep.jsonl``) differs from ``base``'s."""
    path, now = out / "settings.json", shared_settings(base)
    if rows and path.exists():
        saved = json.loads(path.read_text())
        diff = [k for k in now if saved.get(k) != now[k]]
        if diff:
            changes = "; ".join(f"{k} {json.dumps(saved.get(k))} -> {json.dumps(now[k])}" for k in diff)
            raise UsageError(f"--out {out}: holds a sweep with other settings ({changes}); use another --out")


def _describe(row: dict[str, Any]) -> str:
    def num(key: str, spec: str) -> str:
        return "-" if row[key] is None else format(row[key], spec)

    status = "DIVERGED" if row["diverged"] else "val " + num("final_val_loss", ".4f")
    return (
        f"{row['optimizer']} width {row['width']} depth {row['depth']} lr {row['lr']:.3g} (x{row['lr_scale']:g}):"
        f" {status}, train {num('final_train_loss', '.4f')}, {num('tokens_per_s', '.0f')} tok/s,"
        f" {num('wall_s', '.1f')} s" + (f" ({row['error']})" if "error" in row else "")
    )


def _exit_with(parent: int) -> None:
    """A worker's initializer: exit once ``parent`` is gone (killed with SIGKILL, it cannot stop its workers)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="disco-sweep-parent-watch").start()


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the sweep as Ctrl-C does (workers stopped, finished rows kept), not with orphaned workers."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep(sweep: Sweep) -> list[dict[str, Any]]:
    """Run the points not yet in ``sweep.jsonl`` (appending a line as each ends); returns the grid's rows."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    path = sweep.out / "sweep.jsonl"
    rows = read_rows(path)
    check_settings(sweep.out, sweep.base, rows)
    done = {row_key(r): r for r in rows}
    todo = [p for p in sweep.points if p.key not in done]
    jobs = min(sweep.jobs, max(1, len(todo)))
    b = sweep.base
    print(
        f"[sweep] {len(sweep.points)} runs ({len(sweep.points) - len(todo)} already in {path}) | {b.steps} steps"
        f" | batch {b.batch_size} x {b.seq_len} | seed {b.seed} | {jobs} process(es) x {sweep.threads} thread(s)",
        flush=True,
    )
    if todo and sweep.budget_min > 0:
        t0 = time.perf_counter()
        per_point = calibrate(sweep, todo)
        minutes = estimate_minutes([per_point[(p.optimizer, p.width, p.depth)] for p in todo], jobs)
        how = (
            f"from {CALIBRATION_STEPS} timed steps of each optimizer x width x depth after a warm-up step,"
            f" {sweep.threads} thread(s), calibration {time.perf_counter() - t0:.0f} s"
        )
        if minutes > sweep.budget_min:
            raise UsageError(
                f"the grid's {len(todo)} runs would take about {minutes:.1f} min on {jobs} process(es), over"
                f" --budget {sweep.budget_min:g} ({how}); shrink the grid, or raise --budget"
            )
        print(f"[sweep] estimate: {minutes:.1f} min ({how})", flush=True)
    if todo and not rows:
        (sweep.out / "settings.json").write_text(json.dumps(shared_settings(sweep.base), indent=2) + "\n")
    start = time.perf_counter()
    with path.open("a") as sink:

        def record(row: dict[str, Any]) -> None:
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            done[row_key(row)] = row
            n = sum(p.key in done for p in sweep.points)  # rows of other grids in the file are not counted
            print(f"[sweep {n}/{len(sweep.points)}] {_describe(row)}", flush=True)

        if jobs == 1:
            for p in todo:
                record(run_point(sweep.base, p, sweep.out, sweep.threads))
        elif todo:
            spawn = multiprocessing.get_context("spawn")  # no forked torch thread pools
            pool = cf.ProcessPoolExecutor(jobs, mp_context=spawn, initializer=_exit_with, initargs=(os.getpid(),))
            with pool:
                futures = [pool.submit(run_point, sweep.base, p, sweep.out, sweep.threads) for p in todo]
                try:
                    for future in cf.as_completed(futures):
                        record(future.result())
                except BaseException:
                    # Running points would otherwise finish first (the pool's exit waits for them): stop them now.
                    pool.shutdown(wait=False, cancel_futures=True)
                    for child in multiprocessing.active_children():
                        child.terminate()
                    raise
    if todo:
        print(f"[sweep] {len(todo)} runs in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return [done[p.key] for p in sweep.points if p.key in done]


# ---- the command line -----------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Sweep learning rate x width (x depth) for optimizers of the training CLI, same data and seed "
        "for every run; resumable (runs already in --out/sweep.jsonl are skipped).",
        epilog="Exit status: 0 done; 2 a bad input or a grid over --budget (one line on stderr); 130 interrupted "
        "(the same command continues).",
    )
    p.add_argument(
        "--optimizers", required=True, help="comma-separated names (python -m disco train --list-optimizers)"
    )
    p.add_argument("--widths", required=True, help="comma-separated model widths (model.dim), e.g. 64,128,256")
    p.add_argument("--depths", help="comma-separated layer counts (default: the config's n_layers)")
    p.add_argument(
        "--lr-scale",
        required=True,
        help="comma-separated multiples of each optimizer's default lr, e.g. 0.25,0.5,1,2,4",
    )
    p.add_argument("--steps", help="optimizer steps per run (default: the config's)")
    p.add_argument("--out", default="runs/sweep", help="output folder (default runs/sweep)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"training config for the rest (default {DEFAULT_CONFIG})")
    p.add_argument("--seed", help="model init and data order, the same for every run (default: the config's)")
    p.add_argument("--batch-size", help="rows per step (default: the config's)")
    p.add_argument("--seq-len", help="bytes per row (default: the config's)")
    p.add_argument("--eval-batches", help="fixed batches of the final train / val loss (default: the config's)")
    p.add_argument("--heads", help="attention heads at every width (default: the config's n_heads)")
    p.add_argument("--data", help="a text file to train on (default: the config's, else the pydoc_data corpus)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the config's")
    p.add_argument("--jobs", help="runs at once, each in its own process (default: CPU cores on CPU, 1 on a GPU)")
    p.add_argument("--threads", help="torch threads per run (default: CPU cores / --jobs, at least 1)")
    p.add_argument("--budget", default="60", help="refuse a grid estimated to take longer (minutes; 0: no limit)")
    return p


def _numbers(option: str, text: str, kind: type[int] | type[float], minimum: float) -> list[Any]:
    values = []
    for item in split_names(text):
        try:
            value = kind(item)
        except ValueError:
            value = math.nan
        if not value >= minimum or math.isinf(value):
            what = "a whole number" if kind is int else "a number"
            raise UsageError(f"{option} {text}: {item!r} is not {what} >= {minimum:g}")
        values.append(value)
    if not values:
        raise UsageError(f"{option}: empty")
    if len(set(values)) < len(values):
        raise UsageError(f"{option} {text}: a value appears twice")
    return values


def _one(option: str, text: str | None, kind: type[int] | type[float], minimum: float) -> Any:
    if text is None:
        return None
    if "," in text:
        raise UsageError(f"{option} {text}: one value, not a list")
    return _numbers(option, text, kind, minimum)[0]


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    base = load_config(args.config)
    names = split_names(args.optimizers)
    unknown = [n for n in names if n not in optimizer_names()]
    if unknown or not names:
        raise UsageError(f"--optimizers: unknown {unknown or names!r}; valid: {', '.join(optimizer_names())}")
    if len(set(names)) < len(names):
        raise UsageError(f"--optimizers {args.optimizers}: a name appears twice")
    widths = _numbers("--widths", args.widths, int, 1)
    scales = _numbers("--lr-scale", args.lr_scale, float, 0)
    if 0.0 in scales:
        raise UsageError(f"--lr-scale {args.lr_scale}: a scale must be positive")
    depths = _numbers("--depths", args.depths, int, 1) if args.depths else [base.model.n_layers]
    overrides = {
        "steps": _one("--steps", args.steps, int, 1),
        "seed": _one("--seed", args.seed, int, 0),
        "batch_size": _one("--batch-size", args.batch_size, int, 1),
        "seq_len": _one("--seq-len", args.seq_len, int, 1),
        "eval_batches": _one("--eval-batches", args.eval_batches, int, 1),
        "data": args.data,
        "device": args.device,
    }
    base = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    heads = _one("--heads", args.heads, int, 1) or base.model.n_heads
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, n_heads=heads))
    for w in widths:
        if w % heads or (w // heads) % 2:
            raise UsageError(f"--widths {args.widths}: width {w} / {heads} heads is not a whole, even head size")
    validate_config(base)
    train, val = train_val_split(load_text(base.data), base.val_fraction)
    check_long_enough(train, val, base.seq_len, f"--data {base.data}" if base.data else "the pydoc_data corpus")
    gpu = base.device == "cuda" or (base.device == "auto" and torch.cuda.is_available())
    jobs = _one("--jobs", args.jobs, int, 1) or (1 if gpu else os.cpu_count() or 1)
    threads = _one("--threads", args.threads, int, 1) or max(1, (os.cpu_count() or 1) // jobs)
    budget = _one("--budget", args.budget, float, 0)
    points = tuple(Point(o, w, d, s) for o in names for d in depths for w in widths for s in scales)
    return Sweep(base, points, Path(args.out), jobs, budget, threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sweep = sweep_from_args(args)
        try:
            sweep.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {sweep.out}: cannot create the folder ({e.strerror or e})") from None
        torch.set_float32_matmul_precision("high")
        with _sigterm_interrupts():
            rows = run_sweep(sweep)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the same command continues the sweep", file=sys.stderr)
        return 130
    print("\n" + format_best(rows))
    plot = plot_sweep(sweep.out, rows)
    print(f"\nwrote {sweep.out / 'sweep.jsonl'}", end="")
    print(f" and {plot}" if plot else f"; skipped sweep.png: matplotlib is not installed ({INSTALL_TRAIN})")
    return 0
