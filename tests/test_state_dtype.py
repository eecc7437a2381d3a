"""``state_dtype``: the momentum kept in bf16 or as 8-bit blocks, the math in the compute dtype.

* the block quantizer against a float64 reference of its formulas, and its error bound;
* the settings: names, refusals naming the key, ``is_light``;
* bf16 and int8 momentum steps against float64 references fed the optimizer's own stored state (each step's
  rounding or quantization is then the only difference, and it is bounded);
* bytes per parameter; DCP saves the int8 state at 4 real gloo ranks (FSDP x TP) and resumes it at 2 (FSDP),
  equal to one process; a layout whose shards would cut a block is refused.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

import disco
from disco.distributed.launch import rank_threads
from disco.ops.quant import QMAX, block_count, dequantize_blocks, quantize_blocks
from disco.optim.momentum import INT8_BLOCK, state_bytes


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the quantizer -----------------------------------------------------------------------------------------------
def _reference_quant(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64: per block of a row, ``s = max |x| / 127`` and ``x / s`` (before rounding)."""
    x = x.double()
    rows, n = x.shape
    scaled, scales = torch.zeros_like(x), []
    for b in range(block_count(n, block)):
        part = x[:, b * block : (b + 1) * block]
        amax = part.abs().amax(dim=1, keepdim=True)
        s = amax / QMAX
        scaled[:, b * block : (b + 1) * block] = torch.where(amax > 0, part / torch.where(s > 0, s, 1), 0)
        scales.append(s)
    return scaled, torch.cat(scales, dim=1)


@pytest.mark.parametrize(("rows", "n", "block"), [(5, 256, 256), (7, 300, 64), (3, 10, 256), (4, 9, 1), (6, 130, 7)])
def test_quantize_matches_float64_and_error_bound(rows, n, block):
    x = torch.randn(rows, n, generator=_gen(rows * n)) * torch.logspace(-3, 3, rows).unsqueeze(1)
    x[0, :block] = 0  # an all-zero block: scale 0, values 0
    q, scale = quantize_blocks(x, block)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (rows, block_count(n, block))
    scaled, s_ref = _reference_quant(x, block)
    torch.testing.assert_close(scale.double(), s_ref, rtol=2**-23, atol=0)
    # q is the float64 value rounded, but for float32 rounding right at a tie (x / s within 1e-4 of k + 1/2)
    diff = (q.double() - scaled.round()).abs()
    near_tie = ((scaled - scaled.floor()) - 0.5).abs() < 1e-4
    assert diff.max() <= 1 and bool((diff[~near_tie] == 0).all())
    assert int(q.abs().max()) <= QMAX and bool((q[0, :block] == 0).all())
    back = dequantize_blocks(q, scale, block, torch.empty(rows, n))
    # |x - q s| <= s / 2 (rounding to the grid) + float32 rounding of s, x * (127 / amax) and q * s
    bound = s_ref.repeat_interleave(block, dim=1)[:, :n] * (0.5 + 1e-5) + 4 * 2**-24 * x.double().abs()
    assert bool(((back.double() - x.double()).abs() <= bound).all())
    # dequantizing is q * scale, one float32 rounding
    torch.testing.assert_close(back.double(), q.double() * scale.double().repeat_interleave(block, 1)[:, :n],
                               rtol=2**-24, atol=0)  # fmt: skip


def test_quantize_is_the_same_piece_by_piece():
    """Blocks never span rows: quantizing row pieces or column pieces at block boundaries gives the whole's."""
    x = torch.randn(10, 96, generator=_gen(5))
    q, s = quantize_blocks(x, 32)
    q1, s1 = quantize_blocks(x[:4], 32)
    q2, s2 = quantize_blocks(x[:, 32:], 32)
    assert torch.equal(q1, q[:4]) and torch.equal(s1, s[:4])
    assert torch.equal(q2, q[:, 32:]) and torch.equal(s2, s[:, 1:])


