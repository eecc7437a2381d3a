"""``python -m disco bench dion``: Dion's step time and bytes per step against ``disco.Muon`` and microsoft/dion.

On each layout of ``--layouts`` gloo processes hold the bench's transformer matrices (``--layers`` x (q, k, v, out
``w x w``; fc ``4w x w``; proj ``w x 4w``)) with random gradients: ``fsdp`` (``--ranks`` ranks, ``Shard(0)``),
``fsdp_tp`` (``ranks/2 x 2``: ``Shard(0)`` on the FSDP axis, ``Shard(1)`` on the TP axis, the layout microsoft/dion
supports for FSDP x TP) and ``ddp`` (plain replicas, different gradients, compressed data-parallel sync). They time,
side by side in the same processes, ``disco.Muon`` (fp32 Newton-Schulz, whole matrices to one owner; not under
``ddp``) and ``disco.Dion`` at each rank fraction of ``--fractions`` (default 1, 1/2, 1/4, 1/8; FSDP layouts:
``replicate_mesh_grad_sync=False``). ``ms`` is the median over ``--steps`` of the slowest rank; ``sent/rank`` is the
largest number of bytes a rank sent in one step, as counted by the engine (``mean/rank``: their mean);
``dion MiB`` is what microsoft/dion sends per rank for the same matrices and layout, from
:func:`dion_reference_bytes` (bytes are machine-independent); ``x_dion`` is ``sent/rank`` over it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from disco.bench.common import Column, add_device_argument, emit, environment, resolve_device, synchronize

if TYPE_CHECKING:
    from disco.optim.base import SpectralOptimizer


def dion_reference_bytes(
    shapes: Sequence[tuple[int, ...]],
    layout: str,
    world: int,
    rank_fraction: float,
    *,
    tp: int = 2,
    oversample: float = 1.25,
    element_size: int = 4,
) -> float:
    """Bytes one rank of microsoft/dion sends in one step for the 2-D ``shapes``, derived from its algorithm.

    Read from ``dion/dion.py`` of github.com/microsoft/dion (``Dion``, ``dion_update_ddp``, ``dion_update_fsdp``,
    ``dion_update_fsdp_tp``, ``distributed_orthogonalize``); the package is not installed here, so the bytes are
    counted, not measured. Matrices are batched by shape, ``b`` at a time (``b`` = the FSDP size, the TP size or
    the DDP size), the last batch padded to ``b``. ``r = ceil(rank_fraction min(m, n))``. Counting as
    ``EngineStats`` does: an all-reduce counts its buffer (what a rank hands it; a ring sends ``2 (W-1)/W`` of it,
    the same at ``W = 2``), a reduce-scatter or all-gather what leaves the rank. Per batch:

    * ``fsdp`` (``Shard(0)`` over ``O = world``; dion transposes, ``P = M^T Q`` is ``n x r``): ``P`` reduce-scattered
      over the batch and the orthonormal ``P`` all-gathered, ``2 (O-1) n r``; the column norms of ``R``, ``b r``.
    * ``fsdp_tp`` (``O = world / tp`` FSDP ``Shard(0)``, ``I = tp`` TP ``Shard(1)``; transposed): ``Q``
      (``m/O x r/I``) all-gathered over TP, ``(I-1) m r / O``; ``P`` (``n/I x r``) all-reduced over FSDP, ``n r``;
      the distributed randomized Cholesky QR reduce-scatters the sketch ``S P`` (``k x r``, ``k = ceil(oversample
      r / 128) 128``) and ``P^T P`` and all-gathers two ``r x r`` factors, ``(I-1)(k r + 3 r^2)`` (``n <= r``: an
      all-to-all there and back, ``2 (I-1) n r / I``); ``R`` (``m/O x r``) all-reduced over TP, ``b m r / O``;
      the column norms over FSDP, ``b r``.
    * ``ddp`` (``world`` replicas, compressed sync; ``P`` on the longer side ``a = max(m, n)``, ``c = min``): where
      ``rank_fraction < 1`` and ``(m + n) r < m n``, ``P`` reduce-scattered and all-gathered, ``2 (W-1) a r``, and
      ``R`` all-reduced, ``b c r``; else the gradients all-reduced, ``b m n``, and ``P`` all-gathered, ``(W-1) a r``.
    """
    groups: dict[tuple[int, int], int] = {}
    for shape in shapes:
        if len(shape) != 2:
            raise ValueError(f"dion_reference_bytes: 2-D shapes only, got {shape}")
        groups[(shape[0], shape[1])] = groups.get((shape[0], shape[1]), 0) + 1
    outer, inner = (world // tp, tp) if layout == "fsdp_tp" else (world, 1)
    total = 0.0
    for (m, n), count in groups.items():
        r = max(1, min(math.ceil(rank_fraction * min(m, n)), m, n))
        per: float
        if layout == "fsdp":
            b = outer
            per = 2 * (outer - 1) * n * r + (b * r if outer > 1 else 0)
        elif layout == "fsdp_tp":
            b = inner
            per = (inner - 1) * m * r / outer + (n * r if outer > 1 else 0)
            if n > r:
                k = math.ceil(oversample * r / 128.0) * 128
                per += (inner - 1) * (k * r + 3 * r * r)
            else:
                per += 2 * (inner - 1) * n * r / inner
            per += b * m * r / outer + (b * r if outer > 1 else 0)
        elif layout == "ddp":
            b = world
            a, c = max(m, n), min(m, n)
            if rank_fraction < 1 and (m + n) * r < m * n:
                per = 2 * (world - 1) * a * r + b * c * r
            else:
                per = b * m * n + (world - 1) * a * r
        else:
            raise ValueError(f"dion_reference_bytes: layout={layout!r}; valid: 'fsdp', 'fsdp_tp', 'ddp'")
        total += math.ceil(count / b) * per
    return total * element_size


def _bench_rank(rank: int, world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import disco
    from disco.distributed.shapes import transformer

    torch.set_num_threads(cfg["threads"])
    layout, device = cfg["layout"], cfg["device"]
    if layout == "fsdp_tp":
        mesh, placements = init_device_mesh(device, (world // 2, 2)), [Shard(0), Shard(1)]
    else:
        mesh, placements = init_device_mesh(device, (world,)), [Shard(0)]
    shapes = [s.shape for s in transformer(cfg["layers"], cfg["width"], 4 * cfg["width"])]
    gen = torch.Generator().manual_seed(0)
    fulls = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    mine = torch.Generator().manual_seed(1 + rank)  # ddp: each replica its own batch

    def params() -> list[nn.Parameter]:
        if layout == "ddp":
            ps = [nn.Parameter(f.to(device, copy=True)) for f in fulls]
            for p in ps:
                p.grad = torch.randn(p.shape, generator=mine).to(device)
            return ps
        ps = [nn.Parameter(distribute_tensor(f.clone(), mesh, placements, src_data_rank=None)) for f in fulls]
        for p, g in zip(ps, grads):
            p.grad = distribute_tensor(g, mesh, placements, src_data_rank=None)
        return ps

    def timed(opt: SpectralOptimizer) -> dict[str, Any]:
        opt.step()
        times, sent, mean = [], [], []
        for _ in range(cfg["steps"]):
            synchronize(device)
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            synchronize(device)
            b = float(opt.engine.stats.bytes_sent)  # the engine counts per step
            t = torch.tensor([time.perf_counter() - t0, b], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            total = torch.tensor([b], dtype=torch.float64)
            dist.all_reduce(total)
            times.append(float(t[0]))
            sent.append(float(t[1]))
            mean.append(float(total[0]) / world)
        return {"ms": statistics.median(times) * 1e3, "sent_mib": max(sent) / 2**20, "mean_mib": max(mean) / 2**20}

    rows = []
    if layout != "ddp":
        rows.append({"method": "muon", **timed(disco.Muon(params(), compute_dtype=torch.float32))})
    for f in cfg["fractions"]:
        kw: dict[str, Any] = {"replicate_mesh": dist.group.WORLD} if layout == "ddp" else {}
        opt = disco.Dion(
            params(), rank_fraction=f, replicate_mesh_grad_sync=layout == "ddp", qr_method=cfg["qr_method"], **kw
        )
        ref = dion_reference_bytes(shapes, layout, world, f) / 2**20
        row = {"method": f"dion r={f:g}", **timed(opt), "dion_mib": ref}
        row["x_dion"] = row["sent_mib"] / ref if ref else None
        rows.append(row)
    for r in rows:
        r.update(ranks=world, layout=layout)
        r["x_muon"] = r["ms"] / rows[0]["ms"] if layout != "ddp" else None
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m disco bench dion", description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    ap.add_argument("--layouts", default="fsdp", help="comma-separated: fsdp, fsdp_tp, ddp (default fsdp)")
    ap.add_argument("--fractions", default="1,0.5,0.25,0.125", help="Dion rank fractions (default 1,0.5,0.25,0.125)")
    ap.add_argument("--layers", type=int, default=2, help="transformer layers of matrices (default 2)")
    ap.add_argument("--width", type=int, default=512, help="model width (default 512)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    ap.add_argument("--qr-method", default="rcqr", choices=["qr", "cqr", "rcqr"], help="Dion's qr_method")
    add_device_argument(ap)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    from disco.distributed.launch import run_ranks

    args.device = resolve_device(args.device, max(int(x) for x in args.ranks.split(",")), ap)
    cfg = {**vars(args), "fractions": [float(x) for x in args.fractions.split(",")]}
    rows: list[dict[str, Any]] = []
    for layout in args.layouts.split(","):
        for world in [int(x) for x in args.ranks.split(",")]:
            if layout == "fsdp_tp" and (world < 4 or world % 2):
                continue  # a 2-D mesh: FSDP x TP(2)
            if layout == "ddp" and world < 2:
                continue
            run = {**cfg, "layout": layout}
            preload = ["disco", "disco.bench.dion"]
            rows += run_ranks(_bench_rank, world, run, timeout=1200, preload=preload, device=args.device)[0]
    columns: list[Column] = [
        ("layout", "layout"),
        ("ranks", "ranks"),
        ("method", "method"),
        ("ms", "ms", ".1f"),
        ("x_muon", "x_muon", ".2f"),
        ("sent_mib", "sent/rank MiB", ".3f"),
        ("mean_mib", "mean/rank MiB", ".3f"),
        ("dion_mib", "dion MiB", ".3f"),
        ("x_dion", "x_dion", ".2f"),
    ]
    emit(rows, args.json, columns, {"benchmark": "dion", **environment(args.device), "config": cfg})
    return 0
