"""Distributed == single device, for every layout, with each matrix orthogonalized exactly once per step.

Every rank builds the same full parameters and, per step, the same full gradients from fixed seeds, lays them
out as the layout under test (real DTensors from ``fully_shard`` / ``distribute_tensor``, real process groups),
runs three optimizer steps and returns the full parameters; the parent compares them with a single-device run.
The ranks run on the launcher's device (CUDA + NCCL where every rank gets its own GPU, else CPU + gloo); the
reference runs on the CPU, within the tolerance (atol 1e-5) that either device meets.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import RankError, run_ranks
from torch import nn

from disco import Disco, Muon, Scion
from disco.distributed.launch import rank_device, rank_device_type, rank_threads


@pytest.fixture(autouse=True)
def _rank_threads():
    """Single-process references multiply with the ranks' thread count, so both run the same GEMM kernels (see
    ``disco.distributed.launch.RANK_THREADS``)."""
    with rank_threads():
        yield


SHAPES = {
    "a.weight": (97, 64),
    "b.weight": (32, 97),
    "b.bias": (32,),
    "c.weight": (18, 32),
    "e.weight": (97, 64),
}
EXPERTS = {"experts.w1": (4, 16, 12), "experts.w2": (4, 12, 16)}
STEPS = 3


def full_tensors(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) / 8 for n, s in shapes.items()}


def build_optimizer(kind: str, named: list[tuple[str, torch.Tensor]], **kw):
    mats = [(n, p) for n, p in named if p.dim() >= 2]
    vecs = [(n, p) for n, p in named if p.dim() < 2]
    groups = [{"params": [p for _, p in mats], "param_names": [n for n, _ in mats]}]
    if vecs:
        extra = {"algorithm": "adamw"} if kind == "muon" else {"norm_factor": "bias_rms", "backend": "identity"}
        groups.append({"params": [p for _, p in vecs], "param_names": [n for n, _ in vecs], **extra})
    common = {"compute_dtype": torch.float32}
    if kind == "muon":
        return Muon(groups, lr=0.02, weight_decay=0.1, **common, **kw)
    if kind == "scion":
        return Scion(groups, lr=0.05, spectral_radius=2.0, coefficient_type="polar_express", **common, **kw)
    return Disco(groups, lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.05, **common, **kw)


def reference(kind: str, shapes: dict) -> tuple[dict[str, torch.Tensor], int]:
    params = {n: nn.Parameter(t.clone()) for n, t in full_tensors(shapes, 0).items()}
    opt = build_optimizer(kind, list(params.items()))
    for step in range(STEPS):
        for n, g in full_tensors(shapes, 100 + step).items():
            params[n].grad = g
        opt.step()
    return {n: p.detach() for n, p in params.items()}, opt.engine.stats.matrices_computed


def _step_all(opt, params: dict, shapes: dict, set_grad) -> list[int]:
    counts = []
    for step in range(STEPS):
        for n, g in full_tensors(shapes, 100 + step).items():
            set_grad(params[n], g)
        opt.step()
        counts.append(opt.engine.stats.matrices_computed)
    return counts


def _dtensor_grad(p, full):
    from torch.distributed.tensor import distribute_tensor

    p.grad = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)


def _body_dtensor(rank, world_size, kind, layout, shapes):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    full = full_tensors(shapes, 0)
    if layout == "hsdp":
        mesh = init_device_mesh(rank_device_type(), (2, 2), mesh_dim_names=("rep", "shard"))
        place = {n: [Replicate(), Shard(0)] for n in shapes}
    elif layout in ("tp_col", "tp_row"):
        mesh = init_device_mesh(rank_device_type(), (world_size,))
        place = {n: [Shard(0 if layout == "tp_col" or len(s) == 1 else 1)] for n, s in shapes.items()}
    elif layout == "fsdp_tp":
        mesh = init_device_mesh(rank_device_type(), (2, 2), mesh_dim_names=("dp", "tp"))
        place = {n: [_StridedShard(0, split_factor=2), Shard(0)] for n in shapes}
        place["b.weight"] = [Shard(0), Shard(1)]
        place["b.bias"] = [Replicate(), Shard(0)]
    elif layout == "cp":
        mesh2 = init_device_mesh(rank_device_type(), (2, 2), mesh_dim_names=("dp", "cp"))
        mesh = mesh2["dp", "cp"]._flatten("dp_cp")
        place = {n: [Shard(0)] for n in shapes}
    elif layout == "ep_expert_dim":
        mesh = init_device_mesh(rank_device_type(), (world_size,))
        place = {n: [Shard(0)] for n in shapes}
    elif layout == "ep_matrix_dim":
        mesh = init_device_mesh(rank_device_type(), (world_size,))
        place = {n: [Shard(1)] for n in shapes}
    elif layout == "replicated":
        mesh = init_device_mesh(rank_device_type(), (world_size,))
        place = {n: [Replicate()] for n in shapes}
    else:
        raise ValueError(layout)
    params = {n: nn.Parameter(distribute_tensor(t, mesh, place[n], src_data_rank=None)) for n, t in full.items()}
    opt = build_optimizer(kind, list(params.items()))
    counts = _step_all(opt, params, shapes, _dtensor_grad)
    return {n: p.full_tensor() for n, p in params.items()}, counts, opt.assignments


def _body_fsdp(rank, world_size, kind):
    from torch.distributed.fsdp import fully_shard

    model = nn.Module()
    for name, _shape in SHAPES.items():
        mod_name, attr = name.split(".")
        if not hasattr(model, mod_name):
            setattr(model, mod_name, nn.Module())
        getattr(model, mod_name).register_parameter(attr, nn.Parameter(full_tensors(SHAPES, 0)[name].clone()))
    for mod_name in ("a", "b", "c", "e"):
        fully_shard(getattr(model, mod_name))
    fully_shard(model)
    params = dict(model.named_parameters())
    opt = build_optimizer(kind, list(params.items()))
    counts = _step_all(opt, params, SHAPES, _dtensor_grad)
    shards = {n: tuple(p.to_local().shape) for n, p in params.items()}
    return {n: p.full_tensor() for n, p in params.items()}, counts, shards


def _body_ddp(rank, world_size, kind, wrapper):
    from disco.distributed import create_auto_config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 97, bias=False), nn.Linear(97, 32), nn.Linear(32, 18, bias=False))
    model = model.to(rank_device())
    if wrapper:
        model = nn.parallel.DistributedDataParallel(model)
    named = [(n.removeprefix("module."), p) for n, p in model.named_parameters()]
    opt = build_optimizer(kind, named, distributed_config=create_auto_config(average_gradients=not wrapper))
    counts = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 64, generator=g)[rank * 4 : rank * 4 + 4].to(rank_device())
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        counts.append(opt.engine.stats.matrices_computed)
    return {n: p.detach().clone() for n, p in named}, counts


def _ddp_reference(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 97, bias=False), nn.Linear(97, 32), nn.Linear(32, 18, bias=False))
    opt = build_optimizer(kind, list(model.named_parameters()))
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 64, generator=g)
        # Each rank's loss is a mean over its half of the batch; DDP averages the two gradients.
        (0.5 * (model(x[:4]).square().mean() + model(x[4:]).square().mean())).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}, opt.engine.stats.matrices_computed


def _assert_same(got: dict, want: dict, atol=1e-5):
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=atol, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


KINDS = ["muon", "scion", "disco"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_fsdp2_matches_single_device(kind, world_size):
    want, per_step = reference(kind, SHAPES)
    out = run_ranks(_body_fsdp, world_size, kind, timeout=120)
    for got, _, _ in out:
        _assert_same(got, want)
    for step in range(STEPS):
        assert sum(counts[step] for _, counts, _ in out) == per_step  # each matrix exactly once
    if world_size == 4:  # 18 rows over 4 ranks: 5, 5, 5, 3; 32 rows: 8 each
        assert [shards["c.weight"][0] for _, _, shards in out] == [5, 5, 5, 3]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["hsdp", "tp_col", "tp_row", "fsdp_tp", "cp", "replicated"])
def test_dtensor_layouts_match_single_device(kind, layout):
    want, per_step = reference(kind, SHAPES)
    world = 2 if layout.startswith("tp") else 4
    out = run_ranks(_body_dtensor, world, kind, layout, SHAPES, timeout=120)
    for got, _, _ in out:
        _assert_same(got, want)
    for step in range(STEPS):
        assert sum(counts[step] for _, counts, _ in out) == per_step
    assignments = out[0][2]
    owned = sorted(i for ids in assignments.values() for i in ids)
    assert owned == list(range(per_step))  # one owner per whole-tensor LMO parameter


@pytest.mark.parametrize("kind", ["muon", "disco"])
@pytest.mark.parametrize("layout", ["ep_expert_dim", "ep_matrix_dim"])
def test_expert_parallel_matches_single_device(kind, layout):
    want, per_step = reference(kind, EXPERTS)
    assert per_step == 8  # 2 stacks of 4 experts
    out = run_ranks(_body_dtensor, 2, kind, layout, EXPERTS, timeout=120)
    for got, _counts, _ in out:
        _assert_same(got, want)
    for step in range(STEPS):
        assert sum(counts[step] for _, counts, _ in out) == per_step
    if layout == "ep_expert_dim":  # whole experts on each rank: computed in place, 2 per stack per rank
        assert all(counts == [4, 4, 4] for _, counts, _ in out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wrapper", [True, False])
def test_ddp_matches_single_device(kind, wrapper):
    want, per_step = _ddp_reference(kind)
    out = run_ranks(_body_ddp, 2, kind, wrapper, timeout=120)
    for got, _counts in out:
        _assert_same({n: got[n] for n in want}, want)
    for step in range(STEPS):
        assert sum(counts[step] for _, counts in out) == per_step


def _body_pp(rank, world_size, kind):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(rank_device_type(), (2, 2), mesh_dim_names=("pp", "dp"))
    stage = mesh.get_coordinate()[0]
    names = ["a.weight", "b.weight", "b.bias"] if stage == 0 else ["c.weight", "e.weight"]
    shapes = {n: SHAPES[n] for n in names}
    full = {n: t for n, t in full_tensors(SHAPES, 0).items() if n in names}
    params = {
        n: nn.Parameter(distribute_tensor(t, mesh["dp"], [Shard(0)], src_data_rank=None)) for n, t in full.items()
    }
    opt = build_optimizer(kind, list(params.items()))
    counts = []
    for step in range(STEPS):
        grads = full_tensors(SHAPES, 100 + step)
        for n in names:
            _dtensor_grad(params[n], grads[n])
        opt.step()
        counts.append(opt.engine.stats.matrices_computed)
    return {n: p.full_tensor() for n, p in params.items()}, counts, shapes


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_stages_on_disjoint_ranks(kind):
    want, _ = reference(kind, SHAPES)
    out = run_ranks(_body_pp, 4, kind, timeout=120)
    merged = {}
    for got, _, _ in out:
        merged.update(got)
    _assert_same(merged, want)
    stage0 = 2 if kind == "muon" else 3  # Muon keeps the bias in an AdamW group
    for stage_ranks, n_tensors in (((0, 1), stage0), ((2, 3), 2)):
        assert all(sum(out[r][1][s] for r in stage_ranks) == n_tensors for s in range(STEPS))


def _body_missing_grad(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(rank_device_type(), (world_size,))
    params = {
        n: nn.Parameter(distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None))
        for n, t in full_tensors(SHAPES, 0).items()
    }
    opt = build_optimizer("disco", list(params.items()))
    grads = full_tensors(SHAPES, 1)
    for n, p in params.items():
        if n != "c.weight" or rank == 0:
            _dtensor_grad(p, grads[n])
    opt.step()


def test_gradient_missing_on_some_ranks_fails_everywhere():
    with pytest.raises(RankError) as err:
        run_ranks(_body_missing_grad, 2, timeout=60)
    msg = str(err.value)
    assert "rank 0" in msg and "rank 1" in msg
    assert msg.count("gradients present on some ranks and missing on others for: c.weight (1/2 ranks)") >= 2


def _body_skip_grad(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(rank_device_type(), (world_size,))
    full = full_tensors(SHAPES, 0)
    params = {n: nn.Parameter(distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)) for n, t in full.items()}
    opt = build_optimizer("disco", list(params.items()))
    grads = full_tensors(SHAPES, 1)
    for n, p in params.items():
        if n != "c.weight":
            _dtensor_grad(p, grads[n])
    opt.step()
    return params["c.weight"].full_tensor(), opt.engine.stats.matrices_computed


def test_parameters_without_gradient_anywhere_are_skipped():
    out = run_ranks(_body_skip_grad, 2, timeout=60)
    torch.testing.assert_close(out[0][0], full_tensors(SHAPES, 0)["c.weight"], atol=0, rtol=0)
    assert out[0][1] + out[1][1] == len(SHAPES) - 1
