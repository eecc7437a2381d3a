"""Semi-orthogonal and Scion-style initialisation, exact under DTensor sharding.

Each function fills a tensor in place (under ``torch.no_grad()``) and returns it. A tensor is viewed as
matrices ``rows x cols``:

- 2-D ``(out, in)``: one matrix;
- 3-D ``(E, out, in)``: a batch of ``E`` expert matrices, each initialised independently (``batch_dims=1``);
- 4-D and more (conv ``(out, in, k, ...)``): one ``out x (in * k * ...)`` matrix (``batch_dims=0``).

Pass ``batch_dims`` to override (e.g. ``batch_dims=0`` for a ``Conv1d`` weight, which is 3-D);
:func:`image_orthogonal_` always flattens. Pass ``transposed=True`` for a weight stored ``fan_in x fan_out``
(Hugging Face's GPT-2 ``Conv1D``; ``disco.groups`` marks such parameters' groups ``transposed=True``): the
matrix ``fan_out x fan_in`` is drawn and scaled as for ``nn.Linear`` and stored transposed, so with the same
generator state the weight is exactly the transpose of the ``nn.Linear`` one. :func:`init_param_groups_`
applies an init to the hidden matrices of routed parameter groups, orientation included.

**Semi-orthogonal** means every singular value equals the gain: the rows are orthonormal (times the gain)
when the matrix is wide, the columns when it is tall. It is computed from a float64 Gaussian by QR (of the
transpose when wide) with the sign fix ``Q * sign(diag(R))``, which makes the result a deterministic
function of the Gaussian (Haar-distributed), then cast to the tensor's dtype.

**Randomness and DTensor.** Every function draws the *full-shape* Gaussian from one generator, on the
generator's device (CPU unless you pass e.g. a CUDA generator): ``generator`` itself if given, else a fresh
CPU generator seeded by one draw from torch's default generator. Under DTensor the full tensor is computed
on every rank and narrowed to the local shard with ``distribute_tensor(..., src_data_rank=None)`` (no
communication), so ``dtensor.full_tensor()`` equals, bit for bit, the same init of a plain tensor with the
same seed, for any mesh, placement or uneven / empty shard. This needs the generator (or torch's default
generator, via ``torch.manual_seed``) in the same state on all ranks, as SPMD code has anyway.
``nn.init.orthogonal_``, by contrast, fails on wide sharded DTensors and depends on the placement.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, TypeGuard

import torch
from torch import Tensor

from .groups.rules import vector_algorithms

__all__ = [
    "INIT_FNS",
    "build_init_fn",
    "image_orthogonal_",
    "init_names",
    "init_param_groups_",
    "orthogonal_",
    "scaled_orthogonal_",
    "scion_normal_",
]

MakeFull = Callable[[torch.Size, torch.Generator], Tensor]

try:  # torch.distributed may be absent from some builds
    from torch.distributed.tensor import DTensor, distribute_tensor

    _SRC_DATA_RANK = "src_data_rank" in inspect.signature(distribute_tensor).parameters
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]  # absent: _is_dtensor is then always False
    distribute_tensor = None  # type: ignore[assignment]  # absent: only reached for a DTensor
    _SRC_DATA_RANK = False


def _is_dtensor(t: Tensor) -> TypeGuard[DTensor]:
    return DTensor is not None and isinstance(t, DTensor)


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    return torch.Generator().manual_seed(seed)


def _split(shape: torch.Size, batch_dims: int | None) -> tuple[tuple[int, ...], int, int]:
    """``(batch shape, rows, cols)`` of the matrix view of ``shape``."""
    if len(shape) < 2:
        raise ValueError(f"initialisation needs a tensor with at least 2 dims, got shape {tuple(shape)}")
    b = (1 if len(shape) == 3 else 0) if batch_dims is None else batch_dims
    if not 0 <= b <= len(shape) - 2:
        raise ValueError(f"batch_dims={b} leaves no matrix in shape {tuple(shape)}")
    return tuple(shape[:b]), shape[b], math.prod(shape[b + 1 :])


def _gaussian(lead: tuple[int, ...], rows: int, cols: int, gen: torch.Generator) -> Tensor:
    return torch.randn(*lead, rows, cols, generator=gen, dtype=torch.float64, device=gen.device)


def _semi_orthogonal(lead: tuple[int, ...], rows: int, cols: int, gen: torch.Generator) -> Tensor:
    X = _gaussian(lead, rows, cols, gen)
    if X.numel() == 0:
        return X
    wide = rows < cols
    A = X.mT if wide else X
    Q: Tensor
    R: Tensor
    Q, R = torch.linalg.qr(A)  # reduced: Q is (max, min) with orthonormal columns
    d = torch.diagonal(R, dim1=-2, dim2=-1)
    Q = Q * torch.where(d < 0, -1.0, 1.0).to(Q.dtype).unsqueeze(-2)
    return Q.mT if wide else Q


def _swap(shape: torch.Size) -> torch.Size:
    return torch.Size((*shape[:-2], shape[-1], shape[-2]))


def _view_shape(shape: torch.Size, transposed: bool, batch_dims: int | None) -> torch.Size:
    """The ``... x fan_out x fan_in`` shape the init works on: ``shape`` itself, or its last two dims swapped."""
    if not transposed:
        return shape
    b = (1 if len(shape) == 3 else 0) if batch_dims is None else batch_dims
    if len(shape) < 2 or len(shape) - b != 2:
        raise ValueError(
            f"transposed=True needs a matrix (or a batch of matrices: batch_dims={b}), got shape {tuple(shape)}"
        )
    return _swap(shape)


def _write_(tensor: Tensor, make_full: MakeFull, generator: torch.Generator | None, transposed: bool = False) -> Tensor:
    """Fill ``tensor`` (plain or DTensor) with ``make_full(global_shape, gen)``, narrowed to its shard.

    ``transposed``: ``make_full`` gets the shape with the last two dims swapped; its result is stored transposed.
    """
    if tensor.is_meta:
        return tensor
    gen = _generator(generator)
    full = make_full(_swap(tensor.shape), gen).mT.contiguous() if transposed else make_full(tensor.shape, gen)
    if _is_dtensor(tensor):
        tensor.to_local().copy_(_local_shard(full, tensor))
    else:
        tensor.copy_(full)
    return tensor


def _local_shard(full: Tensor, dt: DTensor) -> Tensor:
    mesh, placements = dt.device_mesh, dt.placements
    if _SRC_DATA_RANK:
        # src_data_rank=None: every rank holds ``full`` already and keeps its own shard (no communication)
        return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
    # older torch: slice by the shard's offset (plain Shard / Replicate placements)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    local = full
    for dim, (size, start) in enumerate(zip(shape, offset)):
        local = local.narrow(dim, start, size)
    return local


def _reshape(X: Tensor, shape: torch.Size) -> Tensor:
    return X.reshape(shape)


@torch.no_grad()
def orthogonal_(
    tensor: Tensor,
    gain: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    batch_dims: int | None = None,
    transposed: bool = False,
) -> Tensor:
    """Fill ``tensor`` with a semi-orthogonal matrix (per expert / flattened conv) times ``gain``.

    All singular values of each matrix view equal ``gain``. Works on plain tensors and DTensors alike.
    ``transposed``: ``tensor`` is stored ``fan_in x fan_out`` (see the module docstring).
    """
    _view_shape(tensor.shape, transposed, batch_dims)  # validates

    def make(shape: torch.Size, gen: torch.Generator) -> Tensor:
        lead, rows, cols = _split(shape, batch_dims)
        return _reshape(_semi_orthogonal(lead, rows, cols, gen) * gain, shape)

    return _write_(tensor, make, generator, transposed)


def _scale_factor(scale: str | float, rows: int, cols: int) -> float:
    if not isinstance(scale, str):
        return float(scale)
    if rows == 0 or cols == 0:
        return 1.0
    if scale == "spectral":
        return math.sqrt(rows / cols)
    if scale == "original":
        return math.sqrt(max(1.0, rows / cols))
    if scale == "image_spectral":
        return max(1.0, math.sqrt(rows / cols))
    if scale in ("unit", "none"):
        return 1.0
    raise ValueError(f"unknown scale {scale!r}; valid: spectral, original, image_spectral, unit, or a number")


@torch.no_grad()
def scaled_orthogonal_(
    tensor: Tensor,
    *,
    scale: str | float = "spectral",
    gain: float = 1.0,
    generator: torch.Generator | None = None,
    batch_dims: int | None = None,
    transposed: bool = False,
) -> Tensor:
    """Semi-orthogonal init with singular values ``gain * factor`` for a ``fan_out x fan_in`` matrix view.

    ``scale="spectral"`` gives ``sqrt(fan_out / fan_in)``, the spectral condition of arXiv 2310.17813 (a layer
    maps unit-rms inputs to unit-rms outputs); ``"original"`` ``sqrt(max(1, fan_out / fan_in))``;
    ``"image_spectral"`` ``max(1, sqrt(fan_out / fan_in))``; ``"unit"`` 1; a number is used as is.
    ``transposed``: ``tensor`` is stored ``fan_in x fan_out`` (``fan_out = shape[-1]``).
    """
    _, rows, cols = _split(_view_shape(tensor.shape, transposed, batch_dims), batch_dims)
    factor = gain * _scale_factor(scale, rows, cols)
    return orthogonal_(tensor, factor, generator=generator, batch_dims=batch_dims, transposed=transposed)


@torch.no_grad()
def image_orthogonal_(
    tensor: Tensor, *, gain: float = 1.0, generator: torch.Generator | None = None, transposed: bool = False
) -> Tensor:
    """Conv / image weights: semi-orthogonal on the ``out x (in * k * ...)`` view, singular values
    ``gain * max(1, sqrt(out / (in * k * ...)))``. The whole tensor is one matrix (no expert batch).
    ``transposed``: a 2-D weight stored ``in x out``."""
    return scaled_orthogonal_(
        tensor, scale="image_spectral", gain=gain, generator=generator, batch_dims=0, transposed=transposed
    )


SCION_KINDS = ("input", "output", "hidden")


@torch.no_grad()
def scion_normal_(
    tensor: Tensor,
    *,
    kind: str = "hidden",
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    batch_dims: int | None = None,
    transposed: bool = False,
) -> Tensor:
    """Scion-style init: a float64 Gaussian ``G`` (per matrix view ``rows x cols``), normalised to the unit
    ball of the layer's operator norm (the one the matching LMO of :mod:`disco.ops` uses), times ``scale``:

    - ``kind="input"`` (embeddings ``[vocab, dim]``; ``embed_sqrt``): each row to unit rms,
      ``W[r] = scale * sqrt(cols) * G[r] / ||G[r]||_2``, so ``l1_to_rms(W) == scale``;
    - ``kind="output"`` (heads ``[vocab, dim]``; ``unembed_sqrt``): each row to l2 norm ``1/sqrt(cols)``,
      ``W[r] = scale * G[r] / (||G[r]||_2 * sqrt(cols))``, so ``rms_to_inf(W) == scale``;
    - ``kind="hidden"`` (``spectral``): ``W = scale * sqrt(rows / cols) * G / sigma_max(G)``, so the largest
      singular value is exactly ``scale * sqrt(fan_out / fan_in)`` (``rms_to_rms(W) == scale``).

    ``transposed``: ``tensor`` is stored as the transpose of that ``rows x cols`` view (see the module docstring).
    """
    if kind not in SCION_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {list(SCION_KINDS)}")
    _view_shape(tensor.shape, transposed, batch_dims)  # validates

    def make(shape: torch.Size, gen: torch.Generator) -> Tensor:
        lead, rows, cols = _split(shape, batch_dims)
        G = _gaussian(lead, rows, cols, gen)
        if G.numel() == 0:
            return _reshape(G, shape)
        if kind == "hidden":
            smax = torch.linalg.matrix_norm(G, ord=2, keepdim=True)
            W = G * (scale * math.sqrt(rows / cols) / smax)
        else:
            W = G / torch.linalg.vector_norm(G, dim=-1, keepdim=True)
            W = W * (scale * math.sqrt(cols) if kind == "input" else scale / math.sqrt(cols))
        return _reshape(W, shape)

    return _write_(tensor, make, generator, transposed)


INIT_FNS: dict[str, Callable[..., Tensor]] = {
    "orthogonal": orthogonal_,
    "scaled_orthogonal": scaled_orthogonal_,
    "spectral": functools.partial(scaled_orthogonal_, scale="spectral"),
    "image_orthogonal": image_orthogonal_,
    "scion_input": functools.partial(scion_normal_, kind="input"),
    "scion_output": functools.partial(scion_normal_, kind="output"),
    "scion_hidden": functools.partial(scion_normal_, kind="hidden"),
}


def init_names() -> list[str]:
    return sorted(INIT_FNS)


def build_init_fn(name: str, **kwargs: object) -> Callable[[Tensor], Tensor]:
    """The init function called ``name`` (see :func:`init_names`), with ``kwargs`` bound."""
    if name not in INIT_FNS:
        raise ValueError(f"unknown init {name!r}; valid: {init_names()}")
    fn = INIT_FNS[name]
    return functools.partial(fn, **kwargs) if kwargs else fn


#: Norm factors whose groups hold hidden matrices (the ones :func:`init_param_groups_` initialises).
_HIDDEN_NORMS = ("spectral", "original", "match_rms_adamw", "image_spectral")


@torch.no_grad()
def init_param_groups_(
    param_groups: list[dict[str, Any]],
    scheme: str = "spectral",
    *,
    default_norm: str = "spectral",
    generator: torch.Generator | None = None,
    **kwargs: object,
) -> list[str]:
    """Initialise the hidden matrices of routed parameter groups (``disco.create_disco_param_groups``'s) with
    the init ``scheme`` (:func:`init_names`), honouring each group's ``transposed`` flag; returns their names.

    A group counts as hidden when its ``norm_factor`` (``default_norm`` when unset: the optimizer default) is a
    plain matrix norm (``spectral``, ``original``, ``match_rms_adamw``, ``image_spectral``) and its algorithm
    is not element-wise; embeddings, heads, convolutions, vectors and AdamW / Lion groups keep their weights.
    """
    names: list[str] = []
    for group in param_groups:
        if group.get("algorithm") in vector_algorithms():  # element-wise groups keep their weights
            continue
        if group.get("norm_factor", default_norm) not in _HIDDEN_NORMS:
            continue
        fn: Callable[..., Tensor] = build_init_fn(scheme, **kwargs)
        transposed = bool(group.get("transposed", False))
        pnames = group.get("param_names") or [f"<param {i}>" for i in range(len(group["params"]))]
        for p, n in zip(group["params"], pnames):
            if p.dim() in (2, 3):
                fn(p, generator=generator, transposed=transposed)
                names.append(n)
    return names
