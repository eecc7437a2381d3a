"""disco.ops LMOs: each norm's duality promise, matrix views (conv, experts), parameter stacks, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disco.ops import NORMS, get_norm, lmo, matrix_view, norm_factor, norm_names, orthogonalize

# the math in exact fp32 against float64 / SVD oracles: fp32 matmuls in fp32 whatever the session's precision
# (the library under a user's "medium": tests/test_cpu_independence.py)
pytestmark = pytest.mark.usefixtures("fp32_matmuls")

torch.set_num_threads(1)

SPECTRAL_FAMILY = {  # name -> factor(out, in), written from the definitions (FACTS "Scale factors")
    "spectral": lambda o, i: math.sqrt(o / i),
    "original": lambda o, i: math.sqrt(max(1.0, o / i)),
    "match_rms_adamw": lambda o, i: 0.2 * math.sqrt(max(o, i)),
    "image_spectral": lambda o, i: max(1.0, math.sqrt(o / i)),
}
ROW_NORMS = {  # name -> factor(dim) on unit-l2 rows of a [vocab, dim] matrix
    "embed_sqrt": lambda d: math.sqrt(d),
    "embed_linear": lambda d: float(d),
    "unembed_sqrt": lambda d: 1 / math.sqrt(d),
    "unembed_linear": lambda d: 1 / d,
}


def gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def inner(A: torch.Tensor, B: torch.Tensor) -> float:
    return (A.double() * B.double()).sum().item()


def test_registry_names():
    assert set(norm_names()) == {*SPECTRAL_FAMILY, *ROW_NORMS, "conv_spectral", "sign", "bias_rms", "none"}
    assert set(NORMS) == set(norm_names())
    with pytest.raises(ValueError, match="spectral") as e:
        get_norm("spectrl")
    assert "embed_sqrt" in str(e.value) and "bias_rms" in str(e.value)
    with pytest.raises(ValueError, match="valid"):
        lmo(torch.ones(3, 3), norm="bogus")
    with pytest.raises(ValueError, match="valid"):
        norm_factor("bogus", (3, 3))
    with pytest.raises(ValueError, match="newtonschulz5"):
        lmo(torch.ones(3, 3), norm="spectral", backend="bogus")


@pytest.mark.parametrize("norm", sorted(SPECTRAL_FAMILY))
@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (20, 20)], ids=str)
def test_spectral_family_duality(norm, shape):
    """<G, LMO(G)> = factor * ||G||_nuclear and ||LMO(G)||_op = factor: the maximiser over the scaled ball."""
    G = gaussian(*shape, seed=1)
    factor = SPECTRAL_FAMILY[norm](*shape)
    assert norm_factor(norm, shape) == pytest.approx(factor, rel=1e-15)
    D = lmo(G, norm=norm, backend="svd")
    nuclear = torch.linalg.svdvals(G).sum().item()
    assert inner(G, D) == pytest.approx(factor * nuclear, rel=1e-12)
    s = torch.linalg.svdvals(D)
    assert s.max().item() == pytest.approx(factor, rel=1e-12) and s.min().item() == pytest.approx(factor, rel=1e-10)
    for seed in range(5):  # any other point of the ball pairs lower with G
        other = factor * orthogonalize(gaussian(*shape, seed=100 + seed), backend="svd")
        assert inner(G, other) < inner(G, D)


@pytest.mark.parametrize("norm", sorted(ROW_NORMS))
def test_row_norms_duality(norm):
    vocab, dim = 30, 12
    G = gaussian(vocab, dim, seed=2)
    G[3] = 0  # a token without gradient stays zero
    factor = ROW_NORMS[norm](dim)
    assert norm_factor(norm, (vocab, dim)) == pytest.approx(factor, rel=1e-15)
    D = lmo(G, norm=norm, backend="identity")
    row_l2 = torch.linalg.vector_norm(G, dim=-1)
    assert inner(G, D) == pytest.approx(factor * row_l2.sum().item(), rel=1e-12)
    d_rows = torch.linalg.vector_norm(D, dim=-1)
    assert (D[3] == 0).all()
    torch.testing.assert_close(d_rows[row_l2 > 0], torch.full_like(d_rows[row_l2 > 0], factor), rtol=1e-12, atol=0)
    # each row points along the gradient's row
    cos = (D * G).sum(-1)[row_l2 > 0] / (d_rows * row_l2)[row_l2 > 0]
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_sign_duality():
    G = gaussian(7, 9, seed=3)
    G[0, 0] = 0
    D = lmo(G, norm="sign")
    assert inner(G, D) == pytest.approx(G.abs().sum().item(), rel=1e-14)
    assert D.abs().max().item() == 1 and D[0, 0] == 0
    assert set(D.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(lmo(G[0], norm="sign"), D[0])  # vectors too


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_bias_rms(dtype):
    b = gaussian(17, seed=4, dtype=dtype) * 1e-3
    D = lmo(b, norm="bias_rms")
    assert D.dtype == dtype
    tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert abs(D.double().pow(2).mean().sqrt().item() - 1) < tol
    torch.testing.assert_close(D.double(), (b.double() / b.double().pow(2).mean().sqrt()), rtol=tol, atol=tol)
    stack = gaussian(3, 5, seed=5, dtype=dtype)  # three biases, one per row
    S = lmo(stack, norm="bias_rms", param_ndim=1)
    rms = S.double().pow(2).mean(-1).sqrt()
    assert (rms - 1).abs().max().item() < tol
    assert (lmo(torch.zeros(4, dtype=dtype), norm="bias_rms") == 0).all()


def test_none_returns_a_copy():
    G = gaussian(3, 4, seed=6)
    D = lmo(G, norm="none")
    assert torch.equal(D, G) and D.data_ptr() != G.data_ptr()
    assert norm_factor("none", (5,)) == 1.0 and norm_factor("sign", (2, 3)) == 1.0


@pytest.mark.parametrize("backend", ["svd", "newtonschulz5", "polar_express"])
def test_conv_spectral_is_the_flattened_view(backend):
    out, cin, k = 8, 4, 3
    W = gaussian(out, cin, k, k, seed=7, dtype=torch.float32)
    D = lmo(W, norm="conv_spectral", backend=backend)
    assert D.shape == W.shape
    factor = math.sqrt(out / cin) / (k * k)
    assert norm_factor("conv_spectral", W.shape) == pytest.approx(factor, rel=1e-15)
    expected = orthogonalize(W.reshape(out, cin * k * k), backend=backend) * factor
    torch.testing.assert_close(D.reshape(out, -1), expected)
    assert matrix_view(W, "conv_spectral").shape == (out, cin * k * k)
    if backend == "svd":  # and its duality on the view
        nuclear = torch.linalg.svdvals(W.double().reshape(out, -1)).sum().item()
        assert inner(W, D) == pytest.approx(factor * nuclear, rel=1e-5)


@pytest.mark.parametrize("backend", ["svd", "newtonschulz5"])
def test_expert_weights_are_per_expert(backend):
    E, m, n = 4, 12, 20
    W = gaussian(E, m, n, seed=8, dtype=torch.float32)
    D = lmo(W, norm="spectral", backend=backend)
    assert norm_factor("spectral", (E, m, n)) == pytest.approx(math.sqrt(m / n))
    for e in range(E):
        torch.testing.assert_close(D[e], lmo(W[e], norm="spectral", backend=backend), atol=2e-6, rtol=1e-5)


STACKS = [  # norm, parameter shape, param_ndim, backend
    ("spectral", (12, 20), 2, "svd"),
    ("original", (20, 12), 2, "newtonschulz5"),
    ("match_rms_adamw", (16, 8), 2, "polar_express"),
    ("image_spectral", (8, 16), 2, "svd"),
    ("conv_spectral", (6, 3, 3, 3), 4, "svd"),
    ("conv_spectral", (6, 3, 2), 3, "newtonschulz5"),
    ("spectral", (2, 8, 12), 3, "svd"),  # experts inside each stacked parameter
    ("embed_sqrt", (10, 6), 2, "identity"),
    ("unembed_linear", (10, 6), 2, "identity"),
    ("sign", (5,), 1, "identity"),
    ("bias_rms", (5,), 1, "identity"),
    ("bias_rms", (4, 5), 2, "identity"),
    ("none", (3, 4), 2, "identity"),
]


@pytest.mark.parametrize("norm,pshape,pd,backend", STACKS, ids=lambda x: str(x))
def test_param_ndim_stack_equals_one_by_one(norm, pshape, pd, backend):
    G = gaussian(3, *pshape, seed=9, dtype=torch.float32)
    D = lmo(G, norm=norm, backend=backend, param_ndim=pd)
    assert D.shape == G.shape and D.dtype == G.dtype
    for i in range(3):
        one = lmo(G[i], norm=norm, backend=backend)
        torch.testing.assert_close(D[i], one, atol=2e-6, rtol=1e-5)
    if pd >= 2 and get_norm(norm).kind != "elementwise":
        assert norm_factor(norm, G.shape, pd) == norm_factor(norm, pshape)


def test_matrix_norms_reject_vectors():
    with pytest.raises(ValueError, match="matrix"):
        lmo(torch.ones(5), norm="spectral")
    with pytest.raises(ValueError, match="matrix"):
        norm_factor("spectral", (5,))
    with pytest.raises(ValueError, match="matrix"):
        lmo(torch.ones(3, 5), norm="embed_sqrt", param_ndim=1)


@pytest.mark.parametrize("norm", norm_names())
@pytest.mark.parametrize("backend", ["svd", "newtonschulz5", "polar_express", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_zero_gradient_gives_zeros_and_dtype_kept(norm, backend, dtype):
    shape = (4, 3, 2, 2) if norm == "conv_spectral" else (6, 5)
    G = torch.zeros(shape, dtype=dtype)
    D = lmo(G, norm=norm, backend=backend, eps=1e-20)
    assert D.dtype == dtype and D.shape == G.shape and (D == 0).all()
    D = lmo(G, norm=norm, backend=backend)
    assert (D == 0).all()


@pytest.mark.parametrize("norm", norm_names())
def test_input_not_modified(norm):
    shape = (4, 3, 2, 2) if norm == "conv_spectral" else (6, 5)
    G = gaussian(*shape, seed=10, dtype=torch.float32)
    keep = G.clone()
    backend = "identity" if get_norm(norm).kind == "rows" else "newtonschulz5"
    D = lmo(G, norm=norm, backend=backend)
    D.add_(1.0)  # the result never aliases the input
    assert torch.equal(G, keep)


# ---------------------------------------------------------------------------------------------- hypothesis

mats = st.tuples(st.lists(st.integers(1, 3), min_size=0, max_size=2), st.integers(1, 48), st.integers(1, 48)).map(
    lambda t: (*t[0], t[1], t[2])
)


@settings(max_examples=30, deadline=None)
@given(
    shape=mats,
    norm=st.sampled_from(sorted(SPECTRAL_FAMILY)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_spectral_family_duality(shape, norm, dtype, seed):
    G = gaussian(*shape, seed=seed, dtype=dtype)
    D = lmo(G, norm=norm, backend="svd", param_ndim=2)
    assert D.shape == G.shape and D.dtype == dtype and torch.isfinite(D).all()
    factor = SPECTRAL_FAMILY[norm](*shape[-2:])
    nuclear = torch.linalg.svdvals(G.double()).sum().item()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert inner(G, D) == pytest.approx(factor * nuclear, rel=tol)
    assert torch.linalg.svdvals(D.double()).max().item() <= factor * (1 + tol)


@settings(max_examples=30, deadline=None)
@given(
    shape=mats,
    norm=st.sampled_from(sorted(ROW_NORMS)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_row_norms(shape, norm, dtype, seed):
    G = gaussian(*shape, seed=seed, dtype=dtype)
    D = lmo(G, norm=norm, backend="identity", param_ndim=2)
    assert D.shape == G.shape and D.dtype == dtype
    factor = ROW_NORMS[norm](shape[-1])
    rows = torch.linalg.vector_norm(D.double(), dim=-1)
    torch.testing.assert_close(rows, torch.full_like(rows, factor), rtol=1e-5, atol=0)
    assert inner(G, D) == pytest.approx(factor * torch.linalg.vector_norm(G.double(), dim=-1).sum().item(), rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    shape=mats,
    norm=st.sampled_from(["spectral", "conv_spectral", "original"]),
    backend=st.sampled_from(["newtonschulz5", "polar_express"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_newton_schulz_lmo_is_bounded_and_aligned(shape, norm, backend, seed):
    G = gaussian(*shape, seed=seed, dtype=torch.float32)
    D = lmo(G, norm=norm, backend=backend)
    factor = norm_factor(norm, tuple(G.shape))
    assert torch.isfinite(D).all()
    s = torch.linalg.svdvals(matrix_view(D, norm).double())
    assert s.max().item() <= 1.21 * factor + 1e-6  # keller's scalar map stays below 1.21 (test_ops_orthogonalize)
    assert inner(G, D) > 0  # a descent direction: positively aligned with the gradient
