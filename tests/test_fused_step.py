"""The fused element-wise passes of an LMO step (disco.optim.momentum) against the unfused ops and float64.

* bitwise: ``direction``, ``write_momentum`` and ``update_weight`` equal the eager ops they replace (the math is
  unchanged), on shapes that span several fused blocks with a ragged tail, for fp32 and bf16 results;
* a whole ``disco.Muon`` step (fp64 parameters, SVD polar factor) equals a plain float64 step written from the
  formulas, for Nesterov and plain momentum, decoupled and Frank-Wolfe updates, atomic and streaming commits.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import disco
from disco.optim import momentum as M

SHAPES = [(7, 5), (300, 70), (1030, 129), (2, 600, 257)]  # 1030 x 129 and 2 x 600 x 257: several blocks + tail


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nesterov", [True, False])
def test_direction_and_momentum_bitwise(shape, nesterov):
    g = torch.randn(shape, generator=_gen(1))
    buf = torch.randn(shape, generator=_gen(2))
    beta = 0.95
    want_u = g.lerp(buf, beta * beta) if nesterov else buf.lerp(g, 1 - beta)
    want_m = buf.clone().lerp_(g, 1 - beta)
    for state_dtype in (None, torch.float32):  # float32 state of a float32 gradient: the plain ops
        state = {"momentum_buffer": buf.clone()}
        mom = M.Momentum(state, g, state_dtype, M.DEFAULT_BLOCK)
        g_before = g.clone()
        u = M.direction(g, mom, beta, nesterov)
        assert torch.equal(state["momentum_buffer"], buf)  # the direction writes nothing
        assert torch.equal(u, want_u)
        M.write_momentum(g, mom, beta)
        assert torch.equal(state["momentum_buffer"], want_m)
        assert torch.equal(g, g_before)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16, M.INT8_BLOCK])
def test_direction_made_in_the_engines_input_dtype_is_the_cast(shape, nesterov, state_dtype):
    """``out_dtype`` (the spec's ``input_dtype``): each block rounded as it is made equals the full-precision
    direction cast afterwards, as the engine would cast it."""
    g = torch.randn(shape, generator=_gen(5))
    state = M.init_momentum(torch.empty(shape), state_dtype, 64)
    mom = M.Momentum(state, g, state_dtype, 64)
    M.write_momentum(torch.randn(shape, generator=_gen(6)), mom, 0.5)  # a momentum that is not zero
    want = M.direction(g, mom, 0.95, nesterov).to(torch.bfloat16)
    got = M.direction(g, mom, 0.95, nesterov, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "w_dtype,o_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
     (torch.float64, torch.float32)],
)  # fmt: skip  # not bf16 + bf16: torch's own add_ of two bf16 tensors rounds differently on 1 and 2 threads
@pytest.mark.parametrize("decay", [1.0, 1 - 0.02 * 0.1])
def test_weight_update_bitwise(shape, w_dtype, o_dtype, decay):
    """Every pairing of weight and result dtypes: a wider result (bf16 weights, fp32 compute) is added in its
    dtype and rounded once, as ``add_`` does, never rounded to the weight's dtype first."""
    W = torch.randn(shape, generator=_gen(3)).to(w_dtype)
    O = torch.randn(shape, generator=_gen(4)).to(o_dtype)
    alpha = -0.02 * 1.3

    def unfused(W: torch.Tensor) -> torch.Tensor:
        if decay != 1:
            W.mul_(decay)
        return W.add_(O, alpha=alpha)

    got = W.clone()
    M.update_weight(got, O, decay, alpha)
    assert torch.equal(got, unfused(W.clone()))
    # a non-contiguous weight takes the unfused ops (torch's strided bf16 add_ may round unlike its contiguous one)
    Wt = W.clone().mT.contiguous().mT
    M.update_weight(Wt, O, decay, alpha)
    assert torch.equal(Wt, unfused(W.clone().mT.contiguous().mT))


def _polar(U: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(U, full_matrices=False)
    return u @ vh


def _reference_step(W, Mom, G, *, lr, wd, beta, nesterov, frank_wolfe):
    """One Muon step from its formulas, float64: ``M <- beta M + (1 - beta) G``; ``U = beta M + (1 - beta) G``
    (Nesterov) or ``M``; ``O = sqrt(max(1, m / n)) polar(U)``; ``W <- (1 - lr wd) W - lr O`` (decoupled) or
    ``(1 - lr) W - lr O`` (Frank-Wolfe)."""
    Mom = beta * Mom + (1 - beta) * G
    U = beta * Mom + (1 - beta) * G if nesterov else Mom
    m, n = U.shape
    O = math.sqrt(max(1.0, m / n)) * _polar(U)
    decay = (1 - lr) if frank_wolfe else (1 - lr * wd)
    return decay * W - lr * O, Mom


@pytest.mark.parametrize(
    "kw",
    [
        dict(nesterov=True),
        dict(nesterov=False),
        dict(nesterov=True, update_rule="frank_wolfe"),
        dict(nesterov=True, commit="streaming"),
    ],
)
def test_step_matches_float64_formulas(kw):
    shapes = [(300, 70), (64, 256), (1030, 129)]
    lr, wd, beta = 0.02, 0.1, 0.9
    params = [nn.Parameter(torch.randn(s, generator=_gen(10 + k), dtype=torch.float64)) for k, s in enumerate(shapes)]
    ref = [p.detach().clone() for p in params]
    mom = [torch.zeros_like(p) for p in ref]
    update_rule = kw.pop("update_rule", "decoupled")
    group = dict(params=params, algorithm="muon", update_rule=update_rule, backend="svd", **kw)
    opt = disco.Disco(
        [group], lr=lr, weight_decay=wd, momentum=beta, norm_factor="original", compute_dtype=torch.float64
    )
    gen = _gen(20)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for k, g in enumerate(grads):
            ref[k], mom[k] = _reference_step(
                ref[k], mom[k], g, lr=lr, wd=wd, beta=beta, nesterov=kw["nesterov"],
                frank_wolfe=update_rule == "frank_wolfe",
            )  # fmt: skip
    for p, r, m in zip(params, ref, mom):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], m, rtol=0, atol=1e-12)


def test_bench_step_ortho_rows(capsys):
    """``bench step --ortho`` adds, per dtype, the step against its orthogonalizations alone (one JSON object)."""
    import json

    from disco.bench.step import main as step_main

    args = ["--layers", "1", "--width", "32", "--repeat", "1", "--warmup", "0", "--threads", "1", "--ortho", "--json"]
    assert step_main(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["case"] for r in rows] == ["bf16", "bf16 vs ortho", "fp32", "fp32 vs ortho"]
    for r in rows[1::2]:
        assert r["peer"] == "orthogonalizations alone" and r["ours_ms"] > 0 and r["peer_ms"] > 0
        assert abs(r["ratio"] - r["ours_ms"] / r["peer_ms"]) < 1e-9


def test_bench_environment_names_the_cpu():
    from disco.bench.common import CPU_FLAGS, environment

    env = environment()
    assert env["cpu"] and set(env["cpu_flags"].split()) <= {*CPU_FLAGS, "-"}
