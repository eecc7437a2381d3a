"""``Disco``: the spectral-conditioned umbrella optimizer (per-group LMO, norm factor and backend)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .base import SpectralOptimizer
from .defaults import DISCO_DEFAULTS as D


class Disco(SpectralOptimizer):
    r"""Steepest descent under a per-layer operator norm, distributed with zero redundancy.

    For each matrix parameter ``W`` with gradient ``G`` (per group: ``norm_factor``, ``backend``)::

        M <- momentum * M + (1 - momentum) * G          # EMA (lerp); in p.grad itself when is_light
        U <- lerp(G, M, momentum) if nesterov else M
        O <- norm_factor(W) * polar(U)                  # e.g. sqrt(fan_out/fan_in) * U V^T (spectral condition)
        W <- (1 - lr * weight_decay) * W - lr * O

    Embeddings and heads use row normalisations (``embed_sqrt``, ``unembed_sqrt``, usually with
    ``backend="identity"``), vectors ``bias_rms`` or ``sign``; groups with ``algorithm="adamw"``/``"lion"`` take an
    element-wise update instead, inside the same optimizer.

    Args:
        params: parameters or groups (``create_disco_param_groups`` builds them by name).
        lr, momentum, nesterov, weight_decay: as above; defaults ``disco.optim.defaults.DISCO_DEFAULTS``
            (``nesterov=None`` is ``True``, or ``False`` with ``is_light``).
        eps: added to the Frobenius norm before Newton-Schulz.
        norm_factor: a name from ``disco.ops.NORMS``.
        backend, backend_steps: orthogonalization backend (``gram_newtonschulz5``, the default, ``newtonschulz5``,
            ``polar_express``, ``gram_polar_express``, ``svd``, ``identity``) and its iterations; ``coefficients``
            picks a table.
        is_light: keep the momentum in ``p.grad`` instead of a buffer (saves one parameter-sized tensor).
            Then **do not zero gradients between steps**: the optimizer rescales ``p.grad`` after each step so
            that the next backward's accumulation gives the EMA momentum. ``nesterov`` must be False. A missing
            gradient after a step (``zero_grad(set_to_none=True)``) raises.
        parallel_dims: TorchTitan's ``ParallelDims`` (or ``DummyParallelDims``); optional, layouts are read
            from the DTensor parameters.
        name_of_embedding: kept for the routing helpers.
        nonfinite: ``"raise"`` (default: a NaN / inf gradient or result raises on every rank, naming the
            parameter, before anything changes) or ``"skip"`` (the step is skipped on every rank, nothing changes).
        commit: ``"atomic"`` (default: every update is computed before any is written, so a failure changes
            nothing; the step holds one update per parameter) or ``"streaming"`` (each parameter is written as
            soon as its update is known good: one update held at a time, the same results; a failure after
            the gradients were checked leaves the step partially applied and raises ``StepError`` naming it).
        distributed_config: ``create_dtensor_config()``, ``create_auto_config(...)`` or ``None`` (DTensor
            parameters are detected; plain tensors then run single-device).

    References: spectral condition (arXiv 2310.17813); modular norm (arXiv 2405.14813); Scion (arXiv 2502.07529).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = D.lr,
        momentum: float = D.momentum,
        nesterov: bool | None = None,
        weight_decay: float = D.weight_decay,
        eps: float = D.eps,
        norm_factor: str = D.norm_factor,
        backend: str = D.backend,
        backend_steps: int = D.backend_steps,
        coefficients: Any = None,
        compute_dtype: torch.dtype | None = None,
        is_light: bool = D.is_light,
        parallel_dims: Any = None,
        name_of_embedding: str | None = None,
        distributed_config: Any = None,
        nonfinite: str = "raise",
        commit: str = "atomic",
    ) -> None:
        if nesterov is None:
            nesterov = D.nesterov and not is_light
        defaults = dict(
            algorithm="disco",
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            eps=eps,
            norm_factor=norm_factor,
            backend=backend,
            backend_steps=backend_steps,
            coefficients=coefficients,
            compute_dtype=compute_dtype,
            is_light=is_light,
        )
        self.parallel_dims = parallel_dims
        self.name_of_embedding = name_of_embedding
        defaults["nonfinite"] = nonfinite
        defaults["commit"] = commit
        super().__init__(params, defaults, distributed_config=distributed_config)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A plain group (unnamed tensors, no ``norm_factor`` or ``algorithm``: Hugging Face ``Trainer``'s
        weight-decay groups) that holds vectors is routed inside: its 0-D / 1-D tensors take ``bias_rms`` +
        ``identity``, as ``create_disco_param_groups`` routes them. Named groups are the user's (or the
        routing's) choice and are validated as given."""
        from ..groups import split_vector_params

        params = param_group.get("params")
        named = "param_names" in param_group or (
            isinstance(params, (list, tuple)) and bool(params) and all(isinstance(p, tuple) for p in params)
        )
        for group in [param_group] if named else split_vector_params(param_group):
            super().add_param_group(group)
