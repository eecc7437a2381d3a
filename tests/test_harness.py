"""Tests of the multi-process launcher itself (disco.distributed.launch, via the tests/dist_harness.py shim)."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import dist_harness
import pytest
import torch
import torch.distributed as dist
from dist_harness import RankError, run_ranks

from disco.distributed import launch

pytestmark = pytest.mark.dist


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_dead(pids, within: float = 15.0) -> list[int]:
    end = time.monotonic() + within
    while time.monotonic() < end:
        alive = [p for p in pids if _pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if _pid_alive(p)]


# ------------------------------------------------------------------------------------------- rank bodies


def _identity_body(rank, world_size, scale, *, tag):
    t = torch.arange(3, dtype=torch.float32) * scale + rank
    view = torch.zeros(100)[rank : rank + 2]  # a view of a larger storage
    return {
        "rank": rank,
        "world_size": world_size,
        "tag": tag,
        "t": t,
        "view": view,
        "nested": [rank, (rank * 2, {"x": torch.tensor(rank)})],
        "env": (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]),
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
        "grad": (torch.ones(2, requires_grad=True) * 2),  # non-leaf tensor with grad history
    }


def _all_reduce_body(rank, world_size):
    t = torch.tensor([float(rank + 1), 10.0 * rank])
    dist.all_reduce(t)
    return t, os.environ.get("MASTER_PORT")


def _dtensor_body(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    dt = distribute_tensor(full, mesh, [Shard(0)])
    return {
        "local_shape": tuple(dt.to_local().shape),
        "full": dt.full_tensor(),
        "placements": str(dt.placements),
    }


def _fsdp_body(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    loss = model(torch.ones(2, 4)).sum()
    loss.backward()
    return {
        name: (
            isinstance(p, DTensor),
            str(p.placements),
            tuple(p.to_local().shape),
            isinstance(p.grad, DTensor),
            p.full_tensor(),
        )
        for name, p in model.named_parameters()
    }


def _explode_here(rank):
    raise ValueError(f"boom from rank {rank}")


def _raise_on_rank1_body(rank, world_size):
    if rank == 1:
        _explode_here(rank)
    return rank


def _raise_everywhere_body(rank, world_size):
    if rank == 0:
        raise KeyError("first")
    time.sleep(0.5)  # rank 1 fails second
    raise ValueError("second")


def _raise_during_collective_body(rank, world_size):
    if rank == 1:
        _explode_here(rank)
    dist.all_reduce(torch.ones(1))  # rank 0 waits on rank 1, which is gone: gloo must error out quickly
    return rank


def _die_body(rank, world_size):
    if rank == 1:
        os._exit(3)
    return rank


def _deadlock_body(rank, world_size, piddir):
    with open(os.path.join(piddir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    else:
        time.sleep(600)
    return rank


def _pid_body(rank, world_size):
    return os.getpid()


def _modules_body(rank, world_size, names):
    return {n: n in sys.modules for n in names}


# ------------------------------------------------------------------------------------------------ tests


def test_results_in_rank_order():
    out = run_ranks(_identity_body, 3, 2.0, tag="abc")
    assert [o["rank"] for o in out] == [0, 1, 2]
    for r, o in enumerate(out):
        assert o["world_size"] == 3 and o["tag"] == "abc"
        assert torch.equal(o["t"], torch.tensor([0.0, 2.0, 4.0]) + r)
        assert o["view"].shape == (2,) and o["view"].untyped_storage().nbytes() == 8
        assert o["nested"][0] == r and o["nested"][1][0] == 2 * r
        assert torch.equal(o["nested"][1][1]["x"], torch.tensor(r))
        assert o["env"] == (str(r), "3", str(r))
        assert o["threads"] == 1
        assert not o["grad"].requires_grad and torch.equal(o["grad"], torch.full((2,), 2.0))
    assert len({o["pid"] for o in out}) == 3
    assert os.getpid() not in {o["pid"] for o in out}


@pytest.mark.parametrize("rendezvous", ["file", "tcp"])
def test_all_reduce_four_ranks(rendezvous):
    out = run_ranks(_all_reduce_body, 4, rendezvous=rendezvous)
    expected = torch.tensor([1.0 + 2 + 3 + 4, 10.0 * (0 + 1 + 2 + 3)])
    for t, port in out:
        assert torch.equal(t, expected)
        assert (port is not None) == (rendezvous == "tcp")


def test_dtensor_uneven_shards_round_trip():
    out = run_ranks(_dtensor_body, 4)
    full = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    assert [o["local_shape"] for o in out] == [(3, 3), (3, 3), (3, 3), (1, 3)]
    for o in out:
        assert torch.equal(o["full"], full)
        assert "Shard(dim=0)" in o["placements"]


def test_fully_shard_gives_dtensor_params():
    out = run_ranks(_fsdp_body, 2)
    assert set(out[0]) == {"weight", "bias"}
    for o in out:
        assert o["weight"][:2] == (True, "(Shard(dim=0),)")
        assert o["weight"][3] is True  # gradient is a DTensor too
        assert o["bias"][0] is True
    assert [o["weight"][2] for o in out] == [(2, 4), (1, 4)]  # 3 rows over 2 ranks: 2, 1
    assert [o["bias"][2] for o in out] == [(2,), (1,)]
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    for o in out:
        assert torch.equal(o["weight"][4], ref.weight.detach())
        assert torch.equal(o["bias"][4], ref.bias.detach())


def test_exception_on_rank1_is_reraised_with_traceback():
    with pytest.raises(RankError) as info:
        run_ranks(_raise_on_rank1_body, 2)
    msg = str(info.value)
    assert "rank 1" in msg and "ValueError" in msg
    assert "boom from rank 1" in msg
    assert "Traceback (most recent call last)" in msg and "_explode_here" in msg
    assert "rank 0" not in msg.splitlines()[0]
    assert info.value.failures.keys() == {1}
    assert isinstance(info.value.__cause__, ValueError)
    assert multiprocessing.active_children() == []


def test_several_failures_are_all_reported():
    with pytest.raises(RankError) as info:
        run_ranks(_raise_everywhere_body, 2)
    msg = str(info.value)
    assert msg.splitlines()[0].startswith("rank 0 raised KeyError")
    assert "'first'" in msg and "ValueError: second" in msg
    assert set(info.value.failures) == {0, 1}


def test_failure_during_collective_does_not_wait_for_timeout():
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        run_ranks(_raise_during_collective_body, 2, timeout=60)
    assert time.monotonic() - t0 < 30
    assert info.value.exc_types[1] == "ValueError"
    assert "boom from rank 1" in str(info.value)


def test_rank_that_dies_is_reported():
    with pytest.raises(RankError, match=r"rank 1 died \(exit code 3\)"):
        run_ranks(_die_body, 2, timeout=60)


def test_lambda_is_refused():
    with pytest.raises(TypeError, match="module-level"):
        run_ranks(lambda r, w: r, 2)


@pytest.mark.timeout(120)
def test_deadlock_raises_timeout_and_kills_ranks(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        run_ranks(_deadlock_body, 2, str(tmp_path), timeout=10, pg_timeout=300, exact_timeout=True)
    elapsed = time.monotonic() - t0
    assert elapsed < 60, elapsed  # 10 s deadline + stack dumps + kills, with slack for a loaded machine
    msg = str(info.value)
    assert "ranks [0, 1]" in msg and "did not finish within 10 s" in msg
    assert "_deadlock_body" in msg  # the hung ranks' stacks are dumped
    pids = [int((tmp_path / f"{r}.pid").read_text()) for r in range(2)]
    assert _wait_dead(pids) == []
    assert multiprocessing.active_children() == []


def test_shim_delegates_to_the_package_launcher(monkeypatch):
    """``dist_harness`` is a thin shim: the launcher that runs is ``disco.distributed.launch.run_ranks``."""
    assert dist_harness.RankError is launch.RankError and dist_harness.HOST == launch.HOST
    calls = []

    def fake(fn, world_size, *args, **kwargs):
        calls.append((fn, world_size, args, kwargs))
        return ["sentinel"]

    monkeypatch.setattr(launch, "run_ranks", fake)
    assert run_ranks(_pid_body, 3, 7, timeout=5, preload=["json"], tag="x", exact_timeout=True) == ["sentinel"]
    [(fn, world_size, args, kwargs)] = calls
    assert fn is _pid_body and world_size == 3 and args == (7,)
    precision = torch.get_float32_matmul_precision()  # the caller's, carried to the ranks
    assert kwargs == {
        "timeout": 5,
        "preload": ["pytest", "session_setup", "json"],
        "tag": "x",
        "matmul_precision": precision,
    }
    run_ranks(_pid_body, 2, timeout=5, pg_timeout=1)  # otherwise the timeouts are hang detectors
    assert calls[1][3]["timeout"] == dist_harness.HANG_S and calls[1][3]["pg_timeout"] == dist_harness.PG_HANG_S


def test_preload_modules_are_imported_in_the_ranks():
    """Asked-for modules are there in each rank: preloaded by the forkserver, or (here) imported by the rank."""
    launch._context([])  # the process's forkserver context exists from here on (usually: an earlier test made it)
    assert launch._context(["pyclbr"])[1] == ["pyclbr"]  # not preloaded: each rank imports it
    names = ["pytest", "torch.distributed.checkpoint", "pyclbr"]
    out = run_ranks(_modules_body, 2, names, preload=["pyclbr"])
    assert out == [dict.fromkeys(names, True)] * 2


def test_launcher_does_not_need_pytest():
    """The package's launcher preloads torch only; the tests' shim adds pytest."""
    assert "pytest" not in launch._PRELOAD and "pytest" in dist_harness.PRELOAD
    code = "import sys, disco.distributed.launch; assert 'pytest' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_processes_exit_after_success():
    pids = run_ranks(_pid_body, 2)
    assert _wait_dead(pids) == []
    assert multiprocessing.active_children() == []


_ORPHAN_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import dist_harness
    from dist_harness import run_ranks
    from disco.distributed import launch

    launch._PRELOAD, dist_harness.PRELOAD = ["torch"], []  # a cheaper forkserver for this throw-away parent

    def body(rank, world_size):
        print("PID", os.getpid(), flush=True)
        sys.__stdout__.flush()
        with open(os.path.join({tmp!r}, f"{{rank}}.pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)

    if __name__ == "__main__":
        run_ranks(body, 2, timeout=600)
    """
)


