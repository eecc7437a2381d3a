"""disco.ops orthogonalization: coefficient tables, backends, invariants; SVD in float64 is the oracle.

The accuracy bands below were measured on Gaussian inputs (CPU, fp32, 3 seeds, shapes with aspect ratio >= 2,
where the smallest singular value is bounded away from 0) and are asserted with a small margin:

=============================  =====  ==================  ================  ================
backend / table                steps  rel. Frobenius err  measured band     asserted band
=============================  =====  ==================  ================  ================
newtonschulz5 / keller         5      0.21 - 0.22         [0.6818, 1.1344]  [0.67, 1.15]
newtonschulz5 / you            5      0.018 - 0.019       [0.9778, 1.0318]  [0.97, 1.04]
polar_express / polar_express  5      0.085 - 0.094       [0.8703, 1.1236]  [0.86, 1.13]
polar_express / polar_express  8      1e-6 - 3e-6         [1.0000, 1.0000]  err < 3e-5
polar_express / polar_express_5 5     0.091 - 0.098       [0.8589, 1.1411]  [0.85, 1.15]
=============================  =====  ==================  ================  ================

Square Gaussian matrices have singular values near 0, so no table lifts them into the band in 5 steps; for
those (and any input) only the upper bound of each table's scalar map holds, which is tested separately.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disco.ops import (
    BACKENDS,
    TABLES,
    CoefficientTable,
    backend_names,
    default_compute_dtype,
    get_table,
    newton_schulz,
    orthogonalize,
    orthogonalize_cost,
    table_names,
)

# the math in exact fp32 against float64 / SVD oracles: fp32 matmuls in fp32 whatever the session's precision
# (the library under a user's "medium": tests/test_cpu_independence.py)
pytestmark = pytest.mark.usefixtures("fp32_matmuls")

torch.set_num_threads(1)

NS_CONFIGS = [  # (backend, table) pairs that run the Newton-Schulz iteration
    ("newtonschulz5", "keller"),
    ("newtonschulz5", "you"),
    ("polar_express", "polar_express"),
    ("polar_express", "polar_express_5"),
]
ALL_CONFIGS = [*NS_CONFIGS, ("svd", None), ("identity", None)]
RECT_SHAPES = [(256, 64), (64, 256), (192, 96), (96, 48)]


def gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def polar64(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def rel_err(O: torch.Tensor, P: torch.Tensor) -> float:
    return ((O.double() - P.double()).norm() / P.double().norm()).item()


def svals(O: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(O.double())


def scalar_map(table: CoefficientTable, steps: int, x: torch.Tensor) -> torch.Tensor:
    """What Newton-Schulz does to each normalised singular value: x <- a x + b x^3 + c x^5, step by step."""
    for k in range(steps):
        a, b, c = table.at(k)
        x = a * x + b * x**3 + c * x**5
    return x


def sup_of_map(table: CoefficientTable, steps: int) -> float:
    x = torch.linspace(0, 1, 200001, dtype=torch.float64)
    return scalar_map(table, steps, x).max().item()


# --------------------------------------------------------------------------------------------- tables / bands


BANDS = [  # backend, table, steps, (err_lo, err_hi), (sv_lo, sv_hi)
    ("newtonschulz5", "keller", 5, (0.15, 0.26), (0.67, 1.15)),
    ("newtonschulz5", "you", 5, (0.008, 0.03), (0.97, 1.04)),
    ("polar_express", "polar_express", 5, (0.06, 0.12), (0.86, 1.13)),
    ("polar_express", "polar_express", 8, (0.0, 3e-5), (0.9999, 1.0001)),
    ("polar_express", "polar_express_5", 5, (0.06, 0.12), (0.85, 1.15)),
]


@pytest.mark.parametrize("backend,table,steps,err_band,sv_band", BANDS, ids=[f"{b[1]}-{b[2]}" for b in BANDS])
@pytest.mark.parametrize("shape", RECT_SHAPES, ids=str)
def test_table_accuracy_band_on_gaussian(backend, table, steps, err_band, sv_band, shape):
    for seed in range(2):
        G = gaussian(*shape, seed=seed)
        O = orthogonalize(G, backend=backend, coefficients=table, steps=steps, compute_dtype=torch.float32)
        err = rel_err(O, polar64(G))
        s = svals(O)
        assert err_band[0] <= err <= err_band[1], f"{table}/{steps}: rel err {err:.4g} outside {err_band}"
        assert sv_band[0] <= s.min().item() and s.max().item() <= sv_band[1], (
            f"{table}/{steps}: singular values [{s.min():.4f}, {s.max():.4f}] outside {sv_band}"
        )


def test_keller_band_is_within_the_advertised_range_and_default():
    # The design promise (FACTS): keller with 5 steps keeps singular values in about [0.68, 1.14].
    G = gaussian(512, 128, seed=3)
    s = svals(orthogonalize(G, backend="newtonschulz5", steps=5))  # default table of newtonschulz5 is keller
    assert s.min().item() >= 0.6 and s.max().item() <= 1.25


def test_polar_express_8_steps_fp32_converges():
    G = gaussian(1024, 256, seed=1)
    O = orthogonalize(G, backend="polar_express", steps=8)  # default table of polar_express
    assert rel_err(O, polar64(G)) < 1e-3


def test_more_polar_express_steps_in_fp64_reach_machine_precision():
    G = gaussian(96, 48, seed=2, dtype=torch.float64)
    O = orthogonalize(G, backend="polar_express", steps=12)
    assert O.dtype == torch.float64
    assert rel_err(O, polar64(G)) < 1e-12


@pytest.mark.parametrize("table", sorted(TABLES))
def test_upper_bound_holds_for_any_input(table):
    """The scalar map's sup over [0, 1] bounds the output singular values whatever the conditioning."""
    bound = sup_of_map(TABLES[table], 5)
    U = torch.linalg.qr(gaussian(128, 128, seed=4, dtype=torch.float64))[0]
    V = torch.linalg.qr(gaussian(128, 128, seed=5, dtype=torch.float64))[0]
    ill = U @ torch.diag(torch.logspace(0, -3, 128, dtype=torch.float64)) @ V.T  # condition number 1e3
    for G in (gaussian(128, 128, seed=6), ill.float(), gaussian(1, 37, seed=7), gaussian(5, 5, seed=8)):
        O = orthogonalize(G, backend="polar_express", coefficients=table, steps=5)
        assert svals(O).max().item() <= bound + 1e-4
    assert bound < {"keller": 1.21, "you": 1.15, "polar_express": 1.13, "polar_express_5": 1.15}[table]


