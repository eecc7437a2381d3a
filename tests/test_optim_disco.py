"""disco.Disco: the seed example, light mode, per-group LMO settings, decoupled weight decay, batching."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import disco
from disco.distributed import create_local_config
from disco.ops import lmo

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the tests of a formula say their dtype: the CPU default (DISCO_CPU_BF16) must not decide them
F32 = torch.float32


def test_quickstart_example_runs():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    losses = [float(line.split()[-1]) for line in lines if line.startswith("step ")]
    assert len(losses) == 5 and losses[-1] < losses[0]
    tracked = {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("track_")}
    for key in (
        "track_update_rms_to_rms/layers.0.attention.wq.weight",
        "track_param_rms_to_rms/layers.1.feed_forward.w2.weight",
        "track_update_l1_to_rms/tok_embeddings.weight",
        "track_update_rms_to_inf/output.weight",
        "track_update_rms/norm.weight",
    ):
        assert key in tracked, key
    # spectral LMO: the update's rms -> rms norm is ~1 (Newton-Schulz with keller's table: in [0.6, 1.2])
    assert 0.6 < tracked["track_update_rms_to_rms/layers.0.attention.wq.weight"] < 1.25
    # embed_sqrt: rows of unit rms, so l1 -> rms norm (max row l2 / sqrt(dim)) is 1
    assert abs(tracked["track_update_l1_to_rms/tok_embeddings.weight"] - 1.0) < 1e-3


# ---- light mode -------------------------------------------------------------------------------------------
def _light_model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    W1 = torch.nn.Parameter(torch.randn(32, 16, generator=gen) / 4)
    W2 = torch.nn.Parameter(torch.randn(32, 32, generator=gen) / 6)
    W3 = torch.nn.Parameter(torch.randn(8, 32, generator=gen) / 6)
    b = torch.nn.Parameter(torch.randn(32, generator=gen) * 0.1)
    return [W1, W2, W3, b]


def _light_loss(ps, x):
    W1, W2, W3, b = ps
    return torch.tanh(torch.tanh(x @ W1.T + b) @ W2.T) @ W3.T


def _run_light(light, steps=5, vector_group=None, zero_grad=None):
    ps = _light_model()
    groups = [{"params": ps[:3]}, {"params": ps[3:], **(vector_group or {"norm_factor": "bias_rms"})}]
    opt = disco.Disco(groups, lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.1, is_light=light)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        if not light:
            opt.zero_grad()
        elif zero_grad is not None:
            opt.zero_grad(set_to_none=zero_grad)
        x = torch.randn(24, 16, generator=gen)
        _light_loss(ps, x).pow(2).mean().backward()
        opt.step()
    return opt, ps


@pytest.mark.parametrize(
    "vector_group", [None, {"algorithm": "adamw", "betas": (0.9, 0.95)}, {"algorithm": "lion"}], ids=str
)
def test_light_mode_equals_normal_mode(vector_group, fp32_matmuls):
    _, normal = _run_light(False, vector_group=vector_group)
    opt, light = _run_light(True, vector_group=vector_group)
    start = _light_model()
    for a, b, s in zip(normal, light, start):
        assert (a - s).abs().max() > 1e-2  # moved
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for p in light[:3]:
        assert "momentum_buffer" not in opt.state[p]  # the point of light mode: no momentum buffer


def test_light_mode_detects_zero_grad():
    with pytest.raises(RuntimeError, match="zero_grad"):
        _run_light(True, steps=3, zero_grad=True)


def test_light_mode_rejects_nesterov():
    with pytest.raises(ValueError, match="nesterov"):
        disco.Disco([torch.nn.Parameter(torch.randn(4, 4))], is_light=True, nesterov=True)


# ---- per-group LMO settings ----------------------------------------------------------------------------
GROUPS = [
    {"norm_factor": "spectral", "backend": "newtonschulz5", "backend_steps": 5},
    {"norm_factor": "original", "backend": "polar_express", "backend_steps": 3},
    {"norm_factor": "image_spectral", "backend": "svd"},
    {"norm_factor": "match_rms_adamw", "backend": "newtonschulz5", "backend_steps": 2, "coefficients": "you"},
    {"norm_factor": "embed_sqrt", "backend": "identity"},
    {"norm_factor": "unembed_sqrt", "backend": "identity"},
    {"norm_factor": "sign", "backend": "identity"},
    {"norm_factor": "bias_rms", "backend": "identity"},
]


@pytest.mark.parametrize("overrides", GROUPS, ids=lambda g: f"{g['norm_factor']}-{g['backend']}")
def test_group_settings_are_honoured(overrides):
    torch.manual_seed(0)
    shape = (16,) if overrides["norm_factor"] == "bias_rms" else (48, 24)
    p = torch.nn.Parameter(torch.randn(*shape))
    other = torch.nn.Parameter(torch.randn(48, 24))  # a default group alongside
    lr = 1.0
    opt = disco.Disco([{"params": [p], **overrides}, {"params": [other]}], lr=lr, momentum=0.0, compute_dtype=F32)
    start = p.detach().clone()
    G = torch.randn(*shape)
    p.grad, other.grad = G.clone(), torch.randn(48, 24)
    opt.step()
    expected = lmo(
        G,
        norm=overrides["norm_factor"],
        backend=overrides["backend"],
        steps=overrides.get("backend_steps", 5),
        coefficients=overrides.get("coefficients"),
        eps=1e-7,
        compute_dtype=F32,
    )
    update = (start - p.detach()) / lr
    torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-6)
    if len(shape) == 2 and overrides != GROUPS[0]:
        default = lmo(G, norm="spectral", eps=1e-7, compute_dtype=F32)
        assert (update - default).abs().max() > 1e-2  # the group's settings made a difference


def test_weight_decay_is_decoupled():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(24, 24))
    Z = torch.nn.Parameter(torch.randn(24, 24))
    lr, wd = 0.05, 0.3
    opt = disco.Disco([W, Z], lr=lr, weight_decay=wd, momentum=0.0, compute_dtype=F32)
    W0, Z0 = W.detach().clone(), Z.detach().clone()
    G = torch.randn(24, 24)
    W.grad, Z.grad = G.clone(), torch.zeros(24, 24)
    opt.step()
    # a zero gradient: pure shrinkage (the LMO of 0 is 0, not NaN)
    torch.testing.assert_close(Z.detach(), (1 - lr * wd) * Z0, rtol=0, atol=1e-7)
    expected = (1 - lr * wd) * W0 - lr * lmo(G, norm="spectral", eps=1e-7, compute_dtype=F32)
    torch.testing.assert_close(W.detach(), expected, rtol=0, atol=1e-6)
    # not coupled: the decay does not go through the LMO (which would remove its magnitude)
    assert not torch.allclose(W.detach(), W0 - lr * lmo(G + wd * W0, norm="spectral", eps=1e-7), atol=1e-4)


# ---- batching --------------------------------------------------------------------------------------------
BATCH_SHAPES = [(32, 32)] * 4 + [(32, 64)] * 2 + [(64, 32)] + [(3, 16, 32)]


def _batch_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in BATCH_SHAPES]


def test_same_shape_matrices_are_batched():
    ps = _batch_params()
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(*p.shape, generator=gen) for p in ps]
    # stack_bytes=None: one stack per shape (on CPU the default runs one tensor per call)
    opt = disco.Disco(ps, lr=0.1, momentum=0.5, distributed_config=create_local_config(stack_bytes=None))
    calls: list[tuple[int, ...]] = []
    opt.engine.stats.observers.append(lambda spec, X: calls.append(tuple(X.shape)))
    for _ in range(2):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        calls.clear()
        opt.step()
    assert sorted(opt.engine.stats.batches) == sorted(calls)
    assert sorted(calls) == sorted([(4, 32, 32), (2, 32, 64), (1, 64, 32), (1, 3, 16, 32)])
    assert opt.engine.stats.tensors_computed == len(ps)
    assert opt.engine.stats.matrices_computed == len(ps) - 1 + 3  # the 3-D weight is 3 matrices

    # the same as one optimizer per parameter (no batching)
    singles = _batch_params()
    for p, g in zip(singles, grads):
        one = disco.Disco([p], lr=0.1, momentum=0.5)
        for _ in range(2):
            p.grad = g.clone()
            one.step()
    for a, b in zip(ps, singles):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
