"""Pure math on local tensors: orthogonalization, LMOs / norm factors, operator norms.

Nothing here imports ``torch.distributed``; everything is batched over leading dims.
"""

from .coefficients import TABLES, CoefficientTable, get_table, table_names
from .constraints import ConstraintSpec, msign, spectral_clip, stiefel
from .lmo import NORMS, get_norm, lmo, matrix_view, norm_factor, norm_names
from .norms import (
    OPERATOR_NORMS,
    condition_number,
    l1_to_rms,
    operator_norm,
    rms_to_inf,
    rms_to_rms,
    supremum,
)
from .orthogonalize import (
    BACKENDS,
    ITERATIVE_BACKENDS,
    backend_names,
    cpu_has_native_bf16,
    default_compute_dtype,
    gram_newton_schulz,
    newton_schulz,
    orthogonalize,
    orthogonalize_cost,
    svd_polar,
)
from .specs import LMOSpec, NormsSpec, Spec

__all__ = [
    "BACKENDS",
    "ITERATIVE_BACKENDS",
    "NORMS",
    "OPERATOR_NORMS",
    "TABLES",
    "CoefficientTable",
    "ConstraintSpec",
    "LMOSpec",
    "NormsSpec",
    "Spec",
    "backend_names",
    "condition_number",
    "cpu_has_native_bf16",
    "default_compute_dtype",
    "get_norm",
    "get_table",
    "gram_newton_schulz",
    "l1_to_rms",
    "lmo",
    "matrix_view",
    "msign",
    "newton_schulz",
    "norm_factor",
    "norm_names",
    "operator_norm",
    "orthogonalize",
    "orthogonalize_cost",
    "rms_to_inf",
    "rms_to_rms",
    "spectral_clip",
    "stiefel",
    "supremum",
    "svd_polar",
    "table_names",
]
