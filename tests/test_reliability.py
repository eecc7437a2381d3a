"""Reliability: misuse gets a clear error naming the culprit; ranks agree or fail alike, fast; steps are atomic.

Distributed cases run on real gloo ranks and assert that every rank raises the same error, within ``FAST_S`` of
the step's start, and that nothing changed. The bound tells the step's own propagation (about 0.35 s measured)
from a rank left waiting at a collective, which would raise only at its process-group timeout ``PG_S``, five
times later; it is wide so that a loaded machine cannot trip it.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

import disco
from disco import Disco, Muon, Scion
from disco.distributed import create_auto_config
from disco.distributed.agreement import StepError
from disco.distributed.layout import chunk_bound

#: every rank raises within this many seconds of the step's start (a bound for a loaded machine, not a timing)
FAST_S = 60.0
#: the ranks' process-group timeout: a rank the failure did not reach would wait this long at a collective
PG_S = 300.0


def _W(*shape, seed=0):
    return nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def _snapshot(opt):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {k: v.clone() for p in opt.state for k, v in opt.state[p].items() if torch.is_tensor(v)}
    return params, state


def _unchanged(opt, snap):
    params, state = _snapshot(opt)
    return all(torch.equal(a, b) for a, b in zip(params, snap[0])) and all(
        torch.equal(state[k], snap[1][k]) for k in snap[1]
    )


# ---- the misuse table: (what the user does, exception type, words the message must hold) --------------------
def _named(*shapes):
    return [(f"layer{k}.weight", _W(*s, seed=k)) for k, s in enumerate(shapes)]


MISUSE = [
    ("negative lr", lambda: Disco([_W(4, 4)], lr=-1.0), ValueError, ["lr"]),
    ("momentum 1", lambda: Disco([_W(4, 4)], momentum=1.0), ValueError, ["momentum"]),
    ("muon negative weight decay", lambda: Muon([_W(4, 4)], weight_decay=-0.1), ValueError, ["weight_decay"]),
    ("scion momentum out of range", lambda: Scion([_W(4, 4)], momentum_beta=1.5), ValueError, ["momentum"]),
    ("disco negative weight decay", lambda: Disco([_W(4, 4)], weight_decay=-1e-3), ValueError, ["weight_decay"]),
    ("negative eps", lambda: Disco([_W(4, 4)], eps=-1e-7), ValueError, ["eps"]),
    ("nan lr", lambda: Disco([_W(4, 4)], lr=float("nan")), ValueError, ["lr"]),
    ("backend_steps 0", lambda: Disco([_W(4, 4)], backend_steps=0), ValueError, ["backend_steps", "skip"]),
    ("ns_steps 0", lambda: Muon([_W(4, 4)], ns_steps=0), ValueError, ["backend_steps"]),
    ("bad ns coefficients", lambda: Muon([_W(4, 4)], ns_coefficients=(1.0, 2.0)), ValueError, ["coefficients"]),
    ("unknown table", lambda: Scion([_W(4, 4)], coefficient_type="nope"), ValueError, ["coefficients", "nope"]),
    ("unknown backend", lambda: Disco([_W(4, 4)], backend="qr"), ValueError, ["backend", "'qr'"]),
    ("unknown norm", lambda: Disco([_W(4, 4)], norm_factor="frob"), ValueError, ["frob"]),
    ("bad compute dtype", lambda: Disco([_W(4, 4)], compute_dtype=torch.int32), ValueError, ["compute_dtype"]),
    ("bad nonfinite", lambda: Disco([_W(4, 4)], nonfinite="ignore"), ValueError, ["nonfinite"]),
    ("light + skip", lambda: Disco([_W(4, 4)], is_light=True, nonfinite="skip"), ValueError, ["is_light"]),
    ("light + nesterov", lambda: Disco([_W(4, 4)], is_light=True, nesterov=True), ValueError, ["nesterov"]),
    (
        "complex parameter",
        lambda: Disco([nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat))]),
        ValueError,
        ["complex", "(4, 4)"],
    ),
    ("integer parameter", lambda: Disco([torch.zeros(4, 4, dtype=torch.int64)]), ValueError, ["int64"]),
    ("vector in a matrix group", lambda: Disco(_named((4, 4), (4,))), ValueError, ["'layer1.weight'", "(4,)"]),
    (
        "per-group negative lr",
        lambda: Disco([{"params": [_W(4, 4)], "lr": -0.1, "param_names": ["w"]}]),
        ValueError,
        ["group 0", "'w'", "lr"],
    ),
    (
        "adamw group bad betas",
        lambda: Disco([{"params": [_W(4)], "algorithm": "adamw", "betas": (0.9, 1.0), "param_names": ["b"]}]),
        ValueError,
        ["betas[1]", "'b'"],
    ),
    (
        "adamw group negative eps",
        lambda: Disco([{"params": [_W(4)], "algorithm": "adamw", "eps": -1.0}]),
        ValueError,
        ["adam_eps"],
    ),
    ("unknown algorithm", lambda: Disco([{"params": [_W(4, 4)], "algorithm": "sgd"}]), ValueError, ["'sgd'"]),
    ("same parameter twice", lambda: Muon([(w := _W(8, 4)), w]), ValueError, ["(8, 4)", "once"]),
    (
        "param_names count",
        lambda: Disco([{"params": [_W(4, 4)], "param_names": ["a", "b"]}]),
        ValueError,
        ["param_names"],
    ),
]


@pytest.mark.parametrize(("case", "build", "exc", "words"), MISUSE, ids=[m[0] for m in MISUSE])
def test_misuse_is_refused_by_name(case, build, exc, words):
    with pytest.raises(exc) as e:
        build()
    for w in words:
        assert w in str(e.value), (case, str(e.value))


def test_misuse_table_is_big_enough():
    assert len(MISUSE) + len(STEP_MISUSE) >= 25


def _add_group_negative_wd():
    opt = Disco([_W(4, 4)])
    before = len(opt.param_groups)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [_W(3, 3, seed=1)], "weight_decay": -0.5})
    assert len(opt.param_groups) == before  # refused groups leave nothing behind
    raise ValueError("weight_decay refused by add_param_group")


def _sparse_grad():
    W = _W(4, 4)
    opt = Disco([("emb", W)])
    W.grad = torch.eye(4).to_sparse()
    opt.step()


def _wrong_grad_shape():
    W = _W(4, 4)
    opt = Disco([("w", W)])
    W.grad = torch.ones(4, 4)
    W.grad.data = torch.ones(2, 8)
    opt.step()


def _light_zeroed_in_place():
    m = nn.Linear(4, 3, bias=False)
    opt = Disco([("w", m.weight)], is_light=True, momentum=0.5)
    x = torch.randn(2, 4)
    m(x).sum().backward()
    opt.step()
    m.zero_grad(set_to_none=False)  # wipes the momentum kept in p.grad
    m(x).sum().backward()
    opt.step()


def _light_set_to_none():
    m = nn.Linear(4, 3, bias=False)
    opt = Disco([("w", m.weight)], is_light=True, momentum=0.5)
    x = torch.randn(2, 4)
    m(x).sum().backward()
    opt.step()
    m.zero_grad(set_to_none=True)
    m(x).sum().backward()
    opt.step()


def _nan_grad():
    W = _W(4, 4)
    opt = Disco([("w", W)])
    W.grad = torch.full((4, 4), float("nan"))
    opt.step()


STEP_MISUSE = [
    ("add_param_group negative wd", _add_group_negative_wd, ValueError, ["weight_decay"]),
    ("sparse gradient", _sparse_grad, StepError, ["sparse", "'emb'"]),
    ("gradient of another shape", _wrong_grad_shape, StepError, ["'w'", "(2, 8)"]),
    ("light: zero_grad(set_to_none=False)", _light_zeroed_in_place, StepError, ["in place", "'w'"]),
    ("light: zero_grad(set_to_none=True)", _light_set_to_none, StepError, ["replaced", "'w'"]),
    ("non-finite gradient", _nan_grad, StepError, ["non-finite", "'w'", "skip"]),
]


@pytest.mark.parametrize(("case", "run", "exc", "words"), STEP_MISUSE, ids=[m[0] for m in STEP_MISUSE])
def test_step_misuse_is_refused_by_name(case, run, exc, words):
    with pytest.raises(exc) as e:
        run()
    for w in words:
        assert w in str(e.value), (case, str(e.value))


def test_light_mode_accumulation_is_not_misuse():
    m = nn.Linear(4, 3, bias=False)
    opt = Disco([("w", m.weight)], is_light=True, momentum=0.5)
    for _ in range(3):
        for _ in range(2):  # two micro-batches accumulate
            m(torch.randn(2, 4)).sum().backward()
        opt.step()


def test_nonfinite_raise_and_skip_leave_everything_unchanged():
    for policy in ("raise", "skip"):
        W, b = _W(6, 4), _W(6, seed=1)
        opt = Disco([{"params": [W]}, {"params": [b], "algorithm": "adamw"}], lr=0.1, nonfinite=policy)
        W.grad, b.grad = torch.randn(6, 4), torch.randn(6)
        opt.step()
        snap = _snapshot(opt)
        W.grad, b.grad = torch.randn(6, 4), torch.tensor([1.0, float("inf"), 0, 0, 0, 0])
        if policy == "raise":
            with pytest.raises(StepError, match="group 1"):
                opt.step()
        else:
            with pytest.warns(RuntimeWarning, match="skipped"):
                opt.step()
        assert _unchanged(opt, snap)


def test_exception_inside_math_leaves_everything_unchanged(monkeypatch):
    W, V = _W(6, 4), _W(5, 5, seed=1)
    opt = Disco([("w", W), ("v", V)], backend="svd", lr=0.1)
    W.grad, V.grad = torch.randn(6, 4), torch.randn(5, 5)
    snap = _snapshot(opt)

    def broken(G, **_):
        raise torch.linalg.LinAlgError("svd did not converge")

    monkeypatch.setitem(disco.ops.BACKENDS, "svd", broken)
    with pytest.raises(StepError, match="w: _LinAlgError: svd did not converge"):
        opt.step()
    assert _unchanged(opt, snap)


# ---- distributed: agreement, presence, failure propagation ---------------------------------------------------
def _setup(rank, world, *, swap=False, names=True, lr=0.05):
    """Two 16x12 matrices and a bias, FSDP-sharded on dim 0 as plain tensors with process groups."""
    import torch.distributed as dist

    full = {"a": _W(16, 12, seed=1).detach(), "b": _W(16, 12, seed=2).detach(), "bias": _W(16, seed=3).detach()}
    lo, hi = chunk_bound(16, world, rank)
    params = {n: nn.Parameter(t[lo:hi].clone()) for n, t in full.items()}
    order = ["b", "a"] if swap else ["a", "b"]
    mats = [(n, params[n]) for n in order] if names else [params[n] for n in order]
    groups = [{"params": mats}, {"params": [("bias", params["bias"])], "algorithm": "adamw"}]
    cfg = create_auto_config(dist.group.WORLD)
    return params, groups, cfg, (lo, hi)


def _timed(fn):
    t0 = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return type(e).__name__, str(e), time.monotonic() - t0
    return None, "", time.monotonic() - t0


def _body_agreement(rank, world_size, case, commit="atomic"):
    params, groups, cfg, (lo, hi) = _setup(rank, world_size, swap=(case == "swapped" and rank == 1))
    opt = None

    def build():
        nonlocal opt
        opt = Disco(groups, lr=0.05, distributed_config=cfg, commit=commit)

    err = _timed(build)
    if err[0]:
        return err
    assert opt is not None
    for p in params.values():
        p.grad = torch.ones_like(p)
    if case == "lr" and rank == 1:
        opt.param_groups[0]["lr"] = 0.07  # a scheduler that ran on one rank only
    if case == "steps" and rank == 1:
        opt.param_groups[0]["backend_steps"] = 3
    if case == "missing_elementwise" and rank == 1:
        params["bias"].grad = None
    if case == "missing_tracked" and rank == 1:
        params["bias"].grad = None
    if case == "missing_tracked":
        opt.calculate_norm_at_next_step()
    if case == "nan_one_rank" and rank == 1:
        params["a"].grad[0, 0] = float("nan")
    snap = _snapshot(opt)
    if case == "math_raises" and rank == 1:
        from disco import ops

        def broken(G, **_):
            raise RuntimeError("backend exploded on rank 1")

        ops.BACKENDS["gram_newtonschulz5"] = broken
    err = _timed(opt.step)
    return (*err, _unchanged(opt, snap))


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("swapped", ["rank 0: a (16, 12)", "rank 1: b (16, 12)"]),
        ("lr", ["lr=0.05", "lr=0.07"]),
        ("steps", ["backend_steps=5", "backend_steps=3"]),
        ("missing_elementwise", ["bias", "1/2 ranks"]),
        ("missing_tracked", ["bias", "1/2 ranks"]),
        ("nan_one_rank", ["non-finite", "'a'"]),
        ("math_raises", ["backend exploded on rank 1", "a"]),
    ],
)
def test_ranks_fail_alike_and_fast(case, words):
    out = run_ranks(_body_agreement, 2, case, pg_timeout=PG_S)
    kinds = {o[0] for o in out}
    assert len(kinds) == 1 and None not in kinds, out  # every rank raised, the same kind
    assert len({o[1] for o in out}) == 1, out  # the same message
    for o in out:
        assert o[2] < FAST_S, f"took {o[2]:.1f} s"
        for w in words:
            assert w in o[1], (w, o[1])
        if len(o) > 3:
            assert o[3], "a failed step changed parameters or state"


@pytest.mark.parametrize(
    ("case", "words", "changed"),
    [
        ("lr", ["lr=0.05", "lr=0.07"], False),
        ("missing_tracked", ["bias", "1/2 ranks"], False),
        ("nan_one_rank", ["non-finite", "'a'"], False),  # gradients are checked before anything is written
        ("math_raises", ["backend exploded on rank 1", "partially applied", "Load a checkpoint"], True),
    ],
)
def test_streaming_ranks_fail_alike_and_fast(case, words, changed):
    """``commit="streaming"``: the same cases fail alike and fast; only a failure inside the math leaves a step
    partially applied, and every rank says so."""
    out = run_ranks(_body_agreement, 2, case, "streaming", pg_timeout=PG_S)
    kinds = {o[0] for o in out}
    assert len(kinds) == 1 and None not in kinds, out
    for o in out:
        assert o[2] < FAST_S, f"took {o[2]:.1f} s"
        for w in words:
            assert w in o[1], (w, o[1])
        assert o[3] is not changed, o


def _body_unnamed_swap(rank, world_size):
    W1, W2 = _W(16, 12, seed=1), _W(16, 12, seed=2)
    order = [W2, W1] if rank == 1 else [W1, W2]
    return _timed(lambda: Muon(order, distributed_config=create_auto_config()))  # DDP: replicated copies


def test_unnamed_swapped_parameters_under_ddp_are_refused():
    out = run_ranks(_body_unnamed_swap, 2, pg_timeout=PG_S)
    assert all(o[0] == "ValueError" and "differs across its replicas" in o[1] for o in out), out


def _body_skip(rank, world_size, nan, backend):
    params, groups, cfg, (lo, hi) = _setup(rank, world_size)
    opt = Disco(groups, lr=0.05, distributed_config=cfg, nonfinite="skip", backend=backend)
    good = {n: _W(*p.shape, seed=10 + k).detach() for k, (n, p) in enumerate(params.items())}
    for n, p in params.items():
        p.grad = good[n].clone()
    if nan and rank == 1:
        params["a"].grad[0, 0] = float("nan")
    snap = _snapshot(opt)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt.step()
    skipped = _unchanged(opt, snap)
    return skipped, [str(w.message) for w in seen]


@pytest.mark.parametrize("backend", ["svd", "gram_newtonschulz5"])
def test_nonfinite_skip_is_decided_collectively(backend):
    """A NaN in one rank's piece: the step is skipped on every rank, with SVD (which would raise on it) and with
    Newton-Schulz (which would turn it into a NaN result on the owner)."""
    out = run_ranks(_body_skip, 2, True, backend, pg_timeout=PG_S)
    for skipped, msgs in out:
        assert skipped and any("skipped on every rank" in m for m in msgs)  # both ranks skip, not only rank 1
    out = run_ranks(_body_skip, 2, False, backend, pg_timeout=PG_S)
    assert all(not skipped for skipped, _ in out)


def _body_mixed_dtypes(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full16 = _W(8, 6, seed=1).detach().bfloat16()
    full32 = _W(10, 6, seed=2).detach()
    p16 = nn.Parameter(distribute_tensor(full16, mesh, [Shard(0)], src_data_rank=None))
    p32 = nn.Parameter(distribute_tensor(full32, mesh, [Shard(0)], src_data_rank=None))
    opt = Muon([p16, p32], compute_dtype=torch.float32)  # the bf16 one first
    p16.grad = distribute_tensor(torch.ones(8, 6, dtype=torch.bfloat16), mesh, [Shard(0)], src_data_rank=None)
    p32.grad = distribute_tensor(_W(10, 6, seed=3).detach(), mesh, [Shard(0)], src_data_rank=None)
    opt.step()
    return p32.full_tensor()


def test_fp32_parameter_travels_in_fp32_beside_bf16():
    W = _W(10, 6, seed=2)
    ref = Muon([W], compute_dtype=torch.float32)
    W.grad = _W(10, 6, seed=3).detach()
    ref.step()
    for got in run_ranks(_body_mixed_dtypes, 2, pg_timeout=PG_S):
        assert torch.equal(got, W.detach())  # exact: the fp32 piece never went through bf16
