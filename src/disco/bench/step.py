"""``python -m disco bench step``: one Muon step on a transformer-shaped parameter set, against its peers.

The parameter set is ``--layers`` blocks of ``--width`` w, as plain parameters with fixed random gradients (no
model). ``--block fused`` (the default): per block ``3w x w`` (fused q, k, v), ``w x w`` (attention out),
``4w x w`` and ``w x 4w`` (MLP); ``--block split``: four ``w x w`` attention matrices and the two MLP ones.
Per compute dtype, measured in the same process (median of ``--repeat`` steps after ``--warmup``, the two sides
interleaved step by step):

* ``bf16``: ``disco.Muon(compute_dtype=bfloat16)`` against ``torch.optim.Muon`` (always bf16); goal: <= 0.8.
* ``fp32``: ``disco.Muon(compute_dtype=float32)`` against a per-parameter fp32 loop of the same algorithm (what
  ``torch.optim.Muon`` does, in fp32); goal: <= 0.8.

``disco.Muon`` runs its defaults: the Gram form of Newton-Schulz where a matrix is wider than 1.5:1 (the same
polynomial, less work), one matrix per call on CPU (``--stack-bytes``). bf16 matmuls are 5-150x slower than fp32
on CPUs without bf16 instructions (AVX2 only): there, run ``--dtypes float32``. ``--memory`` adds the peak extra
memory of one step (the profiler's allocation timeline; goal: <= 1.25x the peer's); ``--commit streaming``
writes each parameter as soon as its update is ready instead of holding all of them. ``max |diff|`` is the
largest parameter difference between the two sides after the timed steps (same weights, same gradients).

``--ortho`` adds, per compute dtype, the whole ``disco.Muon`` step against its orthogonalizations alone (the same
LMO specs called on ready directions, one matrix per call, as the step calls them): what the element-wise passes,
the checks and the bookkeeping of a step cost on top (goal: <= 1.10).

``--device auto|cpu|cuda``: ``auto`` (default) steps on the GPU where there is one; there every timed step ends
with ``torch.cuda.synchronize`` and ``--memory`` reads the CUDA allocator's peak instead of the profiler.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from disco.bench.common import Column, add_device_argument, emit, environment, resolve_device, synchronize, time_call
from disco.distributed import create_local_config
from disco.optim.muon import Muon

KELLER = (3.4445, -4.7750, 2.0315)

COLUMNS: list[Column] = [
    ("case", "case"),
    ("ours", "ours"),
    ("peer", "peer"),
    ("matrices", "matrices"),
    ("stack_bytes", "stack_bytes"),
    ("commit", "commit"),
    ("ours_ms", "ours ms/step", ".1f"),
    ("peer_ms", "peer ms/step", ".1f"),
    ("ratio", "ours/peer", ".3f"),
    ("ours_mib", "ours MiB", ".1f"),
    ("peer_mib", "peer MiB", ".1f"),
    ("mem_ratio", "mem ours/peer", ".2f"),
    ("max_abs_diff", "max |diff|", ".2e"),
]

#: block name -> (shapes of one block as (out/w, in/w) multiples, description)
BLOCKS: dict[str, tuple[list[tuple[int, int]], str]] = {
    "fused": ([(3, 1), (1, 1), (4, 1), (1, 4)], "[3w x w, w x w, 4w x w, w x 4w]"),
    "split": ([(1, 1)] * 4 + [(4, 1), (1, 4)], "[4 x (w x w), 4w x w, w x 4w]"),
}


def transformer_shapes(layers: int, width: int, block: str = "fused") -> list[tuple[int, int]]:
    """``layers`` blocks of ``BLOCKS[block]`` at width ``width`` (``out x in``)."""
    return [(o * width, i * width) for o, i in BLOCKS[block][0]] * layers


def make_params(
    shapes: list[tuple[int, int]], *, seed: int = 0, device: str = "cpu"
) -> tuple[list[Tensor], list[Tensor]]:
    """Weights (``1/sqrt(fan_in)`` Gaussian) and gradients, both fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(*s, generator=gen) / math.sqrt(s[1]) for s in shapes]
    grads = [torch.randn(*s, generator=gen) for s in shapes]
    return [w.to(device) for w in weights], [g.to(device) for g in grads]


def _as_params(weights: list[Tensor], grads: list[Tensor]) -> list[torch.nn.Parameter]:
    ps = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(ps, grads):
        p.grad = g  # shared and read-only: no optimizer here writes to its gradients
    return ps


