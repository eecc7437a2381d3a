"""Weight constraints (spectral clip, Stiefel, hyperball): the matrix-sign math against an SVD oracle, the
constraint after every optimizer step, single device against a float64 reference, and distributed equals one
process (FSDP2 x3 uneven, HSDP 2x2, FSDP x TP 2x2), each constraint computed once per matrix per step."""

from __future__ import annotations

import math

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

from disco import Disco, Muon, NorMuon, Scion
from disco.ops import ConstraintSpec, spectral_clip, stiefel

# oracles in exact fp32 (SVD, one process): fp32 matmuls in fp32 whatever the session's precision
pytestmark = pytest.mark.usefixtures("fp32_matmuls")

STEPS = 3


def _svd_clip(W, lo, hi):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U * S.clamp(lo, hi).unsqueeze(-2)) @ Vh


def _grads(shape, steps, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(steps)]


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (3, 12, 8)])
@pytest.mark.parametrize(("lo", "hi"), [(0.0, 1.0), (0.5, 1.2), (0.9, 0.9)])
def test_spectral_clip_equals_the_svd_oracle(shape, lo, hi):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 3
    want = _svd_clip(W, lo, hi)
    torch.testing.assert_close(spectral_clip(W, lo, hi), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(spectral_clip(W.float(), lo, hi).double(), want, atol=2e-6, rtol=0)
    spec = ConstraintSpec("spectral_clip", sigma_min=lo, sigma_max=hi)
    torch.testing.assert_close(spec(W.float().unsqueeze(0))[0].double(), want, atol=2e-6, rtol=0)


def test_stiefel_and_flattened_conv():
    W = torch.randn(10, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = ConstraintSpec("stiefel", radius=0.7, view="flatten")(W.unsqueeze(0))[0]
    s = torch.linalg.svdvals(out.reshape(10, -1))
    torch.testing.assert_close(s, torch.full_like(s, 0.7), atol=1e-12, rtol=0)
    U, _, Vh = torch.linalg.svd(W.reshape(10, -1), full_matrices=False)
    torch.testing.assert_close(stiefel(W.reshape(10, -1), 0.7), 0.7 * U @ Vh, atol=1e-12, rtol=0)


def test_muon_spectral_clip_equals_reference_and_stays_in_bounds():
    """float64, exact polar factor: each step is W <- clip_[a,b]((1 - lr wd) W - lr s polar(U)) (SVD oracle)."""
    shape, lo, hi = (24, 16), 0.5, 1.0
    W = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    X, M = W.detach().clone(), torch.zeros(shape, dtype=torch.float64)
    group = {"params": [W], "weight_constraint": "spectral_clip", "sigma_min": lo, "sigma_max": hi}
    opt = Muon([group], lr=0.1, weight_decay=0.1, momentum=0.9, nesterov=False, backend="svd")
    factor = math.sqrt(max(1, shape[0] / shape[1]))
    for g in _grads(shape, STEPS):
        W.grad = g.clone()
        opt.step()
        M = 0.9 * M + 0.1 * g
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
        X = _svd_clip((1 - 0.1 * 0.1) * X - 0.1 * factor * (U @ Vh), lo, hi)
        s = torch.linalg.svdvals(W.detach())
        assert lo - 1e-10 <= s.min() and s.max() <= hi + 1e-10, s
        torch.testing.assert_close(W.detach(), X, atol=1e-10, rtol=0)


@pytest.mark.parametrize("make", ["scion", "normuon"])
def test_stiefel_sets_every_singular_value_to_the_radius(make):
    W = nn.Parameter(torch.randn(24, 16, generator=torch.Generator().manual_seed(0)))
    group = {"params": [W], "weight_constraint": "stiefel"}
    opt = Scion([group], lr=0.05) if make == "scion" else NorMuon([group], lr=0.05)
    for g in _grads((24, 16), STEPS, dtype=torch.float32):
        W.grad = g
        opt.step()
        s = torch.linalg.svdvals(W.detach().double())
        assert (s - math.sqrt(24 / 16)).abs().max() < 1e-5, s  # default radius: sqrt(fan_out / fan_in)


def test_hyperball_keeps_the_initial_frobenius_norm():
    W = nn.Parameter(torch.randn(24, 16, generator=torch.Generator().manual_seed(0)))
    b = nn.Parameter(torch.randn(16, generator=torch.Generator().manual_seed(1)))
    norms = (W.detach().norm().item(), b.detach().norm().item())
    ball = {"weight_constraint": "hyperball"}  # vectors take it too: the Frobenius norm is decomposable
    opt = Disco([{"params": [W], **ball}, {"params": [b], "norm_factor": "bias_rms", **ball}], lr=0.1)
    for g, h in zip(_grads((24, 16), STEPS, dtype=torch.float32), _grads((16,), STEPS, 2, torch.float32)):
        W.grad, b.grad = g, h
        opt.step()
        assert abs(W.detach().norm().item() - norms[0]) < 1e-5 * norms[0]
        assert abs(b.detach().norm().item() - norms[1]) < 1e-5 * norms[1]
    torch.testing.assert_close(opt.state[W]["init_norm"].item(), norms[0], rtol=1e-6, atol=0)


def test_hyperball_initial_norm_survives_a_state_dict_round_trip():
    W = nn.Parameter(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)))
    opt = Muon([{"params": [W], "weight_constraint": "hyperball"}], lr=0.05)
    r0 = opt.state[W]["init_norm"].clone()
    W.grad = torch.randn(12, 8)
    opt.step()
    W2 = nn.Parameter(torch.randn(12, 8))  # another norm: the loaded state wins over the measured one
    opt2 = Muon([{"params": [W2], "weight_constraint": "hyperball"}], lr=0.05)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[W2]["init_norm"].dtype == torch.float64
    torch.testing.assert_close(opt2.state[W2]["init_norm"], r0, rtol=0, atol=0)


