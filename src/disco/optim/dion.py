"""Dion: low-rank orthonormalized updates with error feedback (Ahn et al., arXiv 2504.05295, Algorithms 1 and 3).

Composed from the engine's movements only; no whole matrix is ever gathered. The power iteration runs on
``A = B^T`` (``orientation="columns"``, the default: ``P`` spans the weight's columns) or on ``A = B``
(``orientation="rows"``: the paper's Algorithm 1 as written). The orientation is a setting, the same for every
layout, never read from the sharding: every layout computes the same math as one process. With ``A`` of shape
``(a, c)``, its dim ``a`` sharded over some axes and ``c`` over others::

    B = M + G                                     # local ([G <- mean over replicas]: see below)
    P = A Q                                       # P: (a/.., r), a Partial sum over the axes sharding c
    [P <- mean over replicas]                     # compressed sync: (a r) numbers, not (m n)
    P = orthonormalize(P)                         # map: reduced to one owner, returned to the holders
    (power_iters > 1: R = A^T P, all_reduce(over=a); P = A R; orthonormalize again)
    R = A^T P;  all_reduce(R, over=a)             # R: (c/.., r)
    [R <- mean over replicas]
    M = B - (1 - mu) (P R^T as B)                 # local: error feedback
    Q = R / ||R||_col;  all_reduce(||R||^2, over=c)
    X = (1 - lr wd) X - lr sqrt(m / n) (P Q^T as B)

Why ``"columns"``: FSDP (and column-parallel TP) shard a weight's rows. With ``P`` on the column side, the rows of
``R = B P`` are local and ``P`` (``n x r``) is only reduced and handed back, where the row side would gather ``P``'s
``m r`` to an owner *and* all-reduce ``R`` (``n r``). Compressed data-parallel sync averages ``P`` and ``R``
(``(m + n) r`` numbers) only where that is less than the gradient (``(m + n) r < m n``); else the gradient itself is
averaged over the replicas (``m n``) and nothing else crosses them.

``Q`` is state of shape ``(..., c, r)`` laid out like the weight's dim ``c`` (``disco.distributed.state``), so DCP
saves and reshards it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ..distributed.config import DistributedConfig, create_auto_config, create_dtensor_config
from ..distributed.engine import Engine, Job, local_piece
from ..distributed.layout import PARTIAL, REPLICATE, Layout, Placement
from ..distributed.state import derived_zeros
from ..ops.dion import QR_METHODS, OrthonormalizeSpec, column_normalize, dion_rank
from . import validation
from .base import SpectralOptimizer
from .contract import Group, Rule, Settings, check_choice, check_range, register_rule
from .rules import Commit, Item, StepContext


@dataclass(frozen=True)
class DionMixedPrecisionConfig:
    """State dtypes (``None``: the parameter's): ``momentum_dtype`` for ``M``, ``Q_dtype`` for ``Q``."""

    momentum_dtype: torch.dtype | None = None
    Q_dtype: torch.dtype | None = None


def _dims(p: Tensor) -> tuple[int, int]:
    """(row dim, column dim) of the matrices of ``p``: 2-D ``(m, n)``, 3-D experts ``(E, m, n)``, conv flattened."""
    return (1, 2) if p.dim() == 3 else (0, 1)


def _matrix(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 4 else t


def _mn(p: Tensor) -> tuple[int, int]:
    shape = _matrix(torch.empty(p.shape, device="meta")).shape
    return int(shape[-2]), int(shape[-1])


ORIENTATIONS = ("columns", "rows")


def sides(p: Tensor, orientation: str) -> tuple[int, int]:
    """``(a, c)``: the dim of ``p`` whose side ``P`` spans (``A``'s rows) and the other one (``A``'s columns).

    From the orientation only, never from the sharding. Conv weights are ``out x (in*k*k)``: their column side is
    ``c = 1`` standing for the flattened dims.
    """
    md, nd = _dims(p)
    return (nd, md) if orientation == "columns" else (md, nd)


def p_layout(lay: Layout, r: int, a: int, c: int, a_size: int, over_replicas: bool = False) -> Layout:
    """The layout of ``P = A Q``: ``(*batch, a_size, r)``, rows sharded like dim ``a``, Partial over the axes that
    shard dim ``c`` (or, for conv weights, any flattened column dim), and over the replica axes too when
    ``over_replicas`` (compressed sync: each replica's piece is its ``P`` over the replica count)."""
    row = min(a, c)  # P's row dim sits after the batch dims
    placements: list[Placement] = []
    for pl in lay.placements:
        if not pl.is_shard:
            placements.append(PARTIAL if over_replicas and pl.kind == "replicate" else REPLICATE)
        elif pl.dim < row:
            placements.append(pl)  # a batch (expert) dim
        elif pl.dim == a:
            placements.append(Placement(pl.kind, row, pl.split_factor))
        else:
            placements.append(PARTIAL)
    return lay.with_placements(placements, shape=(*lay.shape[:row], a_size, r))


@dataclass(frozen=True)
class DionSettings(Settings):
    """The settings of a ``dion`` group (module docstring; ``Dion``'s docstring has the defaults' meaning).

    Attributes:
        mu: momentum in ``[0, 1)``. Default ``0.95``.
        rank_fraction: ``r / min(m, n)`` in ``(0, 1]``. Default ``1.0``.
        rank_multiple_of: round ``r`` up to this, an int ``>= 1``. Default ``1``.
        power_iters: power iterations per step, an int ``>= 1``. Default ``1``.
        qr_method: ``"rcqr"`` (default), ``"cqr"`` or ``"qr"``.
        cqr_warmup_steps: ``"cqr"`` uses Householder QR for this parameter's first steps, an int ``>= 0``.
            Default ``150``.
        rcqr_oversample: sketch rows per column, ``>= 1``. Default ``1.25``.
        epsilon: added to the column norms of ``R``, ``>= 0``. Default ``1e-8``.
        replicate_mesh_grad_sync: sync over the replicas in the optimizer: ``P`` and ``R`` averaged where
            ``(m + n) r < m n``, else the gradient. Default ``True``.
        orientation: ``"columns"`` (default: ``P`` spans the weight's columns) or ``"rows"`` (``P = B Q``).
        momentum_dtype, Q_dtype: state dtypes (``None``: the parameter's). Default ``None``. ``state_dtype`` is
            another name of ``momentum_dtype`` (as for the LMO rules); ``B = M + G`` is computed in the wider of
            the two dtypes, so a bf16 momentum only rounds when it is stored.
    """

    aliases: ClassVar[Mapping[str, str]] = {"state_dtype": "momentum_dtype"}

    mu: float = 0.95
    rank_fraction: float = 1.0
    rank_multiple_of: int = 1
    power_iters: int = 1
    qr_method: str = "rcqr"
    cqr_warmup_steps: int = 150
    rcqr_oversample: float = 1.25
    epsilon: float = 1e-8
    replicate_mesh_grad_sync: bool = True
    orientation: str = "columns"
    momentum_dtype: torch.dtype | None = None
    Q_dtype: torch.dtype | None = None

    def check(self, at: str) -> None:
        super().check(at)
        check_range(self, "mu", at, lo=0.0, hi=1.0, hi_open=True)
        check_range(self, "rank_fraction", at, lo=1e-9, hi=1.0)
        check_range(self, "epsilon", at, lo=0.0)
        check_range(self, "rcqr_oversample", at, lo=1.0)
        for key in ("power_iters", "rank_multiple_of"):
            if getattr(self, key) < 1:
                raise ValueError(f"{at}: {key}={getattr(self, key)!r} must be an int >= 1")
        if self.cqr_warmup_steps < 0:
            raise ValueError(f"{at}: cqr_warmup_steps={self.cqr_warmup_steps!r} must be an int >= 0")
        check_choice(self, "qr_method", at, QR_METHODS)
        check_choice(self, "orientation", at, ORIENTATIONS)


@register_rule
class DionRule(Rule):
    """The ``dion`` algorithm (see the module docstring). Settings: :class:`DionSettings`. State per parameter:
    ``momentum_buffer``, ``Q`` and ``step`` (the steps it took: ``cqr``'s warm-up counts them)."""

    algorithms = ("dion",)
    settings = DionSettings
    runs_ahead = True

    def __init__(self) -> None:
        self._filled: set[int] = set()

    def check_group(self, group: Group, settings: Settings, at: str) -> None:
        validation.check_matrices(group, at, "Dion")

    @staticmethod
    def rank(s: DionSettings, p: Tensor) -> int:
        m, n = _mn(p)
        return dion_rank(m, n, s.rank_fraction, s.rank_multiple_of)

    def init_state(self, settings: Settings, p: Tensor) -> dict[str, Any]:
        assert isinstance(settings, DionSettings)
        r = self.rank(settings, p)
        q_shape, follows = _q_shape(p, settings.orientation, r)
        q_dtype = settings.Q_dtype or p.dtype
        if follows is not None:
            Q = derived_zeros(p, q_shape, follows, dtype=q_dtype)
        else:  # conv's flattened input dims, never sharded (checked in bind)
            Q = torch.zeros(q_shape, dtype=q_dtype, device=p.device)
        M = torch.zeros_like(p, memory_format=torch.preserve_format, dtype=settings.momentum_dtype or p.dtype)
        return {"momentum_buffer": M, "Q": Q, "step": torch.zeros((), dtype=torch.float32)}

    def bind(self, engine: Engine, items: Sequence[Item], ctx: StepContext) -> None:
        """Fill each new ``Q`` with the seeded start (the same full matrix on every rank, this rank's piece)."""
        for it in items:
            if id(it.param) in self._filled:
                continue
            state = ctx.state_of(it.param)
            p, Q = it.param, state["Q"]
            _, follows = _q_shape(p, it.settings_as(DionSettings).orientation, Q.shape[-1])
            lay = engine.layout(it.index) if engine.has_layouts else None
            if lay is not None and p.dim() >= 4 and any(pl.is_shard and pl.dim >= 1 for pl in lay.placements):
                raise ValueError(
                    f"parameter {validation.describe(it.name, p)}: Dion flattens conv weights to out x (in*k*k); "
                    f"they may be sharded on dim 0 only, not as {lay.describe()}"
                )
            full = _q_start(tuple(Q.shape), Q.dtype)
            if lay is not None and follows is not None:
                q_lay = lay.derive(tuple(Q.shape), follows)
                idx = q_lay.index_lists(engine.current_rank)
                piece = full[torch.meshgrid(*[torch.tensor(i, dtype=torch.long) for i in idx], indexing="ij")]
                if not isinstance(Q, DTensor) and tuple(piece.shape) != tuple(Q.shape):
                    state["Q"] = Q = piece.clone()  # a plain piece of a sharded plain tensor
                local_piece(Q).copy_(piece)
            else:
                local_piece(Q).copy_(full)
            self._filled.add(id(it.param))

    def compute(self, items: Sequence[Item], ctx: StepContext) -> Commit:
        engine = ctx.engine
        settings = [it.settings_as(DionSettings) for it in items]
        lays = [engine.layout(it.index) for it in items]
        dims = [sides(it.param, s.orientation) for it, s in zip(items, settings)]
        flip = [s.orientation == "columns" for s in settings]
        Q = [local_piece(ctx.state_of(it.param)["Q"]) for it in items]
        # compressed sync where P and R are fewer numbers than the gradient; else the gradient is averaged
        sync = [
            s.replicate_mesh_grad_sync and compresses(it.param, q.shape[-1]) for it, s, q in zip(items, settings, Q)
        ]
        grads = [ctx.grad_of(it.param) for it in items]
        full = [
            k
            for k, s in enumerate(settings)
            if s.replicate_mesh_grad_sync
            and not sync[k]
            and math.prod(lays[k].mesh_shape[a] for a in lays[k].replica_axes()) > 1
        ]
        if full:
            mean = [grads[k].clone() for k in full]  # never averaged in place: the gradient is the caller's
            engine.all_reduce(mean, [lays[k] for k in full], over="replicas", op="avg")
            for k, g in zip(full, mean):
                grads[k] = g
        B = []
        for it, g in zip(items, grads):
            M = local_piece(ctx.state_of(it.param)["momentum_buffer"])
            wide = torch.promote_types(M.dtype, g.dtype)  # a narrower stored momentum is widened, never G
            B.append(_matrix(M.to(wide) + g.to(wide)))
        A = [b.mT if f else b for b, f in zip(B, flip)]  # the power iteration's matrix (a view)
        Q = [q.to(b.dtype) for q, b in zip(Q, B)]
        specs = [self._spec(s, ctx.state_of(it.param)) for it, s in zip(items, settings)]
        p_lays = [
            p_layout(lay, q.shape[-1], a, c, _mn(it.param)[1 if f else 0], over_replicas=y)
            for it, lay, q, (a, c), f, y in zip(items, lays, Q, dims, flip, sync)
        ]
        # compressed sync: P's mean over the replicas is reduced to its owner with the Partial sum over the shards,
        # the orthonormal P returned to every holder (no all-reduce of P and then a broadcast of the result)
        replicas = [math.prod(lay.mesh_shape[x] for x in lay.replica_axes()) if y else 1 for lay, y in zip(lays, sync)]
        P = [x @ q for x, q in zip(A, Q)]  # P: (a/.., r), Partial over the axes sharding c
        iters = [s.power_iters for s in settings]
        for it_round in range(max(iters)):
            # each parameter runs its own group's count (the same subset on every rank: items are agreed)
            on = [k for k, n in enumerate(iters) if n > it_round]
            if it_round:  # another power iteration: P = B (B^T P)
                sub = self._reduce_rows(
                    [A[k].mT @ P[k] for k in on], [lays[k] for k in on], [dims[k] for k in on], engine
                )
                for k, r in zip(on, sub):
                    P[k] = A[k] @ r
            on_P = [P[k] / replicas[k] if replicas[k] > 1 else P[k] for k in on]
            jobs = [Job(items[k].index, p, specs[k], p_lays[k]) for k, p in zip(on, on_P)]
            for k, p in zip(on, engine.map(jobs, out="input")):
                P[k] = p  # P: (a/.., r), orthonormal columns of the whole P
        R = self._reduce_rows([x.mT @ p for x, p in zip(A, P)], lays, dims, engine)  # R: (c/.., r)
        self._replica_mean(R, lays, sync, engine)
        sq = [r.pow(2).sum(dim=-2, keepdim=True) for r in R]  # column norms: partial sums over the rows of R
        self._reduce_cols(sq, lays, dims, engine)
        eps = [s.epsilon for s in settings]
        Q_new = [r / (s.sqrt() + e) for r, s, e in zip(R, sq, eps)]

        def commit() -> list[Tensor]:
            updates = []
            for it, s, b, p, r, q, f in zip(items, settings, B, P, R, Q_new, flip):
                m, n = _mn(it.param)
                state = ctx.state_of(it.param)
                M = local_piece(state["momentum_buffer"])
                pr = r @ p.mT if f else p @ r.mT  # P R^T of A, as B
                M.copy_((b - (1 - s.mu) * pr).reshape(M.shape))  # error feedback
                local_piece(state["Q"]).copy_(q)
                X = local_piece(it.param)
                pq = q @ p.mT if f else p @ q.mT
                update = (math.sqrt(m / n) * pq).reshape(X.shape)
                if s.weight_decay:
                    X.mul_(1 - s.lr * s.weight_decay)
                X.add_(update.to(X.dtype), alpha=-s.lr)
                state["step"] += 1
                updates.append(update)
            return updates

        return commit

    @staticmethod
    def _spec(s: DionSettings, state: dict[str, Any]) -> OrthonormalizeSpec:
        method = s.qr_method
        if method == "cqr" and float(state["step"]) < s.cqr_warmup_steps:
            method = "qr"  # early P are ill-conditioned: Householder until the warmup ends
        return OrthonormalizeSpec(method, s.rcqr_oversample)

    @staticmethod
    def _reduce_rows(
        parts: list[Tensor], lays: list[Layout], dims: list[tuple[int, int]], engine: Engine
    ) -> list[Tensor]:
        """``B^T P`` pieces summed over the axes that shard the rows (``md``)."""
        by_dim: dict[int, list[int]] = {}
        for k, (md, _) in enumerate(dims):
            by_dim.setdefault(md, []).append(k)
        for md, ks in by_dim.items():
            engine.all_reduce([parts[k] for k in ks], [lays[k] for k in ks], over=md, op="sum")
        return parts

    @staticmethod
    def _reduce_cols(parts: list[Tensor], lays: list[Layout], dims: list[tuple[int, int]], engine: Engine) -> None:
        by_dim: dict[int, list[int]] = {}
        for k, (_, nd) in enumerate(dims):
            by_dim.setdefault(nd, []).append(k)
        for nd, ks in by_dim.items():
            engine.all_reduce([parts[k] for k in ks], [lays[k] for k in ks], over=nd, op="sum")

    @staticmethod
    def _replica_mean(parts: list[Tensor], lays: list[Layout], sync: list[bool], engine: Engine) -> None:
        ks = [k for k, s in enumerate(sync) if s]
        if ks:
            engine.all_reduce([parts[k] for k in ks], [lays[k] for k in ks], over="replicas", op="avg")


def compresses(p: Tensor, r: int) -> bool:
    """Whether averaging ``P`` and ``R`` (``(m + n) r`` numbers per matrix) moves less than the gradient (``m n``)."""
    m, n = _mn(p)
    return (m + n) * r < m * n


def _q_shape(p: Tensor, orientation: str, r: int) -> tuple[tuple[int, ...], dict[int, int] | None]:
    """``Q``'s global shape ``(*batch, c_size, r)`` and ``{Q dim: p dim}`` it is laid out by (``None``: conv's
    flattened input dims, never sharded)."""
    m, n = _mn(p)
    c = sides(p, orientation)[1]
    c_size = m if orientation == "columns" else n
    shape = (*p.shape[:-2], c_size, r) if p.dim() == 3 else (c_size, r)
    if p.dim() >= 4 and c != 0:
        return shape, None
    return shape, {len(shape) - 2: c, **({0: 0} if p.dim() == 3 else {})}


def _q_start(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The seeded start of ``Q``: Gaussian, columns of unit norm; the same on every rank."""
    gen = torch.Generator().manual_seed(20250407)
    return column_normalize(torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def _ranks_of(mesh: Any) -> list[int]:
    """The ranks of a 1-D (or flattened) ``DeviceMesh`` or a process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(mesh, DeviceMesh):
        return sorted(int(r) for r in mesh.mesh.flatten().tolist())
    return sorted(dist.get_process_group_ranks(mesh))


def _group_of(mesh: Any) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(f"Dion's meshes are 1-D (or flattened); got a {mesh.ndim}-D mesh {mesh.mesh.tolist()}")
        return mesh.get_group()
    return mesh


class Dion(SpectralOptimizer):
    r"""Dion (Ahn et al., arXiv 2504.05295): rank-``r`` orthonormalized updates with error feedback.

    .. math::
        B = M + G,\quad P = \mathrm{orth}(B Q),\quad R = B^\top P,\quad M \leftarrow B - (1-\mu) P R^\top,\quad
        Q \leftarrow \mathrm{colnorm}(R),\quad X \leftarrow (1 - \eta\lambda) X - \eta \sqrt{m/n}\, P Q^\top

    with ``r = rank_fraction * min(m, n)`` (rounded up to ``rank_multiple_of``). Groups choose ``algorithm`` among
    ``"dion"`` (the default), ``"muon"`` (``disco.Muon``'s rule, momentum ``mu``), ``"lion"`` and ``"adamw"``
    (``betas``, ``epsilon``).

    Args:
        params: parameters or groups.
        replicate_mesh, outer_shard_mesh, inner_shard_mesh: 1-D (or flattened) ``DeviceMesh``es or process
            groups of the data-parallel replicas, the row shards (FSDP) and the column shards (TP). Optional for
            DTensor parameters (their placements say it; a given mesh is checked against them and a mismatch is a
            clear error); for plain tensors they build the process-group config.
        replicate_mesh_grad_sync: ``True`` (default): replicas do not all-reduce gradients (DDP under
            ``no_sync``, or ``fully_shard`` on the shard mesh only); Dion averages ``P`` and ``R`` over the
            replicas instead, ``(m + n) r`` numbers per matrix instead of ``m n``, for the matrices where that is
            fewer (``(m + n) r < m n``); the others' gradients are averaged (``m n``, so full rank never moves
            more than the gradient). Replicas' momenta then differ: call ``synchronize_for_checkpoint()`` before
            saving. ``False``: gradients are already synchronized.
        orientation: ``"columns"`` (default): the power iteration runs on ``B^T``, ``P`` spans the columns
            (``n x r``) and ``Q`` is ``m x r``: under FSDP (rows sharded) ``P`` is only reduced and handed back, and
            ``R``'s rows are local. ``"rows"``: ``P = B Q`` as in the paper's Algorithm 1. Chosen per group, never
            from the sharding, so every layout gives one process's result. State saved before the setting
            existed is ``"rows"`` (its ``Q`` is ``n x r``): resume it with ``orientation="rows"``.
        rank_fraction: ``r / min(m, n)``. Default 1.0. rank_multiple_of: round ``r`` up to this. Default 1.
        lr: 0.01. mu: momentum, 0.95. betas: element-wise groups' betas, (0.9, 0.95). weight_decay: 0.01.
        epsilon: column-norm and Adam epsilon, 1e-8. power_iters: power iterations per step, 1.
        qr_method: ``"rcqr"`` (default), ``"cqr"`` (Householder for the first ``cqr_warmup_steps`` steps, 150),
            ``"qr"``. rcqr_oversample: sketch rows per column, 1.25.
        mixed_precision_config: ``DionMixedPrecisionConfig`` (state dtypes) or ``None``.
        overlap_batches: ``None`` (default: one exchange per shape each way) or the number of ``P`` per exchange,
            the next batch's exchange overlapping this batch's orthonormalization (the seed's "Dion-async").
        distributed_config: overrides the config the meshes would build. nonfinite: ``"raise"`` or ``"skip"``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        replicate_mesh: Any = None,
        outer_shard_mesh: Any = None,
        inner_shard_mesh: Any = None,
        replicate_mesh_grad_sync: bool = True,
        orientation: str = "columns",
        rank_fraction: float = 1.0,
        rank_multiple_of: int = 1,
        lr: float = 0.01,
        mu: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        epsilon: float = 1e-8,
        power_iters: int = 1,
        qr_method: str = "rcqr",
        cqr_warmup_steps: int = 150,
        rcqr_oversample: float = 1.25,
        mixed_precision_config: DionMixedPrecisionConfig | None = None,
        overlap_batches: int | None = None,
        distributed_config: DistributedConfig | None = None,
        nonfinite: str = "raise",
    ) -> None:
        mp = mixed_precision_config or DionMixedPrecisionConfig()
        defaults: dict[str, Any] = dict(
            algorithm="dion",
            lr=lr,
            mu=mu,
            betas=tuple(betas),
            weight_decay=weight_decay,
            epsilon=epsilon,
            adam_eps=epsilon,
            rank_fraction=rank_fraction,
            rank_multiple_of=rank_multiple_of,
            power_iters=power_iters,
            qr_method=qr_method,
            cqr_warmup_steps=cqr_warmup_steps,
            rcqr_oversample=rcqr_oversample,
            replicate_mesh_grad_sync=replicate_mesh_grad_sync,
            orientation=orientation,
            momentum_dtype=mp.momentum_dtype,
            Q_dtype=mp.Q_dtype,
            # for "muon" groups (disco's LMO rule)
            momentum=mu,
            nesterov=False,
            norm_factor="spectral",
            backend="gram_newtonschulz5",
            backend_steps=5,
            eps=1e-7,
            nonfinite=nonfinite,
        )
        self._meshes = {"replicate": replicate_mesh, "outer": outer_shard_mesh, "inner": inner_shard_mesh}
        params = list(params)
        meshes_given = any(m is not None for m in self._meshes.values())
        if distributed_config is None and meshes_given and not _any_dtensor(params):
            distributed_config = create_auto_config(
                _group_of(outer_shard_mesh) if outer_shard_mesh is not None else None,
                _group_of(inner_shard_mesh) if inner_shard_mesh is not None else None,
                _column_dims(params) if inner_shard_mesh is not None else None,
                replicate_process_group=_group_of(replicate_mesh) if replicate_mesh is not None else None,
            )
        if overlap_batches is not None:
            if overlap_batches < 1:
                raise ValueError(f"overlap_batches={overlap_batches!r} must be an int >= 1 (or None)")
            # The seed's "Dion-async": orthonormalize P in batches, the next batch's exchange in flight while
            # this one computes; the same results.
            base = distributed_config or (create_dtensor_config() if _any_dtensor(params) else None)
            if base is not None:
                distributed_config = replace(
                    base, bucket_size=overlap_batches, prefetch_count=max(1, base.prefetch_count)
                )
        super().__init__(params, defaults, distributed_config=distributed_config)
        self._check_meshes()

    def _check_meshes(self) -> None:
        """A given mesh must be the rank set that the parameters' placements give; else a clear error."""
        engine = self.engine
        if not engine.has_layouts:
            return
        me = engine.current_rank
        for it in self._items():
            if not isinstance(it.settings, DionSettings):
                continue
            lay = engine.layout(it.index)
            md, nd = _dims(it.param)
            axes = {"replicate": lay.replica_axes(), "outer": lay.shard_axes(md), "inner": lay.shard_axes(nd)}
            for name, mesh in self._meshes.items():
                if mesh is None:
                    continue
                want = _ranks_of(mesh)
                got = sorted(lay.axis_group(me, axes[name]))
                if got != want and not (len(want) == 1 and len(got) == 1):
                    raise ValueError(
                        f"parameter {validation.describe(it.name, it.param)}: {name} mesh ranks {want} do not match "
                        f"its placements, which give {got} on rank {me} ({lay.describe()})"
                    )

    @torch.no_grad()
    def synchronize_for_checkpoint(self) -> None:
        """Average the Dion momenta over the replicas (compressed sync lets them drift apart by design)."""
        engine = self.engine
        items = [it for it in self._items() if isinstance(it.settings, DionSettings)]
        if not items or not engine.has_layouts:
            return
        bufs = [local_piece(self.state[it.param]["momentum_buffer"]) for it in items]
        engine.all_reduce(bufs, [engine.layout(it.index) for it in items], over="replicas", op="avg")


def _flat(params: list[Any]) -> list[Tensor]:
    out: list[Tensor] = []
    for p in params:
        if isinstance(p, dict):
            ps = p["params"]
            out.extend(_flat([ps] if isinstance(ps, Tensor) else list(ps)))
        elif isinstance(p, tuple):
            out.append(p[1])
        else:
            out.append(p)
    return out


def _column_dims(params: list[Any]) -> dict[int, int]:
    """``tp_dim_per_param`` for plain tensors under an inner (column) mesh: each matrix's column dim."""
    return {i: _dims(p)[1] for i, p in enumerate(_flat(params)) if p.dim() >= 2}


def _any_dtensor(params: list[Any]) -> bool:
    return any(isinstance(p, DTensor) for p in _flat(params))
