"""Dion's local primitives (Ahn et al., arXiv 2504.05295): orthonormalization of a tall ``P`` and column norms.

All functions work on ``(..., m, r)`` stacks with ``m >= r`` and never produce NaN from all-zero input.

* ``qr``: Householder QR (``torch.linalg.qr``), columns signed so that ``diag(R) >= 0`` (a unique answer);
* ``cqr``: Cholesky QR, ``R = chol(P^T P)^T``, ``P R^{-1}``: the Gram (in float64: exact whatever the user's
  fp32 matmul precision), one ``r x r`` Cholesky and a triangular solve,
  falling back to ``qr`` for the matrices whose Gram matrix is not numerically positive definite;
* ``rcqr``: randomized Cholesky QR: a Gaussian sketch ``S`` (``k x m``, ``k = ceil(oversample * r)``), the QR of
  ``S P`` gives ``R``, ``P R^{-1}`` is well conditioned, and one Cholesky QR pass makes it orthonormal. The sketch
  is fixed (seed 0); the answer does not depend on it (see ``randomized_cholesky_qr``).

The three give the same matrix in exact arithmetic: the unique ``Q`` with ``P = Q R``, ``R`` upper triangular with
a positive diagonal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

QR_METHODS = ("qr", "cqr", "rcqr")


def _upcast(P: Tensor) -> Tensor:
    return P.float() if P.dtype in (torch.float16, torch.bfloat16) else P


def householder(P: Tensor) -> Tensor:
    """The Q factor of ``P = Q R`` with ``diag(R) >= 0``."""
    Q: Tensor
    R: Tensor
    Q, R = torch.linalg.qr(P, mode="reduced")
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs.unsqueeze(-2)


def gram(P: Tensor) -> Tensor:
    """``P^T P`` (``r x r`` per matrix), in float64 for an fp32 ``P``: Cholesky QR's orthonormality is only as
    good as this product. An fp32 matmul runs in bf16 or TF32 under a user's
    ``torch.set_float32_matmul_precision("medium" / "high")`` (AMX CPUs, GPUs; ``Q^T Q`` then misses ``I`` by
    about 1e-3) and a CPU ``bmm`` picks bf16 or fp32 by the batch size (an expert would round differently in one
    process's stack than on a rank holding part of it); a float64 matmul does neither, so this is exact to fp32
    rounding whatever the process-wide setting, which nothing here reads or changes. It also squares ``P``'s
    condition number in float64 rather than fp32. The float64 work is the ``m r^2`` of this product only."""
    X = P.double() if P.dtype == torch.float32 else P
    return X.mT @ X


def cholesky_qr(P: Tensor) -> Tensor:
    """``P R^{-1}`` with ``R^T R = P^T P``; matrices whose Cholesky fails fall back to ``householder``.

    The Gram and its Cholesky factor are float64 for an fp32 ``P`` (``gram``); the triangular solve (no matmul,
    so no reduced precision) is in ``P``'s dtype."""
    L, info = torch.linalg.cholesky_ex(gram(P))
    out: Tensor = torch.linalg.solve_triangular(L.mT.to(P.dtype), P, upper=True, left=False)
    bad = (info != 0) | ~torch.isfinite(out).flatten(-2).all(-1)
    if bool(bad.any()):
        fixed = householder(P[bad])
        out = out.clone()
        out[bad] = fixed
    return out


def randomized_cholesky_qr(P: Tensor, oversample: float = 1.25, seed: int = 0) -> Tensor:
    """Sketch, QR of the sketch, ``P R^{-1}``, then one Cholesky QR refinement (see the module docstring).

    ``R``'s rows are signed so that ``diag(R) > 0``: the result is then the unique orthonormal ``P T`` with ``T``
    upper triangular and a positive diagonal, whatever the sketch, so it equals ``qr`` and ``cqr`` up to rounding.
    The sketch ``S P`` is therefore left in ``P``'s dtype and the user's matmul precision (bf16 under "medium"):
    its rounding changes ``R`` only, and the refinement's float64 Gram (``gram``) makes the answer orthonormal to
    fp32 rounding (measured on 2048 x 128 with condition number 1e5 under "medium": ``|Q^T Q - I|`` 7e-7, 1.5e-7
    with a float64 sketch, which would cost another ``1.25 m r^2`` in float64).
    """
    *_, m, r = P.shape
    k = max(r, math.ceil(oversample * r))
    if k > m:  # no room to oversample: a square sketch is ill-conditioned, so take Householder's answer
        return householder(P)
    gen = torch.Generator(device=P.device).manual_seed(seed)
    S = torch.randn((*P.shape[:-2], k, m), generator=gen, device=P.device, dtype=P.dtype) / math.sqrt(k)
    _, R = torch.linalg.qr(S @ P, mode="reduced")
    d = torch.diagonal(R, dim1=-2, dim2=-1)
    R = R * torch.where(d < 0, -1.0, 1.0).to(R.dtype).unsqueeze(-1)
    diag_ok = (d.abs() > 0).all(-1)
    P1 = torch.linalg.solve_triangular(R, P, upper=True, left=False)
    return cholesky_qr(torch.where(diag_ok[..., None, None], P1, P))


def orthonormalize(P: Tensor, method: str = "qr", *, oversample: float = 1.25) -> Tensor:
    """Orthonormal columns spanning ``P``'s, per matrix of a ``(..., m, r)`` stack; same shape and dtype.

    Args:
        P: ``(..., m, r)`` with ``m >= r``.
        method: ``"qr"`` (Householder), ``"cqr"`` (Cholesky QR) or ``"rcqr"`` (randomized Cholesky QR).
        oversample: sketch rows per column for ``rcqr``. Default 1.25.
    """
    if method not in QR_METHODS:
        raise ValueError(f"unknown qr_method {method!r}; valid: {list(QR_METHODS)}")
    if P.shape[-2] < P.shape[-1]:
        raise ValueError(f"orthonormalize needs m >= r, got P of shape {tuple(P.shape)}")
    if P.numel() == 0:
        return P.clone()
    X = _upcast(P)
    if method == "qr":
        out = householder(X)
    elif method == "cqr":
        out = cholesky_qr(X)
    else:
        out = randomized_cholesky_qr(X, oversample)
    return out.to(P.dtype)


def column_normalize(R: Tensor, eps: float = 1e-8) -> Tensor:
    """Each column of ``(..., n, r)`` ``R`` divided by its l2 norm plus ``eps`` (zero columns stay zero)."""
    norm: Tensor = torch.linalg.vector_norm(R, dim=-2, keepdim=True)
    return R / (norm + eps)


def dion_rank(m: int, n: int, rank_fraction: float, multiple_of: int = 1) -> int:
    """``ceil(rank_fraction * min(m, n))`` rounded up to ``multiple_of``, at most ``min(m, n)``, at least 1."""
    d = min(m, n)
    r = math.ceil(rank_fraction * d)
    r = -(-r // multiple_of) * multiple_of
    return max(1, min(r, d))


@dataclass(frozen=True)
class OrthonormalizeSpec:
    """``orthonormalize(P, method, oversample)`` on stacks of whole ``P`` (``(..., m, r)``): Dion's one gather.

    Args:
        method: ``"qr"``, ``"cqr"`` or ``"rcqr"``.
        oversample: sketch rows per column for ``rcqr``. Default 1.25.
    """

    method: str = "qr"
    oversample: float = 1.25

    def __post_init__(self) -> None:
        if self.method not in QR_METHODS:
            raise ValueError(f"unknown qr_method {self.method!r}; valid: {list(QR_METHODS)}")

    @property
    def needs_whole(self) -> bool:
        return True

    def __call__(self, stack: Tensor) -> Tensor:
        return orthonormalize(stack, self.method, oversample=self.oversample)

    def cost(self, shape: tuple[int, ...]) -> float:
        *batch, m, r = shape
        return float(math.prod(batch)) * m * r * r

    def batch_ndim(self, shape: tuple[int, ...]) -> int:
        return len(shape) - 2

    def result_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def result_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        return dtype
