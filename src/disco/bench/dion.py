"""``python -m disco bench dion``: Dion's step time and bytes per step against ``disco.Muon``, as a table.

On each rank count of ``--ranks`` (default 1, 2) gloo processes hold the bench's transformer matrices
(``--layers`` x (q, k, v, out ``w x w``; fc ``4w x w``; proj ``w x 4w``)) as FSDP ``Shard(0)`` DTensors with
random gradients, and time, side by side in the same processes, ``disco.Muon`` (fp32 Newton-Schulz, the whole
matrix gathered to one owner) and ``disco.Dion`` at each rank fraction of ``--fractions`` (default 1, 1/2, 1/4,
1/8; ``replicate_mesh_grad_sync=False``: only ``P`` travels to its owner and back, ``R`` and the column norms
are all-reduced). ``ms`` is the median over ``--steps`` of the slowest rank; ``sent/rank`` is the largest number of
bytes a rank sent in one step, as counted by the engine; ``x_muon`` is the time over Muon's at the same rank count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch

from disco.bench.common import Column, emit, environment

if TYPE_CHECKING:
    from disco.optim.base import SpectralOptimizer


def _bench_rank(rank: int, world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import disco
    from disco.distributed.shapes import transformer

    torch.set_num_threads(cfg["threads"])
    mesh = init_device_mesh("cpu", (world,))
    shapes = [s.shape for s in transformer(cfg["layers"], cfg["width"], 4 * cfg["width"])]
    gen = torch.Generator().manual_seed(0)
    fulls = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]

    def params() -> list[nn.Parameter]:
        ps = [nn.Parameter(distribute_tensor(f.clone(), mesh, [Shard(0)], src_data_rank=None)) for f in fulls]
        for p, g in zip(ps, grads):
            p.grad = distribute_tensor(g, mesh, [Shard(0)], src_data_rank=None)
        return ps

    def timed(opt: SpectralOptimizer) -> dict[str, Any]:
        opt.step()
        times, sent = [], []
        for _ in range(cfg["steps"]):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            t = torch.tensor([time.perf_counter() - t0, float(opt.engine.stats.bytes_sent)], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(float(t[0]))
            sent.append(float(t[1]))
        return {"ms": statistics.median(times) * 1e3, "sent_mib": max(sent) / 2**20}

    rows = [{"ranks": world, "method": "muon", **timed(disco.Muon(params(), compute_dtype=torch.float32))}]
    for f in cfg["fractions"]:
        opt = disco.Dion(params(), rank_fraction=f, replicate_mesh_grad_sync=False, qr_method=cfg["qr_method"])
        rows.append({"ranks": world, "method": f"dion r={f:g}", **timed(opt)})
    for r in rows:
        r["x_muon"] = r["ms"] / rows[0]["ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m disco bench dion", description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    ap.add_argument("--fractions", default="1,0.5,0.25,0.125", help="Dion rank fractions (default 1,0.5,0.25,0.125)")
    ap.add_argument("--layers", type=int, default=2, help="transformer layers of matrices (default 2)")
    ap.add_argument("--width", type=int, default=512, help="model width (default 512)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    ap.add_argument("--qr-method", default="rcqr", choices=["qr", "cqr", "rcqr"], help="Dion's qr_method")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    from disco.distributed.launch import run_ranks

    cfg = {**vars(args), "fractions": [float(x) for x in args.fractions.split(",")]}
    rows: list[dict[str, Any]] = []
    for world in [int(x) for x in args.ranks.split(",")]:
        rows += run_ranks(_bench_rank, world, cfg, timeout=1200, preload=["disco", "disco.bench.dion"])[0]
    columns: list[Column] = [
        ("ranks", "ranks"),
        ("method", "method"),
        ("ms", "ms", ".1f"),
        ("x_muon", "x_muon", ".2f"),
        ("sent_mib", "sent/rank MiB", ".3f"),
    ]
    emit(rows, args.json, columns, {"benchmark": "dion", **environment(), "config": cfg})
    return 0
