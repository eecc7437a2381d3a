"""Specs: what the distribution layer runs on a stack of whole tensors, as frozen, hashable data.

A spec is the unit of work an optimizer hands the engine (``engine.map(jobs, spec)``). The engine groups jobs
by spec, shape and dtype, stacks them and calls ``spec(stack)`` once per group on the owner; it plans with
``spec.cost(shape)`` and never looks inside. Equal specs (same fields) batch together, so a spec holds only what
changes the math, never a tensor.

Every spec provides:

* ``__call__(stack)``: ``stack`` is ``(k, *shape)``, ``k`` whole tensors of one shape; the result is
  ``(k, *result_shape(shape))``;
* ``cost(shape)``: relative compute cost of one tensor (the planner balances it over ranks);
* ``batch_ndim(shape)``: leading dims that are independent problems (3-D expert stacks): a tensor sharded only
  on those dims can be computed in place, piece by piece;
* ``result_shape(shape)``: the shape of one result (the input's, or e.g. a vector of norms);
* ``needs_whole``: ``False`` when the spec is element-wise, so a local piece can be mapped in place;
* ``result_dtype(dtype, device)`` and ``input_dtype(dtype, device)`` (optional): the dtype of the results, and the
  one each piece is cast to before it is sent or stacked (the engines read them with ``getattr``: a spec without
  them keeps its input's dtype).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .coefficients import CoefficientTable
from .lmo import get_norm, lmo
from .norms import OPERATOR_NORMS, operator_norm
from .orthogonalize import BACKENDS, ITERATIVE_BACKENDS, default_compute_dtype, iteration_cost, orthogonalize_cost


class Spec(Protocol):
    """What ``engine.map`` needs of a spec (see the module docstring)."""

    @property
    def needs_whole(self) -> bool: ...

    def __call__(self, stack: Tensor) -> Tensor: ...

    def cost(self, shape: tuple[int, ...]) -> float: ...

    def batch_ndim(self, shape: tuple[int, ...]) -> int: ...

    def result_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]: ...

    def result_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The dtype of ``spec(stack)`` for a stack of ``dtype`` on ``device``."""
        ...


def _hashable_coefficients(coefficients: Any) -> Any:
    if isinstance(coefficients, (list, tuple)):
        return tuple(_hashable_coefficients(c) for c in coefficients)
    return coefficients


def _matrix_shape(shape: tuple[int, ...], view: str) -> tuple[int, ...]:
    if view == "flatten":
        return (shape[0], math.prod(shape[1:]))
    if view == "transposed":
        return (*shape[:-2], shape[-1], shape[-2])
    return shape


VIEWS = ("native", "flatten", "transposed")


