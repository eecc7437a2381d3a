"""Benchmarks (scripts, not tests): ``python -m disco bench {goals,ortho,step,dist,dion,checks,overlap,plan}``.

Each sub-benchmark lives in its own module with a ``main(argv) -> int`` and is imported only when asked for,
so that ``bench ortho`` works whatever the state of the others.
"""

from __future__ import annotations

import importlib
import sys
from typing import TextIO

BENCHMARKS = {
    "goals": ("disco.bench.goals", "Every performance goal against its peer, in one table (make bench)."),
    "ortho": ("disco.bench.ortho", "Orthogonalization backends and tables: time, error vs SVD, singular values."),
    "step": ("disco.bench.step", "One optimizer step against its peers."),
    "dist": ("disco.bench.dist", "Distributed step: communication volume and time per layout."),
    "dion": ("disco.bench.dion", "Dion's step time and bytes per step against disco.Muon, by rank fraction."),
    "checks": ("disco.bench.checks", "What the agreement checks cost against the distributed step."),
    "overlap": ("disco.bench.overlap", "Exposed optimizer time with overlap_with_backward against the plain step."),
    "plan": ("disco.bench.plan", "Seconds to plan 1,000 matrices for 4,096 to 1,000,000 ranks."),
}


def _usage(file: TextIO | None = None) -> None:
    print("usage: python -m disco bench {" + ",".join(BENCHMARKS) + "} [options]\n", file=file)
    for name, (_, doc) in BENCHMARKS.items():
        print(f"  {name:6s} {doc}", file=file)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _usage()
        return 0
    if argv[0] not in BENCHMARKS:
        print(f"unknown benchmark {argv[0]!r}", file=sys.stderr)
        _usage(sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)
