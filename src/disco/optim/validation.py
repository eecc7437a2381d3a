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
NONFINITE = ("raise", "skip")
#: ``commit``: ``"atomic"`` (hold every update until every rule computed) or ``"streaming"`` (commit each
#: parameter as soon as its update is known good: one update held at a time; see ``SpectralOptimizer.step``).
COMMITS = ("atomic", "streaming")


def describe(name: str, p: Tensor) -> str:
    """``'name' (shape (m, n))``, plus the mesh and placements of a DTensor."""
    text = f"{name!r} (shape {tuple(p.shape)}"
    if isinstance(p, DTensor):
        text += f", mesh {p.device_mesh.mesh.tolist()}, placements {tuple(str(x) for x in p.placements)}"
    return text + ")"


def where(gi: int, names: Sequence[str], params: Sequence[Tensor]) -> str:
    shown = ", ".join(describe(n, p) for n, p in zip(names[:3], params[:3]))
    return f"group {gi} [{shown}{', ...' if len(params) > 3 else ''}]"


def _number(value: Any) -> float | None:
    if isinstance(value, Tensor):
        return float(value.item()) if value.numel() == 1 else None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def check_range(group: Group, key: str, at: str, *, lo: float, hi: float = math.inf, hi_open: bool = False) -> None:
    """``group[key]`` is a finite number in ``[lo, hi]`` (``[lo, hi)`` with ``hi_open``), else ValueError."""
    if key not in group or group[key] is None:
        return
    x = _number(group[key])
    ok = x is not None and math.isfinite(x) and lo <= x and (x < hi if hi_open else x <= hi)
    if not ok:
        bound = f"[{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{at}: {key}={group[key]!r} is invalid; it must be a finite number in {bound}")


def check_params(group: Group, at: str) -> None:
    """Refuse parameters the math does not cover: complex ones (their imaginary part would be dropped)."""
    for p, n in zip(group["params"], group["param_names"]):
        if p.is_complex():
            raise ValueError(
                f"{at}: parameter {describe(n, p)} is complex ({p.dtype}); disco's optimizers are real: "
                "optimize torch.view_as_real(p) as a real parameter instead"
            )
        if not p.is_floating_point():
            raise ValueError(f"{at}: parameter {describe(n, p)} has dtype {p.dtype}; only floating point is trained")


def check_common(group: Group, at: str) -> None:
    check_range(group, "lr", at, lo=0.0)
    check_range(group, "weight_decay", at, lo=0.0)
    if group.get("nonfinite", "raise") not in NONFINITE:
        raise ValueError(f"{at}: nonfinite={group['nonfinite']!r} is invalid; valid: {list(NONFINITE)}")
    if group.get("commit", "atomic") not in COMMITS:
        raise ValueError(f"{at}: commit={group['commit']!r} is invalid; valid: {list(COMMITS)}")


def refuse_streaming(group: Group, at: str, algorithm: str) -> None:
    """For rules whose updates need every parameter's result at once (a norm over them, a shared basis)."""
    if group.get("commit", "atomic") == "streaming":
        raise ValueError(
            f"{at}: commit='streaming' is not available for {algorithm} (its commit reads every parameter's "
            "result of the step); use commit='atomic'"
        )


