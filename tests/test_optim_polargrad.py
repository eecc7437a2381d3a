"""PolarGrad on one process against a float64 reference written from the paper (arXiv 2505.21799): the polar
factor from an SVD, the nuclear norm as the sum of the singular values (not the inner product the rule uses)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from disco import Disco, PolarGrad

STEPS = 3
KW = dict(lr=0.01, momentum=0.9, weight_decay=0.1, backend="svd")


def _grads(shape, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def _polar(X):
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def reference_polargrad(W, grads, *, lr, momentum, wd, nesterov=False, polar_first=False):
    """One matrix in float64. Momentum first: ``M = b M + (1-b) G``, ``U = M`` (or Nesterov's
    ``b M + (1-b) G``), step ``||U||_* polar(U)``. Polar first: ``P = polar(G)``, ``M = b M + (1-b) P``, step
    ``||G||_* M``. Decoupled weight decay."""
    W = W.clone()
    M = torch.zeros_like(W)
    for G in grads:
        if polar_first:
            M = momentum * M + (1 - momentum) * _polar(G)
            D = torch.linalg.svdvals(G).sum() * M
        else:
            M = momentum * M + (1 - momentum) * G
            U = momentum * M + (1 - momentum) * G if nesterov else M
            D = torch.linalg.svdvals(U).sum() * _polar(U)
        W = (1 - lr * wd) * W - lr * D
    return W, M


def _run(opt, params, grads):
    for gs in zip(*grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
@pytest.mark.parametrize(("nesterov", "polar_first"), [(False, False), (True, False), (False, True)])
def test_polargrad_equals_reference(shape, nesterov, polar_first):
    W = nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    W0 = W.detach().clone()
    opt = PolarGrad([W], **KW, nesterov=nesterov, polar_first=polar_first)
    grads = _grads(shape, STEPS)
    _run(opt, [W], [grads])
    want, M = reference_polargrad(W0, grads, lr=0.01, momentum=0.9, wd=0.1, nesterov=nesterov, polar_first=polar_first)
    torch.testing.assert_close(W.detach(), want, atol=1e-10, rtol=0)
    torch.testing.assert_close(opt.state[W]["momentum_buffer"], M, atol=1e-12, rtol=0)


def test_stacks_convs_and_transposed_weights_in_a_disco_group():
    """``algorithm="polargrad"`` in any group: a 3-D stack scales each expert by its own nuclear norm, a conv
    weight is its ``out x in*k*k`` matrix, a transposed weight steps like its transpose; ``norm_factor`` (here
    Moonlight's) is divided back out."""
    gen = torch.Generator().manual_seed(2)
    E = nn.Parameter(torch.randn(3, 12, 8, dtype=torch.float64, generator=gen))
    C = nn.Parameter(torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=gen))
    T = nn.Parameter(torch.randn(10, 14, dtype=torch.float64, generator=gen))  # stored in x out
    start = [p.detach().clone() for p in (E, C, T)]
    opt = Disco(
        [
            {"params": [E, C], "algorithm": "polargrad", "norm_factor": "match_rms_adamw"},
            {"params": [T], "algorithm": "polargrad", "transposed": True},
        ],
        lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.1, backend="svd",
    )  # fmt: skip
    grads = [_grads(tuple(p.shape), STEPS, seed) for p, seed in zip((E, C, T), (5, 6, 7))]
    _run(opt, [E, C, T], grads)
    kw = dict(lr=0.01, momentum=0.9, wd=0.1)
    for k in range(3):
        want, _ = reference_polargrad(start[0][k], [g[k] for g in grads[0]], **kw)
        torch.testing.assert_close(E.detach()[k], want, atol=1e-10, rtol=0)
    want, _ = reference_polargrad(start[1].reshape(6, -1), [g.reshape(6, -1) for g in grads[1]], **kw)
    torch.testing.assert_close(C.detach().reshape(6, -1), want, atol=1e-10, rtol=0)
    want, _ = reference_polargrad(start[2].T, [g.T for g in grads[2]], **kw)
    torch.testing.assert_close(T.detach().T, want, atol=1e-10, rtol=0)


