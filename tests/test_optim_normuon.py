"""NorMuon on one process against a float64 reference written from the paper (arXiv 2510.05491, Algorithm 1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from disco import Disco, NorMuon

STEPS = 3


def _grads(shape, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def _polar(X):
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def reference_normuon(W, grads, *, lr, momentum, beta2, eps, wd, nesterov, factor):
    """Per matrix in float64: EMA momentum (Nesterov), exact polar factor times the norm factor, per-row second
    moment of the orthogonalized update, row normalization, Frobenius norm restored, decoupled weight decay."""
    W = W.clone()
    M = torch.zeros_like(W)
    v = torch.zeros(W.shape[0], dtype=W.dtype)
    for G in grads:
        M = momentum * M + (1 - momentum) * G
        U = momentum * M + (1 - momentum) * G if nesterov else M
        O = factor * _polar(U)
        v = beta2 * v + (1 - beta2) * (O * O).mean(dim=1)
        On = O / (v.sqrt() + eps)[:, None]
        On = On * (O.norm() / On.norm())
        W = (1 - lr * wd) * W - lr * On
    return W, v


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_normuon_equals_reference(shape, nesterov, adjust):
    W = nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    W0 = W.detach().clone()
    kw = dict(lr=0.05, momentum=0.9, beta2=0.9, eps=1e-8, weight_decay=0.1, nesterov=nesterov)
    opt = NorMuon([W], **kw, adjust_lr_fn=adjust, backend="svd")
    grads = _grads(shape, STEPS)
    for g in grads:
        W.grad = g.clone()
        opt.step()
    m, n = shape
    factor = math.sqrt(max(1, m / n)) if adjust is None else 0.2 * math.sqrt(max(m, n))
    want, v = reference_normuon(
        W0, grads, lr=0.05, momentum=0.9, beta2=0.9, eps=1e-8, wd=0.1, nesterov=nesterov, factor=factor
    )
    torch.testing.assert_close(W.detach(), want, atol=1e-10, rtol=0)
    torch.testing.assert_close(opt.state[W]["row_var"], v, atol=1e-12, rtol=0)
    assert opt.state[W]["row_var"].shape == (m,)


def test_match_rms_adamw_gives_the_papers_update_rms():
    """With adjust_lr_fn='match_rms_adamw' the update's RMS is the paper's 0.2 (lr 1, no decay, one step)."""
    W = nn.Parameter(torch.zeros(32, 16, dtype=torch.float64))
    opt = NorMuon([W], lr=1.0, weight_decay=0.0, adjust_lr_fn="match_rms_adamw", backend="svd")
    W.grad = _grads((32, 16), 1)[0]
    opt.step()
    rms = W.detach().pow(2).mean().sqrt().item()
    assert abs(rms - 0.2) < 1e-9, rms


def test_normuon_in_a_disco_group_and_expert_stack():
    """``algorithm="normuon"`` in any group; a 3-D stack normalizes each expert's rows on its own."""
    E = nn.Parameter(torch.randn(3, 12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    W = nn.Parameter(torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    E0, W0 = E.detach().clone(), W.detach().clone()
    opt = Disco(
        [{"params": [E, W], "algorithm": "normuon", "beta2": 0.9}],
        lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.0, norm_factor="spectral", backend="svd",
    )  # fmt: skip
    assert opt.state[E]["row_var"].shape == (3, 12)
    ge, gw = _grads((3, 12, 8), STEPS, 5), _grads((12, 8), STEPS, 6)
    for a, b in zip(ge, gw):
        E.grad, W.grad = a.clone(), b.clone()
        opt.step()
    kw = dict(lr=0.05, momentum=0.9, beta2=0.9, eps=1e-8, wd=0.0, nesterov=False, factor=math.sqrt(12 / 8))
    for k in range(3):
        want, _ = reference_normuon(E0[k], [g[k] for g in ge], **kw)
        torch.testing.assert_close(E.detach()[k], want, atol=1e-10, rtol=0)
    want, _ = reference_normuon(W0, gw, **kw)
    torch.testing.assert_close(W.detach(), want, atol=1e-10, rtol=0)


def test_transposed_group_normalizes_the_output_neurons():
    """A weight stored fan_in x fan_out (transposed=True) steps exactly like its fan_out x fan_in transpose."""
    A = torch.randn(16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    W = nn.Parameter(A.clone())  # out x in
    T = nn.Parameter(A.T.clone())  # in x out, transposed
    kw = dict(lr=0.05, momentum=0.9, beta2=0.9, weight_decay=0.1, backend="svd")
    ow = NorMuon([W], **kw)
    ot = NorMuon([{"params": [T], "transposed": True}], **kw)
    assert ot.state[T]["row_var"].shape == (16,)
    for g in _grads((16, 24), STEPS, 7):
        W.grad, T.grad = g.clone(), g.T.clone()
        ow.step()
        ot.step()
    torch.testing.assert_close(T.detach().T, W.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(ot.state[T]["row_var"], ow.state[W]["row_var"], atol=1e-12, rtol=0)


def test_vectors_are_refused_and_state_dict_round_trips():
    with pytest.raises(ValueError, match="matrix"):
        NorMuon([nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="beta2"):
        NorMuon([nn.Parameter(torch.zeros(4, 4))], beta2=1.0)
    W = nn.Parameter(torch.randn(8, 4))
    opt = NorMuon([W], lr=0.02)
    W.grad = torch.randn(8, 4)
    opt.step()
    sd = opt.state_dict()
    W2 = nn.Parameter(W.detach().clone())
    opt2 = NorMuon([W2], lr=0.02)
    opt2.load_state_dict(sd)
    torch.testing.assert_close(opt2.state[W2]["row_var"], opt.state[W]["row_var"])
