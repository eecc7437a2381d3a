"""Which device and process-group backend the launcher (tests, ``bench``) picks: CUDA + NCCL where every rank gets
its own GPU, else CPU + gloo; ``DISCO_DEVICE`` and ``device=`` override it, a bad value is refused by name.

The choice is tested with ``torch.cuda.is_available`` / ``device_count`` monkeypatched (this machine may have no
GPU); the CPU path runs real gloo ranks. The CUDA path itself runs only where the GPUs are (skipped otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from dist_harness import run_ranks

from disco.bench.common import resolve_device
from disco.distributed import launch
from disco.distributed.launch import DEVICE_ENV, backend_for, choose_device, rank_device, rank_device_type


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n, nccl=True)``: this process sees ``n`` CUDA devices (0: CUDA unavailable) and NCCL if ``nccl``;
    ``DISCO_DEVICE`` unset."""
    monkeypatch.delenv(DEVICE_ENV, raising=False)

    def see(n: int, nccl: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: nccl)

    return see


@pytest.mark.parametrize(("n_gpus", "world", "want"), [(0, 1, "cpu"), (0, 4, "cpu"), (1, 1, "cuda"),
                                                       (1, 2, "cpu"), (4, 4, "cuda"), (8, 2, "cuda")])  # fmt: skip
def test_auto_picks_cuda_only_with_one_gpu_per_rank(gpus, n_gpus, world, want):
    gpus(n_gpus)
    assert choose_device(world) == want
    assert choose_device(world, "auto") == want
    assert backend_for(want) == {"cpu": "gloo", "cuda": "cpu:gloo,cuda:nccl"}[want]


def test_gpus_without_nccl_are_not_picked(gpus):
    gpus(4, nccl=False)
    assert choose_device(2) == "cpu"
    with pytest.raises(ValueError, match="needs one CUDA device per rank: 2 ranks, NCCL is not available"):
        choose_device(2, "cuda")


def test_cpu_is_cpu_even_with_gpus(gpus):
    gpus(8)
    assert choose_device(2, "cpu") == "cpu"


@pytest.mark.parametrize(("n_gpus", "seen"), [(0, "CUDA is not available"), (2, "2 CUDA device")])
def test_cuda_without_a_gpu_per_rank_is_refused(gpus, n_gpus, seen):
    gpus(n_gpus)
    with pytest.raises(ValueError, match=rf"device='cuda' needs one CUDA device per rank: 4 ranks, {seen}"):
        choose_device(4, "cuda")
    if n_gpus:
        assert choose_device(n_gpus, "cuda") == "cuda"  # one GPU per rank: granted