def check_lmo(group: Group, at: str) -> None:
    """The settings of an LMO group (Disco, Muon, Scion)."""
    check_common(group, at)
    check_range(group, "momentum", at, lo=0.0, hi=1.0, hi_open=True)
    check_range(group, "eps", at, lo=0.0)
    check_range(group, "scale", at, lo=0.0)
    check_constraint(group, at)
    try:
        norm = ops.get_norm(group["norm_factor"])
    except ValueError as e:
        raise ValueError(f"{at}: {e}") from None
    backend = group["backend"]
    if backend not in ops.BACKENDS:
        raise ValueError(f"{at}: unknown backend {backend!r}; valid: {ops.backend_names()}")
    steps = group.get("backend_steps")
    if backend in ops.ITERATIVE_BACKENDS:
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
            raise ValueError(
                f"{at}: backend_steps={steps!r} is invalid for backend {backend!r}; it must be an int in [1, 100) "
                "(0 would skip the orthogonalization)"
            )
        coefficients = group.get("coefficients")
        if coefficients is not None:
            try:
                ops.get_table(coefficients)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{at}: coefficients {coefficients!r} are invalid: {e}") from None
    if group.get("compute_dtype") not in COMPUTE_DTYPES:
        raise ValueError(f"{at}: compute_dtype={group['compute_dtype']!r}; valid: {list(COMPUTE_DTYPES)}")
    if group.get("update_rule", "decoupled") not in ("decoupled", "frank_wolfe"):
        raise ValueError(f"{at}: update_rule={group['update_rule']!r}; valid: 'decoupled', 'frank_wolfe'")
    if group.get("is_light") and group.get("nesterov"):
        raise ValueError(f"{at}: is_light=True keeps no separate gradient, so nesterov must be False")
    if group.get("is_light") and group.get("nonfinite") == "skip":
        raise ValueError(
            f"{at}: is_light=True keeps the momentum in p.grad, where a skipped non-finite gradient stays: "
            "nonfinite='skip' needs is_light=False"
        )
    for p, n in zip(group["params"], group["param_names"]):
        if (
            group.get("transposed")
            and norm.kind != "elementwise"
            and (p.dim() not in (2, 3) or norm.name == "conv_spectral")
        ):
            raise ValueError(
                f"parameter {describe(n, p)} is in a group with transposed=True, which needs a 2-D matrix (or a "
                "3-D stack) stored fan_in x fan_out and a norm other than 'conv_spectral'"
            )
        if norm.kind != "elementwise" and p.dim() < 2:
            raise ValueError(
                f"parameter {describe(n, p)} is in a group with norm_factor {group['norm_factor']!r}, which "
                "needs a matrix (2-D or more); route it to 'bias_rms', 'sign' or an element-wise algorithm "
                "('adamw', 'lion')"
            )


WEIGHT_CONSTRAINTS = (None, "spectral_clip", "stiefel", "hyperball")


def check_constraint(group: Group, at: str) -> None:
    """``weight_constraint`` and its bounds (``disco.optim.constraints``)."""
    kind = group.get("weight_constraint")
    if kind not in WEIGHT_CONSTRAINTS:
        raise ValueError(f"{at}: weight_constraint={kind!r} is invalid; valid: {list(WEIGHT_CONSTRAINTS)}")
    if kind is None:
        return
    check_range(group, "sigma_min", at, lo=0.0)
    check_range(group, "sigma_max", at, lo=1e-30)
    check_range(group, "radius", at, lo=1e-30)
    refuse_streaming(group, at, f"weight_constraint={kind!r}")
    lo, hi = group.get("sigma_min"), group.get("sigma_max")
    if lo is not None and hi is not None and float(lo) > float(hi):
        raise ValueError(f"{at}: sigma_min={lo!r} exceeds sigma_max={hi!r}")
    if kind in ("spectral_clip", "stiefel"):
        for p, n in zip(group["params"], group["param_names"]):
            if p.dim() < 2:
                raise ValueError(
                    f"{at}: weight_constraint={kind!r} acts on singular values, but {describe(n, p)} is not a "
                    "matrix: use 'hyperball' or no constraint for vectors"
                )


def check_elementwise(group: Group, at: str) -> None:
    """The settings of an AdamW / Lion / sign group."""
    check_common(group, at)
    check_range(group, "adam_eps", at, lo=0.0)
    if group["algorithm"] == "sign":
        check_range(group, "momentum", at, lo=0.0, hi=1.0, hi_open=True)
    betas = group.get("betas")
    if betas is not None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{at}: betas={betas!r} must be a pair (beta1, beta2)")
        for k, b in enumerate(betas):
            check_range({f"betas[{k}]": b}, f"betas[{k}]", at, lo=0.0, hi=1.0, hi_open=True)


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
