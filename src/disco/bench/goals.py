"""``python -m disco bench goals``: every performance goal of the project in one table, each against its peer.

Each row runs one of the other benchmarks (in a fresh process, ``--json``) or a direct measurement here, and
prints the measured value, the peer's, their ratio, the target and whether it is met. Goals:

1. ``step bf16``: one ``disco.Muon`` step (bf16 compute) over ``time torch.optim.Muon``'s, ``bench step`` at
   4 x [3w x w, w x w, 4w x w, w x 4w], w = 512; target <= 0.75. ``step fp32``: against the per-parameter fp32
   loop, same target.
2. ``memory``: peak extra memory of a steady-state step over ``torch.optim.Muon``'s (same run); target <= 1.25
   with ``commit="streaming"`` (one update held at a time). The default ``commit="atomic"`` holds every update
   until all are computed (half the parameters' bytes in bf16): shown, no target.
3. ``gram``: Newton-Schulz over its Gram form at 512 x 2048 (aspect 4), per dtype; target >= 1.3 (speed-up).
4. ``cpu dtype``: the default compute dtype this CPU gets (``disco.ops.default_compute_dtype``), and the fp32
   step over the bf16 step (how much the right default is worth here).
5. ``overlap``: exposed optimizer time (end of backward to end of ``step()``) with ``overlap_with_backward``
   over the plain step's, one process (``bench overlap``).
6. ``2 ranks``: the FSDP2 step on 2 gloo ranks over one process, one thread each, on ``bench dist``'s model;
   target <= 0.55. The two are timed in alternation inside one 2-rank job (rank 0 steps the whole model alone
   while the other waits, then both step the sharded one), so that the machine's drift hits both alike.
   ``parallel capacity`` measures what the machine allows: two processes each running the same bf16 matmuls,
   their time over one alone (1.0: two real cores; 2.0: one core's worth shared), so the 2-rank ratio can be read.
7. ``planner``: seconds to plan and summarize 1,000 matrices on 65,536 ranks (``bench plan``); target <= 5 s.
8. ``step vs ortho``: the whole ``disco.Muon`` step over its orthogonalizations alone (``bench step --ortho``:
   the same LMO specs on ready directions), per compute dtype; target <= 1.10 (the element-wise passes, checks
   and bookkeeping of a step cost at most a tenth on top).
9. ``state``: optimizer-state bytes per parameter of a Muon group with ``state_dtype`` bf16 and ``"int8_block"``
   against float32 momentum (counted, not timed).

``--quick`` shrinks every case (a smoke run: the numbers mean nothing). ``--device auto|cpu|cuda`` (default:
``DISCO_DEVICE``, else ``auto``): ``auto`` runs the one-process rows on a GPU where there is one and the 2-rank rows
on two GPUs (NCCL) where there are two, each on the CPU otherwise; the header names the CPU, its flags and the GPU,
and each row's ``device`` column says where it ran. On a GPU, ``cpu dtype`` reports the GPU's default dtype.
"""

from __future__ import annotations

import argparse
import functools
import json
import operator
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from disco.bench.common import (
    Column,
    add_device_argument,
    emit,
    environment,
    launch_ranks,
    resolve_device,
    synchronize,
)

COLUMNS: list[Column] = [
    ("goal", "goal"),
    ("measure", "measure"),
    ("ours", "ours", ".4g"),
    ("peer", "peer", ".4g"),
    ("ratio", "ratio", ".3f"),
    ("target", "target"),
    ("met", "met"),
    ("device", "device"),
]


def _bench(name: str, *args: str, timeout: float = 1200) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "disco", "bench", name, *args, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout)  # one JSON object (emit)
    return result


def _row(
    goal: str, measure: str, ours: float, peer: float, target: str, ok: Callable[[float], bool] | None
) -> dict[str, Any]:
    """One goal's row; ``ok=None``: shown for reference, no target (``met`` is ``-``)."""
    ratio = ours / peer if peer else float("nan")
    met = "-" if ok is None else "yes" if ok(ratio) else "no"
    return {"goal": goal, "measure": measure, "ours": ours, "peer": peer, "ratio": ratio, "target": target,
            "met": met}  # fmt: skip


