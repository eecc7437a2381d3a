"""QK-clip (the clip of MuonClip, Kimi K2, arXiv 2507.20534): cap each attention head's largest logit at ``tau``.

After ``opt.step()``, for every head ``h`` whose largest pre-softmax logit ``S_h`` over the step's batch exceeds
``tau``, the head's query and key weights are scaled so that the same inputs would give at most ``tau``::

    gamma_h = min(1, tau / S_h)
    W_q[h] *= sqrt(gamma_h)      W_k[h] *= sqrt(gamma_h)                              (MHA)
    W_q^C[h] *= sqrt(gamma_h)    W_q^R[h] *= gamma_h    W_k^C[h] *= sqrt(gamma_h)      (MLA; shared W_k^R untouched)

The logit is what the model feeds to softmax: ``softmax_scale * q_h . k_h`` (after rotary embedding), over the
pairs the mask allows (causal: key position <= query position). Every head whose ``S_h <= tau`` is left exactly
as it is.

Three parts:

* :class:`MaxLogitRecorder`: the attention calls ``record_qk(name, q, k, scale=...)`` (or ``record_logits``) on
  each training forward; it keeps a running max per head, without autograd.
* :class:`AttentionHeads`: where one layer's heads live in its weights (rows of ``wq`` / ``wk``, columns of a
  fused Conv1D, GQA, MLA's rotary rows).
* :class:`QKClip`: ``.step()`` reduces the recorded maxima over the mesh dims that split the batch or sequence
  (``max``; DDP, FSDP, HSDP, CP), gathers them over the dims that split the heads (TP: each rank records its own
  heads), and scales only the rows (or columns) each rank holds: no weight moves between ranks.

Recipes that install the recorder and map heads for the training CLI's GPT, HF Llama / GPT-2 and TorchTitan's
llama3 live in :mod:`disco.optim.qkclip_recipes`. See docs/qkclip.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["AttentionHeads", "MaxLogitRecorder", "QKClip", "QKClipSettings", "QKScales", "qk_clip_scales"]

#: mesh dim names that split the batch or the sequence (their maxima are reduced with max) or the heads (gathered)
BATCH_DIM_NAMES = ("dp", "dp_replicate", "dp_shard", "cp", "dp_cp", "dp_shard_cp", "fsdp", "ddp")
HEAD_DIM_NAMES = ("tp",)


@dataclass(frozen=True)
class QKScales:
    """Per-head factors: ``q`` on the query's content rows ``[n_heads]``, ``q_rope`` on MLA's rotary query rows
    ``[n_heads]``, ``k`` on the key's content rows ``[n_kv_heads]``."""

    gamma: Tensor
    q: Tensor
    q_rope: Tensor
    k: Tensor