class LoopMuon:
    """The per-parameter reference: ``torch.optim.Muon``'s algorithm, one matrix at a time, in ``dtype``."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        *,
        lr: float,
        weight_decay: float,
        momentum: float = 0.95,
        dtype: torch.dtype = torch.float32,
        eps: float = 1e-7,
        ns_steps: int = 5,
    ) -> None:
        self.params = params
        self.bufs = [torch.zeros_like(p) for p in params]
        self.lr, self.wd, self.momentum = lr, weight_decay, momentum
        self.dtype, self.eps, self.ns_steps = dtype, eps, ns_steps

    def _ns(self, G: Tensor) -> Tensor:
        a, b, c = KELLER
        X = G.to(self.dtype)
        tall = X.size(0) > X.size(1)
        if tall:
            X = X.T
        X = X / X.norm().clamp(min=self.eps)
        for _ in range(self.ns_steps):
            A = X @ X.T
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
        return X.T if tall else X

    @torch.no_grad()
    def step(self) -> None:
        for p, buf in zip(self.params, self.bufs):
            g = p.grad
            assert g is not None
            buf.lerp_(g, 1 - self.momentum)
            u = g.lerp(buf, self.momentum)  # nesterov
            O = self._ns(u)
            p.mul_(1 - self.lr * self.wd)
            p.add_(O.to(p.dtype), alpha=-self.lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))


def peak_extra_mib(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak bytes allocated above the start while ``fn`` runs (MiB), from the profiler's memory timeline: every
    CPU allocation and free in order, not the process's RSS (which the allocator's caching blurs). On CUDA: the
    caching allocator's peak of allocated bytes (``torch.cuda.max_memory_allocated``) over the start."""
    if device == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        fn()
    timeline = MemoryProfileTimeline(p._memory_profile())
    sizes: list[list[int]]  # bytes by category, one row per timestamp
    _, sizes = timeline._coalesce_timeline("cpu")  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    totals = [sum(row) for row in sizes] or [0]
    return (max(totals) - totals[0]) / 2**20


def compare(
    case: str,
    ours: tuple[str, Callable[[], object], Sequence[Tensor]],
    peer: tuple[str, Callable[[], object], Sequence[Tensor]],
    *,
    repeat: int,
    warmup: int,
    device: str,
    memory: bool = False,
) -> dict[str, Any]:
    """Time ``ours`` against ``peer`` (``(name, step, params)`` each), interleaved step by step so that a change
    of machine load hits both alike; with ``memory``, also each side's peak extra memory of one more step."""
    (ours_name, ours_step, ours_params), (peer_name, peer_step, peer_params) = ours, peer
    for _ in range(warmup):
        peer_step()
        ours_step()
    peer_t, ours_t = [], []
    for _ in range(max(1, repeat)):
        peer_t.append(time_call(peer_step, repeat=1, warmup=0, device=device))
        ours_t.append(time_call(ours_step, repeat=1, warmup=0, device=device))
    peer_s, ours_s = statistics.median(peer_t), statistics.median(ours_t)
    diff = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(ours_params, peer_params))
    row = {
        "case": case,
        "ours": ours_name,
        "peer": peer_name,
        "matrices": len(ours_params),
        "ours_ms": ours_s * 1e3,
        "peer_ms": peer_s * 1e3,
        "ratio": ours_s / peer_s,
        "max_abs_diff": diff,
    }
    if memory:
        ours_mib, peer_mib = peak_extra_mib(ours_step, device), peak_extra_mib(peer_step, device)
        row.update(ours_mib=ours_mib, peer_mib=peer_mib, mem_ratio=ours_mib / max(peer_mib, 1e-9))
    return row


def run_case(
    case: str,
    shapes: list[tuple[int, int]],
    dtype: torch.dtype,
    *,
    repeat: int,
    warmup: int,
    device: str,
    memory: bool = False,
    stack_bytes: int | str | None = "auto",
    commit: str = "atomic",
    lr: float = 0.02,
) -> dict[str, Any]:
    """``disco.Muon`` (defaults but ``compute_dtype``) against ``torch.optim.Muon`` (bf16: it always runs bf16)
    or the per-parameter loop of the same algorithm (fp32)."""
    weights, grads = make_params(shapes, device=device)
    ours_p, peer_p = _as_params(weights, grads), _as_params(weights, grads)
    config = create_local_config(stack_bytes=stack_bytes)
    ours = Muon(ours_p, lr=lr, weight_decay=0.1, compute_dtype=dtype, distributed_config=config, commit=commit)
    peer_step: Callable[[], object]
    if dtype == torch.bfloat16:
        peer_name, peer_step = "torch.optim.Muon (bf16)", torch.optim.Muon(peer_p, lr=lr, weight_decay=0.1).step
    else:
        peer_name, peer_step = f"per-parameter {_short(dtype)} loop", LoopMuon(peer_p, lr=lr, weight_decay=0.1).step
    return compare(
        case,
        (f"disco.Muon {_short(dtype)}", ours.step, ours_p),
        (peer_name, peer_step, peer_p),
        repeat=repeat,
        warmup=warmup,
        device=device,
        memory=memory,
    )


