r"""Weight constraints on whole matrices, from matrix-sign iterations only (no SVD on the hot path).

For ``W = U S V^T`` write ``msign(X)`` for the polar factor ``U sign(S) V^T`` of any ``X = U D V^T`` with a
signed diagonal ``D`` (Newton-Schulz with the Polar Express table, then its repeated last quintic step).

* ``stiefel``: ``W <- r msign(W)``: every singular value set to ``r``.
* ``spectral_clip``: every singular value clipped into ``[a, b]``. With ``P = msign(W)`` and
  ``clip(s) = (a + b + |s - a| - |s - b|) / 2``, each ``|s - c|`` is a matrix function of ``Y_c = W - c P =
  U (S - c) V^T``: ``msign(Y_c) Y_c^T = U |S - c| U^T``, so ``U |S - c| V^T = msign(Y_c) Y_c^T P`` and

  .. math::
      \mathrm{clip}_{[a,b]}(W) = \tfrac12\big[(a + b) I + \mathrm{msign}(Y_a) Y_a^\top
      - \mathrm{msign}(Y_b) Y_b^\top\big] P

  (for ``a = 0``, ``msign(Y_0) Y_0^T P = W``: two sign computations instead of three). An error of ``msign(Y_c)``
  on a singular value near ``c`` is multiplied by ``|s - c|``, so the clip is accurate where the sign is not.
  Computed on the wide orientation (the ``m x m`` products are the small ones).

Null singular directions of a rank-deficient ``W`` are not lifted to ``a``: ``P`` is zero there. Hyperball (a
Frobenius-norm constraint) needs no whole matrix: ``disco.optim.constraints`` does it from local sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .orthogonalize import newton_schulz, orthogonalize_cost

KINDS = ("spectral_clip", "stiefel")
#: Newton-Schulz steps of each matrix sign: the 8 of Polar Express, then 2 of its last (converged) quintic.
SIGN_STEPS = 10


def msign(X: Tensor, steps: int = SIGN_STEPS) -> Tensor:
    """The polar factor of each matrix of ``X`` (``(..., m, n)``), in ``X``'s dtype (compute it in fp32 / fp64)."""
    return newton_schulz(X, steps=steps, coefficients="polar_express", eps=0.0, compute_dtype=X.dtype)


def stiefel(W: Tensor, radius: float, steps: int = SIGN_STEPS) -> Tensor:
    """``radius * msign(W)``: the nearest matrix (Frobenius) with every singular value equal to ``radius``."""
    return radius * msign(W, steps)


def spectral_clip(W: Tensor, sigma_min: float, sigma_max: float, steps: int = SIGN_STEPS) -> Tensor:
    """``U clip(S, sigma_min, sigma_max) V^T`` from matrix signs (module docstring)."""
    tall = W.size(-2) > W.size(-1)
    X = W.mT if tall else W
    P = msign(X, steps)
    eye = torch.eye(X.size(-2), dtype=X.dtype, device=X.device)

    def abs_part(c: float) -> Tensor:  # U |S - c| U^T
        Y = X - c * P
        return msign(Y, steps) @ Y.mT

    inner = (sigma_min + sigma_max) * eye - abs_part(sigma_max)
    if sigma_min > 0:
        inner = inner + abs_part(sigma_min)
        out = 0.5 * (inner @ P)
    else:
        out = 0.5 * (inner @ P + X)  # msign(W) W^T P = W
    return out.mT if tall else out


@dataclass(frozen=True)
class ConstraintSpec:
    """A whole-matrix weight constraint for ``engine.map``: ``kind`` in ``KINDS``.

    Args:
        kind: ``"stiefel"`` (every singular value ``radius``) or ``"spectral_clip"`` (into ``[sigma_min,
            sigma_max]``).
        radius, sigma_min, sigma_max: the targets (``radius`` for ``stiefel``, the bounds for ``spectral_clip``).
        steps: Newton-Schulz steps per matrix sign.
        view: ``"native"`` (2-D matrix, 3-D batch of matrices) or ``"flatten"`` (>= 4-D seen as ``out x rest``).

    Computed in float32 (float64 for float64 weights), whatever the weight's dtype.
    """

    kind: str
    radius: float = 1.0
    sigma_min: float = 0.0
    sigma_max: float = 1.0
    steps: int = SIGN_STEPS
    view: str = "native"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint {self.kind!r}; valid: {list(KINDS)}")
        if not 0 <= self.sigma_min <= self.sigma_max:
            raise ValueError(f"need 0 <= sigma_min <= sigma_max, got {self.sigma_min}, {self.sigma_max}")

    @property
    def needs_whole(self) -> bool:
        return True

    def __call__(self, stack: Tensor) -> Tensor:
        dtype = torch.float64 if stack.dtype == torch.float64 else torch.float32
        X = stack.to(dtype)
        if self.view == "flatten":
            X = X.reshape(X.shape[0], X.shape[1], -1)
        if self.kind == "stiefel":
            out = stiefel(X, self.radius, self.steps)
        else:
            out = spectral_clip(X, self.sigma_min, self.sigma_max, self.steps)
        return out.reshape(stack.shape).to(stack.dtype)

    def cost(self, shape: tuple[int, ...]) -> float:
        view = (shape[0], math.prod(shape[1:])) if self.view == "flatten" else tuple(shape)
        signs = 1 if self.kind == "stiefel" else (3 if self.sigma_min > 0 else 2)
        return signs * orthogonalize_cost(view)

    def batch_ndim(self, shape: tuple[int, ...]) -> int:
        return 1 if len(shape) == 3 else 0

    def result_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def result_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        return dtype
