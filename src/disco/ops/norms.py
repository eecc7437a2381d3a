"""Operator norms used for tracking; batched over leading dims, on CPU and CUDA alike.

Each is the dual pairing of an LMO: ``rms_to_rms`` for hidden matrices (spectral), ``l1_to_rms`` for
embeddings, ``rms_to_inf`` for output heads, plus ``supremum`` (max-abs) and the condition number.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def _f(W: Tensor) -> Tensor:
    return W.float() if W.dtype in (torch.bfloat16, torch.float16) else W


def _svdvals(W: Tensor) -> Tensor:
    # torch.linalg.svdvals runs on every device (no driver= argument, which is CUDA-only).
    s: Tensor = torch.linalg.svdvals(_f(W))
    return s


def spectral(W: Tensor) -> Tensor:
    """Largest singular value of each matrix."""
    return _svdvals(W)[..., 0]


def rms_to_rms(W: Tensor) -> Tensor:
    """``sigma_max * sqrt(fan_in / fan_out)`` of a ``fan_out x fan_in`` matrix."""
    return spectral(W) * math.sqrt(W.shape[-1] / W.shape[-2])


def l1_to_rms(W: Tensor) -> Tensor:
    """Embedding ``[vocab, dim]`` read as one-hot (l1) -> rms: ``max row l2 / sqrt(dim)``."""
    row_max: Tensor = torch.linalg.vector_norm(_f(W), dim=-1).amax(dim=-1)
    return row_max / math.sqrt(W.shape[-1])


def rms_to_inf(W: Tensor) -> Tensor:
    """Head ``[vocab, dim]`` from rms inputs to max-abs logits: ``max row l2 * sqrt(dim)``."""
    row_max: Tensor = torch.linalg.vector_norm(_f(W), dim=-1).amax(dim=-1)
    return row_max * math.sqrt(W.shape[-1])


def supremum(W: Tensor) -> Tensor:
    """Largest absolute entry of each matrix."""
    return _f(W).abs().amax(dim=(-2, -1))


def condition_number(W: Tensor) -> Tensor:
    """``sigma_max / sigma_min`` over the ``min(m, n)`` singular values (inf when rank-deficient or 0)."""
    s = _svdvals(W)
    smin = s[..., -1]
    return torch.where(smin > 0, s[..., 0] / smin.clamp_min(torch.finfo(s.dtype).tiny), torch.inf)


def rms(W: Tensor) -> Tensor:
    """Root mean square over all entries of ``W`` (not batched: one scalar for vectors and matrices alike)."""
    return _f(W).pow(2).mean().sqrt()


OPERATOR_NORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "rms_to_rms": rms_to_rms,
    "l1_to_rms": l1_to_rms,
    "rms_to_inf": rms_to_inf,
    "supremum": supremum,
    "condition_number": condition_number,
    "spectral": spectral,
    "rms": rms,
}


def operator_norm(name: str, W: Tensor) -> Tensor:
    """The operator norm ``name`` (a key of ``OPERATOR_NORMS``) of ``W``; ValueError for unknown names."""
    if name not in OPERATOR_NORMS:
        raise ValueError(f"unknown operator norm {name!r}; valid: {sorted(OPERATOR_NORMS)}")
    return OPERATOR_NORMS[name](W)
