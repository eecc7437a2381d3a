"""Orthogonalization backends: the (approximate) polar factor ``U V^T`` of each matrix ``G = U S V^T``.

All backends take ``G`` of shape ``(..., m, n)``, treat leading dims as a batch, and return a tensor of G's
shape and dtype. Tall inputs are transposed to the wide orientation internally so that the Gram matrix is the
small one.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .coefficients import CoefficientSpec, get_table

#: iterative backends -> their default coefficient table (these read ``steps`` and ``coefficients``)
DEFAULT_TABLE = {
    "newtonschulz5": "keller",
    "polar_express": "polar_express",
    "gram_newtonschulz5": "keller",
    "gram_polar_express": "polar_express",
}
#: the Gram form saves work only when ``n / m`` is above this (``10 m^2 n + 5 m^3`` against ``4 m^2 n + 14 m^3``
#: multiply-adds for 5 steps and one restart: equal at 1.5); below it ``gram_newton_schulz`` runs the plain form.
GRAM_MIN_ASPECT = 1.5
#: ``_normalised`` writes a CPU input bigger than this in row pieces of at most this many input bytes.
NORMALISE_CHUNK_BYTES = 2**20
ITERATIVE_BACKENDS = tuple(DEFAULT_TABLE)


def default_compute_dtype(G: Tensor) -> torch.dtype:
    """bf16 on accelerators and on CPUs with native bf16 matmul (``cpu_has_native_bf16``: AVX512-BF16 or AMX, about
    5x the fp32 rate); fp32 on other CPUs (there bf16 matmul is 5-150x slower than fp32); fp64 inputs stay fp64."""
    if G.device.type != "cpu":
        return torch.bfloat16
    if G.dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``; the
    ``DISCO_CPU_BF16=0|1`` environment variable overrides)."""
    forced = os.environ.get("DISCO_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: no cheap way to ask, stay with the safe fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _normalised(G: Tensor, safety: float, eps: float, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """``G / (safety ||G||_F + eps)`` per matrix, written once in ``dtype`` in G's own layout, then seen as a flat
    wide batch ``(batch, m, n)``, ``m <= n`` (a tall matrix as a transposed view: matmuls read it as it lies, so no
    transposing copy); and whether ``G`` is tall.

    The norm and the scaling run in at least fp32 (casting a raw gradient to fp16 first can overflow or flush
    small entries; a tiny eps underflows in fp16); the product is rounded once, straight into ``dtype``.
    """
    # X in G's layout: a transposed G (a stored fan_in x fan_out weight seen as fan_out x fan_in) gives a transposed X
    flipped = not G.is_contiguous() and G.mT.is_contiguous()
    src = G.mT if flipped else G  # contiguous unless G is neither
    denom = _frobenius(src) * safety + eps  # the norm of G^T is G's
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))  # a zero matrix stays zero, never 0/0
    inv = denom.reciprocal()
    buf = torch.empty(src.shape, dtype=dtype, device=G.device)  # laid out like src: rows of one are rows of the other
    X = buf.mT if flipped else buf
    if G.device.type == "cpu" and G.dtype != dtype and G.numel() * G.element_size() > NORMALISE_CHUNK_BYTES:
        # CPU ``mul(out=)`` into another dtype computes a temporary in G's dtype first: rows in pieces bound it.
        n = src.size(-1)
        rows, out = src.reshape(-1, n), buf.view(-1, n)
        inv = inv.expand(*src.shape[:-1], 1).reshape(-1, 1)
        step = max(1, NORMALISE_CHUNK_BYTES // max(1, n * G.element_size()))
        for r in range(0, rows.size(0), step):
            torch.mul(rows[r : r + step], inv[r : r + step], out=out[r : r + step])
    elif G.device.type == "cpu" and G.dtype == dtype and dtype.itemsize < 4 and G.size(-2) * G.size(-1) >= 4096:
        # A 0-d scale keeps the product in G's dtype (computed in fp32, rounded once: the same bits). A (1, 1) fp32
        # scale would promote a bf16 G to an fp32 result cast back into ``buf``: 11x slower on CPU (one call per
        # matrix pays off from a few thousand entries on; fp32 and fp64 are not promoted).
        batch = (math.prod(src.shape[:-2]), *src.shape[-2:])  # explicit: -1 is ambiguous for 0 elements
        flat, out = src.reshape(batch), buf.view(batch)
        for i, s in enumerate(inv.reshape(-1)):
            torch.mul(flat[i], s, out=out[i])
    else:
        torch.mul(src, inv, out=buf)
    tall = G.size(-2) > G.size(-1)
    X = X.mT if tall else X
    return X.reshape(math.prod(X.shape[:-2]), *X.shape[-2:]), tall  # explicit: -1 is ambiguous for 0 elements


def _frobenius(G: Tensor) -> Tensor:
    """``||G||_F`` per matrix, ``(..., 1, 1)``, in at least fp32.

    On CPU, ``vector_norm(dtype=float32)`` of a bf16 / fp16 input first widens all of it into a new fp32 buffer (4
    MiB for a bf16 512 x 2048, with its page faults: 1.5 ms of a 0.4 ms norm); a contiguous matrix bigger than
    ``NORMALISE_CHUNK_BYTES`` in fp32 is taken in pieces of that size instead, each widened in cache, and their
    norms combined (the same norm, summed in another order)."""
    acc = torch.promote_types(G.dtype, torch.float32)
    size = G.shape[-2] * G.shape[-1]
    if G.device.type != "cpu" or G.dtype == acc or size * 4 <= NORMALISE_CHUNK_BYTES or not G.is_contiguous():
        whole: Tensor = torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True, dtype=acc)
        return whole
    piece = NORMALISE_CHUNK_BYTES // 4
    flat = G.reshape(-1, size)
    norms = [
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c, dtype=acc) for c in row.split(piece)]))
        for row in flat
    ]
    out = torch.stack(norms) if norms else flat.new_empty(0, dtype=acc)
    return out.reshape(*G.shape[:-2], 1, 1)


def _per_matrix(A: Tensor) -> bool:
    """Whether a batch ``A`` runs as one ``mm`` per matrix. On CPU a batch of one always does: ``mm`` reads a
    transposed operand in place where ``bmm`` copies it (at 2048 x 512 bf16 up to half the time, one matrix less
    memory), with bit-identical results. So does every fp32 batch under a matmul precision below "highest": there
    CPU ``bmm`` / ``baddbmm`` multiply in bf16 or fp32 depending on the batch size, so an expert would round
    differently in one process's stack of 5 than on a rank holding 1 or 2 of them; one ``mm`` per matrix makes
    every expert's result independent of the stack it is in (the compute dtype, fp32, decides the precision)."""
    if A.device.type != "cpu":
        return False
    return A.size(0) == 1 or (A.dtype == torch.float32 and _cpu_fp32_matmuls_reduced())


def _cpu_fp32_matmuls_reduced() -> bool:
    """Whether CPU fp32 matmuls may run in bf16 or TF32: oneDNN's own setting (torch >= 2.9), which
    ``torch.set_float32_matmul_precision`` sets too ("high": ``tf32``, "medium": ``bf16``). Not
    ``torch.get_float32_matmul_precision()``: it raises once a user set one backend's precision with torch's
    per-backend API (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``), which failed every fp32 step
    of an expert stack."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is not None:
        return str(matmul.fp32_precision) != "ieee"
    return torch.get_float32_matmul_precision() != "highest"  # torch < 2.9: the one setting


def _bmm(A: Tensor, B: Tensor, out: Tensor | None = None) -> Tensor:
    """``torch.bmm``, or one ``mm`` per matrix (``_per_matrix``), or ``mm`` of 2-D ``A`` and ``B`` (``_one``); into
    ``out`` when given (it aliases neither)."""
    if out is None:
        out = A.new_empty(*A.shape[:-1], B.size(-1))
    if A.dim() == 2:
        return torch.mm(A, B, out=out)
    if not _per_matrix(A):
        return torch.bmm(A, B, out=out)
    for i in range(A.size(0)):
        torch.mm(A[i], B[i], out=out[i])
    return out


def _baddbmm(C: Tensor, A: Tensor, B: Tensor, *, beta: float, alpha: float = 1.0, out: Tensor | None = None) -> Tensor:
    """``torch.baddbmm``, or one ``addmm`` per matrix (``_per_matrix``), or ``addmm`` of 2-D operands (``_one``);
    into ``out`` when given (it aliases none of ``A``, ``B`` and ``C``)."""
    if out is None:
        out = A.new_empty(*A.shape[:-1], B.size(-1))
    if A.dim() == 2:
        return torch.addmm(C, A, B, beta=beta, alpha=alpha, out=out)
    if not _per_matrix(A):
        return torch.baddbmm(C, A, B, beta=beta, alpha=alpha, out=out)
    for i in range(A.size(0)):
        torch.addmm(C[i], A[i], B[i], beta=beta, alpha=alpha, out=out[i])
    return out


def _one(X: Tensor) -> Tensor:
    """A flat batch of one matrix that runs per matrix, as that matrix (2-D): its products then skip the batch
    handling of ``_bmm`` / ``_baddbmm`` (a view and a check per call, 1 ms of a step's 16 matrices); else ``X``."""
    return X[0] if X.size(0) == 1 and _per_matrix(X) else X


def _restore(Y: Tensor, G: Tensor, out_dtype: torch.dtype | None) -> Tensor:
    """A flat batch in G's orientation back to G's shape, in ``out_dtype`` (``None``: G's)."""
    return Y.reshape(G.shape).to(out_dtype or G.dtype)


def newton_schulz(
    G: Tensor,
    *,
    steps: int = 5,
    coefficients: CoefficientSpec = "keller",
    eps: float | None = None,
    compute_dtype: torch.dtype | None = None,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Quintic Newton-Schulz iteration towards the polar factor.

    .. math::
        X_0 = G / (s\|G\|_F + \epsilon),\quad A = X_k X_k^T,\quad X_{k+1} = a_k X_k + (b_k A + c_k A^2) X_k

    computed on the wide orientation (``m <= n``). ``(a_k, b_k, c_k)`` come from the table (``keller``,
    ``you``, ``polar_express``, ``polar_express_5``, or user tuples).

    Args:
        G: ``(..., m, n)``, leading dims a batch.
        steps: iterations. Default 5.
        coefficients: a table name, a ``CoefficientTable`` or ``(a, b, c)`` tuples. Default ``"keller"``.
        eps: added to the scaled Frobenius norm (default: the table's).
        compute_dtype: matmul dtype (default ``default_compute_dtype(G)``).
        scale: multiplies the result (folded into the last step, so a norm factor costs no extra pass).
        out_dtype: the result's dtype (default G's); the compute dtype skips a cast and, in bf16, halves it.
    """
    if steps < 0:
        raise ValueError(f"newton_schulz: steps must be >= 0, got {steps}")
    table = get_table(coefficients)
    dtype = compute_dtype or default_compute_dtype(G)
    X, tall = _normalised(G, table.safety, table.eps if eps is None else eps, dtype)  # X: (batch, m, n)
    if steps == 0:
        return _restore((X.mT if tall else X) * scale, G, out_dtype)
    # Every product is written into a buffer made once per call (two for X, used in turn): a matmul's fresh output
    # costs page faults on CPU, and ``beta`` copies its addend into the output first.
    X = _one(X)
    *bsz, m, n = X.shape
    A, B, spare = X.new_empty(*bsz, m, m), X.new_empty(*bsz, m, m), X.new_empty(X.numel())
    for k in range(steps):
        a, b, c = table.at(k)
        _bmm(X, X.mT, out=A)  # A: (batch, m, m)
        _baddbmm(A, A, A, beta=b, alpha=c, out=B)
        if k + 1 < steps:
            nxt = _baddbmm(X, B, X, beta=a, alpha=1.0, out=spare.view(*bsz, m, n))  # fused multiply-adds, one rounding
        elif tall:  # the last step written in G's orientation: (B X)^T = X^T B^T, no transposing copy
            nxt = _baddbmm(X.mT, X.mT, B.mT, beta=a * scale, alpha=scale, out=spare.view(*bsz, n, m))
        else:
            nxt = _baddbmm(X, B, X, beta=a * scale, alpha=scale, out=spare.view(*bsz, m, n))
        X, spare = nxt, X.reshape(-1) if X.is_contiguous() else X.mT.reshape(-1)
    return _restore(X, G, out_dtype)


#: restarts of the Gram form by compute dtype: how far rounding in ``R`` may be amplified (the product of the steps'
#: ``a_k^2``) before the first restart and between later ones. Measured on ill-conditioned and low-rank inputs
#: (64 x 256 to 512 x 2048) with the keller / you / polar_express tables at 5-12 steps (``tests/test_ops_gram.py``):
#: keller restarts after step 3, then every 2 in bf16 (after 5, then every 3 in fp32); polar_express, whose first
#: ``a`` is 8.2, after 2 and 4. Without restarts bf16 diverges from 5 steps on, fp32 from 8.
RESTART_GROWTH: dict[torch.dtype, tuple[float, float]] = {
    torch.bfloat16: (4e3, 3e2),
    torch.float16: (4e3, 3e2),
    torch.float32: (3e5, 2e3),
    torch.float64: (1e11, 3e6),
}


def restart_points(steps: int, dtype: torch.dtype, coefficients: CoefficientSpec = "keller") -> tuple[int, ...]:
    """The default restarts of ``gram_newton_schulz``: the steps after which ``R`` is recomputed from ``X``, as
    late as ``RESTART_GROWTH`` allows for this table."""
    table = get_table(coefficients)
    first, later = RESTART_GROWTH.get(dtype, RESTART_GROWTH[torch.float32])
    points: list[int] = []
    growth, budget = 1.0, first
    for k in range(steps):
        a = table.at(k)[0]
        if growth * a * a > budget and k > 0:  # never before the first step
            points.append(k)
            growth, budget = 1.0, later
        growth *= a * a
    return tuple(points)


def gram_newton_schulz(
    G: Tensor,
    *,
    steps: int = 5,
    coefficients: CoefficientSpec = "keller",
    eps: float | None = None,
    compute_dtype: torch.dtype | None = None,
    scale: float = 1.0,
    restarts: Sequence[int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Newton-Schulz in Gram form: the same polynomial as ``newton_schulz``, iterated on the ``m x m`` Gram matrix.

    Each quintic step is ``X_{k+1} = Q_k X_k`` with ``Q_k = a_k I + b_k R_k + c_k R_k^2`` and ``R_k = X_k X_k^T``.
    Every ``Q_k`` is a polynomial in ``R_0``, so they commute and ``R_{k+1} = Q_k R_k Q_k``: the iteration never
    touches the ``m x n`` matrix until it applies the accumulated product::

        X = G / (s ||G||_F + eps)   (wide: m <= n)
        R = X X^T ; P = I
        for k in steps:
            Z = b_k R + c_k R^2                 # Q_k = a_k I + Z
            P = a_k P + Z P                     # P <- Q_k P
            T = a_k R + Z R ; R = a_k T + Z T   # R <- Q_k R Q_k   (not after the last step)
            if k + 1 in restarts: X = P X ; R = X X^T ; P = I
        return P X

    Multiply-adds for ``steps`` steps and ``r`` restarts: ``2 (r + 1) m^2 n + (4 steps - 3 (r + 1)) m^3``, against
    ``steps (2 m^2 n + m^3)`` for the plain form: at 5 steps and one restart it wins for ``n / m >``
    ``GRAM_MIN_ASPECT`` = 1.5, and runs the plain form below that. Rounding in ``R`` is not corrected by later steps
    the way it is in ``X``: an eigenvalue of ``R`` that rounds below zero grows by ``a_k^2`` per step. A restart
    recomputes ``R`` from ``X``; the default points (``restart_points``) depend on the compute dtype and the table.

    Args:
        G, steps, coefficients, eps, compute_dtype, scale, out_dtype: as ``newton_schulz``.
        restarts: steps after which ``X`` is formed and ``R`` recomputed; ``None``: ``restart_points(steps, dtype,
            coefficients)``.
    """
    if steps < 0:
        raise ValueError(f"gram_newton_schulz: steps must be >= 0, got {steps}")
    m, n = sorted(G.shape[-2:])
    if n < GRAM_MIN_ASPECT * m or steps == 0:
        return newton_schulz(
            G, steps=steps, coefficients=coefficients, eps=eps, compute_dtype=compute_dtype, scale=scale,
            out_dtype=out_dtype,
        )  # fmt: skip
    table = get_table(coefficients)
    dtype = compute_dtype or default_compute_dtype(G)
    restart_after = set(restart_points(steps, dtype, table) if restarts is None else (int(k) for k in restarts))
    X, tall = _normalised(G, table.safety, table.eps if eps is None else eps, dtype)  # X: (batch, m, n)
    # The m x m products go into five buffers made once per call (P's two used in turn): a matmul's fresh output
    # costs page faults on CPU, and ``beta`` copies its addend into the output first.
    X = _one(X)
    R = _bmm(X, X.mT)  # R: (batch, m, m)
    Z, T, P_first, P_second = (torch.empty_like(R) for _ in range(4))
    P: Tensor | None = None  # None: the identity
    P_spare = P_second  # never P
    for k in range(steps):
        a, b, c = table.at(k)
        _baddbmm(R, R, R, beta=b, alpha=c, out=Z)  # Q_k = a_k I + Z
        if P is None:
            P, P_spare = _plus_identity(Z, a, out=P_first), P_second
        else:
            P, P_spare = _baddbmm(P, Z, P, beta=a, out=P_spare), P
        if k + 1 == steps:
            break
        if k + 1 in restart_after:
            # a tall X stays stored as G is, (P X)^T = X^T P^T: CPU matmuls read a transposed left operand slowly (at
            # 2048 x 512 bf16 the final product took 1.8 ms from a transposed X, 0.9 ms from a row-major one)
            X = _bmm(X.mT, P.mT).mT if tall else _bmm(P, X)  # X: (batch, m, n)
            P = None
            _bmm(X, X.mT, out=R)
            continue
        _baddbmm(R, Z, R, beta=a, out=T)
        _baddbmm(T, Z, T, beta=a, out=R)
    assert P is not None
    if scale != 1.0:
        P = P.mul_(scale)  # m x m: cheaper than scaling the result
    # in G's orientation; a tall one as (P X)^T = X^T P^T, no transposing copy
    Y = _bmm(X.mT, P.mT) if tall else _bmm(P, X)  # Y: (batch, n, m) or (batch, m, n)
    return _restore(Y, G, out_dtype)


def _plus_identity(Z: Tensor, a: float, out: Tensor) -> Tensor:
    """``Z + a I`` for a batch of square matrices, into ``out``, the diagonal added in at least fp32.

    Not ``diagonal().add_(a)``: on a bf16 tensor eager CPU rounds the Python float to bf16 before adding
    (``3.4445``, keller's first ``a``, to ``3.4375``) where inductor adds it in fp32, so a compiled bf16 step
    used other coefficients than the eager one (its Gram Newton-Schulz result 3 % away after 5 steps). Spelled
    out in fp32, both add the table's coefficient and give the same bits. (``mul`` by a float is computed in fp32
    by both.)"""
    out.copy_(Z)
    d = out.diagonal(dim1=-2, dim2=-1)
    d.copy_(d.to(torch.promote_types(d.dtype, torch.float32)) + a)
    return out


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
    polar: Tensor = (U * keep.unsqueeze(-2).to(dtype)) @ Vh
    return polar.to(G.dtype)


def identity(G: Tensor, **_: object) -> Tensor:
    """No orthogonalization (embeddings and heads normalise rows in their LMO); a copy, never G itself."""
    return G.clone()


def _newtonschulz5(G: Tensor, **kw: Any) -> Tensor:
    kw.setdefault("coefficients", DEFAULT_TABLE["newtonschulz5"])
    return newton_schulz(G, **kw)


def _polar_express(G: Tensor, **kw: Any) -> Tensor:
    kw.setdefault("coefficients", DEFAULT_TABLE["polar_express"])
    return newton_schulz(G, **kw)


def _gram_newtonschulz5(G: Tensor, **kw: Any) -> Tensor:
    kw.setdefault("coefficients", DEFAULT_TABLE["gram_newtonschulz5"])
    return gram_newton_schulz(G, **kw)


def _gram_polar_express(G: Tensor, **kw: Any) -> Tensor:
    kw.setdefault("coefficients", DEFAULT_TABLE["gram_polar_express"])
    return gram_newton_schulz(G, **kw)


BACKENDS: dict[str, Callable[..., Tensor]] = {
    "newtonschulz5": _newtonschulz5,
    "polar_express": _polar_express,
    "gram_newtonschulz5": _gram_newtonschulz5,
    "gram_polar_express": _gram_polar_express,
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
    coefficients: CoefficientSpec | None = None,
    eps: float | None = None,
    compute_dtype: torch.dtype | None = None,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Approximate polar factor of each matrix in ``G`` (shape ``(..., m, n)``), times ``scale``; G's shape and dtype.

    Args:
        G: input, at least 2-D; leading dims are a batch.
        backend: ``newtonschulz5`` (default table ``keller``), ``polar_express`` (default table
            ``polar_express``), their Gram forms ``gram_newtonschulz5`` / ``gram_polar_express`` (the same
            polynomial, less work for ``n / m > 1.5``), ``svd`` (exact) or ``identity``.
        steps: iterations for the Newton-Schulz backends. Default 5.
        coefficients: a table name, a ``CoefficientTable``, one ``(a, b, c)`` tuple, or ``None`` for the
            backend's default.
        eps: added to the Frobenius norm before dividing (default: the table's).
        compute_dtype: matmul dtype; ``None``: ``default_compute_dtype(G)``.
        scale: multiplies the result (free for the iterative backends: folded into their last step).
        out_dtype: the result's dtype; ``None``: G's.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown orthogonalization backend {backend!r}; valid: {backend_names()}")
    if G.dim() < 2:
        raise ValueError(f"orthogonalize needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    if G.numel() == 0:
        return G.to(out_dtype or G.dtype, copy=True)
    kw: dict[str, Any] = {"compute_dtype": compute_dtype}
    if backend in DEFAULT_TABLE:
        kw.update(steps=steps, eps=eps, scale=scale, out_dtype=out_dtype)
        if coefficients is not None:
            kw["coefficients"] = coefficients
        return BACKENDS[backend](G, **kw)
    out = BACKENDS[backend](G, **kw)
    out = out.mul_(scale) if scale != 1.0 else out
    return out.to(out_dtype) if out_dtype is not None else out


def iteration_cost(
    shape: Sequence[int],
    *,
    backend: str,
    steps: int = 5,
    coefficients: CoefficientSpec | None = None,
    compute_dtype: torch.dtype | None = None,
) -> float:
    """Relative cost of an iterative backend on a ``(..., m, n)`` stack, in ``orthogonalize_cost``'s unit (``m^2 n``
    a matrix, ``m <= n``): its multiply-adds over ``2 steps``. A plain step makes ``2 m^2 n + m^3``; the Gram form
    (``n >= GRAM_MIN_ASPECT m``) makes ``2 (r + 1) m^2 n + (4 steps - 3 (r + 1)) m^3`` in all, ``r`` its restarts in
    ``compute_dtype`` (bf16 when unset: a plan never depends on the machine). So a 4:1 matrix in Gram form costs
    twice a square one of its short side, as measured, where ``orthogonalize_cost`` says four times and the
    planner gave one rank all the wide matrices' extra work. ``steps=0`` costs the normalisation, ``m n``.

    Args:
        shape: ``(..., m, n)``; leading dims a batch.
        backend: one of ``ITERATIVE_BACKENDS``.
        steps, coefficients, compute_dtype: the backend's (``None``: its default table; bf16).
    """
    *batch, m, n = shape
    m, n = sorted((m, n))
    b = math.prod(batch)
    if steps == 0:
        return float(b) * m * n  # the normalisation alone: not free, so the planner still spreads such tensors
    if backend.startswith("gram_") and n >= GRAM_MIN_ASPECT * m:
        table = coefficients if coefficients is not None else DEFAULT_TABLE[backend]
        r = len(restart_points(steps, compute_dtype or torch.bfloat16, table))
        macs = 2 * (r + 1) * m * m * n + (4 * steps - 3 * (r + 1)) * m**3
    else:
        macs = steps * (2 * m * m * n + m**3)
    return float(b) * macs / (2 * steps)


def orthogonalize_cost(shape: Sequence[int]) -> float:
    """Relative cost of orthogonalizing a ``(..., m, n)`` stack: ``batch * m * n * min(m, n)``."""
    *batch, m, n = shape
    b = 1
    for d in batch:
        b *= d
    return float(b) * m * n * min(m, n)