def _best_ms(fn: Callable[[], object], repeat: int, device: str = "cpu") -> float:
    fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def gram_rows(m: int, n: int, repeat: int, device: str = "cpu") -> list[dict[str, Any]]:
    from disco.ops import gram_newton_schulz, newton_schulz

    G = torch.randn(m, n, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        plain = _best_ms(functools.partial(newton_schulz, G, compute_dtype=dtype), repeat, device)
        gram = _best_ms(functools.partial(gram_newton_schulz, G, compute_dtype=dtype), repeat, device)
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        rows.append(_row("3 gram", f"NS / Gram NS ms, {m}x{n} {name}", plain, gram, ">= 1.3x", lambda r: r >= 1.3))
    return rows


def state_rows(layers: int, width: int) -> list[dict[str, Any]]:
    """Momentum bytes per parameter of ``disco.Muon`` on ``bench step``'s shapes, per ``state_dtype``, against
    float32 (the state made at construction, counted on this process)."""
    import disco
    from disco.bench.step import make_params, transformer_shapes
    from disco.optim.momentum import state_bytes

    weights, _ = make_params(transformer_shapes(layers, width))
    params = [torch.nn.Parameter(w) for w in weights]
    numel = sum(p.numel() for p in params)

    def per_param(state_dtype: Any) -> float:
        opt = disco.Muon([{"params": params, "state_dtype": state_dtype}], lr=0.02)
        return sum(state_bytes(opt.state[p]) for p in params) / numel

    fp32 = per_param(None)
    rows = []
    for name, dtype, bound in (("bf16", torch.bfloat16, 0.5), ("int8_block", "int8_block", 0.26)):
        ok: Callable[[float], bool] = functools.partial(operator.ge, bound)  # ratio <= bound
        rows.append(
            _row("9 state", f"momentum bytes/param, {name} vs fp32", per_param(dtype), fp32, f"<= {bound}x", ok)
        )
    return rows


def _matmul_rank(rank: int, world: int, cfg: dict[str, Any]) -> float:
    torch.set_num_threads(1)
    a = torch.randn(cfg["n"], cfg["n"], dtype=torch.bfloat16, device=cfg["device"])
    a @ a
    synchronize(cfg["device"])
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(cfg["reps"]):
        a @ a
    synchronize(cfg["device"])
    return time.perf_counter() - t0


def parallel_capacity(n: int, reps: int, device: str = "cpu") -> tuple[float, float]:
    """Seconds for ``reps`` bf16 ``n x n`` matmuls in one process alone, and the slowest of two at once."""
    cfg = {"n": n, "reps": reps, "device": device}
    one, two = (
        max(launch_ranks(_matmul_rank, w, cfg, timeout_s=300, preload=(), name="goals", device=device)) for w in (1, 2)
    )
    return one, two


def _paired_rank(rank: int, world: int, cfg: dict[str, Any]) -> list[tuple[float, float]]:
    """Alternately: rank 0 alone steps ``disco.Muon`` on the whole model (plain tensors, one process) while the
    other ranks wait at a barrier, then every rank steps it as FSDP2 ``Shard(0)`` DTensors. Returns (one, all)
    seconds per round: both sides measured in the same minutes, so a drift of the machine's load hits both."""
    import torch.distributed as dist
    from torch import nn

    import disco
    from disco.bench.dist import _make_params, _matrices

    torch.set_num_threads(1)
    device = cfg["device"]
    mesh = torch.distributed.device_mesh.init_device_mesh(device, (world,))
    shapes = _matrices(cfg["layers"], cfg["width"])
    sharded, grads = _make_params(shapes, mesh, 0), _make_params(shapes, mesh, 1, scale=False)
    whole = [nn.Parameter(t.full_tensor()) for t in sharded]  # collective: every rank builds it
    wgrads = [g.full_tensor() for g in grads]
    params = [nn.Parameter(t) for t in sharded]
    for p, g in zip(params, grads):
        p.grad = g
    for wp, wg in zip(whole, wgrads):
        wp.grad = wg
    dtype = torch.bfloat16
    many = disco.Muon(params, lr=0.02, weight_decay=0.1, compute_dtype=dtype)
    one = disco.Muon(whole, lr=0.02, weight_decay=0.1, compute_dtype=dtype) if rank == 0 else None
    out = []
    for r in range(cfg["rounds"] + 1):  # the first round warms up
        synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        if one is not None:
            one.step()
            synchronize(device)
        t1 = time.perf_counter()
        dist.barrier()
        t2 = time.perf_counter()
        many.step()
        synchronize(device)
        t3 = torch.tensor([time.perf_counter() - t2], dtype=torch.float64)
        dist.all_reduce(t3, op=dist.ReduceOp.MAX)  # the slowest rank's step
        if r:
            out.append((t1 - t0, float(t3)))
    return out


def two_ranks_paired(layers: int, width: int, rounds: int, device: str = "cpu") -> tuple[float, float]:
    """Median seconds of one step on one process and on 2 ranks, measured in alternation (``_paired_rank``)."""
    cfg = {"layers": layers, "width": width, "rounds": rounds, "device": device}
    preload = ("disco", "disco.bench.dist")
    got = launch_ranks(_paired_rank, 2, cfg, timeout_s=900, preload=preload, name="goals", device=device)[0]
    return statistics.median(a for a, _ in got), statistics.median(b for _, b in got)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disco bench goals", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    # one process, and 2 ranks (auto: on 2 GPUs, else the CPU, whatever the one process got)
    one_dev, two_dev = resolve_device(args.device, 1, parser), resolve_device(args.device, 2, parser)
    torch.set_num_threads(1)
    q = args.quick
    size = ["--layers", "1", "--width", "64", "--repeat", "1"] if q else ["--layers", "4", "--width", "512"]
    size += ["--device", one_dev]
    rows: list[dict[str, Any]] = []

    step = _bench("step", *size, "--threads", "1", "--memory", "--commit", "atomic,streaming", "--ortho")["rows"]
    by = {(r["case"], r["commit"]): r for r in step}
    for case in ("bf16", "fp32"):
        r = by[case, "atomic"]
        rows.append(_row(f"1 step {case}", f"ms vs {r['peer']}", r["ours_ms"], r["peer_ms"], "<= 0.75x",
                         lambda x: x <= 0.75))  # fmt: skip
    for commit, target in (("streaming", "<= 1.25x"), ("atomic", "none (holds every update)")):
        r = by["bf16", commit]
        rows.append(_row("2 memory", f"peak extra MiB vs torch.optim.Muon, commit={commit}", r["ours_mib"],
                         r["peer_mib"], target, (lambda x: x <= 1.25) if commit == "streaming" else None))  # fmt: skip

    for case in ("bf16", "fp32"):
        r = by[f"{case} vs ortho", "atomic"]
        rows.append(_row(f"8 step vs ortho {case}", "ms, step vs its orthogonalizations alone", r["ours_ms"],
                         r["peer_ms"], "<= 1.10x", lambda x: x <= 1.10))  # fmt: skip
    rows += [{**r, "device": "cpu"} for r in state_rows(*((1, 64) if q else (4, 512)))]  # counted, not timed

    rows += gram_rows(*((64, 256) if q else (512, 2048)), repeat=1 if q else 3, device=one_dev)

    from disco.ops import cpu_has_native_bf16, default_compute_dtype

    chosen = default_compute_dtype(torch.empty(1, device=one_dev))
    native = f"native bf16: {cpu_has_native_bf16()}" if one_dev == "cpu" else "on the GPU"
    rows.append(_row("4 cpu dtype", f"default {chosen} ({native}); fp32 / bf16 step ms",
                     by["fp32", "atomic"]["ours_ms"], by["bf16", "atomic"]["ours_ms"], "default = faster",
                     lambda x: (x >= 1) == (chosen == torch.bfloat16)))  # fmt: skip

    ov_size = ["--steps", "2", "--layers", "2", "--width", "32"] if q else []
    ov = _bench("overlap", "--ranks", "0", "--device", one_dev, *ov_size)
    plain, over = ov["rows"][0], ov["rows"][1]
    rows.append(_row("5 overlap", "exposed ms, overlap vs plain (1 process)", over["exposed_ms"], plain["exposed_ms"],
                     "< 1x", lambda x: x < 1))  # fmt: skip
    rows.append(_row("5 overlap", "total ms, overlap vs plain (1 process)", over["total_ms"], plain["total_ms"],
                     "report", lambda x: True))  # fmt: skip

    n_rows = len(rows)
    for row in rows:
        row.setdefault("device", one_dev)
    one_s, two_s = two_ranks_paired(*((1, 64, 2) if q else (4, 512, 7)), device=two_dev)
    backend = "gloo" if two_dev == "cpu" else "NCCL"
    rows.append(_row("6 2 ranks", f"step ms, 2 {backend} ranks vs 1 process, alternated", two_s * 1e3, one_s * 1e3,
                     "<= 0.55x", lambda x: x <= 0.55))  # fmt: skip
    one, two = parallel_capacity(*((128, 5) if q else (1024, 40)), device=two_dev)
    capacity = "1.0 = 2 cores" if two_dev == "cpu" else "1.0 = 2 GPUs"
    rows.append(_row("6 2 ranks", "parallel capacity: 2 procs vs 1, same matmuls", two, one, capacity,
                     lambda x: True))  # fmt: skip
    for row in rows[n_rows:]:
        row["device"] = two_dev

    plan = _bench("plan", "--world-sizes", "65536", "--layouts", "fsdp,hsdp,fsdp+tp",
                  "--matrices", "100" if q else "1000")["rows"]  # fmt: skip
    worst = max(plan, key=lambda r: r["total_s"])
    rows.append(_row("7 planner", f"s for 65,536 ranks ({worst['layout']}, worst)", worst["total_s"], 5.0, "<= 1x",
                     lambda x: x <= 1))  # fmt: skip
    rows[-1]["device"] = "cpu"  # planning is arithmetic on shapes

    meta = {"benchmark": "goals", **environment(one_dev), "quick": q}
    if two_dev != one_dev:
        meta["device_2_ranks"] = two_dev
    emit(rows, args.json, COLUMNS, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
