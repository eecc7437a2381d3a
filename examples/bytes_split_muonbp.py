"""Bytes per step, counted by the engine, of split heads under TP and of MuonBP's block and full steps.

Run it with ``python examples/bytes_split_muonbp.py`` (gloo processes on CPU, a minute). It prints, per rank and
step, ``EngineStats.bytes_sent``, ``bytes_received`` and the data-moving collectives for:

* a fused QKV weight ``1536 x 512`` under Muon, whole and with ``split_sizes=[512] * 3, num_heads=8``, on TP x2
  (colwise, ``Shard(0)``) and on FSDP x TP 2x2 (``Shard(0)``, ``Shard(0)``);
* a ``1024 x 1024`` weight under MuonBP (``period=5``, six steps) on the same two layouts.

The numbers are in ``docs/algorithms_split_muonbp.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from disco.distributed.launch import run_ranks


def _run(rank: int, world: int, kind: str, layout: str, split: bool) -> list[tuple[int, int, int]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from disco import Muon, MuonBP
    from disco.optim import SpectralOptimizer

    shape = (1536, 512) if kind == "qkv" else (1024, 1024)
    mesh = init_device_mesh("cpu", (2, 2) if layout == "fsdp_tp" else (world,))
    pl = [Shard(0)] * mesh.ndim
    p = nn.Parameter(distribute_tensor(torch.randn(shape, generator=torch.Generator().manual_seed(0)), mesh, pl))
    group: dict[str, Any] = {"params": [p], "param_names": ["w"]}
    opt: SpectralOptimizer
    if kind == "qkv":
        if split:
            group.update(split_sizes=[512] * 3, num_heads=8)
        opt, steps = Muon([group], lr=0.01, compute_dtype=torch.float32), 2
    else:
        opt, steps = MuonBP([group], lr=0.01, period=5, compute_dtype=torch.float32), 6
    out = []
    for step in range(steps):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(step + 1))
        p.grad = distribute_tensor(g, mesh, pl)
        opt.step()
        s = opt.engine.stats
        out.append((s.bytes_sent, s.bytes_received, s.collectives))
    return out


def main() -> None:
    for kind, split in [("qkv", False), ("qkv", True), ("muonbp", False)]:
        for layout, world in [("tp", 2), ("fsdp_tp", 4)]:
            runs = run_ranks(_run, world, kind, layout, split, timeout=300)
            what = {("qkv", False): "Muon, whole", ("qkv", True): "Muon, split heads"}.get((kind, split), "MuonBP")
            print(f"{what} on {layout} x{world}: (sent, received, collectives) per rank and step")
            for rank, steps in enumerate(runs):
                print(f"  rank {rank}: {steps}")


if __name__ == "__main__":
    main()
