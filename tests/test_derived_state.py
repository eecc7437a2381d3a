"""State of another shape than its parameter (Dion's Q, n x r) follows the parameter's sharding, and
torch.distributed.checkpoint saves and reshards it like any DTensor (2 x 2 FSDP x TP -> 2-rank TP)."""

from __future__ import annotations

import torch
from dist_harness import run_ranks

from disco.distributed.layout import Layout, shard
from disco.distributed.state import derived_layout, derived_zeros

M, N, R = 8, 6, 3


def _q_full():
    return torch.randn(N, R, generator=torch.Generator().manual_seed(3))


def _body_save(rank, world_size, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2))
    W = distribute_tensor(torch.zeros(M, N), mesh, [Shard(0), Shard(1)], src_data_rank=None)
    Q = derived_zeros(W, (N, R), {0: 1})
    lay = derived_layout(W, (N, R), {0: 1})
    rows, cols = lay.index_lists(rank)
    Q.to_local().copy_(_q_full()[rows][:, cols])
    dcp.save({"q": Q}, checkpoint_id=path)
    return tuple(Q.placements) == (Replicate(), Shard(0)), Q.full_tensor(), tuple(Q.to_local().shape)


def _body_load(rank, world_size, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    W = distribute_tensor(torch.zeros(M, N), mesh, [Shard(1)], src_data_rank=None)  # TP row-wise only
    Q = derived_zeros(W, (N, R), {0: 1})
    dcp.load({"q": Q}, checkpoint_id=path)
    return tuple(Q.placements) == (Shard(0),), Q.full_tensor(), Q.to_local().clone()


def test_derived_state_follows_columns_and_reshards(tmp_path):
    saved = run_ranks(_body_save, 4, str(tmp_path / "ckpt"), timeout=90)
    for placed, full, local_shape in saved:
        assert placed and torch.equal(full, _q_full())
        assert local_shape == (3, R)  # columns of W split over the second mesh axis -> rows of Q
    loaded = run_ranks(_body_load, 2, str(tmp_path / "ckpt"), timeout=90)
    for rank, (placed, full, local) in enumerate(loaded):
        assert placed and torch.equal(full, _q_full())
        assert torch.equal(local, _q_full()[3 * rank : 3 * rank + 3])


def test_derived_layout_is_pure_and_plain_params_stay_plain():
    lay = Layout((M, N), (0, 1, 2, 3), (2, 2), (shard(0), shard(1)))
    q = lay.derive((N, R), {0: 1})
    assert [str(p) for p in q.placements] == ["R", "S(0)"] and q.local_shape(1) == (3, R)
    plain = derived_zeros(torch.zeros(M, N), (N, R), {0: 1})
    assert type(plain) is torch.Tensor and plain.shape == (N, R)