def ortho_case(
    case: str, shapes: list[tuple[int, int]], dtype: torch.dtype, *, repeat: int, warmup: int, device: str,
    lr: float = 0.02,
) -> dict[str, Any]:  # fmt: skip
    """``disco.Muon``'s step against its orthogonalizations alone: the step's own LMO specs (``LMORule.spec``) on
    directions made beforehand in the dtype the engine hands them (``spec.input_dtype``), interleaved."""
    from disco.optim.rules import LMORule, LMOSettings

    weights, grads = make_params(shapes, device=device)
    params = _as_params(weights, grads)
    opt = Muon(params, lr=lr, weight_decay=0.1, compute_dtype=dtype, distributed_config=create_local_config())
    settings = opt.settings_of(opt.param_groups[0])
    assert isinstance(settings, LMOSettings)
    specs = [LMORule.spec(settings, p) for p in params]
    inputs = []
    for spec, g in zip(specs, grads):
        cast = getattr(spec, "input_dtype", None)
        inputs.append(g.to(cast(g.dtype, g.device) if cast is not None else g.dtype).unsqueeze(0))

    def ortho() -> None:
        for spec, x in zip(specs, inputs):
            spec(x)

    row = compare(
        case,
        (f"disco.Muon {_short(dtype)}", opt.step, params),
        ("orthogonalizations alone", ortho, params),
        repeat=repeat,
        warmup=warmup,
        device=device,
    )
    row["max_abs_diff"] = None  # one side only: nothing to compare
    return row


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16")


def _stack_bytes(text: str) -> int | str | None:
    return None if text == "none" else text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disco bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    parser.add_argument("--width", type=int, default=512, help="model width (default 512)")
    parser.add_argument("--block", choices=sorted(BLOCKS), default="fused", help="matrices per block (default fused)")
    parser.add_argument(
        "--dtypes", default="bfloat16,float32", help="compute dtypes, comma-separated (bf16 vs torch, fp32 vs loop)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per side (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    parser.add_argument("--memory", action="store_true", help="also the peak extra memory of a step")
    parser.add_argument(
        "--stack-bytes", default="auto", help="disco's stack budget: auto, none or bytes; a comma list sweeps"
    )
    parser.add_argument(
        "--commit", default="atomic", help="disco's commit: atomic, streaming, or a comma list (sweeps)"
    )
    parser.add_argument(
        "--ortho", action="store_true", help="also the step against its orthogonalizations alone, per dtype"
    )
    add_device_argument(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device, parser=parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layers < 1 or args.width < 1:
        parser.error("--layers and --width must be >= 1")
    try:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
        budgets = [_stack_bytes(b) for b in args.stack_bytes.split(",")]
    except (AttributeError, ValueError) as e:
        parser.error(f"bad --dtypes or --stack-bytes: {e}")
    commits = args.commit.split(",")
    if any(c not in ("atomic", "streaming") for c in commits):
        parser.error(f"--commit: each of {args.commit!r} must be atomic or streaming")
    shapes = transformer_shapes(args.layers, args.width, args.block)
    timing = dict(repeat=args.repeat, warmup=args.warmup, device=args.device, memory=args.memory)
    rows = []
    for dtype in dtypes:
        for sb in budgets:
            for commit in commits:
                row = run_case(_short(dtype), shapes, dtype, stack_bytes=sb, commit=commit, **timing)
                rows.append({**row, "stack_bytes": sb, "commit": commit})
        if args.ortho:
            row = ortho_case(f"{_short(dtype)} vs ortho", shapes, dtype, repeat=args.repeat, warmup=args.warmup,
                             device=args.device)  # fmt: skip
            rows.append({**row, "stack_bytes": "auto", "commit": "atomic"})
    meta = {
        "benchmark": "step",
        **environment(args.device),
        "repeat": args.repeat,
        "warmup": args.warmup,
        "shapes": f"{args.layers} x {BLOCKS[args.block][1]} at w={args.width}",
    }
    emit(rows, args.json, COLUMNS, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