@dataclass(frozen=True)
class LMOSpec:
    """The LMO of one parameter group: ``lmo(X, norm, backend, steps, coefficients, eps, compute_dtype)``.

    Args:
        norm: a name from ``disco.ops.NORMS`` (``"spectral"``, ``"embed_sqrt"``, ``"bias_rms"``, ...).
        backend: orthogonalization backend (``"newtonschulz5"``, ``"gram_newtonschulz5"``, ``"polar_express"``,
            ``"gram_polar_express"``, ``"svd"``, ``"identity"``).
        steps: iterations of the Newton-Schulz backends. Default 5.
        coefficients: a table name, a ``CoefficientTable`` or ``(a, b, c)`` tuples; ``None``: the backend's.
        eps: added to the Frobenius norm before Newton-Schulz; ``None``: the table's.
        compute_dtype: matmul dtype; ``None``: ``disco.ops.default_compute_dtype`` (bf16 on accelerators and on
            CPUs with native bf16 matmul, fp32 on other CPUs).
        view: ``"native"`` (2-D matrix, 3-D batch of expert matrices, conv by its norm), ``"flatten"``
            (a >= 4-D weight seen as ``out x prod(rest)``) or ``"transposed"`` (a 2-D / 3-D weight stored
            ``fan_in x fan_out``, e.g. Hugging Face's ``Conv1D``: the LMO and its norm factor run on ``X.mT``, the
            ``fan_out x fan_in`` matrix, and the result is transposed back to the stored layout).
        result_in_compute_dtype: matrix norms of the Newton-Schulz backends take their input and return their
            result in the compute dtype when it is narrower than the input's (bf16 computing from fp32): the
            engines cast each direction to it before it travels or is stacked (``input_dtype``: half the bytes on
            the wire, and on one process the same cast at the same point, so distributed stays bitwise equal to
            one process), and an optimizer holding every result until it commits holds half the memory. The
            first matmul reads the input in the compute dtype anyway; what changes is that the Frobenius norm
            is taken of the rounded input.
    """

    norm: str = "spectral"
    backend: str = "newtonschulz5"
    steps: int = 5
    coefficients: str | CoefficientTable | tuple[Any, ...] | None = None
    eps: float | None = None
    compute_dtype: torch.dtype | None = None
    view: str = "native"
    result_in_compute_dtype: bool = False

    def __post_init__(self) -> None:
        get_norm(self.norm)  # ValueError naming the valid norms
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; valid: {sorted(BACKENDS)}")
        if self.view not in VIEWS:
            raise ValueError(f"unknown view {self.view!r}; valid: {', '.join(map(repr, VIEWS))}")
        object.__setattr__(self, "coefficients", _hashable_coefficients(self.coefficients))
        object.__setattr__(self, "steps", int(self.steps))

    @classmethod
    def for_param(cls, shape: Sequence[int], *, transposed: bool = False, **settings: Any) -> LMOSpec:
        """The spec of a parameter of ``shape``: a >= 4-D weight is flattened unless its norm is ``conv_spectral``;
        ``transposed=True`` (a 2-D / 3-D weight stored ``fan_in x fan_out``) gives the ``"transposed"`` view."""
        norm = settings.get("norm", "spectral")
        if transposed:
            if len(shape) not in (2, 3) or norm == "conv_spectral":
                raise ValueError(f"transposed needs a 2-D or 3-D matrix weight (not conv_spectral), got {tuple(shape)}")
            return cls(view="transposed", **settings)
        view = "flatten" if len(shape) >= 4 and norm != "conv_spectral" else "native"
        return cls(view=view, **settings)

    @property
    def needs_whole(self) -> bool:
        return self.norm not in ("sign", "none")

    def __call__(self, stack: Tensor) -> Tensor:
        kw: dict[str, Any] = dict(
            norm=self.norm,
            backend=self.backend,
            steps=self.steps,
            coefficients=self.coefficients,
            eps=self.eps,
            compute_dtype=self.compute_dtype,
        )
        out = self.result_dtype(stack.dtype, stack.device)  # never wider than the input
        if out != stack.dtype:
            kw["out_dtype"] = out
        if self.view == "flatten":
            flat = stack.reshape(stack.shape[0], stack.shape[1], -1)
            return lmo(flat, param_ndim=2, **kw).reshape(stack.shape)
        if self.view == "transposed":
            return lmo(stack.mT, param_ndim=stack.dim() - 1, **kw).mT.contiguous()
        return lmo(stack, param_ndim=stack.dim() - 1, **kw)

    def cost(self, shape: tuple[int, ...]) -> float:
        view = _matrix_shape(tuple(shape), self.view)
        if len(view) < 2:
            return float(math.prod(view))
        if self.backend in ITERATIVE_BACKENDS and get_norm(self.norm).kind != "elementwise":
            return iteration_cost(
                view, backend=self.backend, steps=self.steps, coefficients=self.coefficients,
                compute_dtype=self.compute_dtype,
            )  # fmt: skip
        return orthogonalize_cost(view)

    def batch_ndim(self, shape: tuple[int, ...]) -> int:
        elementwise = get_norm(self.norm).kind == "elementwise"
        return 1 if len(shape) == 3 and self.norm != "conv_spectral" and not elementwise else 0

    def result_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def input_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        return self.result_dtype(dtype, device)  # the compute dtype where it is narrower, under the same conditions

    def result_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        # only matrix norms hand ``out_dtype`` to the backend; row and element-wise norms return the input's
        if self.result_in_compute_dtype and self.backend in ITERATIVE_BACKENDS and get_norm(self.norm).kind == "matrix":
            compute = self.compute_dtype or default_compute_dtype(torch.empty(0, dtype=dtype, device=device))
            if compute.itemsize < dtype.itemsize:
                return compute
        return dtype


@dataclass(frozen=True)
class NormsSpec:
    """Operator norms of whole tensors, for tracking: one float32 value per norm, maximised over expert stacks.

    ``spec(stack)`` is ``(k, len(norms))``. A >= 4-D tensor is viewed as ``out x prod(rest)``; a 1-D tensor
    takes only the norms that are defined on vectors (``rms``, ``supremum``) and gives NaN for the others.

    Args:
        norms: names from ``disco.ops.OPERATOR_NORMS``.
        transposed: the tensors are stored ``fan_in x fan_out`` (``LMOSpec``'s ``"transposed"`` view): the norms
            are those of ``t.mT``.
    """

    norms: tuple[str, ...]
    needs_whole: bool = True
    transposed: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "norms", tuple(self.norms))
        for n in self.norms:
            if n not in OPERATOR_NORMS:
                raise ValueError(f"unknown operator norm {n!r}; valid: {sorted(OPERATOR_NORMS)}")

    def one(self, t: Tensor) -> Tensor:
        """The norms of one tensor ``t`` (not a stack)."""
        out = []
        for n in self.norms:
            if t.dim() < 2 and n not in VECTOR_NORMS:
                out.append(t.new_tensor(float("nan"), dtype=torch.float32))
                continue
            view = t.reshape(t.shape[0], -1) if t.dim() >= 4 else t
            if self.transposed and view.dim() >= 2:
                view = view.mT
            if n == "supremum" and view.dim() < 2:
                view = view.view(1, -1)
            out.append(operator_norm(n, view).amax().float())
        return torch.stack(out) if out else t.new_zeros(0, dtype=torch.float32)

    def __call__(self, stack: Tensor) -> Tensor:
        return torch.stack([self.one(t) for t in stack])

    def cost(self, shape: tuple[int, ...]) -> float:
        view = _matrix_shape(tuple(shape), "flatten" if len(shape) >= 4 else "native")
        return orthogonalize_cost(view) if len(view) >= 2 else float(math.prod(view))

    def batch_ndim(self, shape: tuple[int, ...]) -> int:
        return 0

    def result_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (len(self.norms),)

    def result_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        return torch.float32


