r"""The element-wise passes of an LMO step (``LMORule``), fused, and its momentum kept in a chosen state dtype.

One step of a parameter with gradient ``G``, momentum ``M`` and weight ``W`` makes these passes over memory::

    U = lerp(G, M, beta^2)          # the Nesterov direction (or U = lerp(M, G, 1 - beta)): read G, M, write U
    ... the LMO of U (the engine) ...
    M <- lerp(M, G, 1 - beta)       # at the commit: read G, M, write M
    W <- decay W - lr s O           # at the commit: read O, read-modify-write W

Each is one pass: a row block of a few hundred KiB is read once from memory and every operation on it runs while
it sits in cache (``CHUNK_BYTES``); a bf16 ``O`` is widened block by block into a small scratch instead of a whole
float32 copy; nothing is allocated per element but ``U``. The arithmetic is unchanged, element by element, so
the results are bitwise those of the unfused ops.

State dtype (``LMOSettings.state_dtype``): ``None`` keeps the momentum in the parameter's dtype (the math runs
as before, in it). A floating dtype (``torch.bfloat16``) stores it in that dtype while the math runs in the
compute dtype, ``promote_types(G.dtype, float32)``: the stored momentum is widened, updated and rounded once.
``"int8_block"`` stores it as int8 with one float32 absmax scale per block of ``state_block`` entries of a row
(``disco.ops.quant``): ``momentum_int8`` (the parameter's shape) and ``momentum_scale`` (``(..., rows,
ceil(n / state_block))``, laid out like the parameter's rows and blocks, so DCP saves and reshards it). A block
never spans two shards: a layout that would cut one is refused at construction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ..distributed.engine import local_piece
from ..distributed.resolve import dtensor_layout
from ..distributed.state import derived_zeros
from ..ops.quant import block_count, dequantize_blocks, quantize_blocks

#: bytes of float32 per operand in one fused block: several operands of a block stay in a 1-2 MiB L2
CHUNK_BYTES = 2**19
#: the state dtype name of the 8-bit block-quantized momentum
INT8_BLOCK = "int8_block"
#: the default ``state_block``: entries per quantization block (a float32 scale per 256 int8: 1.016 bytes/entry)
DEFAULT_BLOCK = 256


def _rows(t: Tensor) -> Tensor:
    """``t`` as ``(rows, n)``: blocks run along the last dim (2-D, 3-D) or the flattened dims 1.. (>= 4-D). A
    contiguous ``t`` gives a view (state is written through it); another, a copy (read only)."""
    if t.dim() >= 4:
        return t.reshape(t.shape[0], -1)
    return t.reshape(-1, t.shape[-1]) if t.dim() >= 1 else t.reshape(1, 1)


def _state_rows(t: Tensor, key: str) -> Tensor:
    if not t.is_contiguous():
        raise RuntimeError(f"optimizer state {key!r} must be contiguous (it is made so), got strides {t.stride()}")
    return _rows(t)


def scale_shape(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    """The global shape of ``momentum_scale`` for a parameter of ``shape``."""
    if len(shape) >= 4:
        return (shape[0], block_count(math.prod(shape[1:]), block))
    return (*shape[:-1], block_count(shape[-1], block))


def check_state_settings(s: Any, at: str) -> None:
    """``state_dtype`` and ``state_block`` of a settings object: a floating dtype (or its name), ``"int8_block"``
    or ``None``; a name is stored as the dtype. ``is_light`` keeps the momentum in ``p.grad``: no state dtype."""
    dtype = s.state_dtype
    if isinstance(dtype, str) and dtype != INT8_BLOCK:
        named = getattr(torch, dtype, None)
        if not isinstance(named, torch.dtype):
            raise ValueError(
                f"{at}: state_dtype={dtype!r} is invalid; valid: None, a floating torch.dtype or its name "
                f"('bfloat16', 'float16', 'float32', 'float64'), or {INT8_BLOCK!r}"
            )
        object.__setattr__(s, "state_dtype", named)  # frozen settings: normalised once, while being checked
        dtype = named
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise ValueError(
            f"{at}: state_dtype={dtype} is not a floating dtype; for 8-bit state use state_dtype={INT8_BLOCK!r}"
        )
    if not isinstance(s.state_block, int) or isinstance(s.state_block, bool) or s.state_block < 1:
        raise ValueError(f"{at}: state_block={s.state_block!r} must be an int >= 1")
    if dtype is not None and getattr(s, "is_light", False):
        raise ValueError(f"{at}: is_light=True keeps the momentum in p.grad; it takes no state_dtype (got {dtype})")


def check_group_blocks(group: dict[str, Any], state_dtype: torch.dtype | str | None, block: int, at: str) -> None:
    """:func:`check_blocks` for every parameter of a group (``int8_block`` only)."""
    if state_dtype != INT8_BLOCK:
        return
    names = group.get("param_names") or [f"params[{k}]" for k in range(len(group["params"]))]
    for name, p in zip(names, group["params"]):
        check_blocks(p, block, f"{at}: parameter {name!r}")


def check_blocks(p: Tensor, block: int, at: str) -> None:
    """Refuse a layout whose shards would cut a block (the scales of a piece must be whole blocks' scales)."""
    if not isinstance(p, DTensor):
        return
    lay = dtensor_layout(p)
    last = p.dim() - 1
    cut = [pl for pl in lay.placements if pl.is_shard and (pl.dim == last or (p.dim() >= 4 and pl.dim >= 1))]
    if not cut:
        return
    where = f"{at} (shape {tuple(p.shape)}): state_dtype='int8_block' with state_block={block}"
    if p.dim() >= 4:
        raise ValueError(f"{where}: a >= 4-D weight may be sharded on dim 0 only, not as {lay.describe()}")
    s_lay = lay.derive(scale_shape(tuple(p.shape), block), {d: d for d in range(p.dim())})
    n = p.shape[-1]
    axes = [a for a, pl in enumerate(lay.placements) if pl.is_shard and pl.dim == last]
    seen = set()
    for rank in lay.ranks:  # one rank per position along the axes that cut the last dim: the same on every rank
        key = tuple(lay.coord(rank)[a] for a in axes)
        if key in seen:
            continue
        seen.add(key)
        cols = lay.index_lists(rank)[last]
        blocks = s_lay.index_lists(rank)[last]
        want = [j for b in blocks for j in range(b * block, min((b + 1) * block, n))]
        if cols != want:
            raise ValueError(
                f"{where}: its shards over the last dim ({lay.describe()}) cut a block of {block} entries; choose "
                f"a state_block that divides each shard's width (e.g. a divisor of {n // max(1, _shards(lay, last))})"
            )


def _shards(lay: Any, dim: int) -> int:
    return math.prod(n for pl, n in zip(lay.placements, lay.mesh_shape) if pl.is_shard and pl.dim == dim)


def init_momentum(p: Tensor, state_dtype: torch.dtype | str | None, block: int) -> dict[str, Tensor]:
    """The momentum state of ``p`` (zeros) in ``state_dtype`` (module docstring)."""
    if state_dtype == INT8_BLOCK:
        shape = scale_shape(tuple(p.shape), block)
        follows = {0: 0} if p.dim() >= 4 else {d: d for d in range(p.dim())}
        return {
            "momentum_int8": torch.zeros_like(p, dtype=torch.int8, memory_format=torch.contiguous_format),
            "momentum_scale": derived_zeros(p, shape, follows, dtype=torch.float32),
        }
    assert not isinstance(state_dtype, str), state_dtype
    if state_dtype is None:
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}
    # row blocks are views of a contiguous buffer
    return {"momentum_buffer": torch.zeros_like(p, dtype=state_dtype, memory_format=torch.contiguous_format)}