@pytest.mark.parametrize("table", [*sorted(TABLES), "custom_cycle", "custom_repeat"])
@pytest.mark.parametrize("steps", [0, 1, 3, 7])
def test_newton_schulz_equals_scalar_map_on_singular_values(table, steps):
    """In fp64 the iteration is exactly U f(S / (s ||G||_F + eps)) V^T: checks order, safety, eps, modes."""
    custom = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    tab = {
        "custom_cycle": get_table(custom, mode="cycle"),
        "custom_repeat": get_table(custom, mode="repeat_last"),
    }.get(table) or TABLES[table]
    U = torch.linalg.qr(gaussian(40, 24, seed=9, dtype=torch.float64))[0]
    V = torch.linalg.qr(gaussian(24, 24, seed=10, dtype=torch.float64))[0]
    S = torch.linspace(2.0, 0.01, 24, dtype=torch.float64)
    G = U @ torch.diag(S) @ V.T  # tall: exercises the transpose path
    x = S / (tab.safety * S.norm() + tab.eps)
    expected = U @ torch.diag(scalar_map(tab, steps, x)) @ V.T
    for H, E in ((G, expected), (G.mT, expected.mT)):
        O = newton_schulz(H, steps=steps, coefficients=tab)
        torch.testing.assert_close(O, E, atol=1e-10, rtol=0)


