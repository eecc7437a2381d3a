"""``python -m disco bench plan``: seconds to plan, and to compute the plan's stats, by world size and layout.

What ``python -m disco plan --json`` spends after reading its input: ``build_plan`` (layouts, costs, the owner
assignment, buckets, validation) and ``summarize`` (``Plan.stats`` plus the load summary and the ranks with
work), for a transformer-like set of matrices (GPT-2-small blocks of q, k, v, out 768x768, fc 3072x768,
proj 768x3072, repeated up to ``--matrices``). The layout tables are cached per process, so each timed run
starts with the caches cleared, as a fresh ``python -m disco plan`` does. Meshes: ``hsdp`` is R x S with R the
largest divisor of N up to sqrt(N); ``fsdp+tp`` is N/T x T with T = gcd(N, 8).

Goal (issue #13): the whole answer within 5 s at 65,536 ranks and 1,000 matrices, for every layout.

``--models llama3-8b,llama3-70b,llama3-405b,moe-64e`` plans built-in model shape sets instead, and times the
per-rank figures too (``disco.distributed.plan_report.rank_figures``: owned matrices, FLOPs, bytes, peak memory
per rank); goal (issue #21): the whole answer within 5 s at 16,384 ranks.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

from disco.bench.common import Column, emit, environment, parse_ints
from disco.distributed import layout as layout_module
from disco.distributed.plan_cli import build_plan, summarize
from disco.distributed.plan_report import rank_figures
from disco.distributed.shapes import ShapeSpec, model_shapes, transformer

GOAL_WORLD, GOAL_SECONDS = 65536, 5.0
MODEL_GOAL_WORLD = 16384
COLUMNS: list[Column] = [
    ("world_size", "world_size"),
    ("layout", "layout"),
    ("model", "model"),
    ("matrices", "matrices"),
    ("plan_s", "plan_s", ".3f"),
    ("stats_s", "stats_s", ".3f"),
    ("figures_s", "per_rank_s", ".3f"),
    ("flops_vs_lb", "flops/lb", ".3f"),
    ("total_s", "total_s", ".3f"),
    ("imbalance", "imbalance", ".4g"),
    ("bytes_vs_lb", "bytes/lb", ".4f"),
    ("goal", "goal"),
]


def mesh_layout(kind: str, world: int) -> str:
    """``"hsdp"`` -> ``"hsdp:RxS"`` (R the largest divisor of N up to sqrt(N)); ``"fsdp+tp"`` -> ``"fsdp+tp:SxT"``."""
    if kind == "hsdp":
        r = max(d for d in range(1, math.isqrt(world) + 1) if world % d == 0)
        return f"hsdp:{r}x{world // r}"
    if kind == "fsdp+tp":
        t = math.gcd(world, 8)
        return f"fsdp+tp:{world // t}x{t}"
    return kind


def matrices(count: int) -> list[ShapeSpec]:
    """``count`` GPT-2-small block matrices (6 per layer), with their tensor-parallel roles."""
    return transformer(-(-count // 6), 768, 3072)[:count]


def _clear_caches() -> None:
    for fn in (layout_module.local_numels_table, layout_module.replica_group_table, layout_module.rank_positions):
        fn.cache_clear()


def measure(world: int, kind: str, specs: list[ShapeSpec], repeat: int, model: str = "-") -> dict[str, Any]:
    """One row: median seconds over ``repeat`` cold runs of ``build_plan`` and of ``summarize`` (and, for a
    built-in ``model``, of the per-rank figures)."""
    layout = mesh_layout(kind, world)
    plan_s, stats_s, figures_s = [], [], []
    flops_vs_lb = float("nan")
    for _ in range(max(1, repeat)):
        _clear_caches()
        t0 = time.perf_counter()
        plan = build_plan(specs, layout, world)
        t1 = time.perf_counter()
        st = summarize(plan)
        t2 = time.perf_counter()
        if model != "-":
            flops_vs_lb = rank_figures(plan).summary()["flops"]["max_over_lower_bound"]
        plan_s.append(t1 - t0)
        stats_s.append(t2 - t1)
        figures_s.append(time.perf_counter() - t2)
        del plan
    total = statistics.median(p + s + f for p, s, f in zip(plan_s, stats_s, figures_s))
    goal = "-"
    if (world, len(specs), model) == (GOAL_WORLD, 1000, "-") or (world, model != "-") == (MODEL_GOAL_WORLD, True):
        goal = "met" if total <= GOAL_SECONDS else "MISSED"
    return {
        "world_size": world,
        "layout": layout,
        "model": model,
        "matrices": len(specs),
        "plan_s": statistics.median(plan_s),
        "stats_s": statistics.median(stats_s),
        "figures_s": statistics.median(figures_s),
        "flops_vs_lb": flops_vs_lb,
        "total_s": total,
        "imbalance": st["imbalance"],
        "bytes_vs_lb": st["bytes_vs_lower_bound"],
        "goal": goal,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m disco bench plan", description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", default="4096,65536,1000000", help="comma-separated world sizes N")
    p.add_argument("--layouts", default="fsdp,ddp,hsdp,fsdp+tp", help="comma-separated: fsdp, ddp, hsdp, fsdp+tp")
    p.add_argument("--matrices", type=int, default=1000, help="matrices to plan (GPT-2-small blocks)")
    p.add_argument("--models", default="", help="built-in shape sets to plan instead (e.g. llama3-405b,moe-64e)")
    p.add_argument("--repeat", type=int, default=1, help="cold runs per row (median reported)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    kinds = [k for k in args.layouts.replace(" ", "").split(",") if k]
    unknown = sorted(set(kinds) - {"fsdp", "ddp", "hsdp", "fsdp+tp"})
    if unknown:
        p.error(f"unknown layouts {unknown}; valid: fsdp, ddp, hsdp, fsdp+tp")
    worlds = parse_ints(args.world_sizes)
    models = [m for m in args.models.replace(" ", "").split(",") if m]
    try:
        sets = [(m, model_shapes(m)) for m in models] or [("-", matrices(args.matrices))]
    except KeyError as e:
        p.error(str(e.args[0]))
    rows = [measure(w, kind, specs, args.repeat, model) for model, specs in sets for w in worlds for kind in kinds]
    meta = {
        "benchmark": "plan",
        "goal": f"plan + stats <= {GOAL_SECONDS:g} s at {GOAL_WORLD} ranks and 1000 matrices, every layout; "
        f"with --models, plan + stats + per-rank figures <= {GOAL_SECONDS:g} s at {MODEL_GOAL_WORLD} ranks",
        "repeat": args.repeat,
        **environment(),
    }
    emit(rows, args.json, COLUMNS, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