def test_no_constraint_is_bit_identical():
    W1 = nn.Parameter(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)))
    W2 = nn.Parameter(W1.detach().clone())
    o1 = Muon([W1], lr=0.05)
    o2 = Muon([{"params": [W2], "weight_constraint": None}], lr=0.05)
    for g in _grads((12, 8), STEPS, dtype=torch.float32):
        W1.grad, W2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert torch.equal(W1.detach(), W2.detach())


@pytest.mark.parametrize(
    ("group", "match"),
    [
        ({"weight_constraint": "nope"}, "weight_constraint='nope' is invalid"),
        ({"weight_constraint": "spectral_clip", "sigma_min": 2.0, "sigma_max": 1.0}, "exceeds sigma_max"),
        ({"weight_constraint": "stiefel", "radius": -1.0}, "radius"),
    ],
)
def test_bad_settings_are_refused(group, match):
    with pytest.raises(ValueError, match=match):
        Muon([{"params": [nn.Parameter(torch.zeros(4, 4))], **group}])


# ---- distributed ---------------------------------------------------------------------------------------------
SHAPES = {"a": (97, 64), "c": (18, 32)}
CASES = {
    "clip": ("muon", {"weight_constraint": "spectral_clip", "sigma_min": 0.2, "sigma_max": 0.6}),
    "stiefel": ("normuon", {"weight_constraint": "stiefel", "radius": 0.5}),
    "hyperball": ("disco", {"weight_constraint": "hyperball"}),
}


def _full(seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) / 4 for n, s in SHAPES.items()}


def _opt(case, params):
    algo, group = CASES[case]
    groups = [{"params": list(params.items()), **group}]
    kw = dict(lr=0.05, weight_decay=0.1, compute_dtype=torch.float32)
    if algo == "muon":
        return Muon(groups, **kw)
    if algo == "normuon":
        return NorMuon(groups, **kw)
    return Disco(groups, **kw)


def _body(rank, world_size, layout, case):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,) if layout == "fsdp" else (2, 2))
    pl = {"fsdp": [Shard(0)], "hsdp": [Replicate(), Shard(0)], "fsdp_tp": [Shard(0), Shard(1)]}[layout]
    params = {n: nn.Parameter(distribute_tensor(t, mesh, pl, src_data_rank=None)) for n, t in _full(0).items()}
    opt = _opt(case, params)
    computed = []
    for step in range(STEPS):
        for n, g in _full(100 + step).items():
            params[n].grad = distribute_tensor(g, mesh, pl, src_data_rank=None)
        opt.step()
        computed.append(opt.engine.stats.matrices_computed)
    return {n: p.full_tensor() for n, p in params.items()}, computed


def _reference(case):
    params = {n: nn.Parameter(t.clone()) for n, t in _full(0).items()}
    opt = _opt(case, params)
    for step in range(STEPS):
        for n, g in _full(100 + step).items():
            params[n].grad = g
        opt.step()
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.parametrize(
    ("layout", "world", "case"),
    [("fsdp", 3, "clip"), ("fsdp", 3, "stiefel"), ("fsdp", 3, "hyperball"), ("hsdp", 4, "clip"),
     ("fsdp_tp", 4, "clip"), ("fsdp_tp", 4, "hyperball")],
)  # fmt: skip
def test_distributed_constraints_equal_one_process(layout, world, case):
    want = _reference(case)
    out = run_ranks(_body, world, layout, case, timeout=120)
    for got, _ in out:
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=0)
    per_step = len(SHAPES) * (1 if case == "hyperball" else 2)  # the LMO, plus the constraint when whole
    for step in range(STEPS):
        assert sum(o[1][step] for o in out) == per_step
    if case == "clip":
        s = torch.linalg.svdvals(out[0][0]["a"].double())
        assert s.min() >= 0.2 - 1e-5 and s.max() <= 0.6 + 1e-5
