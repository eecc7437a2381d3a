"""Dion on one process against a float64 reference written from the paper (arXiv 2504.05295, Algorithm 1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from disco import Dion
from disco.ops.dion import column_normalize, dion_rank, orthonormalize

STEPS = 3


def _grads(shape, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def reference_dion(X, Q, grads, *, lr, mu, wd, eps=1e-8, power_iters=1, orientation="columns"):
    """Algorithm 1 per matrix, in float64: returns the final X (2-D), with the same start Q. ``"columns"`` runs it
    on the transposes (``P`` spans the columns), the scale ``sqrt(m / n)`` staying the weight's."""
    if orientation == "columns":
        scale = math.sqrt(X.shape[0] / X.shape[1])
        out = _algorithm_1(X.T, Q, [g.T for g in grads], lr, mu, wd, eps, power_iters, scale)
        return out.T
    return _algorithm_1(X, Q, grads, lr, mu, wd, eps, power_iters, math.sqrt(X.shape[0] / X.shape[1]))


def _algorithm_1(X, Q, grads, lr, mu, wd, eps, power_iters, scale):
    X, Q = X.clone(), Q.clone()
    M = torch.zeros_like(X)
    for G in grads:
        B = M + G
        P = B @ Q
        for it in range(power_iters):
            if it:
                P = B @ (B.T @ P)
            P, Rq = torch.linalg.qr(P)
            P = P * torch.sign(torch.diagonal(Rq))  # the Q factor with a positive diagonal R
        R = B.T @ P
        M = B - (1 - mu) * P @ R.T
        Q = R / (R.norm(dim=0, keepdim=True) + eps)
        X = (1 - lr * wd) * X - lr * scale * P @ Q.T
    return X


@pytest.mark.parametrize("method", ["qr", "cqr", "rcqr"])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("power_iters", [1, 2])
@pytest.mark.parametrize(("orientation", "shape"), [("columns", (24, 16)), ("columns", (16, 24)), ("rows", (24, 16))])
def test_dion_equals_reference(method, fraction, power_iters, orientation, shape):
    W = nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    X0 = W.detach().clone()
    opt = Dion(
        [W], lr=0.05, mu=0.9, weight_decay=0.1, rank_fraction=fraction, qr_method=method, cqr_warmup_steps=1,
        power_iters=power_iters, orientation=orientation,
    )  # fmt: skip
    Q0 = opt.state[W]["Q"].clone()
    assert Q0.shape == (shape[0] if orientation == "columns" else shape[1], dion_rank(*shape, fraction))
    grads = _grads(shape, STEPS)
    for g in grads:
        W.grad = g.clone()
        opt.step()
    want = reference_dion(X0, Q0, grads, lr=0.05, mu=0.9, wd=0.1, power_iters=power_iters, orientation=orientation)
    torch.testing.assert_close(W.detach(), want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("method", ["qr", "cqr", "rcqr"])
def test_orthonormalize_gives_orthonormal_columns_in_fp32(method, fp32_matmuls):
    P = torch.randn(5, 96, 24, generator=torch.Generator().manual_seed(3))
    O = orthonormalize(P, method)
    eye = torch.eye(24).expand(5, 24, 24)
    assert (O.mT @ O - eye).abs().max() < 1e-5
    ref = orthonormalize(P.double(), "qr").float()
    assert (O - ref).abs().max() < 1e-4  # the same basis (positive-diagonal R) whatever the method


@pytest.mark.parametrize("orientation", ["columns", "rows"])
def test_expert_stack_and_conv_are_per_matrix(orientation):
    E = nn.Parameter(torch.randn(3, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    C = nn.Parameter(torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    E0, C0 = E.detach().clone(), C.detach().clone()
    opt = Dion([E, C], lr=0.05, mu=0.9, weight_decay=0.0, rank_fraction=0.5, qr_method="qr", orientation=orientation)
    QE, QC = opt.state[E]["Q"].clone(), opt.state[C]["Q"].clone()
    cols = orientation == "columns"
    assert QE.shape == ((3, 12, 5) if cols else (3, 10, 5)) and QC.shape == ((8, 4) if cols else (12, 4))
    ge, gc = _grads((3, 12, 10), STEPS, 5), _grads((8, 3, 2, 2), STEPS, 6)
    for a, b in zip(ge, gc):
        E.grad, C.grad = a.clone(), b.clone()
        opt.step()
    for k in range(3):
        want = reference_dion(E0[k], QE[k], [g[k] for g in ge], lr=0.05, mu=0.9, wd=0.0, orientation=orientation)
        torch.testing.assert_close(E.detach()[k], want, atol=1e-9, rtol=0)
    gcm = [g.reshape(8, 12) for g in gc]
    want = reference_dion(C0.reshape(8, 12), QC, gcm, lr=0.05, mu=0.9, wd=0.0, orientation=orientation)
    torch.testing.assert_close(C.detach().reshape(8, 12), want, atol=1e-9, rtol=0)


def test_zero_and_tiny_momentum_never_give_nan():
    W = nn.Parameter(torch.randn(10, 6))
    opt = Dion([W], qr_method="rcqr")
    for g in (torch.zeros(10, 6), torch.full((10, 6), 1e-30)):
        W.grad = g
        opt.step()
        assert torch.isfinite(W).all() and torch.isfinite(opt.state[W]["Q"]).all()


def test_groups_choose_algorithms_and_state():
    mats, emb, head, bias = (
        nn.Parameter(torch.randn(8, 6)),
        nn.Parameter(torch.randn(20, 6)),
        nn.Parameter(torch.randn(20, 6)),
        nn.Parameter(torch.randn(6)),
    )
    opt = Dion(
        [
            {"params": [mats]},
            {"params": [emb], "algorithm": "lion", "weight_decay": 0.0},
            {"params": [head], "algorithm": "adamw", "lr": 0.01 / math.sqrt(6)},
            {"params": [bias], "algorithm": "adamw"},
        ],
        lr=0.01,
    )
    assert set(opt.state[mats]) == {"momentum_buffer", "Q", "step"}
    assert set(opt.state[emb]) == {"exp_avg"} and "exp_avg_sq" in opt.state[head]
    before = [p.detach().clone() for p in (mats, emb, head, bias)]
    for p in (mats, emb, head, bias):
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, (mats, emb, head, bias)))
    muon = Dion([{"params": [nn.Parameter(torch.randn(8, 6))], "algorithm": "muon"}])
    assert muon.param_groups[0]["momentum"] == 0.95  # Muon groups take mu as their momentum


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"rank_fraction": 0.0}, ["rank_fraction"]),
        ({"rank_fraction": 1.5}, ["rank_fraction"]),
        ({"power_iters": 0}, ["power_iters"]),
        ({"qr_method": "svd"}, ["qr_method", "'svd'"]),
        ({"mu": 1.0}, ["mu"]),
        ({"rank_multiple_of": 0}, ["rank_multiple_of"]),
        ({"orientation": "diagonal"}, ["orientation", "'diagonal'"]),
    ],
)
def test_bad_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError) as e:
        Dion([nn.Parameter(torch.randn(4, 4))], **kwargs)
    assert all(w in str(e.value) for w in words)


