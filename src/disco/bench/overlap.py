"""``python -m disco.bench.overlap``: exposed optimizer time, plain ``step()`` against overlap with backward.

A small MLP (``--layers`` x ``Linear(w, w)`` with tanh, a batch of ``--batch``) is trained with ``disco.Muon``
(``compute_dtype=torch.float32``) twice, from the same start, iterations interleaved: once with the plain step,
once with ``opt.overlap_with_backward(bucket_bytes=...)``. Per iteration it records

* ``exposed_ms``: from the end of ``loss.backward()`` to the end of ``opt.step()``: the optimizer time the
  training loop waits for. With overlap, the buckets' exchanges and orthogonalizations ran inside backward;
* ``backward_ms`` and ``total_ms`` (forward + backward + step + ``zero_grad``).

One process (plain tensors) and ``--ranks`` gloo ranks (default 2) with every layer ``fully_shard``-ed (FSDP2),
one torch thread per rank (``--threads``). Numbers are medians over ``--steps`` iterations of the slowest rank.
``committed`` counts the steps that used the work done in backward (else the step recomputed it).

Be careful reading them on a CPU with one thread per rank: the hooks run the optimizer's math on the same
thread as backward, so moving it there lowers the exposed time but not the total time (it can even rise a
little: more, smaller batched calls and one agreement collective per bucket). The total falls only where the
optimizer's work runs beside backward's (a GPU stream, idle cores, communication waiting on the network).
``--device auto|cpu|cuda``: ``auto`` (default) runs on GPUs (NCCL) where there is one per rank; each timestamp
then waits for the GPU (``torch.cuda.synchronize``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from disco.bench.common import (
    Column,
    add_device_argument,
    emit,
    environment,
    launch_ranks,
    resolve_device,
    synchronize,
)

_PRELOAD = ["disco", "disco.bench.overlap"]

COLUMNS: list[Column] = [
    ("ranks", "ranks"),
    ("layout", "layout"),
    ("mode", "mode"),
    ("exposed_ms", "exposed_ms", ".3g"),
    ("backward_ms", "backward_ms", ".3g"),
    ("total_ms", "total_ms", ".3g"),
    ("x_exposed", "x_exposed_plain", ".3g"),
    ("x_total", "x_total_plain", ".3g"),
    ("committed", "committed"),
]


def _model(cfg: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(cfg["layers"]):
        layers += [nn.Linear(cfg["width"], cfg["width"], bias=False), nn.Tanh()]
    return nn.Sequential(*layers).to(cfg["device"])


def _setup(cfg: dict[str, Any], overlap: bool, fsdp: bool) -> tuple[nn.Module, Any]:
    from disco import Muon

    model = _model(cfg)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.children():
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = Muon(model.parameters(), lr=0.02, compute_dtype=torch.float32)
    if overlap:
        opt.overlap_with_backward(bucket_bytes=cfg["bucket_bytes"])
    return model, opt


def _iteration(model: nn.Module, opt: Any, x: torch.Tensor, barrier: Any) -> tuple[float, float, float]:
    device = x.device

    def now() -> float:
        synchronize(device)
        return time.perf_counter()

    barrier()
    t0 = now()
    loss = model(x).square().mean()
    t1 = now()
    loss.backward()
    t2 = now()
    opt.step()
    t3 = now()
    opt.zero_grad()
    t4 = now()
    return t3 - t2, t2 - t1, t4 - t0


def _bench_rank(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Both modes on this rank, iterations interleaved; the per-iteration times in seconds."""
    torch.set_num_threads(cfg["threads"])
    fsdp = world > 1
    barrier: Any = (lambda: torch.distributed.barrier()) if fsdp else (lambda: None)
    runs = {mode: _setup(cfg, mode == "overlap", fsdp) for mode in ("plain", "overlap")}
    times: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in runs}
    gen = torch.Generator().manual_seed(rank)
    for it in range(cfg["warmup"] + cfg["steps"]):
        x = torch.randn(cfg["batch"], cfg["width"], generator=gen).to(cfg["device"])
        for mode, (model, opt) in runs.items():
            t = _iteration(model, opt, x, barrier)
            if it >= cfg["warmup"]:
                times[mode].append(t)
    ov = runs["overlap"][1].overlap
    return {"times": times, "committed": ov.committed, "steps": ov.committed + ov.recomputed}


def _rows(world: int, per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for mode in ("plain", "overlap"):
        cols = zip(*(r["times"][mode] for r in per_rank))  # per iteration: each rank's (exposed, bwd, total)
        worst = [tuple(max(v[k] for v in per_it) for k in range(3)) for per_it in cols]
        med = [statistics.median(w[k] for w in worst) * 1e3 for k in range(3)]
        rows.append(
            {
                "ranks": world,
                "layout": "FSDP2 Shard(0)" if world > 1 else "one process",
                "mode": mode,
                "exposed_ms": med[0],
                "backward_ms": med[1],
                "total_ms": med[2],
                "committed": f"{per_rank[0]['committed']}/{per_rank[0]['steps']}" if mode == "overlap" else None,
            }
        )
    plain = rows[0]
    for row in rows:
        row["x_exposed"] = row["exposed_ms"] / plain["exposed_ms"]
        row["x_total"] = row["total_ms"] / plain["total_ms"]
    return rows


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m disco.bench.overlap", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="Linear(w, w) layers")
    ap.add_argument("--width", type=int, default=256, help="layer width w")
    ap.add_argument("--batch", type=int, default=64, help="rows per batch (per rank)")
    ap.add_argument("--bucket-bytes", type=int, default=2**18, help="overlap bucket size in bytes")
    ap.add_argument("--ranks", type=int, default=2, help="gloo ranks of the FSDP2 run (0: skip it)")
    ap.add_argument("--steps", type=int, default=10, help="timed iterations per mode (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the multi-rank run")
    add_device_argument(ap)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = make_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return int(e.code or 0)
    if min(args.layers, args.width, args.batch, args.steps, args.threads) < 1 or args.ranks < 0:
        print("bench overlap: --layers, --width, --batch, --steps, --threads must be >= 1", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device, max(1, args.ranks))
    except ValueError as e:
        print(f"bench overlap: {e}", file=sys.stderr)
        return 2
    cfg = {
        "layers": args.layers,
        "width": args.width,
        "batch": args.batch,
        "bucket_bytes": args.bucket_bytes,
        "steps": args.steps,
        "warmup": max(0, args.warmup),
        "threads": args.threads,
        "device": device,
    }
    threads = torch.get_num_threads()
    try:
        rows = _rows(1, [_bench_rank(0, 1, cfg)])
    finally:
        torch.set_num_threads(threads)
    if args.ranks:
        try:
            got = launch_ranks(
                _bench_rank, args.ranks, cfg, timeout_s=args.timeout, preload=_PRELOAD, name="overlap", device=device
            )
        except (RuntimeError, TimeoutError) as e:
            print(str(e), file=sys.stderr)
            return 1
        rows += _rows(args.ranks, got)
    meta = {
        "benchmark": "overlap",
        "layers": args.layers,
        "width": args.width,
        "batch": args.batch,
        "bucket_bytes": args.bucket_bytes,
        "cpu_cores": os.cpu_count(),
        **environment(device),
        "threads_per_rank": args.threads,
        "exposed": "end of backward -> end of step()",
    }
    emit(rows, args.json, COLUMNS, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
