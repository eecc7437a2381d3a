"""disco.init: semi-orthogonal and Scion-style init, exact under DTensor sharding."""

from __future__ import annotations

import math

import pytest
import torch

from disco.init import (
    build_init_fn,
    image_orthogonal_,
    init_names,
    orthogonal_,
    scaled_orthogonal_,
    scion_normal_,
)


def _views(t: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """(batch, rows, cols) float64 view of ``t``."""
    lead = t.shape[:batch_dims]
    return t.double().reshape(math.prod(lead), t.shape[batch_dims], -1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "shape,batch_dims",
    [((8, 20), 0), ((20, 8), 0), ((12, 12), 0), ((6, 3, 2, 2), 0), ((2, 4, 3, 3), 0), ((3, 5, 9), 1), ((3, 9, 5), 1)],
)
@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_orthogonal_singular_values_equal_gain(shape, batch_dims, gain):
    w = torch.empty(shape)
    out = orthogonal_(w, gain, generator=_gen())
    assert out is w
    s = torch.linalg.svdvals(_views(w, batch_dims))
    torch.testing.assert_close(s, torch.full_like(s, gain), atol=1e-6, rtol=1e-6)


def test_orthogonal_wide_rows_tall_columns_orthonormal():
    wide = orthogonal_(torch.empty(4, 10, dtype=torch.float64), generator=_gen())
    torch.testing.assert_close(wide @ wide.T, torch.eye(4, dtype=torch.float64))
    tall = orthogonal_(torch.empty(10, 4, dtype=torch.float64), generator=_gen())
    torch.testing.assert_close(tall.T @ tall, torch.eye(4, dtype=torch.float64))


def test_scaled_orthogonal_spectral_condition():
    for shape in [(8, 32), (32, 8), (4, 16, 8)]:
        w = scaled_orthogonal_(torch.empty(shape), generator=_gen())
        out, inn = shape[-2], shape[-1]
        s = torch.linalg.svdvals(w.double())
        torch.testing.assert_close(s, torch.full_like(s, math.sqrt(out / inn)), atol=1e-6, rtol=1e-6)
    w = scaled_orthogonal_(torch.empty(8, 32), scale="original", generator=_gen())
    torch.testing.assert_close(torch.linalg.svdvals(w.double()), torch.ones(8, dtype=torch.float64))
    w = scaled_orthogonal_(torch.empty(8, 32), scale=3.0, gain=2.0, generator=_gen())
    torch.testing.assert_close(torch.linalg.svdvals(w.double()), torch.full((8,), 6.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="valid"):
        scaled_orthogonal_(torch.empty(4, 4), scale="bogus")


def test_image_orthogonal_flattens_conv():
    # Conv1d (3-D) too: always one out x (in*k) matrix; gain max(1, sqrt(out / (in*k)))
    for shape in [(16, 2, 3), (16, 2, 2, 2), (4, 3, 3, 3)]:
        w = image_orthogonal_(torch.empty(shape), generator=_gen())
        rest = math.prod(shape[1:])
        s = torch.linalg.svdvals(_views(w, 0))
        torch.testing.assert_close(s, torch.full_like(s, max(1.0, math.sqrt(shape[0] / rest))))


def test_low_precision_dtype_written():
    w = orthogonal_(torch.empty(16, 32, dtype=torch.bfloat16), generator=_gen())
    assert w.dtype == torch.bfloat16
    ref = orthogonal_(torch.empty(16, 32, dtype=torch.float64), generator=_gen())
    assert torch.equal(w, ref.to(torch.bfloat16))


def test_reproducible_with_generator_and_default_seed():
    a = orthogonal_(torch.empty(6, 10), generator=_gen(3))
    b = orthogonal_(torch.empty(6, 10), generator=_gen(3))
    c = orthogonal_(torch.empty(6, 10), generator=_gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(7)
    d = orthogonal_(torch.empty(6, 10))
    torch.manual_seed(7)
    e = orthogonal_(torch.empty(6, 10))
    assert torch.equal(d, e)


def test_experts_independent():
    w = orthogonal_(torch.empty(4, 6, 6), generator=_gen())
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(w[i], w[j])
    # batch_dims=0 makes the 3-D tensor one 6 x 36 matrix instead
    v = orthogonal_(torch.empty(4, 6, 6), generator=_gen(), batch_dims=0)
    s = torch.linalg.svdvals(v.double().reshape(4, 36))
    torch.testing.assert_close(s, torch.ones(4, dtype=torch.float64))


def test_parameter_with_grad_and_errors():
    p = torch.nn.Parameter(torch.zeros(5, 7))
    orthogonal_(p, generator=_gen())
    assert p.requires_grad and p.grad_fn is None and p.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2 dims"):
        orthogonal_(torch.empty(5))
    with pytest.raises(ValueError, match="batch_dims"):
        orthogonal_(torch.empty(2, 3), batch_dims=1)
    empty = orthogonal_(torch.empty(0, 4), generator=_gen())
    assert empty.shape == (0, 4)


def test_scion_normal_kinds():
    from disco.ops.norms import l1_to_rms, rms_to_inf, rms_to_rms

    emb = scion_normal_(torch.empty(50, 16, dtype=torch.float64), kind="input", scale=2.0, generator=_gen())
    rms_rows = emb.pow(2).mean(dim=-1).sqrt()
    torch.testing.assert_close(rms_rows, torch.full((50,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(l1_to_rms(emb), torch.tensor(2.0, dtype=torch.float64))

    head = scion_normal_(torch.empty(50, 16, dtype=torch.float64), kind="output", generator=_gen())
    torch.testing.assert_close(head.norm(dim=-1), torch.full((50,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(rms_to_inf(head), torch.tensor(1.0, dtype=torch.float64))

    hid = scion_normal_(torch.empty(3, 8, 32, dtype=torch.float64), kind="hidden", generator=_gen())
    torch.testing.assert_close(rms_to_rms(hid), torch.ones(3, dtype=torch.float64))
    assert torch.linalg.matrix_rank(hid[0]) == 8  # Gaussian, not orthogonal: not all singular values equal
    assert torch.linalg.svdvals(hid[0])[-1] < 0.9 * torch.linalg.svdvals(hid[0])[0]
    with pytest.raises(ValueError, match="valid"):
        scion_normal_(torch.empty(3, 3), kind="middle")


def test_build_init_fn():
    assert {"orthogonal", "scaled_orthogonal", "spectral", "image_orthogonal", "scion_hidden"} <= set(init_names())
    fn = build_init_fn("spectral", generator=_gen(1))
    w = fn(torch.empty(4, 16))
    torch.testing.assert_close(torch.linalg.svdvals(w.double()), torch.full((4,), 0.5, dtype=torch.float64))
    assert torch.equal(w, scaled_orthogonal_(torch.empty(4, 16), generator=_gen(1)))
    assert build_init_fn("orthogonal") is orthogonal_
    with pytest.raises(ValueError, match="valid.*orthogonal"):
        build_init_fn("xavier_magic")


# ---------------------------------------------------------------------------------------------------------------
# DTensor: a sharded init equals, bit for bit, the same init of a plain full tensor


def _dtensor_body(rank, world_size, cases):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import disco.init as di

    names = {"Shard0": Shard(0), "Shard1": Shard(1), "Shard2": Shard(2), "Replicate": Replicate()}
    out = []
    for mesh_shape, placements, shape, fn_name, kw, seed, fallback in cases:
        di._SRC_DATA_RANK = not fallback  # fallback: the slicing path for torch without src_data_rank
        mesh = init_device_mesh("cpu", mesh_shape)
        pl = [names[p] for p in placements]
        fn = getattr(di, fn_name)
        dt = torch.nn.Parameter(distribute_tensor(torch.zeros(shape), mesh, pl))
        if seed is None:  # torch's default generator, same seed on all ranks
            torch.manual_seed(11)
            fn(dt, **kw)
            torch.manual_seed(11)
            ref = fn(torch.zeros(shape), **kw)
        else:
            fn(dt, generator=torch.Generator().manual_seed(seed), **kw)
            ref = fn(torch.zeros(shape), generator=torch.Generator().manual_seed(seed), **kw)
        out.append((dt.to_local().clone(), torch.equal(dt.full_tensor(), ref), ref))
    return out


_DT_CASES = [
    # (mesh, placements, shape, init, kwargs, seed (None: default generator), force the fallback path)
    ((4,), ("Shard0",), (8, 32), "orthogonal_", {}, 0, False),  # wide: nn.init.orthogonal_ fails here
    ((4,), ("Shard1",), (32, 8), "scaled_orthogonal_", {}, 1, False),
    ((4,), ("Shard0",), (18, 32), "orthogonal_", {"gain": 2.0}, 2, False),  # uneven: 5, 5, 5, 3
    ((4,), ("Shard0",), (2, 32), "orthogonal_", {}, 3, False),  # empty shards on ranks 2, 3
    ((2, 2), ("Shard0", "Shard1"), (18, 32), "orthogonal_", {}, 4, False),
    ((2, 2), ("Replicate", "Shard1"), (10, 6), "scion_normal_", {"kind": "hidden"}, 5, False),
    ((2, 2), ("Shard0", "Shard2"), (4, 6, 10), "orthogonal_", {}, 6, False),  # experts x FSDP-like
    ((4,), ("Shard1",), (8, 4, 3, 3), "image_orthogonal_", {}, 7, False),  # conv, sharded on in-channels
    ((4,), ("Shard0",), (12, 20), "orthogonal_", {}, None, False),  # default generator
    ((4,), ("Shard0",), (18, 32), "orthogonal_", {}, 2, True),
    ((2, 2), ("Shard0", "Shard1"), (18, 32), "orthogonal_", {}, 4, True),
]


@pytest.mark.dist
def test_dtensor_init_is_exact():
    from dist_harness import run_ranks

    results = run_ranks(_dtensor_body, 4, _DT_CASES, timeout=120)
    for case_i, case in enumerate(_DT_CASES):
        per_rank = [r[case_i] for r in results]
        assert all(eq for _, eq, _ in per_rank), f"full_tensor() != plain init for {case}"
        ref = per_rank[0][2]
        assert all(torch.equal(r[2], ref) for r in per_rank), f"ranks disagree on the full init for {case}"
    # uneven 18 x 32 over 4 ranks: 5, 5, 5, 3 rows; 2 x 32 over 4: 1, 1, 0, 0 rows
    assert [r[2][0].shape[0] for r in results] == [5, 5, 5, 3]
    assert [r[3][0].shape[0] for r in results] == [1, 1, 0, 0]
    # 2x2 (Shard0, Shard1): rank 3 holds rows 9: and cols 16:
    assert torch.equal(results[3][4][0], results[0][4][2][9:, 16:])
