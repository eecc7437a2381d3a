"""``Spec.result_dtype``: the executor sizes return buffers by it, so it must be the dtype ``spec(stack)`` returns.

A result narrower than the wire travels back as it is (exact); a wrong declaration would round a result on the
wire, so every spec is checked against its own output here, and a distributed row-norm group against one process.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

import disco
from disco.ops.constraints import ConstraintSpec
from disco.ops.dion import OrthonormalizeSpec
from disco.ops.specs import LMOSpec, NormsSpec

NORMS = ["spectral", "embed_sqrt", "unembed_sqrt", "bias_rms", "sign", "none"]
BACKENDS = ["gram_newtonschulz5", "newtonschulz5", "polar_express", "svd", "identity"]


def _input(norm: str, view: str, dtype: torch.dtype) -> torch.Tensor:
    shape = {"bias_rms": (2, 24), "sign": (2, 24), "none": (2, 24)}.get(norm, (2, 16, 40))
    if view == "flatten" and len(shape) == 3:
        shape = (2, 16, 4, 10)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize(("norm", "backend"), list(itertools.product(NORMS, BACKENDS)))
def test_lmo_spec_declares_the_dtype_it_returns(norm, backend):
    for dtype, compute, view, narrow in itertools.product(
        (torch.float32, torch.float64, torch.bfloat16),
        (None, torch.bfloat16, torch.float32),
        ("native", "transposed", "flatten"),
        (True, False),
    ):
        x = _input(norm, view, dtype)
        if view != "native" and x.dim() < 3:
            continue
        spec = LMOSpec(norm=norm, backend=backend, compute_dtype=compute, view=view, result_in_compute_dtype=narrow)
        got = spec(x).dtype
        assert got == spec.result_dtype(x.dtype, x.device), (dtype, compute, view, narrow, got)


def test_other_specs_declare_the_dtype_they_return():
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 12, 6, dtype=dtype)
        for spec in (
            NormsSpec(("spectral", "rms")),
            ConstraintSpec("spectral_clip"),
            ConstraintSpec("stiefel"),
            OrthonormalizeSpec("qr"),
            OrthonormalizeSpec("cqr"),
        ):
            assert spec(x).dtype == spec.result_dtype(x.dtype, x.device), (spec, dtype)


SHAPES = {"emb": (64, 16), "hidden": (16, 48), "bias": (16,)}


def _groups(params):
    # Every LMO here in bf16 from fp32 parameters: the Newton-Schulz result travels back in bf16 (exact), the row
    # norm's and bias_rms' results (fp32: they ignore the compute dtype's narrowing) in fp32.
    return [
        {"params": [params["emb"]], "norm_factor": "embed_sqrt", "backend": "gram_newtonschulz5"},
        {"params": [params["hidden"]]},
        {"params": [params["bias"]], "norm_factor": "bias_rms", "backend": "gram_newtonschulz5"},
    ]


def _run(params, grads, steps=2):
    opt = disco.Disco(_groups(params), lr=0.05, compute_dtype=torch.bfloat16)
    for k in range(steps):
        for n, p in params.items():
            p.grad = grads(n, k)
        opt.step()


def _grad(n: str, k: int) -> torch.Tensor:
    return torch.randn(SHAPES[n], generator=torch.Generator().manual_seed(100 * k + len(n)))


def _init() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _body(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    params = {n: nn.Parameter(distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)) for n, t in _init().items()}
    _run(params, lambda n, k: distribute_tensor(_grad(n, k), mesh, [Shard(0)], src_data_rank=None))
    return {n: p.full_tensor() for n, p in params.items()}


@pytest.mark.dist
def test_row_norm_results_are_not_rounded_on_the_wire():
    params = {n: nn.Parameter(t) for n, t in _init().items()}
    _run(params, _grad)
    for got in run_ranks(_body, 2, timeout=60):
        for n, p in params.items():
            assert torch.equal(got[n], p.detach()), n
