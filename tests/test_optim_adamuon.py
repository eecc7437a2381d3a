"""AdaMuon on one process against a float64 reference written from the paper (arXiv 2507.11005, Algorithm 1):
the polar factor of the sign of the momentum from an SVD, an element-wise second moment, the RMS alignment."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from disco import AdaMuon, Disco

STEPS = 3
KW = dict(lr=0.01, momentum=0.9, beta2=0.9, weight_decay=0.1, backend="svd")


def _grads(shape, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def _polar(X):
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def reference_adamuon(W, grads, *, lr, momentum, beta2, wd, nesterov=True, eps=1e-8, rms=0.2):
    """One ``m x n`` matrix in float64, element by element where the paper is element-wise."""
    W = W.clone()
    m, n = W.shape
    M = torch.zeros_like(W)
    V = torch.zeros_like(W)
    for G in grads:
        M = momentum * M + (1 - momentum) * G
        U = momentum * M + (1 - momentum) * G if nesterov else M
        O = _polar(torch.sign(U))
        On = torch.empty_like(O)
        for i in range(m):
            for j in range(n):
                V[i, j] = beta2 * V[i, j] + (1 - beta2) * O[i, j] ** 2
                On[i, j] = O[i, j] / (math.sqrt(V[i, j]) + eps)
        gamma = rms * math.sqrt(m * n) / math.sqrt(sum(x * x for x in On.flatten().tolist()))
        W = (1 - lr * wd) * W - lr * gamma * On
    return W, V


def _run(opt, params, grads):
    for gs in zip(*grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_adamuon_equals_reference(shape, nesterov):
    W = nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    W0 = W.detach().clone()
    opt = AdaMuon([W], **KW, nesterov=nesterov)
    grads = _grads(shape, STEPS)
    _run(opt, [W], [grads])
    want, V = reference_adamuon(W0, grads, lr=0.01, momentum=0.9, beta2=0.9, wd=0.1, nesterov=nesterov)
    torch.testing.assert_close(W.detach(), want, atol=1e-10, rtol=0)
    torch.testing.assert_close(opt.state[W]["second_moment"], V, atol=1e-12, rtol=0)
    assert opt.state[W]["second_moment"].dtype == torch.float64


def test_the_step_has_the_target_rms():
    """One step from zero weights, lr 1, no decay: the step's RMS is ``rms`` (the paper's 0.2 by default)."""
    for rms in (0.2, 0.05):
        W = nn.Parameter(torch.zeros(32, 16, dtype=torch.float64))
        opt = AdaMuon([W], lr=1.0, weight_decay=0.0, rms=rms, backend="svd")
        W.grad = _grads((32, 16), 1)[0]
        opt.step()
        assert abs(W.detach().pow(2).mean().sqrt().item() - rms) < 1e-12


def test_stacks_convs_and_transposed_weights_in_a_disco_group():
    """``algorithm="adamuon"`` in any group: a 3-D stack aligns each expert's RMS on its own, a conv weight is
    its ``out x in*k*k`` matrix, a transposed weight steps like its transpose; ``norm_factor`` has no effect."""
    gen = torch.Generator().manual_seed(2)
    E = nn.Parameter(torch.randn(3, 12, 8, dtype=torch.float64, generator=gen))
    C = nn.Parameter(torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=gen))
    T = nn.Parameter(torch.randn(10, 14, dtype=torch.float64, generator=gen))  # stored in x out
    start = [p.detach().clone() for p in (E, C, T)]
    opt = Disco(
        [
            {"params": [E, C], "algorithm": "adamuon", "beta2": 0.9, "norm_factor": "match_rms_adamw"},
            {"params": [T], "algorithm": "adamuon", "beta2": 0.9, "transposed": True},
        ],
        lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1, backend="svd",
    )  # fmt: skip
    grads = [_grads(tuple(p.shape), STEPS, seed) for p, seed in zip((E, C, T), (5, 6, 7))]
    _run(opt, [E, C, T], grads)
    kw = dict(lr=0.01, momentum=0.9, beta2=0.9, wd=0.1)
    for k in range(3):
        want, V = reference_adamuon(start[0][k], [g[k] for g in grads[0]], **kw)
        torch.testing.assert_close(E.detach()[k], want, atol=1e-10, rtol=0)
        torch.testing.assert_close(opt.state[E]["second_moment"][k], V, atol=1e-12, rtol=0)
    want, _ = reference_adamuon(start[1].reshape(6, -1), [g.reshape(6, -1) for g in grads[1]], **kw)
    torch.testing.assert_close(C.detach().reshape(6, -1), want, atol=1e-10, rtol=0)
    want, V = reference_adamuon(start[2].T, [g.T for g in grads[2]], **kw)
    torch.testing.assert_close(T.detach().T, want, atol=1e-10, rtol=0)
    torch.testing.assert_close(opt.state[T]["second_moment"].T, V, atol=1e-12, rtol=0)


def test_zero_gradient_takes_a_zero_step():
    W = nn.Parameter(torch.ones(8, 6))
    opt = AdaMuon([W], lr=0.1, compute_dtype=torch.float32)
    W.grad = torch.zeros(8, 6)
    opt.step()
    assert torch.equal(W.detach(), torch.full((8, 6), 1 - 0.1 * 0.1))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta_2": 0.9}, ValueError, r"key 'beta_2' is not a setting of algorithm 'adamuon'.*did you mean 'beta2'"),
        ({"polar_first": True}, ValueError, r"key 'polar_first' is not a setting of algorithm 'adamuon'"),
        ({"beta2": 1.0}, ValueError, "beta2"),
        ({"rms_target": 0.0}, ValueError, "rms_target"),
        ({"adamuon_eps": -1.0}, ValueError, "adamuon_eps"),
        ({"norm_factor": "embed_sqrt"}, ValueError, "not a matrix norm"),
        ({"update_rule": "frank_wolfe"}, ValueError, "decoupled"),
        ({"is_light": True, "nesterov": False}, ValueError, "is_light"),
        ({"rms_target": "big"}, TypeError, "rms_target"),
        ({"commit": "streaming"}, ValueError, "commit='streaming' is not available"),
    ],
)
def test_bad_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaMuon([{"params": [nn.Parameter(torch.zeros(4, 4))], **kwargs}])


def test_vectors_are_refused():
    with pytest.raises(ValueError, match=r"'b' \(shape \(4,\)\) is not a matrix AdaMuon"):
        AdaMuon([("b", nn.Parameter(torch.zeros(4)))])


def test_state_dict_round_trip_continues_the_same_run():
    """Two steps, ``state_dict()`` into a fresh optimizer, a third step: equal to three uninterrupted steps."""
    grads = _grads((12, 9), STEPS, 3)
    start = torch.randn(12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    W = nn.Parameter(start.clone())
    opt = AdaMuon([W], **KW)
    _run(opt, [W], [grads])
    V = nn.Parameter(start.clone())
    first = AdaMuon([V], **KW)
    _run(first, [V], [grads[:2]])
    sd = first.state_dict()
    assert sorted(sd["state"][0]) == ["momentum_buffer", "second_moment"]
    second = AdaMuon([V], **KW)
    second.load_state_dict(sd)
    _run(second, [V], [grads[2:]])
    assert torch.equal(V.detach(), W.detach())
    assert torch.equal(second.state[V]["second_moment"], opt.state[W]["second_moment"])


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_hugging_face_muon_recipe(model):
    """``hf.trainer_optimizer(model, "muon", optimizer=AdaMuon)``: every parameter routed once (GPT-2's Conv1D as
    transposed matrices), and a few steps train."""
    test_hf = pytest.importorskip("test_hf_gpt2")  # skipped without transformers
    from disco.integrations import hf

    net = getattr(test_hf, model)()
    cls, kwargs = hf.trainer_optimizer(net, "muon", optimizer=AdaMuon, lr=3e-3)
    opt = cls(**kwargs)
    assert {n for g in opt.param_groups for n in g["param_names"]} == {n for n, _ in net.named_parameters()}
    assert any(g["algorithm"] == "adamuon" and g.get("transposed") for g in opt.param_groups) == (model == "gpt2")
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
