"""``python -m disco bench step``: one Muon step on a transformer-shaped parameter set, against its peers.

The parameter set is ``layers`` blocks of ``width``: per block four ``width x width`` matrices (attention
q, k, v, o), one ``width x 4*width`` and one ``4*width x width`` (MLP), as plain parameters with fixed random
gradients (no model). Two comparisons, each measured in the same process (median of ``--repeat`` steps after
``--warmup``, the two sides interleaved step by step):

(a) ``disco.Muon`` in fp32 (same-shape matrices batched into one Newton-Schulz call) against a per-parameter
    fp32 loop of the same algorithm (what ``torch.optim.Muon`` does, but in fp32); goal: ratio <= 0.8.
(b) ``disco.Muon`` with ``compute_dtype=bfloat16`` against ``torch.optim.Muon`` (always bf16). bf16 matmuls are
    5-150x slower than fp32 on CPUs without bf16 instructions (AVX2 only), so (b) runs on ``--bf16-layers``
    blocks (default 1) unless set.

``max_abs_diff`` is the largest parameter difference between the two sides after the timed steps (both start
from the same weights and see the same gradients), a check that they compute the same thing.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from disco.bench.common import Column, emit, environment, time_call
from disco.optim.muon import Muon

KELLER = (3.4445, -4.7750, 2.0315)

COLUMNS: list[Column] = [
    ("case", "case"),
    ("ours", "ours"),
    ("peer", "peer"),
    ("layers", "layers"),
    ("width", "width"),
    ("matrices", "matrices"),
    ("ours_ms", "ours ms/step", ".1f"),
    ("peer_ms", "peer ms/step", ".1f"),
    ("ratio", "ours/peer", ".3f"),
    ("max_abs_diff", "max |diff|", ".2e"),
]


def transformer_shapes(layers: int, width: int) -> list[tuple[int, int]]:
    """Per block: 4 x (w, w) attention, (4w, w) and (w, 4w) MLP (``out x in``)."""
    block = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    return block * layers


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


def _compare(
    case: str,
    ours_name: str,
    peer_name: str,
    ours_step: Callable[[], object],
    peer_step: Callable[[], object],
    ours_params: Sequence[Tensor],
    peer_params: Sequence[Tensor],
    *,
    layers: int,
    width: int,
    repeat: int,
    warmup: int,
    device: str,
) -> dict:
    # interleaved (peer, ours) pairs, so that a change of machine load hits both sides alike
    for _ in range(warmup):
        peer_step()
        ours_step()
    peer_t, ours_t = [], []
    for _ in range(max(1, repeat)):
        peer_t.append(time_call(peer_step, repeat=1, warmup=0, device=device))
        ours_t.append(time_call(ours_step, repeat=1, warmup=0, device=device))
    peer_s, ours_s = statistics.median(peer_t), statistics.median(ours_t)
    diff = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(ours_params, peer_params))
    return {
        "case": case,
        "ours": ours_name,
        "peer": peer_name,
        "layers": layers,
        "width": width,
        "matrices": len(ours_params),
        "ours_ms": ours_s * 1e3,
        "peer_ms": peer_s * 1e3,
        "ratio": ours_s / peer_s,
        "max_abs_diff": diff,
    }


def run_fp32(layers: int, width: int, *, repeat: int, warmup: int, device: str, lr: float = 0.02) -> dict:
    """(a) disco.Muon fp32 (batched) vs the per-parameter fp32 loop."""
    weights, grads = make_params(transformer_shapes(layers, width), device=device)
    ours_p, peer_p = _as_params(weights, grads), _as_params(weights, grads)
    ours = Muon(ours_p, lr=lr, weight_decay=0.1, compute_dtype=torch.float32)
    peer = LoopMuon(peer_p, lr=lr, weight_decay=0.1, dtype=torch.float32)
    return _compare(
        "a",
        "disco.Muon fp32 (batched)",
        "per-parameter fp32 loop",
        ours.step,
        peer.step,
        ours_p,
        peer_p,
        layers=layers,
        width=width,
        repeat=repeat,
        warmup=warmup,
        device=device,
    )


def run_bf16(layers: int, width: int, *, repeat: int, warmup: int, device: str, lr: float = 0.02) -> dict:
    """(b) disco.Muon at bf16 compute vs torch.optim.Muon (always bf16)."""
    weights, grads = make_params(transformer_shapes(layers, width), device=device)
    ours_p, peer_p = _as_params(weights, grads), _as_params(weights, grads)
    ours = Muon(ours_p, lr=lr, weight_decay=0.1, compute_dtype=torch.bfloat16)
    peer = torch.optim.Muon(peer_p, lr=lr, weight_decay=0.1)
    return _compare(
        "b",
        "disco.Muon bf16",
        "torch.optim.Muon (bf16)",
        ours.step,
        peer.step,
        ours_p,
        peer_p,
        layers=layers,
        width=width,
        repeat=repeat,
        warmup=warmup,
        device=device,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disco bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks for (a) (default 12)")
    parser.add_argument("--width", type=int, default=768, help="model width (default 768)")
    parser.add_argument(
        "--bf16-layers", type=int, default=1, help="blocks for (b), bf16 (default 1: slow on CPU); 0 skips (b)"
    )
    parser.add_argument("--bf16-width", type=int, default=None, help="width for (b) (default: --width)")
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per side (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layers < 1 or args.width < 1 or args.bf16_layers < 0:
        parser.error("--layers and --width must be >= 1, --bf16-layers >= 0")
    bf16_width = args.bf16_width or args.width

    timing = dict(repeat=args.repeat, warmup=args.warmup, device=args.device)
    rows = [run_fp32(args.layers, args.width, **timing)]
    if args.bf16_layers:
        rows.append(run_bf16(args.bf16_layers, bf16_width, **timing))
    meta = {
        "benchmark": "step",
        **environment(),
        "device": args.device,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "shapes_per_layer": "4 x WxW, 4WxW, Wx4W",
        "a": f"{args.layers} layers x {args.width}",
        "b": f"{args.bf16_layers} layers x {bf16_width}" if args.bf16_layers else "skipped",
        "ratio_fp32_batched_vs_loop": rows[0]["ratio"],
        "ratio_bf16_vs_torch": rows[1]["ratio"] if len(rows) > 1 else None,
    }
    emit(rows, args.json, COLUMNS, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
