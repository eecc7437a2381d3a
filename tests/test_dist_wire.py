"""bf16 on the wire without losing exactness (issue 21 item 2).

With a bf16 compute dtype each direction is cast to bf16 before it travels (``LMOSpec.input_dtype``) and, on one
process, at the same point (``disco.distributed.engine.as_input``), so a distributed step stays bitwise equal to
one process and sends half the bytes of the fp32 pieces. ``comm_dtype`` still decides the wire where it is set.
The bitwise tests run on the CPU (``device="cpu"``, also on a machine with GPUs: the oracle is a CPU process);
the byte counts run on the launcher's device.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

from disco import Muon
from disco.distributed import LocalEngine, create_dtensor_config
from disco.distributed.launch import rank_threads
from disco.ops import LMOSpec

SHAPES = {"a.weight": (97, 64), "b.weight": (32, 97), "b.bias": (32,), "c.weight": (18, 32), "x.w": (3, 24, 16)}
STEPS = 3


@pytest.fixture(autouse=True)
def _rank_threads():
    """One process multiplies with the ranks' thread count, so both run the same GEMM kernels."""
    with rank_threads():
        yield


def full_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) / 8 for n, s in SHAPES.items()}


def build_optimizer(named, compute_dtype, **kw):
    mats = [(n, p) for n, p in named if p.dim() >= 2]
    vecs = [(n, p) for n, p in named if p.dim() < 2]
    groups = [
        {"params": [p for _, p in mats], "param_names": [n for n, _ in mats]},
        {"params": [p for _, p in vecs], "param_names": [n for n, _ in vecs], "algorithm": "adamw"},
    ]
    return Muon(groups, lr=0.02, weight_decay=0.1, compute_dtype=compute_dtype, **kw)


def reference(compute_dtype):
    params = {n: nn.Parameter(t) for n, t in full_tensors(0).items()}
    opt = build_optimizer(list(params.items()), compute_dtype)
    for step in range(STEPS):
        for n, g in full_tensors(100 + step).items():
            params[n].grad = g
        opt.step()
    return {n: p.detach() for n, p in params.items()}


def _body(rank, world_size, compute_dtype, comm_dtype):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    model = nn.Module()
    for name, t in full_tensors(0).items():
        mod, attr = name.split(".")
        if not hasattr(model, mod):
            setattr(model, mod, nn.Module())
        getattr(model, mod).register_parameter(attr, nn.Parameter(t))
    for mod in ("a", "b", "c", "x"):
        fully_shard(getattr(model, mod))
    fully_shard(model)
    params = dict(model.named_parameters())
    config = create_dtensor_config(comm_dtype=comm_dtype) if comm_dtype is not None else None
    opt = build_optimizer(list(params.items()), compute_dtype, distributed_config=config)
    sent = []
    for step in range(STEPS):
        for n, g in full_tensors(100 + step).items():
            p = params[n]
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        opt.step()
        sent.append(opt.engine.stats.bytes_sent)
    # what the planner counts this rank sends: pieces in at the first size, results back at the second
    planned = {sizes: opt.engine.plan.bytes_per_rank(*sizes)[rank]["sent"] for sizes in ((2, 2), (4, 2), (4, 4))}
    return {n: p.full_tensor() for n, p in params.items()}, sent, planned


@pytest.mark.parametrize("comm_dtype", [None, torch.float32])
def test_bf16_compute_fsdp2_bitwise_equal_to_one_process(comm_dtype):
    want = reference(torch.bfloat16)
    out = run_ranks(_body, 2, torch.bfloat16, comm_dtype, timeout=120, device="cpu")
    for got, _, _ in out:
        for n in want:
            assert torch.equal(got[n], want[n]), n
    # pieces travel in the compute dtype (2 bytes) unless comm_dtype says fp32; results come back in bf16 either way
    for _, sent, planned in out:
        assert sent == [planned[(2, 2) if comm_dtype is None else (4, 2)]] * STEPS


def test_bf16_wire_halves_the_pieces_bytes():
    (_, bf16, planned), _ = run_ranks(_body, 2, torch.bfloat16, None, timeout=120)
    (_, fp32, _), _ = run_ranks(_body, 2, torch.bfloat16, torch.float32, timeout=120)
    # rank 0 sends its pieces of the matrices rank 1 owns (p elements) and the results of those it owns (r): the
    # pieces' bytes halve, the results were bf16 already
    results = 2 * planned[(2, 2)] - planned[(4, 2)]  # 2p + 2r and 4p + 2r bytes
    assert fp32[0] - results == 2 * (bf16[0] - results) > 0 and results > 0


def test_fp32_compute_keeps_the_fp32_wire():
    out = run_ranks(_body, 2, torch.float32, None, timeout=120, device="cpu")
    want = reference(torch.float32)
    for got, sent, planned in out:
        for n in want:
            assert torch.equal(got[n], want[n]), n
        assert sent == [planned[(4, 4)]] * STEPS  # pieces and results both fp32


def test_input_dtype_is_the_narrower_compute_dtype():
    spec = LMOSpec(backend="gram_newtonschulz5", compute_dtype=torch.bfloat16, result_in_compute_dtype=True)
    cpu = torch.device("cpu")
    assert spec.input_dtype(torch.float32, cpu) == torch.bfloat16
    assert spec.input_dtype(torch.bfloat16, cpu) == torch.bfloat16
    assert LMOSpec(backend="gram_newtonschulz5", compute_dtype=torch.float32).input_dtype(torch.float32, cpu) == (
        torch.float32
    )
    assert LMOSpec(backend="svd", compute_dtype=torch.bfloat16, result_in_compute_dtype=True).input_dtype(
        torch.float32, cpu
    ) == (torch.float32)
    # one process casts each direction before it computes: the spec sees bf16
    seen = []
    engine = LocalEngine([torch.zeros(8, 4)])
    engine.stats.observers.append(lambda s, stack: seen.append(stack.dtype))
    from disco.distributed import Job

    (res,) = engine.map([Job(0, torch.randn(8, 4))], spec)
    assert seen == [torch.bfloat16] and res.dtype == torch.bfloat16


def _ddp_step(model, opt, rank, world_size):
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 64, generator=g)
        if world_size == 1:  # one process: the mean of the ranks' losses
            loss = 0.5 * (model(x[:4]).square().mean() + model(x[4:]).square().mean())
        else:
            loss = model(x[rank * 4 : rank * 4 + 4]).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}


def _ddp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 97, bias=False), nn.Linear(97, 32), nn.Linear(32, 18, bias=False))


def _body_ddp(rank, world_size, wrapper):
    from disco.distributed import create_auto_config

    model = _ddp_model()
    named = list(model.named_parameters())
    if wrapper:
        model = nn.parallel.DistributedDataParallel(model)
    config = create_auto_config(average_gradients=not wrapper)  # without DDP: the engine averages (Partial pieces)
    opt = build_optimizer(named, torch.bfloat16, distributed_config=config)
    return _ddp_step(model, opt, rank, world_size)


@pytest.mark.parametrize("wrapper", [True, False])
def test_bf16_compute_ddp_bitwise_equal_to_one_process(wrapper):
    model = _ddp_model()
    want = _ddp_step(model, build_optimizer(list(model.named_parameters()), torch.bfloat16), 0, 1)
    for got in run_ranks(_body_ddp, 2, wrapper, timeout=120, device="cpu"):
        for n in want:
            assert torch.equal(got[n], want[n]), n
