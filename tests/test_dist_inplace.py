"""Tensors computed in place (expert stacks sharded on the expert dim, element-wise groups) equal one process.

Issue 19 item 2: expert stacks ``(5, 24, 16)`` under FSDP2 on 3 ranks (sharded 2/2/1 on the expert dim, each rank
orthogonalizing its own experts) drifted from one process (1.3e-5 Muon, 5.5e-5 Scion), and bf16 parameters landed 3
bf16 ulps away. Every rank here builds the same parameters and gradients from fixed seeds, lays them out as the
layout under test (real DTensors, real gloo ranks), runs three steps and returns the full parameters; the parent
compares them with one process run with the ranks' thread count (``rank_threads``). CPU only (``device="cpu"``,
also on a machine with GPUs): the oracle is that CPU process, to 1e-6 and one bf16 ulp.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

from disco import Muon, Scion
from disco.distributed.launch import rank_threads

SHAPES = {"experts.w1": (5, 24, 16), "experts.w2": (5, 16, 24), "head.weight": (18, 32), "head.bias": (18,)}
EXPERTS = ("experts.w1", "experts.w2")
STEPS = 3


@pytest.fixture(autouse=True)
def _rank_threads():
    """One process multiplies with the ranks' thread count, so both run the same GEMM kernels."""
    with rank_threads():
        yield


def full_tensors(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) / 8).to(dtype) for n, s in SHAPES.items()}


def build_optimizer(kind: str, named: list[tuple[str, torch.Tensor]]):
    mats = [(n, p) for n, p in named if p.dim() >= 2]
    vecs = [(n, p) for n, p in named if p.dim() < 2]
    groups = [
        {"params": [p for _, p in mats], "param_names": [n for n, _ in mats]},
        {"params": [p for _, p in vecs], "param_names": [n for n, _ in vecs]},
    ]
    if kind == "muon":
        groups[1]["algorithm"] = "adamw"
        return Muon(groups, lr=0.02, weight_decay=0.1, compute_dtype=torch.float32)
    groups[1].update(norm_factor="bias_rms", backend="identity")
    return Scion(groups, lr=0.05, spectral_radius=2.0, coefficient_type="polar_express", compute_dtype=torch.float32)


def reference(kind: str, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
    params = {n: nn.Parameter(t) for n, t in full_tensors(0, dtype).items()}
    opt = build_optimizer(kind, list(params.items()))
    for step in range(STEPS):
        for n, g in full_tensors(100 + step, dtype).items():
            params[n].grad = g
        opt.step()
    return {n: p.detach() for n, p in params.items()}, opt.engine.stats.matrices_computed


def _fsdp2_params(dtype: torch.dtype) -> dict[str, nn.Parameter]:
    from torch.distributed.fsdp import fully_shard

    model = nn.Module()
    for name, t in full_tensors(0, dtype).items():
        mod, attr = name.split(".")
        if not hasattr(model, mod):
            setattr(model, mod, nn.Module())
        getattr(model, mod).register_parameter(attr, nn.Parameter(t))
    fully_shard(model.experts)
    fully_shard(model.head)
    fully_shard(model)
    return dict(model.named_parameters())


def _dtensor_params(layout: str, world_size: int, dtype: torch.dtype) -> dict[str, nn.Parameter]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if layout == "ep":  # experts over every rank (5 over 3: 2, 2, 1)
        mesh = init_device_mesh("cpu", (world_size,))
        place = [Shard(0)]
    elif layout == "hsdp":  # replicated over 2, experts sharded over 2 (3, 2)
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "shard"))
        place = [Replicate(), Shard(0)]
    elif layout == "ep_x_fsdp":  # experts sharded over both axes (5 -> 3, 2 -> 2, 1, 1, 1)
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "dp"))
        place = [Shard(0), Shard(0)]
    else:
        raise ValueError(layout)
    full = full_tensors(0, dtype)
    return {n: nn.Parameter(distribute_tensor(t, mesh, place, src_data_rank=None)) for n, t in full.items()}


