"""Overlap with backward (``opt.overlap_with_backward``) == the plain step, bit for bit, in every case.

Each test trains two copies of one model from the same seeds, one with the plain step and one with overlap on,
and compares every parameter and state tensor exactly; it also checks whether the overlapped work was committed
(``opt.overlap.committed``) or discarded (``recomputed``), so that a fallback cannot hide a broken commit path
nor a commit path that never runs. Exact equality holds because a bucket runs the same kernels on the same
inputs as the plain step (the engine stacks fewer equal-shape matrices per call; each matrix of a batched matmul
is computed alone on CPU).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

from disco import Dion, Disco, Muon
from disco.distributed.agreement import StepError
from disco.optim.overlap import make_buckets, overlappable

STEPS = 3


def mlp(seed: int = 0, extra: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 6))
    if extra:
        m.unused = nn.Linear(6, 6, bias=False)  # registered, never in the forward: no gradient
    return m


def make_opt(model: nn.Module, kind: str = "muon", **kw):
    named = [(n.removeprefix("module."), p) for n, p in model.named_parameters()]
    mats = [(n, p) for n, p in named if p.dim() >= 2]
    vecs = [(n, p) for n, p in named if p.dim() < 2]
    nonfinite = kw.pop("nonfinite", "raise")
    groups = [{"params": [p for _, p in mats], "param_names": [n for n, _ in mats], "nonfinite": nonfinite}]
    vec_group = {"params": [p for _, p in vecs], "param_names": [n for n, _ in vecs], "algorithm": "adamw"}
    groups.append({**vec_group, "nonfinite": nonfinite})
    if kind == "muon":
        return Muon(groups, lr=0.02, weight_decay=0.1, compute_dtype=torch.float32, **kw)
    if kind == "dion":
        return Dion(groups, lr=0.02, rank_fraction=0.5, **kw)
    kw.setdefault("nesterov", True)
    return Disco(groups, lr=0.02, momentum=0.9, weight_decay=0.05, compute_dtype=torch.float32, **kw)


def batch(step: int, micro: int = 0, rank: int | None = None) -> torch.Tensor:
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(100 * step + micro))
    return x if rank is None else x[rank * 4 : rank * 4 + 4]


def snapshot(model: nn.Module, opt) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                out[f"{n}/{k}"] = v.detach().clone()
    return out


def assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k}: max diff {(got[k] - want[k]).abs().max().item()}"


def train(overlap: bool, *, kind: str = "muon", bucket_bytes: int = 1, extra: bool = False, loop=None, **kw):
    model = mlp(extra=extra)
    opt = make_opt(model, kind, **kw)
    if overlap:
        opt.overlap_with_backward(bucket_bytes=bucket_bytes)
    for step in range(STEPS):
        (loop or plain_loop)(model, opt, step)
    return snapshot(model, opt), opt


def plain_loop(model, opt, step):
    model(batch(step)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def compare(loop=None, *, committed: bool = True, **kw):
    want, _ = train(False, loop=loop, **kw)
    got, opt = train(True, loop=loop, **kw)
    assert_equal(got, want)
    ov = opt.overlap
    assert (ov.committed, ov.recomputed) == ((STEPS, 0) if committed else (0, STEPS)), ov.reason
    return opt


# ---- buckets ----------------------------------------------------------------------------------------------------
def test_buckets_follow_backward_order_and_bytes():
    model = mlp()
    opt = make_opt(model)
    items = overlappable(opt, opt._items())
    assert [it.name for it in items] == ["0.weight", "2.weight", "4.weight"]  # adamw biases stay in step()
    names = lambda bs: [[it.name for it in b] for b in bs]  # noqa: E731
    assert names(make_buckets(opt.engine, items, 1)) == [["4.weight"], ["2.weight"], ["0.weight"]]
    # 4.weight: 6*24*4 = 576 bytes, 2.weight: 2304, 0.weight: 1152
    assert names(make_buckets(opt.engine, items, 2880)) == [["4.weight", "2.weight"], ["0.weight"]]
    assert names(make_buckets(opt.engine, items, 10**9)) == [["4.weight", "2.weight", "0.weight"]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        opt.overlap_with_backward(bucket_bytes=-1)


# ---- one process --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["muon", "disco", "dion"])
@pytest.mark.parametrize("bucket_bytes", [1, 10**9])
def test_equals_plain_step(kind, bucket_bytes):
    opt = compare(kind=kind, bucket_bytes=bucket_bytes)
    assert opt.assignments == {0: [0, 1, 2]}


def test_parameter_without_gradient_fires_at_end_of_backward():
    opt = compare(extra=True)
    assert opt.overlap.buckets[0][0].name == "unused.weight"  # last registered: first bucket, never ready


def test_zero_grad_set_to_none_false():
    def loop(model, opt, step):
        model(batch(step)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    compare(loop)


def test_zero_grad_between_backward_and_step_discards():
    def loop(model, opt, step):
        model(batch(step, 1)).square().mean().backward()
        opt.zero_grad()  # that backward's work is void; the next one fires again
        model(batch(step)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    compare(loop)


def test_accumulation_paused_commits():
    def loop(model, opt, step):
        for micro in range(3):
            with opt.overlap_paused() if micro < 2 else torch.enable_grad():
                model(batch(step, micro)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    compare(loop)


def test_accumulation_unpaused_recomputes_and_warns():
    def loop(model, opt, step):
        for micro in range(2):
            model(batch(step, micro)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    with pytest.warns(RuntimeWarning, match="accumulated again"):
        compare(loop, committed=False)


def test_gradient_changed_after_backward_recomputes():
    def loop(model, opt, step):
        model(batch(step)).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)  # in place, after the buckets fired
        opt.step()
        opt.zero_grad()

    with pytest.warns(RuntimeWarning, match="changed after its bucket fired"):
        compare(loop, committed=False)


def test_settings_changed_after_backward_recomputes():
    def loop(model, opt, step):
        model(batch(step)).square().mean().backward()
        opt.param_groups[0]["lr"] *= 0.5  # a scheduler stepped between backward and step()
        opt.step()
        opt.zero_grad()

    opt = compare(loop, committed=False)
    assert opt.overlap.reason == "the settings changed after backward"


def test_grads_set_by_hand_recompute():
    def loop(model, opt, step):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        opt.step()

    opt = compare(loop, committed=False)
    assert opt.overlap.reason == "bucket 0 did not fire in backward"


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradient_found_in_backward(policy):
    def loop(model, opt, step):
        out = model(batch(step))
        if step == 1:
            out = out * torch.tensor(float("nan"))  # every gradient non-finite
        out.square().mean().backward()
        if step == 1 and policy == "raise":
            before = snapshot(model, opt)
            with pytest.raises(StepError, match="non-finite"):
                opt.step()
            assert_equal(snapshot(model, opt), before)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
        opt.zero_grad()

    want, _ = train(False, loop=loop, nonfinite=policy)
    got, opt = train(True, loop=loop, nonfinite=policy)
    assert_equal(got, want)
    assert opt.overlap.committed == STEPS - 1


def test_error_in_backward_is_raised_by_step():
    model = mlp()
    opt = make_opt(model)
    opt.overlap_with_backward(bucket_bytes=1)
    before = snapshot(model, opt)

    def boom(spec, stack):
        raise ValueError("boom in a spec")

    opt.engine.stats.observers.append(boom)
    model(batch(0)).square().mean().backward()  # does not raise: captured
    with pytest.raises(ValueError, match="boom in a spec"):
        opt.step()
    assert_equal(snapshot(model, opt), before)
    opt.engine.stats.observers.remove(boom)
    opt.zero_grad()
    model(batch(0)).square().mean().backward()
    opt.step()
    assert opt.overlap.committed == 1


def test_light_mode_is_refused():
    """Light groups keep their momentum in p.grad, which backward writes: they cannot run ahead, and overlap says
    so instead of leaving them in step() unannounced."""
    opt = make_opt(mlp(), "disco", is_light=True, nesterov=False)
    with pytest.raises(ValueError, match=r"cannot compute ahead in backward \(is_light=True"):
        opt.overlap_with_backward()
    assert opt.overlap is None


def test_groups_added_rebuild_the_buckets():
    def loop(model, opt, step):
        model(batch(step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            model.add_module("late", nn.Linear(6, 6, bias=False))
            opt.add_param_group({"params": [model.late.weight], "param_names": ["late.weight"]})

    want, _ = train(False, loop=loop)
    got, opt = train(True, loop=loop)
    assert_equal(got, want)
    assert (opt.overlap.committed, opt.overlap.recomputed) == (2, 1)
    assert opt.overlap.buckets[0][0].name == "late.weight"


def test_disable_removes_hooks():
    model = mlp()
    opt = make_opt(model)
    opt.overlap_with_backward(bucket_bytes=1)
    opt.overlap_with_backward(False)
    assert opt.overlap is None
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


# ---- several processes ----------------------------------------------------------------------------------------
def _body_fsdp(rank, world_size, bucket_bytes, accumulate):
    from torch.distributed.fsdp import fully_shard

    results = []
    for overlap in (False, True):
        model = mlp()
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        fully_shard(model)
        opt = make_opt(model, "disco")
        if overlap:
            opt.overlap_with_backward(bucket_bytes=bucket_bytes)
        for step in range(STEPS):
            for micro in range(2 if accumulate else 1):
                model.set_requires_gradient_sync(micro == 1 or not accumulate)
                model(batch(step, micro, rank)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            full.update({f"{n}/{k}": v.full_tensor() for k, v in opt.state[p].items() if hasattr(v, "full_tensor")})
        results.append((full, opt.overlap and (opt.overlap.committed, opt.overlap.recomputed)))
    return results


@pytest.mark.dist
@pytest.mark.parametrize(("bucket_bytes", "accumulate"), [(1, False), (10**9, True)])
def test_fsdp2_equals_plain_step(bucket_bytes, accumulate):
    for (want, _), (got, counts) in run_ranks(_body_fsdp, 2, bucket_bytes, accumulate, timeout=120):
        assert_equal(got, want)
        assert counts == (STEPS, 0)


def _body_ddp(rank, world_size, wrapper):
    from disco.distributed import create_auto_config

    results = []
    for overlap in (False, True):
        model = mlp()
        if wrapper:
            model = nn.parallel.DistributedDataParallel(model)
        opt = make_opt(model, "muon", distributed_config=create_auto_config(average_gradients=not wrapper))
        if overlap:
            opt.overlap_with_backward(bucket_bytes=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(STEPS):
                model(batch(step, 0, rank)).square().mean().backward()
                opt.step()
                opt.zero_grad()
        grads_kept = [str(w.message) for w in caught]
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        results.append((state, opt.overlap and (opt.overlap.committed, opt.overlap.recomputed), grads_kept))
    return results


@pytest.mark.dist
@pytest.mark.parametrize("wrapper", [False, True])
def test_ddp_equals_plain_step(wrapper):
    for (want, _, _), (got, counts, caught) in run_ranks(_body_ddp, 2, wrapper, timeout=120):
        assert_equal(got, want)
        if wrapper:  # torch DDP reduces after the hooks: detected, recomputed, warned
            assert counts == (0, STEPS)
            assert any("changed after its bucket fired" in m for m in caught)
        else:  # Disco's DDP mode: averaged in the hooks
            assert counts == (STEPS, 0)