def test_newton_schulz_step_is_the_inner_product_with_its_own_polar_factor():
    """With an approximate backend the scale is ``<U, P>`` for the ``P`` used (float64 Newton-Schulz here, the
    LMO's factor divided out): one step from zero weights without decay is ``-lr <G, P> P``."""
    from disco.ops import lmo

    G = _grads((32, 20), 1, 9)[0]
    W = nn.Parameter(torch.zeros(32, 20, dtype=torch.float64))
    opt = PolarGrad([W], lr=1.0, momentum=0.0, compute_dtype=torch.float64, backend="newtonschulz5")
    W.grad = G.clone()
    opt.step()
    P = lmo(G, norm="spectral", backend="newtonschulz5", compute_dtype=torch.float64) / (32 / 20) ** 0.5
    torch.testing.assert_close(W.detach(), -(G * P).sum() * P, atol=1e-10, rtol=0)


def test_zero_gradient_takes_a_zero_step():
    W = nn.Parameter(torch.ones(8, 6))
    opt = PolarGrad([W], lr=0.1, compute_dtype=torch.float32)
    W.grad = torch.zeros(8, 6)
    opt.step()
    assert torch.equal(W.detach(), torch.ones(8, 6))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"polar_frist": True}, ValueError, r"key 'polar_frist' is not a setting .*did you mean 'polar_first'"),
        ({"beta2": 0.9}, ValueError, r"key 'beta2' is not a setting of algorithm 'polargrad'"),
        ({"polar_first": True, "nesterov": True}, ValueError, "nesterov must be False"),
        ({"norm_factor": "sign"}, ValueError, "not a matrix norm"),
        ({"update_rule": "frank_wolfe"}, ValueError, "decoupled"),
        ({"is_light": True}, ValueError, "is_light"),
        ({"polar_first": 1}, TypeError, "polar_first"),
        ({"commit": "streaming"}, ValueError, "commit='streaming' is not available"),
    ],
)
def test_bad_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        PolarGrad([{"params": [nn.Parameter(torch.zeros(4, 4))], **kwargs}])


def test_vectors_are_refused():
    with pytest.raises(ValueError, match=r"'b' \(shape \(4,\)\) is not a matrix PolarGrad"):
        PolarGrad([("b", nn.Parameter(torch.zeros(4)))])


@pytest.mark.parametrize("polar_first", [False, True])
def test_state_dict_round_trip_continues_the_same_run(polar_first):
    """Two steps, ``state_dict()`` into a fresh optimizer, a third step: equal to three uninterrupted steps."""
    grads = _grads((12, 9), STEPS, 3)
    start = torch.randn(12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kw = dict(KW, polar_first=polar_first)
    W = nn.Parameter(start.clone())
    opt = PolarGrad([W], **kw)
    _run(opt, [W], [grads])
    V = nn.Parameter(start.clone())
    first = PolarGrad([V], **kw)
    _run(first, [V], [grads[:2]])
    second = PolarGrad([V], **kw)
    second.load_state_dict(first.state_dict())
    _run(second, [V], [grads[2:]])
    assert torch.equal(V.detach(), W.detach())
    assert torch.equal(second.state[V]["momentum_buffer"], opt.state[W]["momentum_buffer"])


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_hugging_face_muon_recipe(model):
    """``hf.trainer_optimizer(model, "muon", optimizer=PolarGrad)``: every parameter routed once (GPT-2's Conv1D as
    transposed matrices), and a few steps train."""
    test_hf = pytest.importorskip("test_hf_gpt2")  # skipped without transformers
    from disco.integrations import hf

    net = getattr(test_hf, model)()
    cls, kwargs = hf.trainer_optimizer(net, "muon", optimizer=PolarGrad, lr=0.01)
    opt = cls(**kwargs)
    assert {n for g in opt.param_groups for n in g["param_names"]} == {n for n, _ in net.named_parameters()}
    assert any(g["algorithm"] == "polargrad" and g.get("transposed") for g in opt.param_groups) == (model == "gpt2")
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
