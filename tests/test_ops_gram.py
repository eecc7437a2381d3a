"""Gram Newton-Schulz (``disco.ops.gram_newton_schulz``): the plain iteration's polynomial run on ``X X^T``.

The float64 equivalence tests check the algebra (same polynomial, restarts anywhere, ``scale``); the fp32 / bf16
tests check the numerics against the SVD oracle and plain ``newton_schulz``. Measured on this project's CPU
(torch 2.13; 128 x 512 inputs unless noted) before the thresholds were chosen:

============================================  ===============================  =====================
quantity                                      measured                         asserted
============================================  ===============================  =====================
fp64 Gram vs fp64 NS, all cases below         <= 1.5e-14 rel. Frobenius        < 1e-10
fp32 Gram keller 5 steps, Gaussian, 3 seeds   sv in [0.6818, 1.1344]           [0.67, 1.15]
fp32 Gram vs fp32 NS singular values          <= 2e-7 apart                    < 1e-4
fp32 Gram vs fp64 NS                          rel 1.7e-6, max abs 6.4e-7       rel < 2e-5, abs < 1e-4
fp32 Gram polar_express 8 steps vs SVD        rel 2.9e-6 - 3.0e-6              < 3e-5
fp32 12 steps, ill-cond. / low-rank, none     inf or 1e9 - 1e29 (polar_exp.)   > 1.5 or non-finite
fp32 12 steps, default restarts (5, 8, 11)    sv max <= 1.267                  < 1.3
bf16 8 steps, restarts=()                     non-finite, every case           > 1.5 or non-finite
bf16 8 steps, default (3, 5, 7), keller/you   sv max 1.199 / 1.244             < min(1.3, sup + 0.05)
bf16 plain NS, same inputs                    sv max 1.187 - 1.248
bf16 rel. err vs fp64 NS, Gram / plain        0.92/0.83, 0.66/0.61, 2.84/2.49  Gram <= 2 x plain
============================================  ===============================  =====================

(``sup``: the sup over [0, 1] of the table's scalar map, 1.202 for keller, 1.247 for you at 8 steps.) The low-rank
relative errors exceed 1 for both forms: bf16 noise in the null directions is lifted towards 1 while the fp64
result keeps them near 0.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import disco
from disco.ops import (
    BACKENDS,
    cpu_has_native_bf16,
    default_compute_dtype,
    get_table,
    gram_newton_schulz,
    newton_schulz,
    orthogonalize,
    svd_polar,
)
from disco.ops.orthogonalize import GRAM_MIN_ASPECT, RESTART_GROWTH, restart_points

# the math in exact fp32 against float64 / SVD oracles: fp32 matmuls in fp32 whatever the session's precision
# (the library under a user's "medium": tests/test_cpu_independence.py)
pytestmark = pytest.mark.usefixtures("fp32_matmuls")

# ``disco.ops.orthogonalize`` is also the name of a function re-exported by ``disco.ops``: take the module itself.
ORTHO_MODULE = sys.modules["disco.ops.orthogonalize"]
F64 = torch.float64


def gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def orthonormal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(gaussian(n, n, seed=seed))[0]


def ill_conditioned(m: int, n: int, seed: int) -> torch.Tensor:
    """``U diag(logspace(0, -6, m)) V^T`` (m <= n), condition number 1e6, in float64."""
    U, V = orthonormal(m, seed), orthonormal(n, seed + 1)[:, :m]
    return U @ torch.diag(torch.logspace(0, -6, m, dtype=F64)) @ V.T


def low_rank(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, n, generator=g, dtype=F64)


def rel_err(O: torch.Tensor, P: torch.Tensor) -> float:
    return ((O.double() - P.double()).norm() / P.double().norm()).item()


def largest_sv(O: torch.Tensor) -> float:
    """Largest singular value (per matrix, the max over a batch); ``inf`` for a non-finite output."""
    O = O.double()
    if not torch.isfinite(O).all():
        return float("inf")
    return torch.linalg.svdvals(O).max().item()


def sup_of_map(table: str, steps: int) -> float:
    t = get_table(table)
    x = torch.linspace(0, 1, 200001, dtype=F64)
    for k in range(steps):
        a, b, c = t.at(k)
        x = a * x + b * x**3 + c * x**5
    return x.max().item()


# --------------------------------------------------------------------------------- float64: the same polynomial

SHAPES = [(32, 96), (96, 32), (3, 24, 64), (2, 3, 16, 48), (2, 80, 20)]  # wide, tall, batched 3-D / 4-D
RESTARTS = [None, (), (1,), (2, 4), (1, 2, 3, 4, 5, 6, 7)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("table", ["keller", "you", "polar_express"])
def test_fp64_gram_equals_plain_newton_schulz(shape, table):
    G = gaussian(*shape, seed=1)
    for steps in (1, 2, 5, 8):
        want = newton_schulz(G, steps=steps, coefficients=table, compute_dtype=F64)
        for restarts in RESTARTS:
            got = gram_newton_schulz(G, steps=steps, coefficients=table, compute_dtype=F64, restarts=restarts)
            assert got.shape == G.shape and got.dtype == F64
            err = rel_err(got, want)
            assert err < 1e-10, f"{table} steps={steps} restarts={restarts}: rel err {err:.3g}"


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (2, 3, 16, 48)], ids=str)
def test_fp64_scale_multiplies_the_result(shape):
    G = gaussian(*shape, seed=2)
    for steps, restarts in ((1, None), (5, None), (5, (2,)), (8, ())):
        base = gram_newton_schulz(G, steps=steps, compute_dtype=F64, restarts=restarts)
        for scale in (0.5, 3.0, -2.0):
            got = gram_newton_schulz(G, steps=steps, compute_dtype=F64, restarts=restarts, scale=scale)
            torch.testing.assert_close(got, scale * base, rtol=1e-12, atol=1e-14)
            plain = newton_schulz(G, steps=steps, compute_dtype=F64, scale=scale)
            assert rel_err(got, plain) < 1e-10


@pytest.mark.parametrize(
    ("backend", "plain", "table"),
    [
        ("gram_newtonschulz5", "newtonschulz5", "keller"),
        ("gram_polar_express", "polar_express", "polar_express"),
    ],
)
def test_backends_registered_and_use_their_default_tables(backend, plain, table):
    assert backend in BACKENDS
    G = gaussian(2, 24, 72, seed=3)
    got = orthogonalize(G, backend=backend, steps=6, scale=1.5, compute_dtype=F64)
    want = orthogonalize(G, backend=plain, steps=6, scale=1.5, compute_dtype=F64)
    assert rel_err(got, want) < 1e-10
    direct = newton_schulz(G, steps=6, coefficients=table, compute_dtype=F64, scale=1.5)
    assert rel_err(got, direct) < 1e-10
    # an explicit table overrides the backend's default
    other = orthogonalize(G, backend=backend, steps=6, coefficients="you", compute_dtype=F64)
    assert rel_err(other, newton_schulz(G, steps=6, coefficients="you", compute_dtype=F64)) < 1e-10
    assert rel_err(other, got / 1.5) > 1e-3


# ------------------------------------------------------------------------------ aspect threshold: plain form


@pytest.mark.parametrize("shape", [(64, 64), (32, 47), (47, 32), (3, 40, 40), (2, 2, 20, 29), (1, 1)], ids=str)
def test_below_min_aspect_runs_the_plain_form_exactly(shape):
    G = gaussian(*shape, seed=4, dtype=torch.float32)
    for kw in ({}, {"steps": 3, "coefficients": "you", "scale": 0.7}, {"restarts": (1, 2)}):
        plain_kw = {k: v for k, v in kw.items() if k != "restarts"}
        got = gram_newton_schulz(G, compute_dtype=torch.float32, **kw)
        assert torch.equal(got, newton_schulz(G, compute_dtype=torch.float32, **plain_kw))
    via_backend = orthogonalize(G, backend="gram_newtonschulz5", compute_dtype=torch.float32)
    assert torch.equal(via_backend, orthogonalize(G, backend="newtonschulz5", compute_dtype=torch.float32))


def test_dispatch_threshold_is_gram_min_aspect(monkeypatch):
    """``n < GRAM_MIN_ASPECT * m`` delegates to ``newton_schulz``; at the threshold and above the Gram form runs."""
    assert GRAM_MIN_ASPECT == 1.5
    calls = []
    real = ORTHO_MODULE.newton_schulz

    def spy(G, **kw):
        calls.append(tuple(G.shape))
        return real(G, **kw)

    monkeypatch.setattr(ORTHO_MODULE, "newton_schulz", spy)
    for shape, plain in [((32, 47), True), ((47, 32), True), ((32, 48), False), ((48, 32), False), ((8, 64), False)]:
        calls.clear()
        gram_newton_schulz(gaussian(*shape, seed=5), compute_dtype=F64)
        assert bool(calls) == plain, f"{shape}: plain form called {calls}"


# ----------------------------------------------------------------------------------- restart schedule


def test_restart_points_follow_the_growth_budget():
    assert restart_points(8, torch.bfloat16) == (3, 5, 7)
    assert restart_points(5, torch.bfloat16) == (3,)
    assert restart_points(3, torch.bfloat16) == ()
    assert restart_points(5, torch.float32) == ()
    assert restart_points(12, torch.float32) == (5, 8, 11)
    assert restart_points(12, torch.float64) == (10,)
    assert restart_points(5, torch.bfloat16, "polar_express") == (2, 4)  # its first a is 8.2: restart earlier
    assert restart_points(8, torch.float8_e4m3fn) == restart_points(8, torch.float32)  # unknown dtype: fp32's
    for dtype, (first, later) in RESTART_GROWTH.items():
        for table in ("keller", "you", "polar_express"):
            for steps in range(0, 15):
                pts = restart_points(steps, dtype, table)
                assert all(0 < k < steps for k in pts) and list(pts) == sorted(set(pts))
                # each phase stays within its budget (a single step may exceed it: it cannot be split)
                bounds = [0, *pts, steps]
                for ph, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
                    growth = math.prod(get_table(table).at(k)[0] ** 2 for k in range(lo, hi))
                    assert hi - lo == 1 or growth <= (first if ph == 0 else later)


def test_default_restarts_are_restart_points_of_the_compute_dtype():
    G = gaussian(24, 96, seed=6, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        default = gram_newton_schulz(G, steps=8, compute_dtype=dtype)
        explicit = gram_newton_schulz(G, steps=8, compute_dtype=dtype, restarts=restart_points(8, dtype))
        assert torch.equal(default, explicit)
    # and restarts change the computation (in bf16 the rounding differs): they are not silently ignored
    none = gram_newton_schulz(G, steps=8, compute_dtype=torch.bfloat16, restarts=())
    assert not torch.equal(none, gram_newton_schulz(G, steps=8, compute_dtype=torch.bfloat16))


# ----------------------------------------------------------------------------------- fp32 against the SVD oracle


@pytest.mark.parametrize("seed", range(3))
def test_fp32_singular_values_lie_where_ns5_keller_puts_them(seed):
    G = gaussian(128, 512, seed=seed)
    gram = gram_newton_schulz(G.float(), compute_dtype=torch.float32)
    plain = newton_schulz(G.float(), compute_dtype=torch.float32)
    assert gram.dtype == torch.float32
    s_gram, s_plain = torch.linalg.svdvals(gram.double()), torch.linalg.svdvals(plain.double())
    assert s_gram.min().item() >= 0.67 and s_gram.max().item() <= 1.15
    assert (s_gram - s_plain).abs().max().item() < 1e-4
    ref = newton_schulz(G, compute_dtype=F64)
    assert rel_err(gram, ref) < 2e-5
    assert (gram.double() - ref).abs().max().item() < 1e-4
    # NS5-keller is deliberately far from the polar factor: the Gram form is exactly as far
    oracle = svd_polar(G)
    assert abs(rel_err(gram, oracle) - rel_err(ref, oracle)) < 1e-4


@pytest.mark.parametrize("shape", [(128, 512), (512, 128)], ids=str)
def test_fp32_polar_express_8_steps_reaches_the_svd_polar_factor(shape):
    G = gaussian(*shape, seed=7)
    O = orthogonalize(G.float(), backend="gram_polar_express", steps=8, compute_dtype=torch.float32)
    assert O.shape == shape and O.dtype == torch.float32
    assert rel_err(O, svd_polar(G)) < 3e-5


@pytest.mark.parametrize("table", ["keller", "you", "polar_express"])
def test_fp32_default_restarts_keep_12_steps_stable(table):
    assert restart_points(12, torch.float32)  # else this test says nothing
    for G in (ill_conditioned(128, 512, seed=0), low_rank(128, 512, 8, seed=1)):
        G = G.float()
        none = gram_newton_schulz(G, steps=12, coefficients=table, compute_dtype=torch.float32, restarts=())
        assert largest_sv(none) > 1.5  # rounding in R compounds: the reason restarts exist
        default = gram_newton_schulz(G, steps=12, coefficients=table, compute_dtype=torch.float32)
        assert largest_sv(default) < 1.3


# ----------------------------------------------------------------------------------- bf16: the restarts' reason

BF16_CASES = {  # kept few and 128 x 512: bf16 matmul is slow on CPUs without AVX512-BF16
    "ill-keller": (lambda: ill_conditioned(128, 512, seed=0), "keller"),
    "ill-you": (lambda: ill_conditioned(128, 512, seed=0), "you"),
    "lowrank-keller": (lambda: low_rank(128, 512, 16, seed=0), "keller"),
}


@pytest.mark.parametrize("case", sorted(BF16_CASES))
def test_bf16_restarts_prevent_divergence(case):
    make, table = BF16_CASES[case]
    G64 = make()
    G = G64.float()
    bf16 = {"compute_dtype": torch.bfloat16, "steps": 8, "coefficients": table}
    none = gram_newton_schulz(G, restarts=(), **bf16)
    assert largest_sv(none) > 1.5, "without restarts bf16 Gram NS should blow up on this input"
    gram = gram_newton_schulz(G, **bf16)
    plain = newton_schulz(G, **bf16)
    assert gram.dtype == torch.float32 and torch.isfinite(gram).all()
    assert largest_sv(gram) < min(1.3, sup_of_map(table, 8) + 0.05)
    ref = newton_schulz(G64, steps=8, coefficients=table, compute_dtype=F64)
    err_gram, err_plain = rel_err(gram, ref), rel_err(plain, ref)
    assert err_gram <= 2 * err_plain, f"bf16 Gram err {err_gram:.3g} vs plain NS {err_plain:.3g}"


def test_bf16_gram_polar_express_default_restarts_on_ill_conditioned():
    # restarting after step 3 (keller's point) let these reach 6.7 at 5 steps; plain NS: 1.124
    worst = 0.0
    for seed in range(4):
        G = ill_conditioned(64, 256, seed=seed).float()
        O = orthogonalize(G, backend="gram_polar_express", steps=5, compute_dtype=torch.bfloat16)
        worst = max(worst, largest_sv(O))
    assert worst < 1.3


# ----------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", ["gram_newtonschulz5", "gram_polar_express", "newtonschulz5"])
@pytest.mark.parametrize("shape", [(2, 48, 192), (160, 40), (64, 64), (40, 50)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("steps", [5, 8])
def test_iteration_cost_counts_the_multiply_adds_made(monkeypatch, backend, shape, dtype, steps):
    """``iteration_cost`` (the planner's cost of an LMO) is the multiply-adds the backend's matmuls make, counted
    by wrapping them, over ``2 steps``; so in Gram form a 4:1 matrix costs twice a square one (5 steps, bf16)."""
    module = ORTHO_MODULE
    made = [0]

    def counted(fn):
        def wrapper(*args, **kw):
            out = fn(*args, **kw)
            a = args[1] if fn is real_baddbmm else args[0]
            made[0] += math.prod(out.shape) * a.shape[-1]  # (batch, m, n) out of a (batch, m, k) operand
            return out

        return wrapper

    real_bmm, real_baddbmm = module._bmm, module._baddbmm
    monkeypatch.setattr(module, "_bmm", counted(real_bmm))
    monkeypatch.setattr(module, "_baddbmm", counted(real_baddbmm))
    G = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    orthogonalize(G, backend=backend, steps=steps, compute_dtype=dtype)
    want = module.iteration_cost(shape, backend=backend, steps=steps, compute_dtype=dtype) * 2 * steps
    assert made[0] == want
    assert module.iteration_cost(shape, backend=backend, steps=0) == math.prod(shape)  # normalising: not free
    if steps == 5 and dtype == torch.bfloat16 and backend == "gram_newtonschulz5":
        cost = module.iteration_cost
        assert (
            cost((512, 2048), backend=backend)
            == cost((2048, 512), backend=backend)
            == 2 * cost((512, 512), backend=backend)
        )


def test_zero_matrix_gives_zeros():
    for shape in [(16, 48), (48, 16), (3, 16, 48)]:
        for dtype in (torch.float32, torch.bfloat16):
            Z = torch.zeros(shape, dtype=dtype)
            out = gram_newton_schulz(Z, compute_dtype=torch.float32)
            assert out.dtype == dtype and out.shape == Z.shape
            assert torch.equal(out, Z)
            assert torch.equal(orthogonalize(Z, backend="gram_newtonschulz5"), Z)
    # a zero matrix in a batch leaves its neighbours alone
    G = torch.stack([torch.zeros(16, 48), gaussian(16, 48, seed=8, dtype=torch.float32)])
    out = gram_newton_schulz(G, compute_dtype=torch.float32)
    assert torch.equal(out[0], torch.zeros(16, 48)) and torch.isfinite(out).all()
    torch.testing.assert_close(out[1], gram_newton_schulz(G[1], compute_dtype=torch.float32), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(0, 16, 48), (0, 48, 16), (0, 6), (6, 0), (2, 0, 5), (0, 0)], ids=str)
def test_empty_input_via_orthogonalize(shape):
    for backend in ("gram_newtonschulz5", "gram_polar_express"):
        out = orthogonalize(torch.empty(shape), backend=backend)
        assert out.shape == shape and out.dtype == torch.float32


@pytest.mark.parametrize("shape", [(0, 16, 48), (0, 48, 16)], ids=str)
def test_empty_batch_direct(shape):
    out = gram_newton_schulz(torch.empty(shape, dtype=torch.bfloat16))
    assert out.shape == shape and out.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(0, 6), (6, 0), (2, 0, 6), (0, 0)], ids=str)
def test_empty_matrix_dim_direct(shape):
    for fn in (gram_newton_schulz, newton_schulz):
        out = fn(torch.empty(shape))
        assert out.shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("shape", [(24, 96), (96, 24), (2, 24, 96)], ids=str)
def test_dtype_and_shape_preserved(dtype, shape):
    G = gaussian(*shape, seed=9, dtype=dtype)
    out = gram_newton_schulz(G)
    assert out.dtype == dtype and out.shape == G.shape and torch.isfinite(out.float()).all()
    # the default compute dtype is default_compute_dtype(G) (fp32 here: conftest pins DISCO_CPU_BF16=0)
    explicit = gram_newton_schulz(G, compute_dtype=default_compute_dtype(G))
    assert torch.equal(out, explicit)


def test_steps_zero_equals_newton_schulz_steps_zero_and_negative_steps_raise():
    for shape in [(24, 96), (96, 24), (40, 40)]:
        G = gaussian(*shape, seed=10, dtype=torch.float32)
        got = gram_newton_schulz(G, steps=0, scale=2.0, compute_dtype=torch.float32)
        want = newton_schulz(G, steps=0, scale=2.0, compute_dtype=torch.float32)
        assert torch.equal(got, want)
        torch.testing.assert_close(got, 2.0 * G / G.norm(), rtol=1e-5, atol=1e-7)  # the normalised input
    with pytest.raises(ValueError, match="steps"):
        gram_newton_schulz(gaussian(24, 96, seed=0), steps=-1)


# ----------------------------------------------------------------------------------- Muon


def test_muon_default_backend_is_gram_newtonschulz5():
    p = torch.nn.Parameter(torch.zeros(8, 32))
    assert disco.Muon([p]).param_groups[0]["backend"] == "gram_newtonschulz5"
    assert disco.Muon([p], backend="newtonschulz5").param_groups[0]["backend"] == "newtonschulz5"


def _muon_params(backend: str, steps: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(32, 128), (128, 32), (48, 32), (64, 64), (2, 16, 64)]  # wide, tall, at 1.5, square, 3-D stack
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = disco.Muon(params, lr=0.02, backend=backend, compute_dtype=torch.float32)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def test_muon_gram_backend_matches_plain_backend():
    # measured: at most 2.4e-7 apart after 3 steps (the square one is bit-identical: the plain form runs)
    gram, plain = _muon_params("gram_newtonschulz5"), _muon_params("newtonschulz5")
    start = _muon_params("newtonschulz5", steps=0)
    for g, p, s in zip(gram, plain, start):
        torch.testing.assert_close(g, p, atol=1e-5, rtol=0)
        assert (p - s).abs().max() > 1e-3  # the steps did move the parameters
    assert torch.equal(gram[3], plain[3])


# ----------------------------------------------------------------------------------- bf16 detection


@pytest.fixture
def fresh_bf16_cache():
    cpu_has_native_bf16.cache_clear()
    yield
    cpu_has_native_bf16.cache_clear()  # monkeypatch restores DISCO_CPU_BF16 after this fixture: next call re-reads


def test_env_override_forces_the_answer(monkeypatch, fresh_bf16_cache):
    fp32, fp64 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=F64)
    monkeypatch.setenv("DISCO_CPU_BF16", "1")
    cpu_has_native_bf16.cache_clear()
    assert cpu_has_native_bf16() is True
    assert default_compute_dtype(fp32) == torch.bfloat16
    assert default_compute_dtype(fp64) == F64
    monkeypatch.setenv("DISCO_CPU_BF16", "0")
    assert cpu_has_native_bf16() is True  # cached: the override is read once
    cpu_has_native_bf16.cache_clear()
    assert cpu_has_native_bf16() is False
    assert default_compute_dtype(fp32) == torch.float32
    assert default_compute_dtype(fp64) == F64
    assert default_compute_dtype(torch.zeros(2, 2, dtype=torch.bfloat16)) == torch.float32


def test_detection_reads_proc_cpuinfo(monkeypatch, fresh_bf16_cache):
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    expected = "avx512_bf16" in flags or "amx_bf16" in flags
    for value in (None, "", "yes", "2"):  # unset or not 0/1: detection
        if value is None:
            monkeypatch.delenv("DISCO_CPU_BF16", raising=False)
        else:
            monkeypatch.setenv("DISCO_CPU_BF16", value)
        cpu_has_native_bf16.cache_clear()
        assert cpu_has_native_bf16() is expected
        assert default_compute_dtype(torch.zeros(2, 2)) == (torch.bfloat16 if expected else torch.float32)
        assert default_compute_dtype(torch.zeros(2, 2, dtype=F64)) == F64


def test_lmo_spec_keeps_bf16_results_for_the_commit():
    from disco.ops import LMOSpec

    stack = gaussian(2, 32, 96, seed=12, dtype=torch.float32)
    kept = LMOSpec(backend="gram_newtonschulz5", compute_dtype=torch.bfloat16, result_in_compute_dtype=True)
    cast = LMOSpec(backend="gram_newtonschulz5", compute_dtype=torch.bfloat16)
    a, b = kept(stack), cast(stack)
    assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
    assert torch.equal(a.float(), b)  # the same values: only the cast is skipped
    # never wider than the input, and the exact SVD backend keeps the input's dtype
    wide = LMOSpec(compute_dtype=torch.float64, result_in_compute_dtype=True)(stack)
    assert wide.dtype == torch.float32
    svd = LMOSpec(backend="svd", compute_dtype=torch.bfloat16, result_in_compute_dtype=True)(stack)
    assert svd.dtype == torch.float32