def test_table_registry_and_aliases():
    assert set(table_names()) == {"keller", "you", "polar_express", "polar_express_5", "simple", "quintic"}
    assert get_table("simple") is TABLES["keller"]
    assert get_table("quintic") is TABLES["you"]
    assert TABLES["keller"].tuples == ((3.4445, -4.7750, 2.0315),) and TABLES["keller"].mode == "cycle"
    assert len(TABLES["you"].tuples) == 5 and TABLES["you"].mode == "cycle"
    assert TABLES["polar_express"].mode == "repeat_last" and TABLES["polar_express_5"].mode == "repeat_last"
    assert (TABLES["polar_express"].safety, TABLES["polar_express_5"].safety) == (1.01, 1.02)
    with pytest.raises(ValueError, match="keller"):
        get_table("kellr")
    t = CoefficientTable("x", ((1.0, 0.0, 0.0),))
    assert get_table(t) is t


@pytest.mark.parametrize("alias,name", [("simple", "keller"), ("quintic", "you")])
def test_alias_gives_identical_result(alias, name):
    G = gaussian(48, 32, seed=11)
    a = orthogonalize(G, backend="newtonschulz5", coefficients=alias, steps=5)
    b = orthogonalize(G, backend="newtonschulz5", coefficients=name, steps=5)
    assert torch.equal(a, b)


def test_polar_express_safety_scaling_of_the_paper_tuples():
    t = TABLES["polar_express"].tuples
    assert len(t) == 8
    a0, b0, c0 = 8.28721201814563, -23.595886519098837, 17.300387312530933
    assert t[0] == pytest.approx((a0 / 1.01, b0 / 1.01**3, c0 / 1.01**5), rel=1e-15)
    assert t[7] == (1.875, -1.25, 0.375)  # the last tuple is not scaled
    # the exact Polar Express iteration sends [~0.001, 1] into a neighbourhood of 1 after 8 steps
    x = torch.linspace(1e-3, 1, 1001, dtype=torch.float64) / 1.01
    y = scalar_map(TABLES["polar_express"], 8, x)
    assert (y - 1).abs().max().item() < 1e-2


def test_user_tuples_need_an_explicit_mode():
    two = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    with pytest.raises(ValueError, match="mode"):
        get_table(two)
    with pytest.raises(ValueError, match="mode"):
        get_table(two, mode="bogus")
    with pytest.raises(ValueError):
        get_table([(1.0, 2.0)], mode="cycle")
    single = get_table((3.4445, -4.7750, 2.0315))  # torch.optim.Muon's ns_coefficients form: no mode needed
    assert single.tuples == TABLES["keller"].tuples
    assert get_table([(3.4445, -4.7750, 2.0315)]).tuples == TABLES["keller"].tuples
    cyc, rep = get_table(two, mode="cycle"), get_table(two, mode="repeat_last")
    assert [cyc.at(k) for k in range(2)] == [rep.at(k) for k in range(2)]
    assert cyc.at(2) == two[0] and rep.at(2) == two[1] and cyc.at(3) == two[1]
    G = gaussian(32, 48, seed=12)
    same = [orthogonalize(G, coefficients=tab, steps=2) for tab in (cyc, rep)]
    assert torch.equal(same[0], same[1])  # within the list both modes agree
    beyond = [orthogonalize(G, coefficients=tab, steps=3) for tab in (cyc, rep)]
    assert (beyond[0] - beyond[1]).abs().max().item() > 1e-3  # beyond it they differ
    assert get_table("keller", mode="repeat_last").mode == "repeat_last"  # mode overrides a named table


