"""Hyperparameter and parameter checks, run on every group (constructors, ``add_param_group``) before any state.

Every message names the group, its parameters with their shapes (and mesh and placements for DTensors) and the
offending value, so that a mistake is found where it is made, not steps later as a silently different run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .. import ops

Group = dict[str, Any]

COMPUTE_DTYPES = (None, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(name: str, p: Tensor) -> str:
    """``'name' (shape (m, n))``, plus the mesh and placements of a DTensor."""
    text = f"{name!r} (shape {tuple(p.shape)}"
    if isinstance(p, DTensor):
        text += f", mesh {p.device_mesh.mesh.tolist()}, placements {tuple(str(x) for x in p.placements)}"
    return text + ")"


def where(gi: int, names: Sequence[str], params: Sequence[Tensor]) -> str:
    shown = ", ".join(describe(n, p) for n, p in zip(names[:3], params[:3]))
    return f"group {gi} [{shown}{', ...' if len(params) > 3 else ''}]"


class ComplexParameterError(ValueError, RuntimeError):
    """A complex parameter, refused when its group is added. A ``RuntimeError`` as ``torch.optim.Muon``'s (which
    raises at the first step) and a ``ValueError`` as every other refusal of a parameter here."""


def check_params(group: Group, at: str, owner: str = "disco's optimizers") -> None:
    """Refuse parameters the math does not cover: complex ones (their imaginary part would be dropped)."""
    for p, n in zip(group["params"], group["param_names"]):
        if p.is_complex():
            raise ComplexParameterError(
                f"{at}: {owner} does not support complex parameters: {describe(n, p)} is {p.dtype}; optimize "
                "torch.view_as_real(p) as a real parameter instead"
            )
        if not p.is_floating_point():
            raise ValueError(f"{at}: parameter {describe(n, p)} has dtype {p.dtype}; only floating point is trained")


def label(s: Any, key: str) -> str:
    """``key`` with the other names a group may give it (``backend_steps (ns_steps)``: torch.optim.Muon's)."""
    aliases = [a for a, k in getattr(type(s), "aliases", {}).items() if k == key]
    return f"{key} ({', '.join(aliases)})" if aliases else key


def check_orthogonalization(s: Any, at: str) -> None:
    """``norm_factor``, ``backend``, ``backend_steps``, ``coefficients``, ``eps`` and ``compute_dtype`` of an LMO."""
    try:
        ops.get_norm(s.norm_factor)
    except ValueError as e:
        raise ValueError(f"{at}: {e}") from None
    if s.backend not in ops.BACKENDS:
        raise ValueError(f"{at}: unknown backend {s.backend!r}; valid: {ops.backend_names()}")
    if s.backend in ops.ITERATIVE_BACKENDS:
        if not 1 <= s.backend_steps < 100:
            raise ValueError(
                f"{at}: Invalid {label(s, 'backend_steps')} value: {s.backend_steps!r} for backend {s.backend!r}; "
                "it must be an int in [1, 100) (0 would skip the orthogonalization)"
            )
        if s.coefficients is not None:
            try:
                ops.get_table(s.coefficients)
            except (ValueError, TypeError) as e:
                raise ValueError(
                    f"{at}: {label(s, 'coefficients')}={s.coefficients!r} are invalid ({e}); valid: a table name "
                    f"({ops.table_names()}), an (a, b, c) triple of numbers, or a list of such triples"
                ) from None
    if not (s.eps is None or (math.isfinite(s.eps) and s.eps >= 0)):
        raise ValueError(f"{at}: Invalid eps value: {s.eps!r}; eps must be a finite number in [0, inf)")
    if s.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{at}: compute_dtype={s.compute_dtype!r}; valid: {list(COMPUTE_DTYPES)}")


def check_matrix_params(group: Group, s: Any, at: str) -> None:
    """The parameters of an LMO group fit its norm, view and weight constraint."""
    norm = ops.get_norm(s.norm_factor)
    for p, n in zip(group["params"], group["param_names"]):
        if s.transposed and norm.kind != "elementwise" and (p.dim() not in (2, 3) or norm.name == "conv_spectral"):
            raise ValueError(
                f"parameter {describe(n, p)} is in a group with transposed=True, which needs a 2-D matrix (or a "
                "3-D stack) stored fan_in x fan_out and a norm other than 'conv_spectral'"
            )
        if norm.kind != "elementwise" and p.dim() < 2:
            raise ValueError(
                f"parameter {describe(n, p)} is in a group with norm_factor {s.norm_factor!r}, which "
                "needs a matrix (2-D or more); route it to 'bias_rms', 'sign' or an element-wise algorithm "
                "('adamw', 'lion')"
            )
        if s.weight_constraint in ("spectral_clip", "stiefel") and p.dim() < 2:
            raise ValueError(
                f"{at}: weight_constraint={s.weight_constraint!r} acts on singular values, but {describe(n, p)} is "
                "not a matrix: use 'hyperball' or no constraint for vectors"
            )


def check_matrices(group: Group, at: str, algorithm: str, *, exactly_2d: bool = False) -> None:
    """Every parameter of the group is a matrix (2-D or more; exactly 2-D with ``exactly_2d``)."""
    for p, n in zip(group["params"], group["param_names"]):
        if p.dim() < 2 or (exactly_2d and p.dim() != 2):
            need = "2-D out x in weights" if exactly_2d else "2-D weights (3-D expert stacks, conv weights)"
            raise ValueError(
                f"{at}: parameter {describe(n, p)} is not a matrix {algorithm} takes: it needs {need}; route it "
                "to another algorithm of the optimizer ('adamw', 'lion' or 'muon')"
            )


def check_grad(name: str, p: Tensor) -> str | None:
    """Why ``p.grad`` cannot be stepped (sparse, wrong shape or dtype kind), or None."""
    g = p.grad
    if g is None:
        return None
    if g.is_sparse or g.layout != torch.strided:
        return f"the gradient of {describe(name, p)} is sparse ({g.layout}); disco's optimizers need dense gradients"
    if tuple(g.shape) != tuple(p.shape):
        return f"the gradient of {describe(name, p)} has shape {tuple(g.shape)}"
    if g.is_complex():
        return f"the gradient of {describe(name, p)} is complex ({g.dtype})"
    return None