# ---- settings ----------------------------------------------------------------------------------------------------
def _params(shapes=((64, 32), (3, 16, 24))):
    return [nn.Parameter(torch.randn(s, generator=_gen(k))) for k, s in enumerate(shapes)]


def test_settings_names_and_refusals():
    opt = disco.Muon([{"params": _params(), "state_dtype": "bfloat16"}], lr=0.02)
    assert opt.settings_of(opt.param_groups[0]).state_dtype == torch.bfloat16  # type: ignore[attr-defined]
    assert all(st["momentum_buffer"].dtype == torch.bfloat16 for st in opt.state.values())
    for bad, err, words in [
        ("int9", ValueError, "state_dtype='int9' is invalid"),
        ("int4", ValueError, "not a floating dtype"),
        (torch.int8, ValueError, "int8_block"),
        (3, TypeError, "state_dtype=3"),
    ]:
        with pytest.raises(err, match=words):
            disco.Muon([{"params": _params(), "state_dtype": bad}], lr=0.02)
    with pytest.raises(ValueError, match="state_block=0"):
        disco.Muon([{"params": _params(), "state_dtype": INT8_BLOCK, "state_block": 0}], lr=0.02)
    disco.Muon([{"params": _params(), "is_light": True, "nesterov": False}])  # fine without a state dtype
    with pytest.raises(ValueError, match="is_light=True"):
        disco.Muon([{"params": _params(), "is_light": True, "nesterov": False, "state_dtype": torch.bfloat16}])


