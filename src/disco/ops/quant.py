"""8-bit block quantization: int8 values with one absmax scale per block of consecutive entries of a row.

A tensor seen as rows ``(r, n)`` is cut into blocks of ``block`` consecutive entries of each row (the last block
of a row is shorter when ``block`` does not divide ``n``). Per block ``b`` with entries ``x_j``::

    s_b = max_j |x_j| / 127                  # the scale, float32
    q_j = round(x_j * (127 / max_j |x_j|))   # int8 in [-127, 127]; 0 for an all-zero block
    x_j ~ q_j * s_b                          # |x_j - q_j s_b| <= s_b / 2 (+ a few float32 ulps of max |x|)

A block never spans two rows, so a tensor split by rows (or by columns at block boundaries) quantizes piece by
piece exactly as it does whole: the scales of a piece are the whole tensor's scales of its blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: the largest magnitude of a quantized entry (symmetric: -127 .. 127, never -128)
QMAX = 127


def block_count(n: int, block: int) -> int:
    """Blocks in a row of ``n`` entries (``ceil(n / block)``)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return -(-n // block)


def _parts(x: Tensor, block: int) -> list[tuple[Tensor, slice]]:
    """``x`` (rows, n) as ``(rows, k, block)`` whole blocks and the ``(rows, 1, tail)`` short block, with the
    columns of the scale each part takes."""
    n = x.shape[-1]
    k = n // block
    out = []
    if k:
        out.append((x[:, : k * block].view(x.shape[0], k, block), slice(0, k)))  # a view: written through
    if n - k * block:
        out.append((x[:, k * block :].unsqueeze(-2), slice(k, k + 1)))
    return out


def quantize_blocks(
    x: Tensor, block: int, q: Tensor | None = None, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` (``(rows, n)``, float) by blocks of ``block`` entries of each row (module docstring).

    Args:
        x: the values, ``(rows, n)``, float32 or float64 (the arithmetic runs in ``x``'s dtype).
        block: entries per block, ``>= 1``.
        q: where to write the int8 values, ``(rows, n)``; ``None``: a new tensor.
        scale: where to write the float32 scales, ``(rows, block_count(n, block))``; ``None``: a new tensor.

    Returns:
        ``(q, scale)``.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_blocks takes (rows, n), got shape {tuple(x.shape)}")
    rows, n = x.shape
    q = torch.empty((rows, n), dtype=torch.int8, device=x.device) if q is None else q
    scale = torch.empty((rows, block_count(n, block)), dtype=torch.float32, device=x.device) if scale is None else scale
    for (xs, cols), (qs, _) in zip(_parts(x, block), _parts(q, block)):
        amax = xs.abs().amax(dim=-1, keepdim=True)  # (rows, k, 1)
        inv = torch.where(amax > 0, QMAX / amax, torch.zeros_like(amax))
        qs.copy_((xs * inv).round_().clamp_(-QMAX, QMAX))
        scale[:, cols].copy_((amax / QMAX).squeeze(-1))
    return q, scale


def dequantize_blocks(q: Tensor, scale: Tensor, block: int, out: Tensor) -> Tensor:
    """``out = q * scale`` per block (the inverse of :func:`quantize_blocks`), in ``out``'s dtype.

    Args:
        q: int8 values, ``(rows, n)``.
        scale: float32 scales, ``(rows, block_count(n, block))``.
        block: entries per block.
        out: ``(rows, n)`` float tensor written in place (and returned).
    """
    for (qs, cols), (os_, _) in zip(_parts(q, block), _parts(out, block)):
        os_.copy_(qs)
        os_.mul_(scale[:, cols].unsqueeze(-1))
    return out
