"""``python -m disco bench ortho``: orthogonalization backends and coefficient tables side by side.

For each shape (a square ``s x s`` and a rectangular ``s x s/4`` per size ``s``) and each backend / table (the Gram
forms run their plain twin on square shapes), in ``--compute-dtype`` (default: the input's), prints
the median (and min) time per call after a warm-up, the candidates timed round-robin so that a noisy neighbour
hits them all alike; the relative Frobenius error to the exact polar factor (float64 SVD); and the smallest and
largest singular value of the result. ``x_svd`` is the median time over the SVD backend's, measured in the same
process (timing claims are ratios against a peer).
"""

from __future__ import annotations

import argparse
import functools
import statistics
from typing import Any

import torch

from disco.bench.common import (
    Column,
    add_device_argument,
    emit,
    environment,
    parse_ints,
    resolve_device,
    time_interleaved,
)
from disco.ops import orthogonalize

CONFIGS: list[tuple[str, str | None]] = [
    ("newtonschulz5", "keller"),
    ("newtonschulz5", "you"),
    ("polar_express", "polar_express"),
    ("polar_express", "polar_express_5"),
    ("gram_newtonschulz5", "keller"),
    ("gram_polar_express", "polar_express"),
    ("svd", None),
]
COLUMNS: list[Column] = [
    ("backend", "backend"),
    ("table", "table"),
    ("shape", "shape"),
    ("steps", "steps"),
    ("ms", "ms/call", ".2f"),
    ("ms_min", "ms_min", ".2f"),
    ("x_svd", "x_svd", ".2f"),
    ("rel_err", "rel_err", ".3e"),
    ("sv_min", "sv_min", ".4f"),
    ("sv_max", "sv_max", ".4f"),
]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def shapes_for(sizes: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in sizes:
        out.append((s, s))
        if s >= 8:
            out.append((s, s // 4))
    return out


def measure(
    shape: tuple[int, int],
    *,
    steps: int,
    repeat: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """One row per backend / table for a Gaussian input of ``shape``."""
    gen = torch.Generator().manual_seed(seed)
    G64 = torch.randn(*shape, generator=gen, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G64, full_matrices=False)
    polar = U @ Vh
    G = G64.to(device=device, dtype=dtype)
    calls = [
        functools.partial(
            orthogonalize, G, backend=backend, steps=steps, coefficients=table, compute_dtype=compute_dtype or dtype
        )
        for backend, table in CONFIGS
    ]
    times = time_interleaved(calls, repeat=repeat, warmup=1, device=device)
    rows = []
    for (backend, table), call, t in zip(CONFIGS, calls, times):
        O = call().to(device="cpu", dtype=torch.float64)
        s = torch.linalg.svdvals(O)
        rows.append(
            {
                "backend": backend,
                "table": table or "-",
                "shape": f"{shape[0]}x{shape[1]}",
                "m": shape[0],
                "n": shape[1],
                "steps": steps if backend != "svd" else None,
                "ms": statistics.median(t) * 1e3,
                "ms_min": min(t) * 1e3,
                "rel_err": ((O - polar).norm() / polar.norm()).item(),
                "sv_min": s.min().item(),
                "sv_max": s.max().item(),
            }
        )
    svd_ms = next(r["ms"] for r in rows if r["backend"] == "svd")
    for r in rows:
        r["x_svd"] = r["ms"] / svd_ms if svd_ms > 0 else None
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m disco bench ortho", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256,512,1024", help="comma-separated sizes s: shapes s x s and s x s/4")
    p.add_argument("--steps", type=int, default=5, help="Newton-Schulz / Polar Express iterations")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per row (median reported)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="input dtype")
    p.add_argument("--compute-dtype", choices=sorted(DTYPES), default=None, help="matmul dtype (default: --dtype)")
    add_device_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device, parser=p)
    rows: list[dict[str, Any]] = []
    for shape in shapes_for(parse_ints(args.sizes)):
        compute = DTYPES[args.compute_dtype] if args.compute_dtype else None
        rows += measure(
            shape, steps=args.steps, repeat=args.repeat, dtype=DTYPES[args.dtype], device=args.device,
            compute_dtype=compute,
        )  # fmt: skip
    meta = {
        "benchmark": "ortho",
        "dtype": args.dtype,
        "compute_dtype": args.compute_dtype or args.dtype,
        "steps": args.steps,
        "repeat": args.repeat,
        **environment(args.device),
    }
    emit(rows, args.json, COLUMNS, meta)
    return 0
