"""Linear minimization oracles (LMOs) and their norm factors.

For a gradient-like ``G`` and a norm ``||.||``, the LMO returns ``argmax_{||D|| <= 1} <G, D>`` (the sign is
left to the optimizer, which subtracts it). Matrix norms first orthogonalize with a backend, then scale by a
norm factor that encodes the layer's operator norm (spectral condition, arXiv 2310.17813; Scion,
arXiv 2502.07529).

``G`` may hold a stack of parameters: the last ``param_ndim`` dims are one parameter, leading dims a stack.
Within a parameter, 2-D is a matrix ``out x in``; 3-D is a batch of expert matrices, except for
``conv_spectral`` which views ``(out, in, k, ...)`` as ``out x (in*k*...)`` per parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .coefficients import CoefficientSpec
from .orthogonalize import orthogonalize


@dataclass(frozen=True)
class NormSpec:
    """How a norm treats a parameter: whether it orthogonalizes, and its factor on the matrix view."""

    name: str
    kind: str  # "matrix" (backend + factor), "rows" (row-normalise), "elementwise"
    doc: str


def _upcast(X: Tensor) -> Tensor:
    """fp32 for half types; fp32 and fp64 stay as they are (never lose fp64 precision)."""
    return X.float() if X.dtype in (torch.float16, torch.bfloat16) else X


def _rows_unit(X: Tensor, eps: float) -> Tensor:
    norm: Tensor = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
    return X / norm.clamp_min(eps)


NORMS: dict[str, NormSpec] = {
    n.name: n
    for n in (
        NormSpec("spectral", "matrix", "polar factor * sqrt(fan_out / fan_in)"),
        NormSpec("original", "matrix", "polar factor * sqrt(max(1, rows / cols)) (torch.optim.Muon)"),
        NormSpec("match_rms_adamw", "matrix", "polar factor * 0.2 * sqrt(max(rows, cols)) (Moonlight)"),
        NormSpec("image_spectral", "matrix", "polar factor * max(1, sqrt(fan_out / fan_in))"),
        NormSpec("conv_spectral", "matrix", "polar factor of out x (in*k*k) * sqrt(out / in) / (k*k)"),
        NormSpec("embed_sqrt", "rows", "rows of [vocab, dim] to unit l2, * sqrt(dim)"),
        NormSpec("embed_linear", "rows", "rows of [vocab, dim] to unit l2, * dim"),
        NormSpec("unembed_sqrt", "rows", "rows of [vocab, dim] to unit l2, / sqrt(dim)"),
        NormSpec("unembed_linear", "rows", "rows of [vocab, dim] to unit l2, / dim"),
        NormSpec("sign", "elementwise", "sign(g) (l-inf LMO)"),
        NormSpec("bias_rms", "elementwise", "g / rms(g) per parameter"),
        NormSpec("none", "elementwise", "g unchanged"),
    )
}


def norm_names() -> list[str]:
    return sorted(NORMS)


def get_norm(name: str) -> NormSpec:
    if name not in NORMS:
        raise ValueError(f"unknown norm / norm_factor {name!r}; valid: {norm_names()}")
    return NORMS[name]


def matrix_view(G: Tensor, norm: str, param_ndim: int | None = None) -> Tensor:
    """View a stack of parameters as ``(..., m, n)`` matrices for ``norm`` (no copy when contiguous)."""
    pd = G.dim() if param_ndim is None else param_ndim
    lead = G.shape[: G.dim() - pd]
    pshape = G.shape[G.dim() - pd :]
    if pd < 2:
        raise ValueError(f"norm {norm!r} needs a matrix-shaped parameter, got shape {tuple(pshape)}")
    if norm == "conv_spectral":
        return G.reshape(*lead, pshape[0], math.prod(pshape[1:]))
    return G


def norm_factor(norm: str, shape: tuple[int, ...], param_ndim: int | None = None) -> float:
    """The scalar factor of a matrix norm for one parameter of ``shape`` (the last ``param_ndim`` dims).

    Element-wise norms (``sign``, ``bias_rms``, ``none``) have factor 1 for any shape; matrix and row norms
    need a parameter of at least 2 dims.
    """
    spec = get_norm(norm)
    if spec.kind == "elementwise":
        return 1.0
    shape = tuple(shape)
    pd = len(shape) if param_ndim is None else param_ndim
    pshape = shape[len(shape) - pd :]
    if len(pshape) < 2:
        raise ValueError(f"norm {norm!r} needs a matrix-shaped parameter, got shape {pshape}")
    out_, in_ = pshape[-2], pshape[-1]
    if norm == "conv_spectral":
        out_, in_ = pshape[0], pshape[1]
        spatial = math.prod(pshape[2:]) if len(pshape) > 2 else 1
        return math.sqrt(out_ / in_) / spatial
    if norm == "spectral":
        return math.sqrt(out_ / in_)
    if norm == "original":
        return math.sqrt(max(1.0, out_ / in_))
    if norm == "match_rms_adamw":
        return 0.2 * math.sqrt(max(out_, in_))
    if norm == "image_spectral":
        return max(1.0, math.sqrt(out_ / in_))
    if norm in ("embed_sqrt", "unembed_sqrt"):
        return math.sqrt(in_) if norm == "embed_sqrt" else 1.0 / math.sqrt(in_)
    if norm in ("embed_linear", "unembed_linear"):
        return float(in_) if norm == "embed_linear" else 1.0 / in_
    raise AssertionError(f"norm {norm!r} is registered but has no factor")  # pragma: no cover


def lmo(
    G: Tensor,
    *,
    norm: str = "spectral",
    backend: str = "newtonschulz5",
    steps: int = 5,
    coefficients: CoefficientSpec | None = None,
    eps: float | None = None,
    compute_dtype: torch.dtype | None = None,
    param_ndim: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """The LMO direction of ``G`` under ``norm``, scaled by the norm's factor; G's shape, and G's dtype unless
    ``out_dtype`` is given (matrix norms only: element-wise and row norms keep G's).

    Pseudocode for the matrix norms::

        X = matrix_view(G)                      # conv: out x (in*k*k); experts: batch of matrices
        O = orthogonalize(X, backend, steps)    # ~ U V^T
        return norm_factor(norm, shape) * O

    Row norms (``embed_*``, ``unembed_*``) apply the backend (usually ``identity``), then scale each row of
    the ``[vocab, dim]`` view to unit l2. Element-wise norms ignore the backend.
    """
    spec = get_norm(norm)
    pd = G.dim() if param_ndim is None else param_ndim
    if spec.kind == "elementwise":
        if norm == "sign":
            return torch.sign(G)
        if norm == "bias_rms":
            dims = tuple(range(G.dim() - pd, G.dim()))
            X = _upcast(G)
            rms = X.pow(2).mean(dim=dims, keepdim=True).sqrt()
            tiny = torch.finfo(torch.float32).tiny if eps is None else eps
            return (X / rms.clamp_min(tiny)).to(G.dtype)
        return G.clone()  # never alias the caller's buffer
    X = matrix_view(G, norm, pd)
    factor = norm_factor(norm, tuple(G.shape), pd)
    if spec.kind == "matrix":
        O = orthogonalize(
            X,
            backend=backend,
            steps=steps,
            coefficients=coefficients,
            eps=eps,
            compute_dtype=compute_dtype,
            scale=factor,
            out_dtype=out_dtype,
        )
        return O.reshape(G.shape)
    if backend == "identity":
        O = X  # _rows_unit below makes the new tensor; skip identity's copy of a (large) embedding
    else:
        O = orthogonalize(
            X, backend=backend, steps=steps, coefficients=coefficients, eps=eps, compute_dtype=compute_dtype
        )
    O = _rows_unit(_upcast(O), 1e-30 if eps is None else max(eps, 1e-30)).to(G.dtype)
    return (O * factor).reshape(G.shape)


LMO_FNS: dict[str, Callable[..., Tensor]] = {name: lmo for name in NORMS}
