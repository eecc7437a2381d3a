"""``python -m disco bench checks``: what the agreement checks cost, against the distributed step they guard.

On ``--ranks`` gloo ranks, the bench's transformer matrices (``--layers`` x (q, k, v, out ``w x w``; fc
``4w x w``; proj ``w x 4w``)) as FSDP ``Shard(0)`` DTensors, ``disco.Muon`` in fp32. Times, each as a median
over repeats on the slowest rank: one whole ``step()``; the three agreement collectives of a step (the step vote:
presence, non-finite flags, settings digest; the map's job digest; the map's settle); the non-finite scan of the
local gradients; the settings digest. Prints each and its share of the step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from disco.bench.common import Column, add_device_argument, emit, environment, resolve_device, synchronize


def _bench_rank(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, float]:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import disco
    from disco.distributed.agreement import Outcomes, check_step, settle
    from disco.distributed.executor import PlanEngine
    from disco.distributed.shapes import transformer
    from disco.optim.phases import nonfinite_flags as _nonfinite

    torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    mesh = init_device_mesh(device, (world,))
    gen = torch.Generator().manual_seed(0)
    shapes = [s.shape for s in transformer(cfg["layers"], cfg["width"], 4 * cfg["width"])]
    params = [
        nn.Parameter(distribute_tensor(torch.randn(s, generator=gen), mesh, [Shard(0)], src_data_rank=None))
        for s in shapes
    ]
    opt = disco.Muon(params, compute_dtype=torch.float32)
    dgrads = [
        distribute_tensor(torch.randn(p.shape, generator=gen), mesh, [Shard(0)], src_data_rank=None) for p in params
    ]
    for p, g in zip(params, dgrads):
        p.grad = g
    engine = opt.engine
    assert isinstance(engine, PlanEngine)
    n = len(params)
    settings = opt._settings()
    grads = [g.to_local() for g in dgrads]  # the tensors p.grad holds

    def checks() -> None:
        check_step(engine.group, engine.group_ranks, engine.names, [True] * n, [False] * n, settings, None)
        engine._all_gather_int(1)
        settle(Outcomes(), engine.group, engine.group_ranks, list(range(n)), engine.names)

    def timed(fn: Any, repeat: int) -> float:
        fn()
        out = []
        for _ in range(repeat):
            synchronize(device)
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            out.append(float(t))
        return statistics.median(out) * 1e3

    return {
        "step_ms": timed(opt.step, cfg["steps"]),
        "checks_ms": timed(checks, 50),
        "scan_ms": timed(lambda: _nonfinite(grads), 20),
        "settings_ms": timed(opt._settings, 50),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m disco bench checks", description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="gloo ranks (default 2)")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers of matrices (default 4)")
    ap.add_argument("--width", type=int, default=512, help="model width (default 512)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    add_device_argument(ap)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    from disco.distributed.launch import run_ranks

    args.device = resolve_device(args.device, args.ranks, ap)
    cfg = vars(args)
    preload = ["disco", "disco.bench.checks"]
    rows = run_ranks(_bench_rank, args.ranks, cfg, timeout=600, preload=preload, device=args.device)
    r = rows[0]
    table = [{"what": k.removesuffix("_ms"), "ms": v, "of_step": v / r["step_ms"]} for k, v in r.items()]
    columns: list[Column] = [("what", "what"), ("ms", "ms", ".2f"), ("of_step", "share of step", ".2%")]
    emit(table, args.json, columns, {"benchmark": "checks", **environment(args.device), "config": cfg})
    return 0