def qk_clip_scales(max_logits: Tensor, tau: float, n_kv_heads: int | None = None) -> QKScales:
    """The QK-clip factors of one attention layer.

    ``gamma_h = tau / S_h`` where ``S_h > tau``, else 1. Multi-head attention: the query and key rows of head ``h``
    are each scaled by ``sqrt(gamma_h)``, so the head's logits scale by ``gamma_h`` and its largest becomes
    ``tau``. Grouped-query attention (``n_kv_heads < n_heads``; query head ``h`` reads key head
    ``h // (n_heads // n_kv_heads)``, as HF's ``repeat_kv`` and SDPA's ``enable_gqa`` do): key head ``g`` is
    scaled by ``sqrt(min_{h in g} gamma_h)`` and query head ``h`` by ``gamma_h / sqrt(min_{h' in g} gamma_h')``,
    so that every head's logits again scale by exactly ``gamma_h`` (an unclipped head's logits are unchanged).
    MLA's rotary query rows get ``gamma_h`` (the shared rotary key is not scaled).

    Args:
        max_logits: ``[n_heads]`` largest pre-softmax logit of each head over the step's batch.
        tau: the threshold (> 0).
        n_kv_heads: key heads (default: ``n_heads``); must divide ``n_heads``.
    """
    if max_logits.ndim != 1:
        raise ValueError(f"max_logits must be [n_heads], got shape {tuple(max_logits.shape)}")
    s = max_logits.to(torch.float64)
    gamma = torch.where(s > tau, tau / s, torch.ones_like(s))
    h = s.numel()
    kv = h if n_kv_heads is None else n_kv_heads
    if kv < 1 or h % kv:
        raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={h}")
    group_min = gamma.view(kv, h // kv).amin(dim=1)
    k = group_min.sqrt()
    q = gamma / k.repeat_interleave(h // kv)
    return QKScales(gamma=gamma, q=q, q_rope=gamma, k=k)


@dataclass(frozen=True)
class AttentionHeads:
    """Where one attention layer's heads live in its weights.

    Head ``h`` of the query is the ``head_dim + q_rope_dim`` indices starting at ``q_start + h * (head_dim +
    q_rope_dim)`` along ``axis`` of ``q_weight`` (``axis=0``: rows, as ``nn.Linear``; ``axis=1``: columns, as
    HF's ``Conv1D``); its first ``head_dim`` are the content part, the last ``q_rope_dim`` MLA's rotary part. Key
    head ``g`` is the ``head_dim`` indices starting at ``k_start + g * k_stride`` (``k_stride``: ``head_dim``, or
    MLA's ``k_nope + v`` rows per head of ``wkv_b``, whose value rows are left alone). ``q_weight`` and
    ``k_weight`` may be the same fused tensor. ``q_index`` / ``k_index`` (``[n_heads, head_dim + q_rope_dim]`` /
    ``[n_kv_heads, head_dim]`` integer tensors) replace those formulas for interleaved layouts (TorchTitan's fused
    ``wqkv``: per key group its query heads, then its key, then its value). Biases, when the projections have
    them, are scaled like their rows.
    """

    q_weight: Tensor
    k_weight: Tensor
    n_heads: int
    head_dim: int
    n_kv_heads: int = 0  # 0: n_heads
    q_start: int = 0
    k_start: int = 0
    axis: int = 0
    q_rope_dim: int = 0
    k_stride: int = 0  # 0: head_dim
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    q_index: Tensor | None = None
    k_index: Tensor | None = None

    def indices(self) -> tuple[Tensor, Tensor]:
        """``[n_heads, head_dim + q_rope_dim]`` query and ``[n_kv_heads, head_dim]`` key indices along ``axis``."""
        d, r = self.head_dim, self.q_rope_dim
        q = self.q_index
        if q is None:
            q = self.q_start + torch.arange(self.n_heads)[:, None] * (d + r) + torch.arange(d + r)
        k = self.k_index
        if k is None:
            k = self.k_start + torch.arange(self.kv_heads)[:, None] * (self.k_stride or d) + torch.arange(d)
        return q, k

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def check(self, name: str) -> None:
        """Raise ``ValueError`` naming the layer, the tensor and its shape when the heads do not fit."""
        if self.n_heads < 1 or self.head_dim < 1 or self.n_heads % self.kv_heads:
            raise ValueError(f"{name}: n_heads={self.n_heads}, n_kv_heads={self.kv_heads}, head_dim={self.head_dim}")
        if self.axis not in (0, 1):
            raise ValueError(f"{name}: axis must be 0 (rows) or 1 (columns), got {self.axis}")
        q_idx, k_idx = self.indices()
        if tuple(q_idx.shape) != (self.n_heads, self.head_dim + self.q_rope_dim):
            raise ValueError(f"{name}: q_index has shape {tuple(q_idx.shape)}")
        if tuple(k_idx.shape) != (self.kv_heads, self.head_dim):
            raise ValueError(f"{name}: k_index has shape {tuple(k_idx.shape)}")
        for what, t, idx in (("q", self.q_weight, q_idx), ("k", self.k_weight, k_idx)):
            end = int(idx.max()) + 1
            if t.ndim != 2 or t.shape[self.axis] < end or int(idx.min()) < 0:
                raise ValueError(
                    f"{name}: {what} weight of shape {tuple(t.shape)}{_mesh_of(t)} has no room for its heads along"
                    f" axis {self.axis} (needs {end})"
                )
        if self.q_weight is self.k_weight and torch.isin(q_idx, k_idx).any():
            raise ValueError(
                f"{name}: the query and key heads overlap in the fused weight {tuple(self.q_weight.shape)}"
            )
        for what, b, w in (("q", self.q_bias, self.q_weight), ("k", self.k_bias, self.k_weight)):
            if b is not None and (b.ndim != 1 or b.shape[0] != w.shape[self.axis]):
                raise ValueError(f"{name}: {what} bias of shape {tuple(b.shape)} does not match {tuple(w.shape)}")

    def factors(self, scales: QKScales) -> list[tuple[Tensor, int, Tensor]]:
        """``(tensor, axis, factor)`` for each weight / bias, ``factor`` over the whole ``tensor.shape[axis]``."""
        d, r = self.head_dim, self.q_rope_dim
        per_q = torch.cat([scales.q[:, None].expand(-1, d), scales.q_rope[:, None].expand(-1, r)], dim=1)
        per_k = scales.k[:, None].expand(-1, d)
        q_idx, k_idx = self.indices()
        out: dict[int, tuple[Tensor, int, Tensor]] = {}
        for w, b, idx, block in (
            (self.q_weight, self.q_bias, q_idx, per_q),
            (self.k_weight, self.k_bias, k_idx, per_k),
        ):
            for t, axis in ((w, self.axis), (b, 0)):
                if t is not None:
                    ones = torch.ones(t.shape[axis], dtype=torch.float64, device=block.device)
                    entry = out.setdefault(id(t), (t, axis, ones))
                    entry[2][idx.flatten().to(block.device)] *= block.flatten()
        return list(out.values())


def _mesh_of(t: Tensor) -> str:
    from torch.distributed.tensor import DTensor

    return f" on mesh {t.device_mesh} {tuple(t.placements)}" if isinstance(t, DTensor) else ""


def _local_indices(t: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """The local tensor of ``t`` (sharing its storage) and the global indices along ``axis`` that it holds.

    For a DTensor the indices are found by sharding ``arange`` exactly like ``t`` (``Shard(axis)`` and
    ``_StridedShard(axis)`` kept, shards of other dims replicated): it uses the same chunking as ``t`` itself.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(t, DTensor):
        return t, torch.arange(t.shape[axis], device=t.device)
    placements: list[Any] = []
    for p in t.placements:
        if isinstance(p, (Shard, _StridedShard)):
            if p.dim % t.ndim != axis:
                placements.append(Replicate())
            elif isinstance(p, _StridedShard):  # FSDP over TP: a shard of the TP shard (not a Shard subclass)
                placements.append(_StridedShard(0, split_factor=p.split_factor))
            else:
                placements.append(Shard(0))
        elif p.is_replicate():
            placements.append(Replicate())
        else:
            raise ValueError(f"QK-clip cannot scale a weight of shape {tuple(t.shape)}{_mesh_of(t)}: placement {p}")
    local = t.to_local()
    ids = torch.arange(t.shape[axis], device=local.device)
    return local, distribute_tensor(ids, t.device_mesh, placements, src_data_rank=None).to_local()


@torch.no_grad()
def _scale(t: Tensor, axis: int, factor: Tensor) -> None:
    """Multiply ``t`` in place by ``factor`` along ``axis``, touching only the local part of a DTensor."""
    local, ids = _local_indices(t, axis)
    f = factor.to(local.device)[ids]
    shape = [1] * local.ndim
    shape[axis] = -1
    if local.dtype in (torch.float32, torch.float64):
        local.mul_(f.to(local.dtype).view(shape))
    else:  # low precision: multiply in fp32, round once
        local.copy_(local.float() * f.float().view(shape))


_BLOCK_ELEMENTS = 1 << 24  # logits computed at once by record_qk (64 MiB in fp32)


class MaxLogitRecorder:
    """A running max per head of each attention layer's pre-softmax logits, kept without autograd.

    The attention calls :meth:`record_qk` (or :meth:`record_logits`) on each training forward with a layer name;
    :class:`QKClip` reads and resets it after each step. Under gradient accumulation the max runs over every
    micro-batch; activation recomputation records the same values twice, which does not change a max.
    """

    def __init__(self) -> None:
        self._max: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self._max)

    def reset(self) -> None:
        self._max = {}

    def maxima(self) -> dict[str, Tensor]:
        """Layer name -> ``[heads]`` float32, as recorded on this rank (no communication)."""
        return dict(self._max)

    @torch.no_grad()
    def record_logits(self, name: str, logits: Tensor, head_dim: int = 1) -> None:
        """``logits``: what the layer feeds to softmax (scale applied, masked entries ``-inf``), heads on
        ``head_dim`` (``[B, H, Tq, Tk]`` by default)."""
        x = _plain(logits, name).detach().float().transpose(0, head_dim)
        self._update(name, x.reshape(x.shape[0], -1).amax(dim=1))

    @torch.no_grad()
    def record_qk(
        self,
        name: str,
        q: Tensor,
        k: Tensor,
        *,
        scale: float,
        causal: bool = True,
        q_offset: int = 0,
        k_offset: int = 0,
        layout: str = "bhtd",
        mask: Tensor | None = None,
    ) -> None:
        """Record ``max over (b, i, j allowed) of scale * q[b, h, i] . k[b, g(h), j]`` for each query head ``h``.

        Args:
            q: queries after rotary embedding, ``[B, H, Tq, D]`` (``layout="bhtd"``) or ``[B, Tq, H, D]`` ("bthd").
            k: keys, ``[B, Hkv, Tk, D]`` (or "bthd"); ``Hkv`` must divide ``H`` (query head ``h`` reads key head
                ``h // (H // Hkv)``).
            scale: the softmax scale the layer uses (``1 / sqrt(D)`` for SDPA's default).
            causal: only keys at positions ``<= `` the query's count; positions are ``q_offset + i`` and
                ``k_offset + j`` (context parallelism: the chunk's place in the sequence).
            mask: optional boolean ``[B or 1, 1 or H, Tq, Tk]``, True where attention is allowed (with ``causal``).
        """
        if layout not in ("bhtd", "bthd"):
            raise ValueError(f"layout must be 'bhtd' or 'bthd', got {layout!r}")
        q, k = _plain(q, name).detach(), _plain(k, name).detach()
        if layout == "bthd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        if k.shape[0] != B or k.shape[3] != D or H % Hkv:
            raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} do not match ({layout})")
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
        if causal:
            pos_q = q_offset + torch.arange(Tq, device=q.device)
            allowed = (k_offset + torch.arange(Tk, device=q.device))[None, :] <= pos_q[:, None]
        best = torch.full((H,), -math.inf, dtype=dtype, device=q.device)
        rows = max(1, _BLOCK_ELEMENTS // (H * Tk))  # query rows per block: bounded memory at long context
        for b in range(B):
            kb = k[b].to(dtype)
            for i in range(0, Tq, rows):
                qb = q[b, :, i : i + rows].to(dtype)
                n = qb.shape[1]
                s = torch.einsum("grid,gjd->grij", qb.reshape(Hkv, H // Hkv, n, D), kb).reshape(H, n, Tk) * scale
                ok = allowed[i : i + rows]
                if mask is not None:
                    ok = ok & mask[b if mask.shape[0] > 1 else 0][..., i : i + rows, :]
                best = torch.maximum(best, s.masked_fill(~ok, -math.inf).reshape(H, -1).amax(dim=1))
        self._update(name, best.float())

    def _update(self, name: str, per_head: Tensor) -> None:
        old = self._max.get(name)
        if old is not None and old.shape != per_head.shape:
            raise ValueError(f"{name}: recorded {old.numel()} heads before, now {per_head.numel()}")
        self._max[name] = per_head if old is None else torch.maximum(old, per_head)


def _plain(t: Tensor, name: str) -> Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        raise TypeError(f"{name}: record the local tensors (to_local()), got a DTensor{_mesh_of(t)}")
    return t


@dataclass(frozen=True)
class QKClipSettings:
    """``tau``: the logit cap (Kimi K2 uses 100). ``batch_dims``: mesh dims that split the batch or the sequence
    (None: every dim named in ``BATCH_DIM_NAMES``); ``head_dims``: mesh dims that split the heads (None: those
    named in ``HEAD_DIM_NAMES``). A mesh dim in neither is refused: its meaning cannot be guessed."""

    tau: float
    batch_dims: tuple[str, ...] | None = None
    head_dims: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        ok = isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool)
        if not ok or not math.isfinite(self.tau) or self.tau <= 0:
            raise ValueError(f"QKClip: tau must be a finite number > 0, got {self.tau!r}")

    def dims(self, mesh: DeviceMesh | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The mesh's batch dims and head dims, or ValueError naming the dim that is neither."""
        names = tuple(mesh.mesh_dim_names or ()) if mesh is not None else ()
        if mesh is not None and mesh.ndim and not names:
            raise ValueError(f"QKClip needs a mesh with named dims, got {mesh}")
        heads = self.head_dims if self.head_dims is not None else tuple(n for n in names if n in HEAD_DIM_NAMES)
        batch = self.batch_dims
        if batch is None:
            batch = tuple(n for n in names if n in BATCH_DIM_NAMES and n not in heads)
        for n in (*batch, *heads):
            if n not in names:
                raise ValueError(f"QKClip: mesh dim {n!r} is not in the mesh {names}")
        unknown = [n for n in names if n not in batch and n not in heads]
        if unknown:
            raise ValueError(
                f"QKClip: mesh dim(s) {unknown} of mesh {names} neither split the batch/sequence nor the heads;"
                " pass batch_dims= and head_dims= explicitly"
            )
        return batch, heads


class QKClip:
    """Apply QK-clip after each optimizer step: ``opt.step(); clip.step()``.

    Args:
        heads: a model that a recipe of :mod:`disco.optim.qkclip_recipes` knows (the training CLI's GPT, HF Llama /
            GPT-2, TorchTitan llama3: the recorder is installed on it), or a mapping ``layer name ->
            AttentionHeads`` whose attention calls ``recorder`` with the same names.
        tau: the logit cap.
        recorder: the recorder the attention calls (a new one when ``heads`` is a model).
        mesh: the device mesh of the run (None: one process). Recorded maxima are reduced with ``max`` over
            ``batch_dims`` and gathered over ``head_dims`` (see :class:`QKClipSettings`).
        batch_dims, head_dims: override the defaults read from the mesh dim names.
    """

    def __init__(
        self,
        heads: nn.Module | Mapping[str, AttentionHeads],
        tau: float,
        recorder: MaxLogitRecorder | None = None,
        *,
        mesh: DeviceMesh | None = None,
        batch_dims: Sequence[str] | None = None,
        head_dims: Sequence[str] | None = None,
    ) -> None:
        self.settings = QKClipSettings(
            float(tau) if isinstance(tau, int) else tau,
            None if batch_dims is None else tuple(batch_dims),
            None if head_dims is None else tuple(head_dims),
        )
        self.recorder = recorder if recorder is not None else MaxLogitRecorder()
        if isinstance(heads, nn.Module):
            from disco.optim.qkclip_recipes import install

            heads = install(heads, self.recorder)
        if not heads:
            raise ValueError("QKClip: no attention layers to clip")
        for name, h in heads.items():
            h.check(name)
        self.heads = dict(heads)
        self.mesh = mesh
        if mesh is None and _world_size() > 1:
            raise ValueError(
                "QKClip on several ranks needs mesh= (the ranks' maxima are reduced over its batch dims); ranks"
                " that share no data (pipeline stages) pass a mesh with batch_dims=() and head_dims=()"
            )
        self.batch_dims, self.head_dims = self.settings.dims(mesh)
        self.last_max_logits: dict[str, Tensor] = {}

    @property
    def tau(self) -> float:
        return self.settings.tau

    def max_logits(self) -> dict[str, Tensor]:
        """The recorded maxima of every layer, ``[n_heads]`` float32, identical on every rank (collective)."""
        local = self.recorder.maxima()
        missing = sorted(set(self.heads) - set(local))
        if missing:
            raise RuntimeError(
                f"QKClip: no logits recorded for {missing[:3]}{'...' if len(missing) > 3 else ''}; the attention"
                " must call the recorder in each training forward (model.train()) before clip.step()"
            )
        names = sorted(self.heads)
        sizes = [local[n].numel() for n in names]
        rows = _reduce(torch.cat([local[n] for n in names]), self.mesh, self.batch_dims, self.head_dims)
        out = {}
        for name, part in zip(names, torch.split(rows, sizes, dim=1), strict=True):
            full = part.reshape(-1)  # ranks of the head dim hold consecutive heads (Shard(0) chunks, rank order)
            if full.numel() != self.heads[name].n_heads:
                raise ValueError(
                    f"QKClip: {name} has {self.heads[name].n_heads} heads, recorded {full.numel()} (after gathering"
                    f" over the head dims {self.head_dims} of mesh {self.mesh})"
                )
            out[name] = full
        return out

    @torch.no_grad()
    def step(self) -> dict[str, Tensor]:
        """Reduce the recorded maxima, scale the heads over ``tau``, reset the recorder; return the maxima."""
        maxima = self.max_logits()
        for name, s in maxima.items():
            spec = self.heads[name]
            # unclipped heads are multiplied by exactly 1.0 (no change): no host sync to skip them
            for t, axis, f in spec.factors(qk_clip_scales(s, self.tau, spec.kv_heads)):
                _scale(t, axis, f)
        self.recorder.reset()
        self.last_max_logits = maxima
        return maxima

    def summary(self) -> dict[str, Any]:
        """For logging after :meth:`step` (the maxima of the step's forward, before its clip): ``max_logit``,
        ``clipped_heads`` (how many were over ``tau``) and ``max_logit_layers`` (each layer's largest)."""
        if not self.last_max_logits:
            return {}
        names = sorted(self.last_max_logits)
        per_layer = torch.stack([self.last_max_logits[n].max() for n in names]).tolist()  # one host sync
        clipped = sum(int((v > self.tau).sum()) for v in self.last_max_logits.values())
        return {
            "max_logit": max(per_layer),
            "clipped_heads": clipped,
            "max_logit_layers": dict(zip(names, per_layer, strict=True)),
        }


def _reduce(flat: Tensor, mesh: DeviceMesh | None, batch: tuple[str, ...], heads: tuple[str, ...]) -> Tensor:
    """``max`` over each batch dim, then every rank's vector of the head dim stacked in rank order: ``[ranks, n]``.

    Each collective is preceded by a size check over the same group so that a rank that recorded other layers
    raises on every rank instead of hanging or mixing heads.
    """
    if mesh is None:
        return flat[None]
    import torch.distributed as dist

    if len(heads) > 1:
        raise ValueError(f"QKClip: at most one mesh dim may split the heads, got {heads}")
    for dim in batch:
        group = mesh.get_group(dim)
        _same_size(flat, group, dim)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    if not heads:
        return flat[None]
    group = mesh.get_group(heads[0])
    _same_size(flat, group, heads[0])
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, flat, group=group)
    return torch.stack(parts)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _same_size(flat: Tensor, group: Any, dim: str) -> None:
    import torch.distributed as dist

    n = torch.tensor([flat.numel(), -flat.numel()], dtype=torch.int64, device=flat.device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
    if int(n[0]) != -int(n[1]):
        raise RuntimeError(f"QKClip: ranks of mesh dim {dim!r} recorded different numbers of heads ({n.tolist()})")