@pytest.mark.timeout(120)
def test_ranks_die_with_a_killed_parent(tmp_path):
    """The watchdog: SIGKILL the process that called run_ranks; its ranks must go away by themselves."""
    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT.format(tests=tests, tmp=str(tmp_path)))
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the killed parent cannot remove its temporary files
    devnull = subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, str(script)], stdout=devnull, stderr=devnull, env=env)
    try:
        end = time.monotonic() + 90
        while not all((tmp_path / f"{r}.pid").exists() for r in range(2)):
            assert proc.poll() is None, "the parent script died early"
            assert time.monotonic() < end, "ranks never started"
            time.sleep(0.1)
        time.sleep(0.2)
        pids = [int((tmp_path / f"{r}.pid").read_text()) for r in range(2)]
        assert all(_pid_alive(p) for p in pids)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _wait_dead(pids, within=20) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _precision_body(rank, world_size):
    return torch.get_float32_matmul_precision()


def test_ranks_run_at_the_callers_matmul_precision():
    """A test that pins its precision (``fp32_matmuls``) pins its ranks too, whatever the session's."""
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("medium", "highest"):
            torch.set_float32_matmul_precision(precision)
            assert run_ranks(_precision_body, 2) == [precision] * 2
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.raises(ValueError, match="matmul_precision"):
        run_ranks(_precision_body, 2, matmul_precision="low")
