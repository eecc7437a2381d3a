"""disco.ops operator norms against direct float64 definitions (numpy), batched, with their dispatcher."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from disco.ops import OPERATOR_NORMS, condition_number, l1_to_rms, operator_norm, rms_to_inf, rms_to_rms, supremum
from disco.ops.norms import rms, spectral

torch.set_num_threads(1)

SHAPES = [(12, 8), (8, 12), (10, 10), (1, 7), (7, 1)]


def gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def rms_np(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)))


# Direct definitions, written from the operator norm sup_x ||W x||_out / ||x||_in on a fan_out x fan_in matrix
# (or on the embedding / head maps of a [vocab, dim] matrix), in float64 numpy.
def ref_rms_to_rms(W: np.ndarray) -> float:
    out_, in_ = W.shape
    return float(np.linalg.svd(W, compute_uv=False)[0]) * math.sqrt(in_ / out_)


def ref_l1_to_rms(W: np.ndarray) -> float:
    # embedding: one-hot x in R^vocab (l1 ball vertices e_i) -> W^T x = row i, measured in rms over dim
    return max(rms_np(W[i]) for i in range(W.shape[0]))


def ref_rms_to_inf(W: np.ndarray) -> float:
    # head: h in R^dim with rms(h) = 1 -> logits W h, max-abs; the sup is attained at h along a row
    dim = W.shape[1]
    best = 0.0
    for i in range(W.shape[0]):
        h = W[i] / np.linalg.norm(W[i]) * math.sqrt(dim) if np.linalg.norm(W[i]) > 0 else np.zeros(dim)
        best = max(best, float(np.abs(W @ h).max()) if h.any() else 0.0)
    return best


def ref_supremum(W: np.ndarray) -> float:
    return float(np.abs(W).max())


def ref_condition(W: np.ndarray) -> float:
    s = np.linalg.svd(W, compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else math.inf


CASES = [
    (rms_to_rms, ref_rms_to_rms, "rms_to_rms"),
    (l1_to_rms, ref_l1_to_rms, "l1_to_rms"),
    (rms_to_inf, ref_rms_to_inf, "rms_to_inf"),
    (supremum, ref_supremum, "supremum"),
    (condition_number, ref_condition, "condition_number"),
]


@pytest.mark.parametrize("fn,ref,name", CASES, ids=[c[2] for c in CASES])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_against_definition(fn, ref, name, shape, dtype):
    W = gaussian(*shape, seed=1, dtype=dtype)
    expected = ref(W.double().numpy())
    got = fn(W)
    assert got.shape == () and got.dtype == dtype
    assert got.item() == pytest.approx(expected, rel=1e-12 if dtype == torch.float64 else 1e-5)
    assert operator_norm(name, W).item() == got.item()


@pytest.mark.parametrize("fn,ref,name", CASES, ids=[c[2] for c in CASES])
def test_batched(fn, ref, name):
    W = gaussian(2, 3, 9, 6, seed=2, dtype=torch.float64)
    got = fn(W)
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert got[i, j].item() == pytest.approx(ref(W[i, j].numpy()), rel=1e-12)


def test_rms_to_rms_bounds_random_ratios():
    W = gaussian(16, 24, seed=3, dtype=torch.float64)
    bound = rms_to_rms(W).item()
    X = gaussian(24, 200, seed=4, dtype=torch.float64)
    ratios = (W @ X).pow(2).mean(0).sqrt() / X.pow(2).mean(0).sqrt()
    assert ratios.max().item() <= bound * (1 + 1e-12)
    v = torch.linalg.svd(W)[2][0]  # the top right singular vector attains it
    attained = ((W @ v).pow(2).mean().sqrt() / v.pow(2).mean().sqrt()).item()
    assert attained == pytest.approx(bound, rel=1e-12)


def test_rms_to_inf_bounds_random_ratios():
    W = gaussian(30, 8, seed=5, dtype=torch.float64)
    bound = rms_to_inf(W).item()
    H = gaussian(8, 500, seed=6, dtype=torch.float64)
    ratios = (W @ H).abs().amax(0) / H.pow(2).mean(0).sqrt()
    assert ratios.max().item() <= bound * (1 + 1e-12)


def test_lmo_duals_have_unit_operator_norm():
    # the LMO of each layer kind lies on the unit sphere of the norm it is tracked with
    from disco.ops import lmo

    G = gaussian(24, 16, seed=7, dtype=torch.float64)
    assert rms_to_rms(lmo(G, norm="spectral", backend="svd")).item() == pytest.approx(1.0, rel=1e-12)
    assert l1_to_rms(lmo(G, norm="embed_sqrt", backend="identity")).item() == pytest.approx(1.0, rel=1e-12)
    assert rms_to_inf(lmo(G, norm="unembed_sqrt", backend="identity")).item() == pytest.approx(1.0, rel=1e-12)
    assert supremum(lmo(G, norm="sign")).item() == 1.0


def test_condition_number_of_singular_and_zero_matrices_is_inf():
    assert condition_number(torch.zeros(4, 3)).item() == math.inf
    A = gaussian(6, 2, seed=8, dtype=torch.float64) @ gaussian(2, 5, seed=9, dtype=torch.float64)
    assert condition_number(A).item() > 1e12  # rank 2 of 5: numerically singular
    D = torch.diag(torch.tensor([3.0, 1.0, 0.0]))
    assert condition_number(D).item() == math.inf
    assert condition_number(torch.eye(5)).item() == pytest.approx(1.0)
    batch = torch.stack([torch.eye(3), torch.zeros(3, 3), torch.diag(torch.tensor([4.0, 2.0, 1.0]))])
    assert condition_number(batch).tolist() == [1.0, math.inf, 4.0]


def test_half_precision_inputs_are_computed_in_fp32():
    W = gaussian(12, 8, seed=10)
    for fn, _, _ in CASES:
        got = fn(W.bfloat16())
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(fn(W.bfloat16().float()).item(), rel=1e-6)


def test_spectral_and_rms():
    W = gaussian(5, 7, seed=11, dtype=torch.float64)
    assert spectral(W).item() == pytest.approx(float(np.linalg.norm(W.numpy(), 2)), rel=1e-12)
    assert rms(W).item() == pytest.approx(rms_np(W.numpy()), rel=1e-12)
    assert rms(torch.tensor([3.0, -4.0])).item() == pytest.approx(math.sqrt(12.5))


def test_registry_and_unknown_name():
    assert {"rms_to_rms", "l1_to_rms", "rms_to_inf", "supremum", "condition_number"} <= set(OPERATOR_NORMS)
    with pytest.raises(ValueError, match="rms_to_rms"):
        operator_norm("frobenius_typo", torch.eye(2))
