"""``Muon``: a drop-in for ``torch.optim.Muon`` with distribution, conv / 3-D weights and backend choice."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .base import SpectralOptimizer

_ADJUST = {None: "original", "original": "original", "match_rms_adamw": "match_rms_adamw"}


class Muon(SpectralOptimizer):
    r"""MomentUm Orthogonalized by Newton-Schulz (Jordan et al.), same signature and numerics as torch's.

    ::

        B <- lerp(B, G, 1 - momentum)
        U <- lerp(G, B, momentum) if nesterov else B
        O <- NS_{ns_steps}(U; ns_coefficients, eps)
        W <- (1 - lr * weight_decay) * W - adjust(lr, shape) * O

    ``adjust_lr_fn``: ``None``/``"original"`` scales by ``sqrt(max(1, rows/cols))``, ``"match_rms_adamw"`` by
    ``0.2 * sqrt(max(rows, cols))`` (Moonlight). Beyond torch: ``compute_dtype`` (torch always runs in bf16; ours
    defaults to bf16 on CUDA and on CPUs with native bf16 matmul, fp32 on other CPUs), ``backend`` (default
    ``gram_newtonschulz5``: torch's polynomial in Gram form where a matrix is wider than 1.5:1; ``newtonschulz5``
    is torch's plain iteration; ``polar_express``, ``svd``...), conv weights
    (flattened to ``out x in*k*k``) and 3-D expert stacks (a batch of matrices), parameter groups with
    ``algorithm="adamw"``/``"lion"`` for non-matrix parameters, ``distributed_config`` and ``nonfinite``
    (``"raise"``, the default, or ``"skip"``: see ``disco.Disco``), ``commit`` (``"atomic"``, the default, or
    ``"streaming"``: one update held at a time instead of one per parameter; see ``disco.Disco``), ``state_dtype``
    (``None``: the parameter's; ``torch.bfloat16``; ``"int8_block"``: 8-bit blocks of ``state_block`` entries,
    see ``disco.optim.momentum``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        distributed_config: Any = None,
        nonfinite: str = "raise",
        backend: str = "gram_newtonschulz5",
        compute_dtype: torch.dtype | None = None,
        commit: str = "atomic",
        state_dtype: torch.dtype | str | None = None,
        state_block: int = 256,
    ) -> None:
        defaults = muon_group_defaults(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            backend=backend,
            compute_dtype=compute_dtype,
            nonfinite=nonfinite,
        )
        defaults.update(commit=commit, state_dtype=state_dtype, state_block=state_block)
        super().__init__(params, defaults, distributed_config=distributed_config)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's per-group names (``ns_steps``, ``ns_coefficients``, ``adjust_lr_fn``) are taken as the rule's
        settings they stand for (``backend_steps``, ``coefficients``, ``norm_factor``)."""
        super().add_param_group(torch_group_keys(param_group))


def torch_group_keys(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with ``torch.optim.Muon``'s key names replaced by disco's (a given disco name wins)."""
    out = dict(group)
    for theirs, ours in (("ns_steps", "backend_steps"), ("ns_coefficients", "coefficients")):
        if theirs in out:
            value = out.pop(theirs)
            out.setdefault(ours, tuple(value) if ours == "coefficients" and isinstance(value, list) else value)
    if "adjust_lr_fn" in out:  # an alias of norm_factor (LMOSettings.aliases), None spelled out
        _check_adjust(out["adjust_lr_fn"])
        out["adjust_lr_fn"] = _ADJUST[out["adjust_lr_fn"]]
    return out


def muon_group_defaults(
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    eps: float,
    ns_steps: int,
    adjust_lr_fn: str | None,
    backend: str,
    compute_dtype: torch.dtype | None,
    nonfinite: str,
) -> dict[str, Any]:
    """The group settings of torch-style Muon arguments (``adjust_lr_fn`` picks the norm factor)."""
    _check_adjust(adjust_lr_fn)
    return dict(
        algorithm="muon",
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        coefficients=tuple(ns_coefficients) if isinstance(ns_coefficients, list) else ns_coefficients,
        eps=eps,
        backend_steps=ns_steps,
        norm_factor=_ADJUST[adjust_lr_fn],
        adjust_lr_fn=adjust_lr_fn,
        backend=backend,
        compute_dtype=compute_dtype,
        nonfinite=nonfinite,
    )


def _check_adjust(adjust_lr_fn: Any) -> None:
    if not isinstance(adjust_lr_fn, (str, type(None))) or adjust_lr_fn not in _ADJUST:
        raise ValueError(
            f"Adjust learning rate function {adjust_lr_fn} is not supported: adjust_lr_fn={adjust_lr_fn!r} must "
            f"be one of {list(_ADJUST)}"
        )