def test_environment_overrides_auto_and_the_argument_overrides_it(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert choose_device(2) == "cpu"
    assert choose_device(2, "auto") == "cuda"  # an explicit argument wins over the environment
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    assert choose_device(4) == "cuda"
    with pytest.raises(ValueError, match=r"DISCO_DEVICE='cuda' needs one CUDA device per rank: 8 ranks, 4 CUDA"):
        choose_device(8)
    monkeypatch.setenv(DEVICE_ENV, "")  # empty: auto
    assert choose_device(4) == "cuda"
    gpus(0)
    assert choose_device(4) == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:0", "nccl"])
def test_a_bad_value_is_refused_naming_its_source(gpus, monkeypatch, bad):
    gpus(4)
    with pytest.raises(ValueError, match=rf"^device='{bad}' is not a device of the launcher; valid: \['auto', 'cpu'"):
        choose_device(2, bad)
    monkeypatch.setenv(DEVICE_ENV, bad)
    with pytest.raises(ValueError, match=rf"^DISCO_DEVICE='{bad}' is not a device"):
        choose_device(2)
    with pytest.raises(ValueError, match="DISCO_DEVICE"):
        run_ranks(_where, 2)  # refused in the parent, before any rank starts
    with pytest.raises(ValueError, match="device must be one of"):
        backend_for(bad)


def test_bench_resolves_its_device_alike(gpus, monkeypatch):
    gpus(2)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"
    assert resolve_device("auto", ranks=4) == "cpu"  # 2 GPUs for 4 ranks: the CPU
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert resolve_device(None) == "cpu"
    gpus(0)
    with pytest.raises(ValueError, match="--device='cuda' needs one CUDA device per rank: 1 ranks"):
        resolve_device("cuda")


def test_run_ranks_refuses_cuda_without_gpus_before_starting(gpus):
    gpus(0)
    with pytest.raises(ValueError, match="device='cuda' needs one CUDA device per rank: 2 ranks"):
        run_ranks(_where, 2, device="cuda")


def _where(rank, world_size):
    import os

    import torch.distributed as dist

    t = torch.full((2,), float(rank + 1), device=rank_device_type())
    dist.all_reduce(t)
    return {
        "type": rank_device_type(),
        "device": str(rank_device()),
        "backend": str(dist.get_backend()),
        "sum": t,
        "sum_device": str(t.device),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(_cuda_count() > 0, reason="this machine has a GPU: auto would pick it (see the CUDA test)")
def test_cpu_ranks_on_gloo_as_before(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    for out in (run_ranks(_where, 2), run_ranks(_where, 2, device="cpu")):
        for got in out:
            assert (got["type"], got["device"], got["backend"], got["sum_device"]) == ("cpu", "cpu", "gloo", "cpu")
            assert torch.equal(got["sum"], torch.full((2,), 3.0))
            assert got["visible"] is None  # no GPU to hide: the rank's environment is as it always was
    assert rank_device_type() == "cpu" and rank_device() == torch.device("cpu")  # outside a rank


def test_cpu_ranks_on_a_gpu_machine_see_no_gpu(gpus):
    """1 GPU for 2 ranks: auto runs them on the CPU, and they see no GPU (what picks a device by itself, such as
    ``fully_shard``'s default mesh, must pick the CPU too); the parent's view is monkeypatched, the ranks are real."""
    gpus(1)
    for got in run_ranks(_where, 2):
        assert (got["type"], got["backend"], got["visible"]) == ("cpu", "gloo", "")
        assert torch.equal(got["sum"], torch.full((2,), 3.0))


@pytest.mark.skipif(_cuda_count() < 2, reason="needs 2 CUDA devices")
def test_cuda_ranks_use_nccl_and_return_cpu_tensors(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    out = run_ranks(_where, 2)  # auto: one GPU per rank
    assert [got["device"] for got in out] == ["cuda:0", "cuda:1"]
    for got in out:
        assert got["backend"] == "cpu:gloo,cuda:nccl" and got["sum_device"].startswith("cuda")
        assert got["sum"].device.type == "cpu" and torch.equal(got["sum"], torch.full((2,), 3.0))
    for got in run_ranks(_where, 2, device="cpu"):  # pinned to the CPU: the GPUs are hidden from the rank
        assert (got["type"], got["backend"], got["visible"]) == ("cpu", "gloo", "")


def test_a_cuda_tensor_would_come_back_on_the_cpu(monkeypatch):
    """``_portable`` copies what is not on the CPU to it; CPU tensors are cloned as before (detached, compact)."""
    calls = []

    class FakeCuda(torch.Tensor):  # a CPU tensor that reports a CUDA device: what _portable branches on
        @property
        def device(self):
            return torch.device("cuda", 0)

        def cpu(self, *args, **kwargs):
            calls.append("cpu")
            return torch.Tensor.cpu(self.as_subclass(torch.Tensor))

    x = torch.arange(6.0).as_subclass(FakeCuda)
    got = launch._portable({"a": [x], "b": (torch.arange(3.0).requires_grad_(),)})
    assert calls == ["cpu"] and type(got["a"][0]) is torch.Tensor and torch.equal(got["a"][0], torch.arange(6.0))
    assert not got["b"][0].requires_grad and torch.equal(got["b"][0], torch.arange(3.0))


def test_the_test_session_refuses_a_bad_device_at_once():
    """``tests/session_setup.py`` (imported by ``conftest.py`` and every rank) checks ``DISCO_DEVICE``."""
    env = {**os.environ, DEVICE_ENV: "gpu"}
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", "import session_setup"], cwd=tests, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode != 0 and "ValueError: DISCO_DEVICE='gpu'; valid: ['auto', 'cpu', 'cuda']" in out.stderr
    env[DEVICE_ENV] = "cpu"
    out = subprocess.run([sys.executable, "-c", "import session_setup; print(session_setup.DEVICE)"], cwd=tests,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "cpu", out.stderr