#: Norms defined on vectors as well as matrices.
VECTOR_NORMS = ("rms", "supremum")


def split_runs(sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(start, count, size)`` of each run of consecutive equal block sizes: equal blocks batch into one call."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for s in sizes:
        if runs and runs[-1][2] == s:
            a, c, _ = runs[-1]
            runs[-1] = (a, c + 1, s)
        else:
            runs.append((start, 1, s))
        start += s
    return runs


@dataclass(frozen=True)
class SplitLMOSpec:
    """The LMO of each block of a 2-D weight, cut along its output dim (QKV blocks, attention heads).

    The output dim is dim 0 of the stored tensor (``inner.view == "native"``) or dim 1 (``"transposed"``: stored
    ``fan_in x fan_out``); block ``j`` spans ``sizes[j]`` of it. Each block gets ``inner``'s LMO with its own norm
    factor (from the block's shape); consecutive equal blocks run as one batch. The result is the blocks' LMOs put
    back in place, so it has the weight's shape.

    Args:
        inner: the LMO of one block (``view`` ``"native"`` or ``"transposed"``).
        sizes: the block sizes along the output dim, in order (they sum to it).
    """

    inner: LMOSpec
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.inner.view not in ("native", "transposed"):
            raise ValueError(f"a split needs a 2-D view ('native' or 'transposed'), got {self.inner.view!r}")
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        if not self.sizes or min(self.sizes) <= 0:
            raise ValueError(f"split sizes must be positive, got {list(self.sizes)}")

    @property
    def axis(self) -> int:
        """The output dim of one stored weight: 0 (native) or 1 (transposed)."""
        return 1 if self.inner.view == "transposed" else 0

    @property
    def needs_whole(self) -> bool:
        return True

    def _check(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2 or shape[self.axis] != sum(self.sizes):
            raise ValueError(f"split sizes {list(self.sizes)} do not cover dim {self.axis} of a weight of {shape}")

    def __call__(self, stack: Tensor) -> Tensor:
        self._check(tuple(stack.shape[1:]))
        k, m, n = stack.shape
        outs = []
        for start, count, size in split_runs(self.sizes):
            if self.axis == 0:
                part = stack[:, start : start + count * size, :].reshape(k * count, size, n)
                outs.append(self.inner(part).reshape(k, count * size, n))
            else:
                part = stack[:, :, start : start + count * size].reshape(k, m, count, size)
                blocks = part.permute(0, 2, 1, 3).reshape(k * count, m, size)
                res = self.inner(blocks).reshape(k, count, m, size).permute(0, 2, 1, 3)
                outs.append(res.reshape(k, m, count * size))
        return torch.cat(outs, dim=1 + self.axis)

    def cost(self, shape: tuple[int, ...]) -> float:
        total = 0.0
        for _, count, size in split_runs(self.sizes):
            block = (size, shape[1]) if self.axis == 0 else (shape[0], size)
            total += count * self.inner.cost(block)
        return total

    def batch_ndim(self, shape: tuple[int, ...]) -> int:
        return 0

    def result_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def result_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        return self.inner.result_dtype(dtype, device)

    def input_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """``inner``'s (the engines cast the pieces to it), so that gathered and in-place blocks round alike."""
        f = getattr(self.inner, "input_dtype", None)
        out: torch.dtype = dtype if f is None else f(dtype, device)
        return out


@dataclass(frozen=True)
class PieceLMOSpec(LMOSpec):
    """``LMOSpec`` on whatever piece it is given: each rank orthogonalizes its own local piece in place, with the
    norm factor of the piece's shape (MuonBP's block steps). ``needs_whole`` is ``False`` so the engine maps it
    without moving a byte; the result depends on the layout by design. An empty piece gives an empty result."""

    @property
    def needs_whole(self) -> bool:
        return False

    def __call__(self, stack: Tensor) -> Tensor:
        if stack.numel() == 0:
            return stack.new_empty(stack.shape, dtype=self.result_dtype(stack.dtype, stack.device))
        return super().__call__(stack)
