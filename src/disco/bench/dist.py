"""``python -m disco bench dist``: a distributed Muon step on gloo (CPU) or NCCL (GPU) ranks against two naive peers.

For each rank count (default 1, 2, 4) the benchmark starts that many processes (with
``disco.distributed.launch.run_ranks``: a ``forkserver`` that preloads torch and disco), builds a transformer-shaped
set of matrices (``--layers`` x (q, k, v, out: ``w x w``; fc ``4w x w``; proj ``w x 4w``)) as DTensors
``Shard(0)`` over all ranks (FSDP2's layout; ``distribute_tensor(..., src_data_rank=None)``), gives them random
gradients, and times, side by side in the same processes:

* ``disco``: ``disco.Muon(compute_dtype=torch.float32)`` (``--compute-dtype``): every matrix orthogonalized
  once, on one owner, with one all-to-all per bucket each way. Bytes sent per rank are counted by the
  executor (``opt.engine.stats``) and set against the planner's lower bound (``opt.engine.plan.stats()``).
* ``naive_full_tensor``: every rank calls ``full_tensor()`` on each (momentum-updated) gradient and
  orthogonalizes all of them itself with the same Newton-Schulz (``disco.ops.orthogonalize``), then keeps its
  rows. Its ``max_diff`` is the largest difference of its first update to ``disco``'s (same math: ~1e-6).
* ``torch_muon``: ``torch.optim.Muon`` on the same DTensors (bf16 Newton-Schulz on DTensors). It is timed only
  once (with a note) if its first step takes longer than ``--torch-muon-max-s``: bf16 matmul is very slow on
  CPUs without AVX-512 BF16; on CPUs with it bf16 beats fp32 (compare with ``--compute-dtype bfloat16``).

Step time is the median over ``--steps`` timed steps of the slowest rank's time (ranks meet at a barrier before
each step). ``x_1rank`` is the time over the same method's 1-rank time; ``x_disco`` over ``disco``'s at the same
rank count; ``ns_ms`` is the slowest rank's time inside Newton-Schulz (the rest of a step is communication,
packing and the update). ``--memory``: disco's peak extra memory of one more step on each rank (the profiler's
allocation timeline), the largest over ranks, beside each rank's parameter bytes; ``--commit streaming`` writes
each parameter as its update arrives. Goals (reported, not asserted): redundancy 1.00, bytes at the lower
bound, 2 ranks < 0.7x of 1. On a machine with fewer cores than ranks, more ranks cannot be faster: the core
count is printed. ``--device auto|cpu|cuda``: ``auto`` (default) puts each rank on its own GPU (NCCL) where there
is one per rank for the largest rank count, else on the CPU (gloo); on CUDA each timed step ends with
``torch.cuda.synchronize`` and ``--memory`` reads the CUDA allocator's peak.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from disco.bench.common import (
    Column,
    add_device_argument,
    emit,
    environment,
    launch_ranks,
    parse_ints,
    resolve_device,
    synchronize,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

_PRELOAD = ["disco", "disco.bench.dist"]  # on top of the launcher's torch modules

COLUMNS: list[Column] = [
    ("ranks", "ranks"),
    ("method", "method"),
    ("ms", "step_ms", ".1f"),
    ("compute_ms", "ns_ms", ".1f"),
    ("x_1rank", "x_1rank", ".2f"),
    ("x_disco", "x_disco", ".2f"),
    ("sent_max", "sent/rank MiB", ".2f"),
    ("recv_max", "recv/rank MiB", ".2f"),
    ("bytes_vs_lb", "bytes/lb", ".3f"),
    ("collectives", "coll/rank"),
    ("plan_collectives", "plan_coll"),
    ("redundancy", "redund", ".2f"),
    ("peak_mib", "peak MiB/rank", ".1f"),
    ("param_mib", "params MiB/rank", ".1f"),
    ("imbalance", "imbal", ".3f"),
    ("max_diff", "max_diff", ".1e"),
]


# ---------------------------------------------------------------------------------------------- rank side


def _matrices(layers: int, width: int) -> list[tuple[int, ...]]:
    from disco.distributed.shapes import transformer

    return [s.shape for s in transformer(layers, width, 4 * width)]


def _timed(
    fn: Callable[[], object],
    steps: int,
    warmup: int,
    compute: Callable[[], float] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Median ms of the slowest rank per step; with ``compute``, also the median of the slowest rank's
    ``compute()`` after each step (seconds that step spent orthogonalizing)."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    times: list[float] = []
    computes: list[float] = []
    for _ in range(max(1, steps)):
        synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - t0
        t = torch.tensor([elapsed, compute() if compute is not None else 0.0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t[0]) * 1e3)
        computes.append(float(t[1]) * 1e3)
    out: dict[str, Any] = {"ms": statistics.median(times), "times_ms": times}
    if any(computes):
        out["compute_ms"] = statistics.median(computes)
    return out


def _compute_s(opt: Any) -> float:
    """Seconds the last step spent inside the engine's spec (orthogonalization) calls; 0.0 if not counted."""
    return float(getattr(opt.engine.stats, "compute_s", 0.0))