def _span_rows(rows: int, n: int) -> int:
    """Rows of one fused block: about ``CHUNK_BYTES`` of float32."""
    return min(max(rows, 1), max(1, CHUNK_BYTES // (4 * max(n, 1))))


def _spans(rows: int, n: int) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``CHUNK_BYTES`` of float32 each."""
    step = _span_rows(rows, n)
    for r in range(0, rows, step):
        yield r, min(rows, r + step)


class Momentum:
    """One parameter's momentum (this rank's piece) in its state dtype, read and written by row blocks in the
    compute dtype."""

    def __init__(self, state: dict[str, Any], like: Tensor, state_dtype: torch.dtype | str | None, block: int):
        self.block = block
        self.quantized = state_dtype == INT8_BLOCK
        if self.quantized:
            self.q = _state_rows(local_piece(state["momentum_int8"]), "momentum_int8")
            self.scale = _state_rows(local_piece(state["momentum_scale"]), "momentum_scale")
            self.buf = None
        else:
            self.buf = local_piece(state["momentum_buffer"])
            if state_dtype is not None and not self.buf.is_contiguous():
                raise RuntimeError(f"a momentum in state_dtype={state_dtype} must be contiguous (it is made so)")
        #: ``None``: the legacy math, in the stored dtype (``state_dtype=None``)
        self.compute = None if state_dtype is None else torch.promote_types(like.dtype, torch.float32)

    def plain(self, g: Tensor) -> bool:
        """The momentum needs no conversion: the unfused whole-tensor ops are already one pass each."""
        return self.buf is not None and (self.compute is None or self.buf.dtype == self.compute == g.dtype)

    def read(self, r0: int, r1: int, out: Tensor) -> Tensor:
        """Rows ``r0:r1`` of the momentum into ``out`` (compute dtype)."""
        if self.quantized:
            return dequantize_blocks(self.q[r0:r1], self.scale[r0:r1], self.block, out)
        assert self.buf is not None
        return out.copy_(_rows(self.buf)[r0:r1])

    def write(self, r0: int, r1: int, values: Tensor) -> None:
        """Store rows ``r0:r1`` from ``values`` (compute dtype): rounded or quantized once."""
        if self.quantized:
            quantize_blocks(values, self.block, self.q[r0:r1], self.scale[r0:r1])
        else:
            assert self.buf is not None
            _rows(self.buf)[r0:r1].copy_(values)


def direction(g: Tensor, mom: Momentum, beta: float, nesterov: bool, out_dtype: torch.dtype | None = None) -> Tensor:
    """The LMO's input: ``lerp(G, M, beta^2)`` (Nesterov: ``lerp(G, lerp(M, G, 1 - beta), beta)`` in one pass,
    leaving ``M`` as it is) or ``lerp(M, G, 1 - beta)``. Writes nothing of the state.

    ``out_dtype``: the dtype the engine casts the direction to (the spec's ``input_dtype``, bf16 for a bf16
    compute dtype); each block is then rounded into it as it is made, so the full-precision direction is never
    written out and cast again (the same values: one rounding of the same result). ``None``: ``g``'s dtype (the
    momentum buffer's for plain momentum in the legacy state).
    """
    buf = mom.buf
    if mom.plain(g):
        assert buf is not None
        if out_dtype is None or out_dtype == g.dtype or buf.dtype != g.dtype:
            U = g.lerp(buf.to(g.dtype), beta * beta) if nesterov else buf.lerp(g.to(buf.dtype), 1 - beta)
            return U if out_dtype is None else U.to(out_dtype)
        compute: torch.dtype = g.dtype
    else:
        compute = mom.compute or g.dtype
    out = torch.empty(g.shape, dtype=out_dtype or g.dtype, device=g.device)
    G, U = _rows(g), _rows(out)
    B = _rows(buf) if mom.plain(g) and buf is not None else None  # read only: a copy if buf is not contiguous
    rows, n = G.shape
    step = _span_rows(rows, n)
    m = torch.empty((step, n), dtype=compute, device=g.device)
    # the blocks as views made in one call each (``split``): per block, only the ops cross into C++
    Ms = torch.split(B, step) if B is not None else [None] * len(range(0, rows, step))
    for r0, Gc, Uc, Bc in zip(range(0, rows, step), torch.split(G, step), torch.split(U, step), Ms):
        mc = m if Gc.shape[0] == step else m[: Gc.shape[0]]
        Mc = Bc if Bc is not None else mom.read(r0, r0 + Gc.shape[0], mc)
        if not nesterov:
            Uc.copy_(torch.lerp(Mc, Gc.to(compute), 1 - beta, out=mc))
        elif Gc.dtype == compute:
            Uc.copy_(torch.lerp(Gc, Mc, beta * beta, out=mc))  # never in place: Gc is the gradient
        else:
            Uc.copy_(Gc.to(compute).lerp_(Mc, beta * beta))  # .to made a copy: a new dtype
    return out


def write_momentum(g: Tensor, mom: Momentum, beta: float) -> None:
    """``M <- lerp(M, G, 1 - beta)`` in place (the commit), in the compute dtype, stored once."""
    if mom.plain(g) or (mom.compute is None and mom.buf is not None):
        assert mom.buf is not None
        mom.buf.lerp_(g.to(mom.buf.dtype), 1 - beta)
        return
    compute = mom.compute or g.dtype
    G = _rows(g)
    rows, n = G.shape
    m = torch.empty((min(rows, max(1, CHUNK_BYTES // (4 * max(n, 1)))), n), dtype=compute, device=g.device)
    for r0, r1 in _spans(rows, n):
        Mc = mom.read(r0, r1, m[: r1 - r0])
        mom.write(r0, r1, Mc.lerp_(G[r0:r1].to(compute), 1 - beta))


def update_weight(W: Tensor, O: Tensor, decay: float, alpha: float) -> None:
    """``W <- decay W + alpha O`` in place, one read-modify-write of ``W``: bitwise ``W.mul_(decay)`` then
    ``W.add_(O, alpha=alpha)``, block by block while the block is in cache (a narrower ``O`` widened block by
    block into a scratch, as ``add_`` would widen all of it at once; a wider ``O``, e.g. the fp32 result of bf16
    weights, is added as it is: ``add_`` computes in its dtype and rounds once)."""
    if not (W.is_contiguous() and O.is_contiguous() and W.shape == O.shape) or W.numel() == 0:
        if decay != 1:
            W.mul_(decay)
        W.add_(O, alpha=alpha)
        return
    step = max(1024, CHUNK_BYTES // 4 // 1024 * 1024)
    w, o = torch.split(W.view(-1), step), torch.split(O.view(-1), step)
    if torch.promote_types(W.dtype, O.dtype) != W.dtype or O.dtype == W.dtype:
        # the same dtype, or a wider O (a bf16 weight, an fp32 result): add_ computes in the wider dtype and rounds
        # once; a narrowing scratch would round O first (two roundings, not the unfused op's one)
        for wc, oc in zip(w, o):
            if decay != 1:
                wc.mul_(decay)
            wc.add_(oc, alpha=alpha)
        return
    scratch = torch.empty(min(step, W.numel()), dtype=W.dtype, device=W.device)
    for wc, oc in zip(w, o):
        # O widened first: the weight's block is then read and written twice while it is still in cache
        sc = scratch.copy_(oc) if oc.numel() == step else scratch[: oc.numel()].copy_(oc)
        if decay != 1:
            wc.mul_(decay)
        wc.add_(sc, alpha=alpha)


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes of a parameter's momentum state (this rank's pieces)."""
    keys = ("momentum_buffer", "momentum_int8", "momentum_scale")
    return sum(local_piece(state[k]).nbytes for k in keys if k in state)