def _body(rank, world_size, kind, layout, dtype, precision="highest"):
    from torch.distributed.tensor import distribute_tensor

    torch.set_float32_matmul_precision(precision)  # what a user may set in every process

    params = _fsdp2_params(dtype) if layout == "fsdp2" else _dtensor_params(layout, world_size, dtype)
    opt = build_optimizer(kind, list(params.items()))
    per_step = []
    for step in range(STEPS):
        for n, g in full_tensors(100 + step, dtype).items():
            p = params[n]
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        opt.step()
        per_step.append(opt.engine.stats.matrices_computed)
    shards = {n: tuple(p.to_local().shape) for n, p in params.items()}
    return {n: p.full_tensor() for n, p in params.items()}, shards, per_step


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


LAYOUTS = {"fsdp2": 3, "ep": 3, "hsdp": 4, "ep_x_fsdp": 4}


@pytest.mark.usefixtures("fp32_matmuls")  # the one-process reference as the ranks' _body: in fp32
@pytest.mark.parametrize("kind", ["muon", "scion"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_stacks_computed_in_place_match_one_process(kind, layout):
    want, per_step = reference(kind, torch.float32)
    out = run_ranks(_body, LAYOUTS[layout], kind, layout, torch.float32, timeout=120, device="cpu")
    for got, _, _ in out:
        for n in want:
            assert _relative(got[n], want[n]) <= 1e-6, (n, _relative(got[n], want[n]))
    for step in range(STEPS):
        assert sum(counts[step] for _, _, counts in out) == per_step  # each matrix once
    if layout in ("fsdp2", "ep"):
        # each rank orthogonalizes its own experts in place (2, 2, 1 of each stack)
        experts = [2 * shards["experts.w1"][0] for _, shards, _ in out]
        assert experts == [4, 4, 2]
        assert all(min(counts) >= e for (_, _, counts), e in zip(out, experts))


def _ulps_bf16(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of the bf16 spacing at ``want`` (both bf16)."""
    up = torch.nextafter(want.abs(), torch.tensor(float("inf"), dtype=want.dtype)).float() - want.abs().float()
    return (got.float() - want.float()).abs() / up


@pytest.mark.usefixtures("fp32_matmuls")
@pytest.mark.parametrize("kind", ["muon", "scion"])
def test_bf16_params_fsdp2_x3_within_one_ulp(kind):
    want, _ = reference(kind, torch.bfloat16)
    out = run_ranks(_body, 3, kind, "fsdp2", torch.bfloat16, timeout=120, device="cpu")
    for got, _, _ in out:
        for n in want:
            assert got[n].dtype == torch.bfloat16
            assert _ulps_bf16(got[n], want[n]).max().item() <= 1.0, n


@pytest.mark.parametrize("kind", ["muon", "scion"])
def test_expert_stacks_match_one_process_under_medium_precision(kind, medium_matmuls):
    """With fp32 matmul precision "medium" (set by the user), a batched CPU matmul may run in bf16 where a single
    one does not: one process's stack of 5 experts and a rank's lone expert must still use the same kernel."""
    want, _ = reference(kind, torch.float32)
    out = run_ranks(_body, 3, kind, "fsdp2", torch.float32, medium_matmuls, timeout=120, device="cpu")
    assert [shards["experts.w1"][0] for _, shards, _ in out] == [2, 2, 1]
    for got, _, _ in out:
        for n in want:
            assert _relative(got[n], want[n]) <= 1e-6, (n, _relative(got[n], want[n]))


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
@pytest.mark.parametrize("backend", ["gram_newtonschulz5", "newtonschulz5", "gram_polar_express"])
def test_an_expert_rounds_alike_in_any_stack(precision, backend):
    """One process: the LMO of each expert is bitwise the same whether its stack holds 5, 2 or 1 of them, under
    every fp32 matmul precision (what makes in-place computing on uneven shards exact)."""
    from disco.ops import LMOSpec

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        spec = LMOSpec(backend=backend, compute_dtype=torch.float32)
        G = torch.randn(1, 5, 24, 16, generator=torch.Generator().manual_seed(0))
        whole = spec(G)[0]
        for part in (slice(0, 2), slice(2, 4), slice(4, 5)):
            assert torch.equal(spec(G[:, part])[0], whole[part]), part
            assert torch.equal(spec(G[0, part].mT.unsqueeze(0).mT)[0], whole[part])  # a transposed stack too
    finally:
        torch.set_float32_matmul_precision(before)