def test_vectors_in_a_dion_group_are_refused_by_name():
    with pytest.raises(ValueError, match=r"'bias'.*\(4,\).*lion"):
        Dion([("w", nn.Parameter(torch.randn(4, 4))), ("bias", nn.Parameter(torch.randn(4)))])


def test_rank_rounding():
    assert dion_rank(100, 60, 0.25) == 15
    assert dion_rank(100, 60, 0.25, multiple_of=8) == 16
    assert dion_rank(10, 6, 1.0, multiple_of=4) == 6
    assert torch.allclose(column_normalize(torch.zeros(3, 2)), torch.zeros(3, 2))


def test_groups_with_different_power_iters_each_run_their_own():
    # one rule serves every Dion group: a group's power_iters must not leak into another's parameters
    g = torch.Generator().manual_seed(3)
    A = nn.Parameter(torch.randn(24, 16, dtype=torch.float64, generator=g))
    C = nn.Parameter(torch.randn(20, 12, dtype=torch.float64, generator=g))
    X0 = {"A": A.detach().clone(), "C": C.detach().clone()}
    groups = [{"params": [A], "power_iters": 1}, {"params": [C], "power_iters": 3}]
    opt = Dion(groups, lr=0.05, mu=0.9, weight_decay=0.1, rank_fraction=0.5, qr_method="qr")
    Q0 = {"A": opt.state[A]["Q"].clone(), "C": opt.state[C]["Q"].clone()}
    grads = {"A": _grads((24, 16), STEPS, seed=4), "C": _grads((20, 12), STEPS, seed=5)}
    for k in range(STEPS):
        A.grad, C.grad = grads["A"][k].clone(), grads["C"][k].clone()
        opt.step()
    for name, p, iters in (("A", A, 1), ("C", C, 3)):
        want = reference_dion(X0[name], Q0[name], grads[name], lr=0.05, mu=0.9, wd=0.1, power_iters=iters)
        torch.testing.assert_close(p.detach(), want, atol=1e-9, rtol=0)
