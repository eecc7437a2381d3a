"""``Scion``: norm-constrained LMO descent (Pethick et al., arXiv 2502.07529)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .base import SpectralOptimizer

#: ``fp32_matmul_prec`` -> the compute dtype it stands for on every device: ``"medium"`` lets fp32 matmuls run
#: in bf16 (what ``torch.set_float32_matmul_precision("medium")`` does on GPUs and AMX CPUs), so it is bf16.
#: "high" (TF32 on GPUs) has no CPU or bf16 counterpart that is exact in fp32 terms: fp32.
_PRECISIONS = {"highest": torch.float32, "high": torch.float32, "medium": torch.bfloat16}


class Scion(SpectralOptimizer):
    r"""Scion: conditional-gradient (Frank-Wolfe) steps inside a norm ball of radius ``spectral_radius``.

    ::

        M <- lerp(M, G, 1 - momentum_beta)
        O <- norm_factor * polar(M)                       # per-group LMO ("spectral" = sqrt(fan_out/fan_in))
        W <- (1 - lr) * W - lr * spectral_radius * O      # constrained (default): W stays in the ball
        W <- W - lr * spectral_radius * O                 # constrained=False (unconstrained Scion)

    Args:
        lr, momentum_beta, spectral_radius: as above.
        fp32_matmul_prec: ``None`` (default: ``compute_dtype`` decides) or the seed's name of the orthogonalization's
            precision, taken as a compute dtype of that call only: ``"highest"`` / ``"high"`` -> fp32, ``"medium"``
            -> bf16. Nothing changes torch's process-wide ``set_float32_matmul_precision``. Given together with a
            different ``compute_dtype``, refused.
        coefficient_type: Newton-Schulz table (``quintic`` = ``you``, ``simple`` = ``keller``,
            ``polar_express``...).
        num_ns_steps: Newton-Schulz iterations.
        constrained: Frank-Wolfe update (default) or the unconstrained one.
        nonfinite: ``"raise"`` (default: a NaN / inf gradient or result raises on every rank, naming the
            parameter, before anything changes) or ``"skip"`` (the step is skipped on every rank, nothing changes).
        commit: ``"atomic"`` (default: every update is computed before any is written, so a failure changes
            nothing; the step holds one update per parameter) or ``"streaming"`` (each parameter is written as
            soon as its update is known good: one update held at a time, the same results; a failure after
            the gradients were checked leaves the step partially applied and raises ``StepError`` naming it).
        norm_factor, backend: per-group LMO (vectors: ``bias_rms`` / ``sign``; embeddings: ``embed_sqrt``...).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-4,
        momentum_beta: float = 0.95,
        *,
        fp32_matmul_prec: str | None = None,
        coefficient_type: str = "quintic",
        num_ns_steps: int = 5,
        spectral_radius: float = 1.0,
        constrained: bool = True,
        weight_decay: float = 0.0,
        norm_factor: str = "spectral",
        backend: str = "gram_newtonschulz5",
        eps: float = 1e-7,
        compute_dtype: torch.dtype | None = torch.float32,
        distributed_config: Any = None,
        nonfinite: str = "raise",
        commit: str = "atomic",
    ) -> None:
        if fp32_matmul_prec is not None:
            if fp32_matmul_prec not in _PRECISIONS:
                raise ValueError(f"fp32_matmul_prec must be one of {list(_PRECISIONS)}, got {fp32_matmul_prec!r}")
            wanted = _PRECISIONS[fp32_matmul_prec]
            if compute_dtype not in (wanted, torch.float32):  # float32 is the default, overridden here
                raise ValueError(
                    f"fp32_matmul_prec={fp32_matmul_prec!r} means compute_dtype={wanted}, but compute_dtype="
                    f"{compute_dtype} was given: pass one of them"
                )
            compute_dtype = wanted
        defaults = dict(
            algorithm="scion",
            lr=lr,
            momentum=momentum_beta,
            nesterov=False,
            coefficients=coefficient_type,
            backend_steps=num_ns_steps,
            scale=spectral_radius,
            update_rule="frank_wolfe" if constrained else "decoupled",
            weight_decay=weight_decay,
            norm_factor=norm_factor,
            backend=backend,
            eps=eps,
            compute_dtype=compute_dtype,
        )
        self.fp32_matmul_prec = fp32_matmul_prec
        defaults["nonfinite"] = nonfinite
        defaults["commit"] = commit
        super().__init__(params, defaults, distributed_config=distributed_config)
