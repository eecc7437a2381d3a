"""disco.Scion: the constrained (Frank-Wolfe) and unconstrained updates computed by hand, matmul precision,
per-group LMOs for vectors and embeddings."""

from __future__ import annotations

import pytest
import torch

from disco import Scion
from disco.ops import lmo

torch.set_num_threads(1)


def _lmo(M, norm="spectral", backend="newtonschulz5"):
    return lmo(M, norm=norm, backend=backend, steps=5, coefficients="you", eps=1e-7, compute_dtype=torch.float32)


def _two_steps(opt, params, grads):
    """Two steps with the given gradients; returns the expected params by hand alongside."""
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("constrained", [True, False])
def test_update_by_hand(constrained, fp32_matmuls):
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(40, 24) * 0.1)
    lr, beta, radius = 0.1, 0.9, 3.0
    opt = Scion([W], lr=lr, momentum_beta=beta, spectral_radius=radius, constrained=constrained)
    grads = [torch.randn(40, 24), torch.randn(40, 24)]
    expected = W.detach().clone()
    M = torch.zeros(40, 24)
    for G in grads:
        M = beta * M + (1 - beta) * G
        keep = (1 - lr) if constrained else 1.0
        expected = keep * expected - lr * radius * _lmo(M)
    _two_steps(opt, [W], [[g] for g in grads])
    torch.testing.assert_close(W.detach(), expected, rtol=0, atol=1e-6)
    # the two forms differ by the (1 - lr) shrinkage: each test would catch the other's update
    other = W.detach() / (1 - lr) if constrained else W.detach() * (1 - lr)
    assert (other - expected).abs().max() > 1e-3


def test_constrained_stays_in_the_ball():
    """Frank-Wolfe: a convex combination of W and points of norm <= radius keeps W inside the ball."""
    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.zeros(32, 32))
    radius = 2.0
    opt = Scion([W], lr=0.2, momentum_beta=0.0, spectral_radius=radius, num_ns_steps=5, coefficient_type="you")
    G0 = torch.randn(32, 32)
    for _ in range(20):
        W.grad = G0 + 0.3 * torch.randn(32, 32)  # a consistent direction: unconstrained steps would add up
        opt.step()
    # the "you" table's singular values end within ~[0.7, 1.2] of 1: allow that overshoot
    norm = torch.linalg.matrix_norm(W.detach(), ord=2)
    assert 0.8 * radius < norm < 1.25 * radius


@pytest.mark.parametrize("prec", ["highest", "high", "medium"])
def test_fp32_matmul_prec_is_a_compute_dtype(prec):
    """``fp32_matmul_prec`` picks the LMO's dtype for that call only: the process-wide precision is never touched."""
    W = torch.nn.Parameter(torch.randn(16, 16))
    opt = Scion([W], lr=0.01, fp32_matmul_prec="medium")
    seen = []
    opt.engine.stats.observers.append(
        lambda spec, X: seen.append((torch.get_float32_matmul_precision(), spec.compute_dtype))
    )
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(prec)
        W.grad = torch.randn(16, 16)
        opt.step()
        assert seen == [(prec, torch.bfloat16)]  # bf16 compute, the global setting as the user left it
        assert torch.get_float32_matmul_precision() == prec
    finally:
        torch.set_float32_matmul_precision(previous)
    exact = Scion([torch.nn.Parameter(torch.randn(4, 4))], fp32_matmul_prec="highest")
    assert exact.param_groups[0]["compute_dtype"] == torch.float32
    with pytest.raises(ValueError, match="fp32_matmul_prec='medium' means compute_dtype=torch.bfloat16"):
        Scion([torch.nn.Parameter(torch.randn(4, 4))], fp32_matmul_prec="medium", compute_dtype=torch.float64)


def test_invalid_precision():
    with pytest.raises(ValueError, match="fp32_matmul_prec"):
        Scion([torch.nn.Parameter(torch.randn(4, 4))], fp32_matmul_prec="low")


def test_per_group_lmos():
    torch.manual_seed(2)
    emb = torch.nn.Parameter(torch.randn(50, 16))
    hidden = torch.nn.Parameter(torch.randn(32, 16))
    bias = torch.nn.Parameter(torch.randn(32))
    gain = torch.nn.Parameter(torch.ones(16))
    groups = [
        {"params": [emb], "norm_factor": "embed_sqrt", "backend": "identity", "param_names": ["tok_embeddings"]},
        {"params": [hidden], "param_names": ["layers.0.w"]},
        {"params": [bias, gain], "norm_factor": "bias_rms", "backend": "identity", "param_names": ["b", "g"]},
        {"params": [], "norm_factor": "sign", "param_names": []},  # all groups named or none, as torch.optim
    ]
    lr = 0.05
    opt = Scion(groups, lr=lr, momentum_beta=0.0, spectral_radius=1.0)
    params = [emb, hidden, bias, gain]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    _two_steps(opt, params, [grads])
    Ge, Gh, Gb, Gg = grads
    row = Ge / Ge.norm(dim=1, keepdim=True) * 16**0.5  # unit rows, * sqrt(dim)
    expected = [
        row,
        _lmo(Gh),
        Gb / Gb.pow(2).mean().sqrt(),
        Gg / Gg.pow(2).mean().sqrt(),
    ]
    for p, s, e in zip(params, start, expected):
        torch.testing.assert_close(p.detach(), (1 - lr) * s - lr * e, rtol=0, atol=1e-5)
    # bias_rms: unit rms update; embed_sqrt: every row of l2 norm sqrt(dim)
    torch.testing.assert_close(expected[2].pow(2).mean(), torch.tensor(1.0))
    torch.testing.assert_close(expected[0].norm(dim=1), torch.full((50,), 4.0))