def _make_params(shapes: Sequence[tuple[int, ...]], mesh: DeviceMesh, seed: int, scale: bool = True) -> list[DTensor]:
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        full = torch.randn(shape, generator=gen)
        if scale:
            full /= math.sqrt(shape[-1])
        out.append(distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None))
    return out


@torch.no_grad()
def _bench_rank(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    import disco
    from disco import ops
    from disco.distributed.executor import PlanEngine
    from disco.distributed.layout import chunk_bound

    torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    mesh = init_device_mesh(device, (world,))
    shapes = _matrices(cfg["layers"], cfg["width"])
    params: list[Any] = [nn.Parameter(t) for t in _make_params(shapes, mesh, 0)]
    grads = _make_params(shapes, mesh, 1, scale=False)
    lr, wd, beta = 0.02, 0.1, 0.95
    coeffs = (3.4445, -4.7750, 2.0315)
    out: dict[str, Any] = {"rows": {}, "notes": []}

    def set_grads(ps: Sequence[torch.Tensor]) -> None:
        for p, g in zip(ps, grads):
            p.grad = g

    # ---- disco.Muon
    cdtype = getattr(torch, cfg["compute_dtype"])
    opt = disco.Muon(params, lr=lr, weight_decay=wd, momentum=beta, compute_dtype=cdtype, commit=cfg["commit"])
    set_grads(params)
    before = [p.to_local().clone() for p in params]
    opt.step()
    disco_delta = [p.to_local() - b for p, b in zip(params, before)]
    st = opt.engine.stats
    row: dict[str, Any] = {
        "bytes_sent": st.bytes_sent,
        "bytes_received": st.bytes_received,
        "collectives": st.collectives,
        "matrices": st.matrices_computed,
    }
    # the engine's clock reads the host's time: on CUDA that is the launches', not the GPU's work (not shown)
    compute = functools.partial(_compute_s, opt) if device == "cpu" else None
    row.update(_timed(opt.step, cfg["steps"], cfg["warmup"], compute, device))
    assert isinstance(opt.engine, PlanEngine)  # DTensor parameters: the plan executor
    # pieces in and results back in the compute dtype when narrower than fp32 (exact: one process casts alike)
    wire_size = min(cdtype.itemsize, 4)
    row.update(plan=opt.engine.plan.stats(wire_size, wire_size), n_matrices=len(shapes))
    if cfg["memory"]:
        from disco.bench.step import peak_extra_mib

        row["peak_mib"] = peak_extra_mib(opt.step, device)
        row["param_mib"] = sum(p.to_local().numel() * p.element_size() for p in params) / 2**20
    out["rows"]["disco"] = row
    del opt

    # ---- naive: full_tensor() everywhere, everything orthogonalized on every rank
    for p, b in zip(params, before):
        p.to_local().copy_(b)
    bufs = [torch.zeros_like(p.to_local()) for p in params]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(shapes):
        by_shape.setdefault(tuple(s), []).append(i)
    counted = {"received": 0, "sent": 0, "collectives": 0}
    clock = {"compute": 0.0}

    def naive_step() -> None:
        counted.update(received=0, sent=0, collectives=0)
        clock["compute"] = 0.0
        fulls: dict[int, torch.Tensor] = {}
        for i, p in enumerate(params):
            g = grads[i].to_local()
            bufs[i].lerp_(g, 1 - beta)
            u = g.lerp(bufs[i], beta)
            dt = DTensor.from_local(u, mesh, p.placements, shape=p.shape, stride=p.stride())
            fulls[i] = dt.full_tensor()
            counted["received"] += (fulls[i].numel() - u.numel()) * 4
            counted["sent"] += u.numel() * 4 * (world - 1)
            counted["collectives"] += 1 if world > 1 else 0
        for shape, ids in by_shape.items():
            t0 = time.perf_counter()
            O = ops.orthogonalize(
                torch.stack([fulls[i] for i in ids]),
                steps=5,
                coefficients=coeffs,
                eps=1e-7,
                compute_dtype=cdtype,
            )
            synchronize(device)
            clock["compute"] += time.perf_counter() - t0
            scale = math.sqrt(max(1.0, shape[0] / shape[1]))
            lo, hi = chunk_bound(shape[0], world, rank)
            for k, i in enumerate(ids):
                local = params[i].to_local()
                local.mul_(1 - lr * wd).add_(O[k, lo:hi], alpha=-lr * scale)

    naive_step()
    diff = max(float((p.to_local() - b - d).abs().max()) for p, b, d in zip(params, before, disco_delta))
    out["rows"]["naive_full_tensor"] = {
        **_timed(naive_step, cfg["steps"], cfg["warmup"], lambda: clock["compute"], device),
        "bytes_sent": counted["sent"],
        "bytes_received": counted["received"],
        "collectives": counted["collectives"],
        "matrices": len(shapes),
        "n_matrices": len(shapes),
        "max_diff": diff,
    }

    # ---- torch.optim.Muon on the DTensors
    if cfg["torch_muon"]:
        topt: torch.optim.Optimizer = torch.optim.Muon(params, lr=lr, weight_decay=wd, momentum=beta)
        synchronize(device)
        t0 = time.perf_counter()
        try:
            topt.step()
            synchronize(device)
            err = None
        except Exception as e:  # noqa: BLE001 - reported, not raised
            err = f"{type(e).__name__}: {e}"
        first = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(first, op=dist.ReduceOp.MAX)
        fails = torch.tensor([1 if err else 0])
        dist.all_reduce(fails)
        if int(fails):
            out["notes"].append(f"torch.optim.Muon failed on {world} ranks: {err or 'on another rank'}")
        elif float(first) > cfg["torch_muon_max_s"]:
            out["notes"].append(
                f"torch.optim.Muon: first step took {float(first):.1f} s on {world} ranks "
                f"(> --torch-muon-max-s {cfg['torch_muon_max_s']:g}); not timed further"
            )
            first_ms = float(first) * 1e3
            out["rows"]["torch_muon"] = {"ms": first_ms, "times_ms": [first_ms], "matrices": len(shapes)}
        else:
            out["rows"]["torch_muon"] = {**_timed(topt.step, cfg["steps"], 0, None, device), "matrices": len(shapes)}
    return out


def _mib(n: float | None) -> float | None:
    return None if n is None else n / 2**20


def summarize(world: int, per_rank: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    rows = []
    notes = sorted({n for r in per_rank for n in r["notes"]})
    for method in ("disco", "naive_full_tensor", "torch_muon"):
        if method not in per_rank[0]["rows"]:
            continue
        rs = [r["rows"][method] for r in per_rank]
        row: dict[str, Any] = {"ranks": world, "method": method, "ms": rs[0]["ms"], "times_ms": rs[0]["times_ms"]}
        row["compute_ms"] = rs[0].get("compute_ms")
        if "bytes_sent" in rs[0]:
            row["sent_max"] = _mib(max(x["bytes_sent"] for x in rs))
            row["recv_max"] = _mib(max(x["bytes_received"] for x in rs))
            row["bytes_sent_per_rank"] = [x["bytes_sent"] for x in rs]
            row["bytes_received_per_rank"] = [x["bytes_received"] for x in rs]
            row["bytes_total"] = sum(x["bytes_received"] for x in rs)
            row["collectives"] = max(x["collectives"] for x in rs)
            row["redundancy"] = sum(x["matrices"] for x in rs) / rs[0]["n_matrices"]
        if method == "disco":
            plan = rs[0]["plan"]
            row["bytes_lower_bound"] = plan["bytes_lower_bound"]
            row["plan_bytes_total"] = plan["bytes_total"]
            row["plan_collectives"] = plan["collectives_per_step"]
            row["imbalance"] = plan["imbalance"]
            row["plan_redundancy"] = plan["redundancy"]
            row["at_lower_bound"] = row["bytes_total"] == plan["bytes_lower_bound"]
        if method in ("disco", "naive_full_tensor"):
            lb = per_rank[0]["rows"]["disco"]["plan"]["bytes_lower_bound"]
            row["bytes_vs_lb"] = row["bytes_total"] / lb if lb else (1.0 if row["bytes_total"] == 0 else None)
        if "max_diff" in rs[0]:
            row["max_diff"] = max(x["max_diff"] for x in rs)
        if "peak_mib" in rs[0]:
            row["peak_mib"] = max(x["peak_mib"] for x in rs)
            row["param_mib"] = max(x["param_mib"] for x in rs)
        rows.append(row)
    return rows, notes


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m disco bench dist", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="transformer layers (6 matrices each)")
    ap.add_argument("--width", type=int, default=512, help="model width w (MLP 4w)")
    ap.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts (default 1,2,4)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument(
        "--compute-dtype", choices=("float32", "bfloat16"), default="float32", help="disco / naive NS dtype"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--torch-muon", choices=("on", "off"), default="on", help="also time torch.optim.Muon")
    ap.add_argument("--torch-muon-max-s", type=float, default=20.0, help="skip torch Muon if a step is slower")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per rank count before giving up")
    ap.add_argument("--commit", choices=("atomic", "streaming"), default="atomic", help="disco.Muon's commit")
    ap.add_argument("--memory", action="store_true", help="also disco's peak extra memory of a step (max over ranks)")
    add_device_argument(ap)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = make_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return int(e.code or 0)
    try:
        ranks = parse_ints(args.ranks)
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1 or args.layers < 1 or args.width < 1 or args.steps < 1:
        print("bench dist: --ranks needs positive integers; --layers, --width, --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device, max(ranks))  # one device for every rank count of the run
    except ValueError as e:
        print(f"bench dist: {e}", file=sys.stderr)
        return 2
    cfg = {
        "layers": args.layers,
        "width": args.width,
        "steps": args.steps,
        "warmup": max(0, args.warmup),
        "threads": max(1, args.threads),
        "compute_dtype": args.compute_dtype,
        "torch_muon": args.torch_muon == "on",
        "torch_muon_max_s": args.torch_muon_max_s,
        "commit": args.commit,
        "memory": args.memory,
        "device": device,
    }
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for world in ranks:
        try:
            got = launch_ranks(
                _bench_rank, world, cfg, timeout_s=args.timeout, preload=_PRELOAD, name="dist", device=device
            )
        except (RuntimeError, TimeoutError) as e:
            print(str(e), file=sys.stderr)
            return 1
        r, n = summarize(world, got)
        rows.extend(r)
        notes.extend(n)
    base = {row["method"]: row["ms"] for row in rows if row["ranks"] == min(ranks)}
    disco_at = {row["ranks"]: row["ms"] for row in rows if row["method"] == "disco"}
    for row in rows:
        row["x_1rank"] = row["ms"] / base[row["method"]] if min(ranks) == 1 and row["method"] in base else None
        row["x_disco"] = row["ms"] / disco_at[row["ranks"]] if row["ranks"] in disco_at else None
    shapes = _matrices(args.layers, args.width)
    meta = {
        "benchmark": "dist",
        "layers": args.layers,
        "width": args.width,
        "matrices": len(shapes),
        "elements": sum(a * b for a, b in shapes),
        "layout": "Shard(0) over all ranks (FSDP2)",
        "cpu_cores": os.cpu_count(),
        **environment(device),
        "threads_per_rank": cfg["threads"],
        "compute_dtype": args.compute_dtype,
        "notes": "; ".join(notes) if notes else "none",
    }
    two = [r for r in rows if r["method"] == "disco" and r["ranks"] == 2]
    if two and two[0]["x_1rank"] is not None:
        meta["goal_2_ranks_below_0.7x"] = two[0]["x_1rank"] < 0.7
    emit(rows, args.json, COLUMNS, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