# ---- steps against float64 ---------------------------------------------------------------------------------------
def _polar64(U: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(U.double(), full_matrices=False)
    return u @ vh


def _stored(state: dict, block: int) -> torch.Tensor:
    """The stored momentum as float64 (dequantized for int8)."""
    if "momentum_int8" in state:
        q, s = state["momentum_int8"], state["momentum_scale"]
        n = q.shape[-1]
        out = torch.empty(q.reshape(-1, n).shape)
        return dequantize_blocks(q.reshape(-1, n), s.reshape(-1, s.shape[-1]), block, out).reshape(q.shape).double()
    return state["momentum_buffer"].double()


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, INT8_BLOCK])
@pytest.mark.parametrize("nesterov", [True, False])
def test_step_matches_float64_fed_its_own_state(state_dtype, nesterov):
    """Each step from the optimizer's stored momentum ``M``: the new stored momentum is ``lerp(M, G, 1 - beta)``
    rounded once (bf16: within half a bf16 ulp; int8: within half a block's scale), the weight moves by
    ``-lr sqrt(max(1, m/n)) polar(U)`` with ``U`` from the same ``M`` (float32 compute, SVD)."""
    block, beta, lr, wd = 16, 0.9, 0.02, 0.1
    params = _params(((70, 48), (40, 96)))
    group = dict(params=params, state_dtype=state_dtype, state_block=block, backend="svd", nesterov=nesterov)
    opt = disco.Muon([group], lr=lr, weight_decay=wd, momentum=beta, compute_dtype=torch.float32)
    gen = _gen(7)
    for _ in range(4):
        before = [(p.detach().double().clone(), _stored(opt.state[p], block)) for p in params]
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, g, (W, M) in zip(params, grads, before):
            M_new = beta * M + (1 - beta) * g.double()
            got = _stored(opt.state[p], block)
            arith = 1e-6 * (M.abs() + g.double().abs())  # float32 arithmetic before the rounding
            if state_dtype == torch.bfloat16:
                bound = M_new.abs() * 2**-8 + arith  # half an ulp of bf16 (8 significant bits)
            else:
                amax = M_new.reshape(-1, p.shape[-1] // block, block).abs().amax(-1, keepdim=True)
                bound = (amax / QMAX * (0.5 + 1e-4)).expand(-1, -1, block).reshape(p.shape) + arith
            assert bool(((got - M_new).abs() <= bound).all()), (got - M_new).abs().max()
            U = beta * M_new + (1 - beta) * g.double() if nesterov else M_new
            m, n = p.shape
            W_ref = (1 - lr * wd) * W - lr * math.sqrt(max(1.0, m / n)) * _polar64(U)
            torch.testing.assert_close(p.detach().double(), W_ref, rtol=0, atol=2e-6)


def test_state_bytes_per_parameter():
    shapes = ((512, 512), (1536, 512))
    numel = sum(a * b for a, b in shapes)
    per = {}
    for sd in (None, torch.bfloat16, INT8_BLOCK):
        params = _params(shapes)
        opt = disco.Muon([{"params": params, "state_dtype": sd}], lr=0.02)
        per[sd] = sum(state_bytes(opt.state[p]) for p in params) / numel
    assert per[None] == 4 and per[torch.bfloat16] == 2 and per[INT8_BLOCK] == 1 + 4 / 256


# ---- distributed: DCP 4 -> 2, refusals ---------------------------------------------------------------------------
SHAPES = {"a": (97, 64), "c": (18, 32)}
KW = dict(lr=0.05, momentum=0.9, weight_decay=0.1, compute_dtype=torch.float32)
BLOCK = 16


def _full(seed):
    g = _gen(seed)
    return {n: torch.randn(s, generator=g) / 4 for n, s in SHAPES.items()}


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    if world == 4:  # FSDP x TP: the last dim is cut in 2 (32 and 16 columns: whole blocks of 16)
        return init_device_mesh("cpu", (2, 2)), [Shard(0), Shard(1)]
    return init_device_mesh("cpu", (world,)), [Shard(0)]


def _opt(params, block=BLOCK):
    return disco.Muon([{"params": list(params.values()), "param_names": list(params), "state_dtype": INT8_BLOCK,
                        "state_block": block}], **KW)  # fmt: skip


def _body_save(rank, world_size, path, steps):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import distribute_tensor

    mesh, pl = _mesh(world_size)
    params = {n: nn.Parameter(distribute_tensor(t, mesh, pl, src_data_rank=None)) for n, t in _full(0).items()}
    opt = _opt(params)
    for step in range(steps):
        for n, g in _full(100 + step).items():
            params[n].grad = distribute_tensor(g, mesh, pl, src_data_rank=None)
        opt.step()
    dcp.save({"params": params, "optim": opt.state_dict()}, checkpoint_id=path)
    st = opt.state[params["a"]]
    return sorted(opt.state_dict()["state"][0]), st["momentum_int8"].full_tensor(), st["momentum_scale"].full_tensor()


def _body_load(rank, world_size, path, steps):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import distribute_tensor

    mesh, pl = _mesh(world_size)
    params = {n: nn.Parameter(distribute_tensor(t, mesh, pl, src_data_rank=None)) for n, t in _full(0).items()}
    opt = _opt(params)
    state = {"params": params, "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=path)
    opt.load_state_dict(state["optim"])
    st = opt.state[params["a"]]
    loaded = (st["momentum_int8"].full_tensor(), st["momentum_scale"].full_tensor())
    for n, g in _full(100 + steps).items():
        params[n].grad = distribute_tensor(g, mesh, pl, src_data_rank=None)
    opt.step()
    return loaded, {n: p.full_tensor() for n, p in params.items()}


def _one_process(steps):
    params = {n: nn.Parameter(t.clone()) for n, t in _full(0).items()}
    opt = _opt(params)
    out = []
    for step in range(steps):
        for n, g in _full(100 + step).items():
            params[n].grad = g
        opt.step()
        st = opt.state[params["a"]]
        out.append(
            (
                st["momentum_int8"].clone(),
                st["momentum_scale"].clone(),
                {n: p.detach().clone() for n, p in params.items()},
            )
        )
    return out


def test_int8_state_dcp_saves_at_4_ranks_and_resumes_at_2(tmp_path):
    steps = 2
    with rank_threads():
        want = _one_process(steps + 1)
    path = str(tmp_path / "ckpt")
    for keys, q, s in run_ranks(_body_save, 4, path, steps, timeout=180):
        assert keys == ["momentum_int8", "momentum_scale"]
        assert torch.equal(q, want[steps - 1][0]) and torch.equal(s, want[steps - 1][1])
    for (q, s), got in run_ranks(_body_load, 2, path, steps, timeout=180):
        assert torch.equal(q, want[steps - 1][0]) and torch.equal(s, want[steps - 1][1])
        for n in SHAPES:
            torch.testing.assert_close(got[n], want[steps][2][n], atol=1e-6, rtol=0)


def _body_refused(rank, world_size):
    from torch.distributed.tensor import distribute_tensor

    mesh, pl = _mesh(world_size)
    params = {n: nn.Parameter(distribute_tensor(t, mesh, pl, src_data_rank=None)) for n, t in _full(0).items()}
    try:
        _opt(params, block=24)  # 32-column shards of 64: a block of 24 would straddle
    except ValueError as e:
        return str(e)
    return None


def test_a_block_cut_by_a_shard_is_refused_on_every_rank():
    for msg in run_ranks(_body_refused, 4, timeout=120):
        assert msg is not None and "'a'" in msg and "(97, 64)" in msg and "state_block=24" in msg


# ---- every rule that keeps a momentum --------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["muon", "normuon", "adamuon", "polargrad"])
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, INT8_BLOCK])
def test_first_step_equals_float32_state(algorithm, state_dtype):
    """From zero momentum the first direction is the same, so the first step is bitwise the float32-state step;
    the stored momentum is the float32 one rounded (bf16) or quantized once (int8)."""
    shapes = ((64, 32), (48, 96))
    runs = []
    for sd in (None, state_dtype):
        params = _params(shapes)
        opt = disco.Disco([{"params": params, "algorithm": algorithm, "state_dtype": sd, "state_block": 16}], lr=0.02)
        for k, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=_gen(50 + k))
        opt.step()
        runs.append((params, opt))
    (p32, o32), (pq, oq) = runs
    for a, b in zip(p32, pq):
        assert torch.equal(a, b)
        m32 = o32.state[a]["momentum_buffer"]
        if state_dtype == torch.bfloat16:
            assert torch.equal(oq.state[b]["momentum_buffer"], m32.bfloat16())
        else:
            q, s = quantize_blocks(m32.reshape(-1, m32.shape[-1]), 16)
            assert torch.equal(oq.state[b]["momentum_int8"].reshape(q.shape), q)
            assert torch.equal(oq.state[b]["momentum_scale"].reshape(s.shape), s)


def test_polar_first_refuses_int8_state():
    with pytest.raises(ValueError, match="polar_first=True takes state_dtype"):
        group = {"algorithm": "polargrad", "polar_first": True, "nesterov": False, "state_dtype": INT8_BLOCK}
        disco.Disco([{"params": _params(), **group}])


def test_dion_state_dtype_is_its_momentum_dtype_and_computes_wide():
    """``state_dtype`` names Dion's ``momentum_dtype``; ``B = M + G`` runs in float32, so from zero momentum the
    first step is bitwise the float32-momentum step and the stored momentum is its float32 one rounded."""
    runs = []
    for sd in (None, torch.bfloat16):
        params = _params(((64, 32), (48, 96)))
        opt = disco.Dion([{"params": params, "state_dtype": sd}], lr=0.01, rank_fraction=0.5)
        for k, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=_gen(60 + k))
        opt.step()
        runs.append((params, opt))
    (p32, o32), (p16, o16) = runs
    for a, b in zip(p32, p16):
        assert torch.equal(a, b)
        assert o16.state[b]["momentum_buffer"].dtype == torch.bfloat16
        assert torch.equal(o16.state[b]["momentum_buffer"], o32.state[a]["momentum_buffer"].bfloat16())