# ---------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("backend,table", ALL_CONFIGS, ids=lambda x: str(x))
def test_batched_equals_one_by_one(backend, table):
    G = gaussian(2, 3, 20, 12, seed=13)
    O = orthogonalize(G, backend=backend, coefficients=table, steps=5)
    assert O.shape == G.shape
    for i in range(2):
        for j in range(3):
            one = orthogonalize(G[i, j], backend=backend, coefficients=table, steps=5)
            torch.testing.assert_close(O[i, j], one, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,table", ALL_CONFIGS, ids=lambda x: str(x))
def test_tall_equals_transpose_of_wide(backend, table):
    G = gaussian(16, 40, seed=14)
    wide = orthogonalize(G, backend=backend, coefficients=table, steps=5)
    tall = orthogonalize(G.mT.contiguous(), backend=backend, coefficients=table, steps=5)
    torch.testing.assert_close(tall, wide.mT, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "shape,transposed",
    [((3, 24, 40), False), ((40, 24), True), ((0, 5, 7), False), ((2, 80, 60), False), ((90, 70), True)],
)
def test_normalised_input_is_one_rounding_of_the_fp32_product(dtype, shape, transposed):
    """The normalised input in the compute dtype is ``G * (1 / (s ||G|| + eps))`` computed in fp32 and rounded
    once, whatever path writes it (a same-dtype input takes a faster one on CPU)."""
    from disco.ops.orthogonalize import _normalised

    G = (gaussian(*shape, seed=21) * 3).to(dtype)
    G = G.mT.contiguous().mT if transposed else G
    X, tall = _normalised(G, 1.01, 1e-7, dtype)
    norm = torch.linalg.vector_norm(G.float(), dim=(-2, -1), keepdim=True)
    want = (G.float() * (norm * 1.01 + 1e-7).reciprocal()).to(dtype)
    want = want.mT if tall else want
    assert torch.equal(X, want.reshape(X.shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 600, 500), (1, 1, 300_001), (0, 600, 500)])
def test_frobenius_norm_in_pieces_equals_float64(dtype, shape):
    """Matrices above ``NORMALISE_CHUNK_BYTES`` in fp32 take their norm in pieces on CPU: the norm of the float64
    input to fp32 accuracy (an fp32 sum of 300,000 squares: 1e-5 here, 1.4e-5 for the one-call fp32 norm), per
    matrix, shaped ``(..., 1, 1)``."""
    from disco.ops.orthogonalize import NORMALISE_CHUNK_BYTES, _frobenius

    G = (gaussian(*shape, seed=22) * 5).to(dtype)
    assert shape[-2] * shape[-1] * 4 > NORMALISE_CHUNK_BYTES
    got = _frobenius(G)
    want = torch.linalg.vector_norm(G.double(), dim=(-2, -1), keepdim=True)
    assert got.shape == (*shape[:-2], 1, 1) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=3e-5, atol=0)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [None, 1e-20, 0.0])
def test_zero_input_gives_zeros(backend, dtype, compute_dtype, eps):
    G = torch.zeros(2, 6, 9, dtype=dtype)
    O = orthogonalize(G, backend=backend, steps=5, eps=eps, compute_dtype=compute_dtype)
    assert O.dtype == dtype and O.shape == G.shape
    assert torch.isfinite(O).all() and (O == 0).all()


@pytest.mark.parametrize("backend,table", NS_CONFIGS + [("svd", None)], ids=lambda x: str(x))
def test_zero_matrix_in_a_batch_does_not_disturb_the_others(backend, table):
    G = gaussian(3, 24, 12, seed=15)
    G[1] = 0
    O = orthogonalize(G, backend=backend, coefficients=table, steps=5, eps=1e-20)
    assert (O[1] == 0).all() and torch.isfinite(O).all()
    torch.testing.assert_close(O[0], orthogonalize(G[0], backend=backend, coefficients=table, steps=5))


