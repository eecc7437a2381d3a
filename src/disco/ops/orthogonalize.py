"""Orthogonalization backends: the (approximate) polar factor ``U V^T`` of each matrix ``G = U S V^T``.

All backends take ``G`` of shape ``(..., m, n)``, treat leading dims as a batch, and return a tensor of G's
shape and dtype. Tall inputs are transposed to the wide orientation internally so that the Gram matrix is the
small one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .coefficients import CoefficientTable, get_table

DEFAULT_TABLE = {"newtonschulz5": "keller", "polar_express": "polar_express"}


def default_compute_dtype(G: Tensor) -> torch.dtype:
    """bf16 on accelerators; on CPU fp32 (a bf16 matmul there is ~100x slower), fp64 kept for fp64 inputs."""
    if G.device.type != "cpu":
        return torch.bfloat16
    return torch.float64 if G.dtype == torch.float64 else torch.float32


def _frobenius_normalise(X: Tensor, safety: float, eps: float) -> Tensor:
    # Normalise in at least fp32: casting a raw gradient to fp16 first can overflow (> 65504) or flush small
    # entries to zero, and a tiny eps (1e-20) underflows in fp16. After this, entries are <= 1 in magnitude.
    if X.dtype in (torch.float16, torch.bfloat16):
        X = X.float()
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    denom = norm * safety + eps
    # A zero matrix must stay zero, never 0/0 (eps may be 0).
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return X / denom


def newton_schulz(
    G: Tensor,
    *,
    steps: int = 5,
    coefficients: str | CoefficientTable | Sequence = "keller",
    eps: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Quintic Newton-Schulz iteration towards the polar factor.

    .. math::
        X_0 = G / (s\|G\|_F + \epsilon),\quad A = X_k X_k^T,\quad X_{k+1} = a_k X_k + (b_k A + c_k A^2) X_k

    computed on the wide orientation (``m <= n``). ``(a_k, b_k, c_k)`` come from the table (``keller``,
    ``you``, ``polar_express``, ``polar_express_5``, or user tuples).
    """
    if steps < 0:
        raise ValueError(f"newton_schulz: steps must be >= 0, got {steps}")
    table = get_table(coefficients)
    dtype = compute_dtype or default_compute_dtype(G)
    X = G.mT if G.size(-2) > G.size(-1) else G
    tall = X is not G
    X = _frobenius_normalise(X, table.safety, table.eps if eps is None else eps).to(dtype)
    lead = X.shape[:-2]
    # Fused multiply-adds (one rounding, as in the 2-D case) on a flat batch: (batch, m, n).
    X = X.reshape(-1, *X.shape[-2:]) if X.dim() != 2 else X
    mm = torch.addmm if X.dim() == 2 else torch.baddbmm
    for k in range(steps):
        a, b, c = table.at(k)
        A = X @ X.mT
        B = mm(A, A, A, beta=b, alpha=c)
        X = mm(X, B, X, beta=a, alpha=1.0)
    X = X.reshape(*lead, *X.shape[-2:])
    if tall:
        X = X.mT
    return X.to(G.dtype)


def svd_polar(G: Tensor, *, compute_dtype: torch.dtype | None = None, **_: object) -> Tensor:
    """Exact polar factor by SVD; numerically-null directions map to 0 (as Newton-Schulz maps them near 0).

    A singular value counts as null below ``2 (sqrt(m) + sqrt(n)) * eps * sigma_max``: measured null singular
    values of rank-deficient fp32 / fp64 products stay below ``0.35 (sqrt(m) + sqrt(n)) * eps * sigma_max``,
    while the rank-revealing ``max(m, n) * eps * sigma_max`` would also drop genuine small singular values of
    well-posed inputs (about 1 of 1024 for a 1024 x 1024 Gaussian in fp32).
    """
    dtype = compute_dtype or (torch.float64 if G.dtype == torch.float64 else torch.float32)
    if dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32  # linalg.svd has no half-precision kernels
    X = G.to(dtype)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    m, n = G.shape[-2:]
    tol = S.amax(dim=-1, keepdim=True) * (2 * (math.sqrt(m) + math.sqrt(n)) * torch.finfo(dtype).eps)
    keep = (tol < S) & (S > 0)
    return ((U * keep.unsqueeze(-2).to(dtype)) @ Vh).to(G.dtype)


def identity(G: Tensor, **_: object) -> Tensor:
    """No orthogonalization (embeddings and heads normalise rows in their LMO); a copy, never G itself."""
    return G.clone()


def _newtonschulz5(G: Tensor, **kw) -> Tensor:
    kw.setdefault("coefficients", DEFAULT_TABLE["newtonschulz5"])
    return newton_schulz(G, **kw)


def _polar_express(G: Tensor, **kw) -> Tensor:
    kw.setdefault("coefficients", DEFAULT_TABLE["polar_express"])
    return newton_schulz(G, **kw)


BACKENDS: dict[str, Callable[..., Tensor]] = {
    "newtonschulz5": _newtonschulz5,
    "polar_express": _polar_express,
    "svd": svd_polar,
    "identity": identity,
}


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def orthogonalize(
    G: Tensor,
    *,
    backend: str = "newtonschulz5",
    steps: int = 5,
    coefficients: str | CoefficientTable | Sequence | None = None,
    eps: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Approximate polar factor of each matrix in ``G`` (shape ``(..., m, n)``), same shape and dtype.

    Args:
        G: input, at least 2-D; leading dims are a batch.
        backend: ``newtonschulz5`` (default table ``keller``), ``polar_express`` (default table
            ``polar_express``), ``svd`` (exact) or ``identity``.
        steps: iterations for the Newton-Schulz backends.
        coefficients: a table name, a ``CoefficientTable``, one ``(a, b, c)`` tuple, or ``None`` for the
            backend's default.
        eps: added to the Frobenius norm before dividing (default: the table's).
        compute_dtype: matmul dtype; ``None`` is bf16 on CUDA and fp32 on CPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown orthogonalization backend {backend!r}; valid: {backend_names()}")
    if G.dim() < 2:
        raise ValueError(f"orthogonalize needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    if G.numel() == 0:
        return G.clone()
    kw: dict = {"compute_dtype": compute_dtype}
    if backend in DEFAULT_TABLE:
        kw.update(steps=steps, eps=eps)
        if coefficients is not None:
            kw["coefficients"] = coefficients
    return BACKENDS[backend](G, **kw)


def orthogonalize_cost(shape: Sequence[int]) -> float:
    """Relative cost of orthogonalizing a ``(..., m, n)`` stack: ``batch * m * n * min(m, n)``."""
    *batch, m, n = shape
    b = 1
    for d in batch:
        b *= d
    return float(b) * m * n * min(m, n)
