"""``python -m disco plan``: the distribution plan for a world size, a layout and a set of shapes, no processes.

    python -m disco plan --world-size 8 --model gpt2-small
    python -m disco plan --world-size 4096 --model gpt2-small --json
    python -m disco plan --world-size 16 --shapes shapes.json --layout hsdp:2x8

    python -m disco plan --world-size 16384 --model llama3-405b --layout fsdp+tp:256x8 --pp 8 --plot load.png

``--shapes FILE``: a JSON list of shapes, each a list of 2 or 3 positive ints (3: a stack of experts).
``--model NAME``: a built-in set from ``disco.distributed.shapes`` (embeddings and output head excluded): GPT-2,
Llama-3 8B / 70B / 405B, a 64-expert MoE.
``--pp P``: P pipeline stages of whole layers; each stage runs the layout on its own ``N / P`` ranks.

Besides the plan's totals it prints, per rank (min / mean / max): owned matrices, orthogonalization FLOPs, bytes
sent + received and peak optimizer memory, each against its lower bound (``disco.distributed.plan_report``);
``--plot FILE`` draws per-rank FLOPs and bytes.

Layouts over ranks ``0..N-1`` (row-major meshes):

* ``fsdp``: ``Shard(0)`` over N (3-D stacks: sharded on the expert dim, so computed in place);
* ``ddp``: ``Replicate`` over N;
* ``hsdp:RxS``: mesh ``(R, S)``, ``(Replicate, Shard(0))``, R*S = N;
* ``fsdp+tp:SxT``: mesh ``(S, T)`` as FSDP2 over TP leaves it. Column-wise matrices (``tp="col"``):
  ``(_StridedShard(0, sf=T), Shard(0))``; row-wise (``tp="row"``): ``(Shard(0), Shard(1))``. The built-in sets
  name each matrix's role; for a shapes file the rule is by shape: ``rows < cols`` (a down projection) is
  row-wise, everything else column-wise. 3-D stacks ``(E, out, in)``: experts sharded over S, and the matrix
  dim of the role over T: ``(Shard(0), Shard(1))`` column-wise, ``(Shard(0), Shard(2))`` row-wise.

Costs are ``orthogonalize_cost(shape)`` and every tensor has the same bucket key, so same-shape tensors share
buckets. Exit status 2 on bad input (missing or malformed file, bad shape, mesh that does not hold N ranks).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence

from ..ops.orthogonalize import orthogonalize_cost
from .layout import REPLICATE, Layout, Placement, shard
from .plan_report import RankFigures, plot_rank_load, rank_figures
from .planner import Plan, make_plan
from .shapes import MODELS, ShapeSpec, model_shapes, pipeline_stages, role_by_shape


class PlanInputError(ValueError):
    """Bad command-line input: reported on stderr with exit status 2."""


def parse_layout(text: str, world_size: int) -> tuple[str, tuple[int, ...]]:
    """``"fsdp"`` -> ``("fsdp", (N,))``; ``"hsdp:2x4"`` -> ``("hsdp", (2, 4))``; checks the mesh holds N ranks."""
    kind, _, dims = text.partition(":")
    if kind in ("fsdp", "ddp"):
        if dims:
            raise PlanInputError(f"layout {kind!r} takes no mesh (got {text!r})")
        return kind, (world_size,)
    if kind not in ("hsdp", "fsdp+tp"):
        raise PlanInputError(f"unknown layout {text!r}; valid: fsdp, ddp, hsdp:RxS, fsdp+tp:SxT")
    parts = dims.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise PlanInputError(f"layout {text!r}: expected {kind}:AxB with positive integers, e.g. {kind}:2x4")
    a, b = int(parts[0]), int(parts[1])
    if a * b != world_size:
        raise PlanInputError(f"layout {text!r}: mesh {a}x{b} holds {a * b} ranks, but --world-size is {world_size}")
    return kind, (a, b)


def layout_for(spec: ShapeSpec, kind: str, mesh: tuple[int, ...], ranks: tuple[int, ...] | None = None) -> Layout:
    """``spec``'s layout over ranks ``0..N-1``; pass one shared ``ranks`` tuple for many specs (a tuple per layout
    costs memory and time at a million ranks)."""
    shape = spec.shape
    if ranks is None:
        ranks = tuple(range(math.prod(mesh)))
    if kind == "ddp":
        return Layout(shape, ranks, mesh, (REPLICATE,))
    if kind == "fsdp":
        return Layout(shape, ranks, mesh, (shard(0),))
    if kind == "hsdp":
        return Layout(shape, ranks, mesh, (REPLICATE, shard(0)))
    col = spec.tp == "col"
    if len(shape) == 3:
        return Layout(shape, ranks, mesh, (shard(0), shard(1 if col else 2)))
    if col:
        return Layout(shape, ranks, mesh, (Placement("strided_shard", 0, mesh[1]), shard(0)))
    return Layout(shape, ranks, mesh, (shard(0), shard(1)))


def load_shapes_file(path: str) -> list[ShapeSpec]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PlanInputError(f"shapes file {path!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanInputError(f"cannot read shapes file {path!r}: {e}") from None
    except json.JSONDecodeError as e:
        raise PlanInputError(f"shapes file {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise PlanInputError(f"shapes file {path!r}: expected a non-empty JSON list of shapes like [[768, 768], ...]")
    out = []
    for i, s in enumerate(data):
        ok = (
            isinstance(s, list)
            and len(s) in (2, 3)
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s)
        )
        if not ok:
            raise PlanInputError(
                f"shapes file {path!r}: entry {i} is {json.dumps(s)}; each shape must be a list of 2 or 3 "
                "positive integers"
            )
        shape = tuple(s)
        out.append(ShapeSpec(f"t{i}", shape, role_by_shape(shape)))
    return out


def build_plan(specs: Sequence[ShapeSpec], layout: str, world_size: int, bucket_size: int | None = None) -> Plan:
    """The plan that ``disco.Muon`` (keys all equal) would make for these shapes under ``layout``."""
    if world_size < 1:
        raise PlanInputError(f"--world-size must be >= 1, got {world_size}")
    if bucket_size is not None and bucket_size < 1:
        raise PlanInputError(f"--bucket-size must be >= 1, got {bucket_size}")
    kind, mesh = parse_layout(layout, world_size)
    ranks = tuple(range(world_size))
    layouts = [layout_for(s, kind, mesh, ranks) for s in specs]
    costs = [orthogonalize_cost(s.shape) for s in specs]
    return make_plan(
        layouts,
        costs,
        [0] * len(specs),
        ranks=ranks,
        batch_ndims=[1 if len(s.shape) == 3 else 0 for s in specs],
        bucket_size=bucket_size,
    )


def summarize(plan: Plan, element_size: int = 4) -> dict[str, float]:
    """``Plan.stats()`` plus the load summary and the ratio of bytes moved to the lower bound."""
    st = plan.stats(element_size)
    loads = list(map(plan.load.get, plan.ranks, itertools.repeat(0.0)))
    st["load_min"] = min(loads)
    st["load_max"] = max(loads)
    st["load_mean"] = sum(loads) / len(loads)
    st["cost_total"] = sum(plan.costs)
    st["elements"] = sum(lay.numel for lay in plan.layouts)
    st["bytes_vs_lower_bound"] = st["bytes_total"] / st["bytes_lower_bound"] if st["bytes_lower_bound"] else 1.0
    st["ranks_with_work"] = plan.ranks_with_work()
    st["element_size"] = element_size
    return st


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _print_human(plan: Plan, st: Mapping[str, float], title: str, show_ranks: int) -> None:
    print(title)
    print(f"  tensors           {st['tensors']} ({st['elements'] / 1e6:.2f}M elements, {st['element_size']} B each)")
    print(
        f"  load (cost)       min {st['load_min']:.4g}  mean {st['load_mean']:.4g}  max {st['load_max']:.4g}"
        f"  ({st['ranks_with_work']} of {st['world_size']} ranks compute)"
    )
    print(f"  imbalance         {st['imbalance']:.4f}  (max / mean load; 1.0 is perfect)")
    print(f"  redundancy        {st['redundancy']:.4f}  (work done / work needed; 1.0 is zero redundancy)")
    print(f"  bytes/rank max    {_fmt_bytes(st['bytes_per_rank_max'])}  (sent + received)")
    print(
        f"  bytes total       {_fmt_bytes(st['bytes_total'])}  lower bound {_fmt_bytes(st['bytes_lower_bound'])}"
        f"  ratio {st['bytes_vs_lower_bound']:.4f}"
    )
    print(
        f"  collectives/step  {st['collectives_per_step']}  ({st['buckets']} exchanged buckets, "
        f"{st['local_buckets']} in-place buckets)"
    )
    if show_ranks and plan.world_size <= show_ranks:
        per = plan.bytes_per_rank(int(st["element_size"]))
        assign = plan.assignments
        rows = [
            (
                str(r),
                str(len(assign[r])),
                f"{plan.load.get(r, 0.0):.4g}",
                f"{plan.load.get(r, 0.0) / st['load_mean']:.3f}" if st["load_mean"] else "-",
                _fmt_bytes(per[r]["sent"]),
                _fmt_bytes(per[r]["received"]),
            )
            for r in plan.ranks
        ]
        head = ("rank", "tensors", "cost", "x_mean", "sent", "received")
        widths = [max(len(h), *(len(row[k]) for row in rows)) for k, h in enumerate(head)]
        print()
        print("  " + "  ".join(h.rjust(w) for h, w in zip(head, widths)))
        print("  " + "  ".join("-" * w for w in widths))
        for row in rows:
            print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)))


def _print_rank_figures(figures: RankFigures) -> None:
    units = {
        "owned_matrices": (1.0, ""),
        "flops": (1e12, " TFLOP"),
        "bytes_sent_received": (2**30, " GiB"),
        "peak_optimizer_bytes": (2**30, " GiB"),
    }
    print(f"\n  per rank ({len(figures.ranks)} ranks)        min        mean         max   lower bound   max/bound")
    for name, row in figures.summary().items():
        div, unit = units[name]
        cells = [f"{row[k] / div:>11.4g}" for k in ("min", "mean", "max")]
        bound = "-" if math.isnan(row["lower_bound"]) else f"{row['lower_bound'] / div:.4g}"
        ratio = "-" if math.isnan(row["max_over_lower_bound"]) else f"{row['max_over_lower_bound']:.3f}"
        print(f"  {name + unit:<26}{' '.join(cells)} {bound:>13} {ratio:>11}")


def _stages(specs: list[ShapeSpec], pp: int, world_size: int) -> list[list[ShapeSpec]]:
    if pp < 1 or world_size % pp:
        raise PlanInputError(f"--pp {pp} must be >= 1 and divide --world-size {world_size}")
    try:
        return pipeline_stages(specs, pp)
    except ValueError as e:
        raise PlanInputError(str(e)) from None


def _figures(plans: Sequence[Plan], element_size: int, state_bytes: int) -> RankFigures:
    """Every stage's ranks, renumbered after the previous stages'."""
    figures = rank_figures(plans[0], element_size=element_size, state_bytes=state_bytes)
    for k, plan in enumerate(plans[1:], 1):
        more = rank_figures(plan, element_size=element_size, state_bytes=state_bytes)
        more.ranks = [r + k * plan.world_size for r in more.ranks]
        figures.extend(more)
    return figures


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m disco plan",
        description="Print the distribution plan (owners, balance, bytes) for a world size, layout and shapes.",
    )
    ap.add_argument("--world-size", "-n", type=int, required=True, help="number of ranks N")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shapes", metavar="FILE", help="JSON list of shapes, each [m, n] or [experts, m, n]")
    src.add_argument("--model", choices=sorted(MODELS), help="built-in shape set (embeddings excluded)")
    ap.add_argument("--layout", default="fsdp", help="fsdp | ddp | hsdp:RxS | fsdp+tp:SxT (default fsdp)")
    ap.add_argument("--bucket-size", type=int, default=None, help="most tensors per exchange (default: no limit)")
    ap.add_argument("--element-size", type=int, default=4, help="bytes per element on the wire (default 4, fp32)")
    ap.add_argument("--ranks-table", type=int, default=64, help="print a per-rank table up to this many ranks")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (whole layers each, N / P ranks each)")
    ap.add_argument("--state-bytes", type=int, default=4, help="bytes per element of the momentum (default 4)")
    ap.add_argument("--plot", metavar="FILE", help="draw per-rank FLOPs and bytes to a PNG (needs matplotlib)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = make_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse: 0 for --help, 2 for usage errors (message already printed)
        return int(e.code or 0)
    try:
        if args.element_size < 1:
            raise PlanInputError(f"--element-size must be >= 1, got {args.element_size}")
        specs = load_shapes_file(args.shapes) if args.shapes else model_shapes(args.model)
        stages = _stages(specs, args.pp, args.world_size)
        t0 = time.perf_counter()
        try:
            plans = [build_plan(stage, args.layout, args.world_size // args.pp, args.bucket_size) for stage in stages]
        except PlanInputError as e:
            if args.pp == 1:
                raise
            raise PlanInputError(f"{e} (each of the --pp {args.pp} stages runs the layout on N / P ranks)") from None
        t_plan = time.perf_counter() - t0
        st = summarize(plans[0], args.element_size)
        figures = _figures(plans, args.element_size, args.state_bytes)
        t_total = time.perf_counter() - t0
    except PlanInputError as e:
        print(f"disco plan: error: {e}", file=sys.stderr)
        return 2
    source = args.model if args.model else args.shapes
    record: dict[str, object] = {
        "model": source,
        "layout": args.layout,
        "pp": args.pp,
        **st,
        "per_rank": figures.summary(),
        "plan_seconds": t_plan,
        "total_seconds": t_total,
    }
    if args.json:
        print(json.dumps(record))
    else:
        title = f"plan: {source} on {args.world_size} ranks, layout {args.layout}"
        if args.pp > 1:
            title += f", {args.pp} pipeline stages (totals: stage 0 on {args.world_size // args.pp} ranks)"
        _print_human(plans[0], st, title, args.ranks_table)
        _print_rank_figures(figures)
        print(f"\n  planned in {t_plan:.3f} s, stats in {t_total - t_plan:.3f} s")
    if args.plot:
        plot_rank_load(figures, args.plot, f"{source}, {args.world_size} ranks, {args.layout}, pp={args.pp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