def test_svd_maps_the_null_space_to_zero():
    A = gaussian(32, 3, seed=16, dtype=torch.float64) @ gaussian(3, 24, seed=17, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(A, full_matrices=False)
    P = U[:, :3] @ Vh[:3]
    for dtype in (torch.float64, torch.float32):
        O = orthogonalize(A.to(dtype), backend="svd")
        assert O.dtype == dtype
        assert rel_err(O, P) < (1e-12 if dtype == torch.float64 else 1e-5)
        s = svals(O)
        assert (s[:3] - 1).abs().max() < 1e-5 and s[3:].max() < 1e-5
        null = Vh[3:].mT.to(dtype)  # right null space of A
        assert (O @ null).abs().max() < 1e-5


@pytest.mark.parametrize("dtype,small", [(torch.float32, 1e-5), (torch.float64, 2e-14)])
def test_svd_keeps_small_but_genuine_singular_values(dtype, small):
    """6 of 96 singular values at ``small`` (relative): real directions, kept (a rank-revealing ``max(m, n) *
    eps`` cut would drop them, error 0.25); they are only resolved to about eps / small, hence the 0.02."""
    U = torch.linalg.qr(gaussian(128, 96, seed=27, dtype=torch.float64))[0]
    V = torch.linalg.qr(gaussian(96, 96, seed=28, dtype=torch.float64))[0]
    S = torch.cat([torch.ones(90, dtype=torch.float64), torch.full((6,), small, dtype=torch.float64)])
    G = (U @ torch.diag(S) @ V.T).to(dtype)
    O = orthogonalize(G, backend="svd")
    assert rel_err(O, polar64(G)) < 0.02
    assert (svals(O) > 0.9).all()


@pytest.mark.parametrize("backend,table", NS_CONFIGS, ids=lambda x: str(x))
def test_newton_schulz_on_rank_deficient_input(backend, table):
    A = gaussian(32, 3, seed=18, dtype=torch.float64) @ gaussian(3, 24, seed=19, dtype=torch.float64)
    _, _, Vh = torch.linalg.svd(A, full_matrices=False)
    null = Vh[3:].mT
    O64 = orthogonalize(A, backend=backend, coefficients=table, steps=8)
    assert (O64 @ null).abs().max() < 1e-10  # odd polynomial: the null space stays exactly null
    O32 = orthogonalize(A.float(), backend=backend, coefficients=table, steps=8)
    assert torch.isfinite(O32).all()
    assert svals(O32).max() < 1.25 and (O32.double() @ null).abs().max() < 1e-2  # rounding noise, amplified


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtype_and_shape_preserved(backend, dtype):
    G = gaussian(2, 12, 20, seed=20).to(dtype)
    O = orthogonalize(G, backend=backend, steps=3)
    assert O.dtype == dtype and O.shape == G.shape and torch.isfinite(O).all()
    if backend != "identity":
        ref = orthogonalize(G.double(), backend=backend, steps=3)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
        assert rel_err(O, ref) < tol


def test_low_precision_compute_is_close_to_fp32():
    G = gaussian(48, 96, seed=21)
    ref = orthogonalize(G, steps=5, compute_dtype=torch.float32)
    for cd, tol in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        O = orthogonalize(G, steps=5, compute_dtype=cd)
        assert O.dtype == torch.float32 and rel_err(O, ref) < tol


def test_fp16_compute_survives_large_and_tiny_gradients():
    G = gaussian(24, 40, seed=22)
    for scale in (1e6, 1e-9):  # 1e6 overflows fp16 if cast before normalising; 1e-9 flushes to zero
        ref = orthogonalize(G * scale, backend="polar_express", steps=5, eps=1e-20)
        O = orthogonalize(G * scale, backend="polar_express", steps=5, eps=1e-20, compute_dtype=torch.float16)
        assert torch.isfinite(O).all() and svals(O).max() > 0.5 and rel_err(O, ref) < 5e-3


def test_default_compute_dtype_cpu_branch():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert default_compute_dtype(torch.zeros(2, 2, dtype=dtype)) == torch.float32
    assert default_compute_dtype(torch.zeros(2, 2, dtype=torch.float64)) == torch.float64
    G = gaussian(24, 40, seed=23).bfloat16()
    assert torch.equal(orthogonalize(G), orthogonalize(G, compute_dtype=torch.float32))


def test_default_compute_dtype_accelerator_branch_with_meta_device():
    assert default_compute_dtype(torch.empty(4, 4, device="meta")) == torch.bfloat16
    O = orthogonalize(torch.empty(3, 4, 6, device="meta"), steps=2)  # runs end to end without data
    assert O.shape == (3, 4, 6) and O.dtype == torch.float32 and O.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_default_compute_dtype_cuda():
    G = gaussian(64, 128, seed=24).cuda()
    assert default_compute_dtype(G) == torch.bfloat16
    O = orthogonalize(G, backend="polar_express", steps=5)
    assert O.dtype == torch.float32 and rel_err(O.cpu(), orthogonalize(G.cpu(), backend="polar_express")) < 3e-2


def test_argument_errors_and_empty_inputs():
    with pytest.raises(ValueError, match="newtonschulz5"):
        orthogonalize(torch.ones(2, 2), backend="bogus")
    assert set(backend_names()) == {
        "newtonschulz5",
        "polar_express",
        "gram_newtonschulz5",
        "gram_polar_express",
        "svd",
        "identity",
    }
    with pytest.raises(ValueError):
        orthogonalize(torch.ones(4))
    with pytest.raises(ValueError):
        orthogonalize(torch.ones(3, 3), steps=-1)
    for shape in ((0, 5), (5, 0), (0, 3, 4)):
        assert orthogonalize(torch.ones(shape)).shape == shape


def test_identity_backend_copies():
    G = gaussian(4, 5, seed=25)
    O = orthogonalize(G, backend="identity")
    assert torch.equal(O, G) and O.data_ptr() != G.data_ptr()


def test_negation_is_odd_and_input_untouched():
    G = gaussian(20, 30, seed=26)
    keep = G.clone()
    for backend, table in NS_CONFIGS + [("svd", None)]:
        O = orthogonalize(G, backend=backend, coefficients=table)
        torch.testing.assert_close(orthogonalize(-G, backend=backend, coefficients=table), -O)
    assert torch.equal(G, keep)


def test_orthogonalize_cost():
    assert orthogonalize_cost((64, 32)) == 64 * 32 * 32
    assert orthogonalize_cost((3, 2, 10, 40)) == 6 * 10 * 40 * 10


# ---------------------------------------------------------------------------------------------- hypothesis

shapes = st.tuples(st.lists(st.integers(1, 3), min_size=0, max_size=2), st.integers(1, 48), st.integers(1, 48)).map(
    lambda t: (*t[0], t[1], t[2])
)
configs = st.sampled_from(NS_CONFIGS + [("svd", None)])
dtypes = st.sampled_from([torch.float32, torch.float64])


@settings(max_examples=30, deadline=None)
@given(shape=shapes, config=configs, dtype=dtypes, seed=st.integers(0, 2**31 - 1))
def test_property_orthogonalize(shape, config, dtype, seed):
    backend, table = config
    G = gaussian(*shape, seed=seed, dtype=dtype)
    O = orthogonalize(G, backend=backend, coefficients=table, steps=5)
    assert O.shape == G.shape and O.dtype == dtype and torch.isfinite(O).all()
    s = svals(O)
    if backend == "svd":  # a partial isometry: singular values are 1 (or 0 on a null space)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        assert ((s - 1).abs() < tol).logical_or(s < tol).all()
    else:
        assert s.max().item() <= sup_of_map(get_table(table), 5) + 1e-4
    # tall = transpose of wide, and batched = one-by-one (checked on the first matrix of the batch)
    T = orthogonalize(G.mT, backend=backend, coefficients=table, steps=5)
    torch.testing.assert_close(T, O.mT, atol=1e-5, rtol=1e-5)
    if G.dim() > 2:
        first = G.reshape(-1, *G.shape[-2:])[0]
        one = orthogonalize(first, backend=backend, coefficients=table, steps=5)
        torch.testing.assert_close(O.reshape(-1, *G.shape[-2:])[0], one, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(2, 48), n=st.integers(2, 48), seed=st.integers(0, 2**31 - 1))
def test_property_polar_express_fp64_matches_svd_on_well_conditioned(m, n, seed):
    k = min(m, n)
    U = torch.linalg.qr(gaussian(m, k, seed=seed, dtype=torch.float64))[0]
    V = torch.linalg.qr(gaussian(n, k, seed=seed + 1, dtype=torch.float64))[0]
    S = torch.linspace(1.0, 0.5, k, dtype=torch.float64)  # condition number 2: 8 Polar Express steps suffice
    G = U @ torch.diag(S) @ V.T
    O = orthogonalize(G, backend="polar_express", steps=8)
    assert rel_err(O, U @ V.T) < 1e-6 * math.sqrt(k) + 1e-9
