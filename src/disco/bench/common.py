"""Shared helpers for the benchmarks: the device, timing, a fixed-width table, one-JSON-object output, ranks.

Every benchmark takes ``--device auto|cpu|cuda`` (default: ``DISCO_DEVICE``, else ``auto``); ``auto`` is CUDA
where there is one GPU per rank, else the CPU (:func:`disco.distributed.launch.choose_device`); on CUDA the ranks
talk over NCCL and every timing waits for the GPU (``torch.cuda.synchronize``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import torch

# A column is a row key, or (key, header), or (key, header, format spec such as ".3g").
Column = str | tuple[str, str] | tuple[str, str, str]


def _column(col: Column) -> tuple[str, str, str | None]:
    if isinstance(col, str):
        return col, col, None
    if len(col) == 2:
        return col[0], col[1], None
    return col[0], col[1], col[2]


def format_value(value: Any, spec: str | None = None) -> str:
    """``-`` for missing values; floats with ``spec`` or 4 significant digits; everything else ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return format(value, spec or ".4g")
    if spec and isinstance(value, int):
        return format(value, spec)
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def print_table(
    rows: list[dict[str, Any]], columns: Sequence[Column] | None = None, file: TextIO | None = None
) -> None:
    """Print ``rows`` as a fixed-width table: text left-aligned, numbers right-aligned, one header line."""
    out = file or sys.stdout
    cols = [_column(c) for c in (columns if columns is not None else list(rows[0]) if rows else [])]
    cells = [[format_value(row.get(key), spec) for key, _, spec in cols] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, (_, h, _) in enumerate(cols)]
    numeric = [
        all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows) for key, _, _ in cols
    ]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    print(line([h for _, h, _ in cols]), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in cells:
        print(line(r), file=out)


#: the CPU flags that decide the speed of a step: vector width, fused multiply-add, native bf16 matmul
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name and which of ``CPU_FLAGS`` it has (``/proc/cpuinfo``; elsewhere ``platform``'s
    processor and no flags)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, [f for f in CPU_FLAGS if f in flags]


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda`` (default: ``DISCO_DEVICE``, else ``auto``); read it with :func:`resolve_device`."""
    from disco.distributed.launch import DEVICES

    parser.add_argument(
        "--device",
        choices=DEVICES,
        default=None,
        help="auto (default, or DISCO_DEVICE): cuda when there is a GPU per rank, else cpu",
    )


def resolve_device(device: str | None, ranks: int = 1, parser: argparse.ArgumentParser | None = None) -> str:
    """``"cpu"`` or ``"cuda"`` for ``--device`` (``None``: ``DISCO_DEVICE``, else ``auto``) and ``ranks`` processes
    (``auto`` picks CUDA only with one GPU per rank, so that every rank count of a run uses the same device). A
    device that cannot be had raises ``ValueError``, or with ``parser`` is its ``error`` (usage, exit status 2)."""
    from disco.distributed.launch import choose_device

    try:
        return choose_device(ranks, device, name="--device")
    except ValueError as e:
        if parser is None:
            raise
        parser.error(str(e))


def environment(device: str = "cpu") -> dict[str, Any]:
    """Where the numbers come from: torch version, device (and the GPU's name on CUDA), threads, machine, CPU model
    and its relevant flags."""
    name, flags = cpu_model()
    env: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu": name,
        "cpu_flags": " ".join(flags) or "-",
        "python": platform.python_version(),
    }
    if device == "cuda":
        env["gpu"] = f"{torch.cuda.get_device_name()} x {torch.cuda.device_count()}"
        env["cuda"] = torch.version.cuda
    return env


def emit(
    rows: list[dict[str, Any]],
    json_flag: bool,
    columns: Sequence[Column] | None = None,
    meta: dict[str, Any] | None = None,
    file: TextIO | None = None,
) -> None:
    """Print one JSON object ``{**meta, "rows": rows}`` when ``json_flag``, else ``meta`` lines and a table."""
    out = file or sys.stdout
    meta = dict(meta or {})
    if json_flag:
        print(json.dumps({**meta, "rows": rows}, default=str), file=out)
        return
    for key, value in meta.items():
        print(f"# {key}: {format_value(value)}", file=out)
    print_table(rows, columns, file=out)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the GPU's queued work when ``device`` is CUDA (a timer read before it would time the launch only)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], Any], repeat: int = 3, warmup: int = 1, device: torch.device | str | None = None
) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(
    fns: Sequence[Callable[[], Any]], repeat: int = 3, warmup: int = 1, device: torch.device | str | None = None
) -> list[list[float]]:
    """Wall times in seconds of each of ``fns``, called round-robin ``repeat`` times after ``warmup`` rounds.

    Interleaving spreads a noisy neighbour (a shared machine) over all candidates instead of one, so ratios
    between them stay meaningful; report the median (or min) of each list.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeat)):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[i].append(time.perf_counter() - t0)
    return times


def parse_ints(text: str) -> list[int]:
    """``"256,512,1024"`` -> ``[256, 512, 1024]``."""
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def launch_ranks(
    fn: Callable[..., Any],
    world: int,
    cfg: dict[str, Any],
    *,
    timeout_s: float,
    preload: Sequence[str],
    name: str,
    device: str = "cpu",
) -> list[Any]:
    """``fn(rank, world, cfg)`` on ``world`` ranks (``disco.distributed.launch.run_ranks``) on ``device`` (gloo
    on ``"cpu"``, NCCL on ``"cuda"``); results by rank.

    What the ranks print is replayed on stderr, so that the table or the JSON object stays alone on stdout. A
    failure or a timeout raises ``RuntimeError`` / ``TimeoutError`` naming the benchmark and the rank count.
    """
    from disco.distributed.launch import RankError, run_ranks

    with contextlib.redirect_stdout(sys.stderr):
        try:
            return run_ranks(fn, world, cfg, timeout=timeout_s, preload=list(preload), device=device)
        except RankError as e:
            raise RuntimeError(f"bench {name}: {world} ranks: {e}") from e
        except TimeoutError as e:
            raise TimeoutError(f"bench {name}: {world} ranks: {e}") from e
