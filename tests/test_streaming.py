"""``commit="streaming"``: each parameter written as soon as its update is known good.

Oracles: the atomic step (bit for bit, single process and on 2 gloo ranks under FSDP, TP, replicated and expert
layouts); the peak memory of a one-matrix step (streaming holds one update at a time, whatever the count); a
failure mid-step leaves every failed parameter and its momentum untouched on every rank, commits the others
exactly as the atomic step would, and raises the same ``StepError`` everywhere.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

import disco
from disco import ops
from disco.bench.step import peak_extra_mib
from disco.distributed.agreement import StepError

SHAPES = [(32, 16), (16, 48), (32, 16), (24, 24), (40, 16)]  # the last is the one that fails when asked
FAILING = (40, 16)


def _full(seed: int, shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def _break_backend(monkeypatch_or_none, how: str, failing=FAILING):
    """Make the default backend fail (``how``: ``"raise"`` or ``"nan"``) for ``failing`` matrices only; without
    a monkeypatch, returns a function that puts the real one back."""
    real = ops.BACKENDS["gram_newtonschulz5"]

    def broken(G, **kw):
        if tuple(G.shape[-2:]) == failing:
            if how == "raise":
                raise RuntimeError("backend exploded")
            return torch.full_like(real(G, **kw), float("nan"))
        return real(G, **kw)

    if monkeypatch_or_none is not None:
        monkeypatch_or_none.setitem(ops.BACKENDS, "gram_newtonschulz5", broken)
        return None
    ops.BACKENDS["gram_newtonschulz5"] = broken
    return lambda: ops.BACKENDS.__setitem__("gram_newtonschulz5", real)


def _muon(params, commit, **kw):
    return disco.Muon(params, lr=0.05, compute_dtype=torch.float32, commit=commit, **kw)


# ---- single process ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("nesterov", [True, False])
def test_streaming_equals_atomic_bit_for_bit(nesterov):
    out = {}
    for commit in ("atomic", "streaming"):
        params = [nn.Parameter(t) for t in _full(0)]
        vec = nn.Parameter(torch.randn(7, generator=torch.Generator().manual_seed(99)))
        groups = [{"params": params}, {"params": [vec], "algorithm": "adamw"}]
        opt = _muon(groups, commit, nesterov=nesterov)
        for k in range(3):
            for p, g in zip(
                [*params, vec], [*_full(10 + k), torch.randn(7, generator=torch.Generator().manual_seed(k))]
            ):
                p.grad = g
            opt.step()
        out[commit] = (
            [p.detach().clone() for p in [*params, vec]],
            [opt.state[p]["momentum_buffer"].clone() for p in params],
        )
    for a, b in zip(out["atomic"][0] + out["atomic"][1], out["streaming"][0] + out["streaming"][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", ["disco_light", "scion"])
def test_streaming_equals_atomic_disco_light_and_scion(make):
    out = {}
    for commit in ("atomic", "streaming"):
        params = [nn.Parameter(t) for t in _full(0)]
        if make == "scion":
            opt = disco.Scion(params, lr=0.05, commit=commit)
        else:
            opt = disco.Disco(params, lr=0.05, is_light=True, commit=commit, compute_dtype=torch.float32)
        for k in range(3):
            if make == "scion":
                for p, g in zip(params, _full(10 + k)):
                    p.grad = g
            else:  # light mode: backward accumulates into p.grad, which the user never zeroes
                sum((p * g).sum() for p, g in zip(params, _full(10 + k))).backward()
            opt.step()
        out[commit] = [p.detach().clone() for p in params]
    for a, b in zip(out["atomic"], out["streaming"]):
        assert torch.equal(a, b)


def test_streaming_holds_one_update_at_a_time():
    """The step's peak extra memory with 8 matrices is that of a step with one of them (the atomic step holds all
    8 updates: at least 8 MiB here)."""
    shape = (1024, 256)  # 1 MiB in fp32 (the tests' compute dtype)

    def peak(commit: str, n: int) -> float:
        params = [nn.Parameter(torch.randn(shape)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn(shape)
        opt = _muon(params, commit)
        opt.step()  # steady state: momentum exists
        return peak_extra_mib(opt.step)

    one, many, atomic = peak("streaming", 1), peak("streaming", 8), peak("atomic", 8)
    assert many <= one + 0.25, (one, many)
    assert atomic >= many + 6, (atomic, many)


def test_norm_tracking_step_holds_updates_and_matches_atomic():
    norms = {}
    for commit in ("atomic", "streaming"):
        params = [nn.Parameter(t) for t in _full(0)]
        opt = _muon(params, commit)
        for p, g in zip(params, _full(10)):
            p.grad = g
        opt.calculate_norm_at_next_step()
        opt.step()
        norms[commit] = opt.get_norms_at_current_step()
        assert opt.streamed is None  # outside a step
    assert norms["atomic"].keys() == norms["streaming"].keys() and norms["atomic"]
    for k in norms["atomic"]:
        assert torch.equal(norms["atomic"][k], norms["streaming"][k]), k


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], [opt.state[p]["momentum_buffer"].clone() for p in params]


@pytest.mark.parametrize("how", ["raise", "nan"])
def test_failure_mid_step_commits_the_others_and_names_it(monkeypatch, how):
    ref_params = [nn.Parameter(t) for t in _full(0)]
    ref = _muon(ref_params, "atomic")
    for p, g in zip(ref_params, _full(10)):
        p.grad = g
    ref.step()

    params = [nn.Parameter(t) for t in _full(0)]
    opt = _muon([(f"w{i}", p) for i, p in enumerate(params)], "streaming")
    for p, g in zip(params, _full(10)):
        p.grad = g
    before, moments = _snapshot(params, opt)
    _break_backend(monkeypatch, how)
    with pytest.raises(StepError, match="partially applied.*4 of 5 parameters") as info:
        opt.step()
    assert "'w4'" in str(info.value) and (how != "raise" or "backend exploded" in str(info.value))
    assert info.value.applied == [0, 1, 2, 3]
    assert (info.value.failed if how == "raise" else info.value.nonfinite) == [4]
    assert torch.equal(params[4], before[4]) and torch.equal(opt.state[params[4]]["momentum_buffer"], moments[4])
    for p, r in zip(params[:4], ref_params[:4]):
        assert torch.equal(p, r)
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[r]["momentum_buffer"])


def test_streaming_failure_before_any_commit_follows_the_nonfinite_policy(monkeypatch):
    """Nothing was handed over yet (the only matrix failed): the step is as untouched as an atomic one, so
    ``nonfinite="skip"`` skips it."""
    params = [nn.Parameter(torch.randn(FAILING))]
    opt = _muon(params, "streaming", nonfinite="skip")
    params[0].grad = torch.randn(FAILING)
    before, moments = _snapshot(params, opt)
    _break_backend(monkeypatch, "nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    after, moments_after = _snapshot(params, opt)
    assert all(torch.equal(a, b) for a, b in zip(before + moments, after + moments_after))


def test_atomic_failure_still_changes_nothing(monkeypatch):
    params = [nn.Parameter(t) for t in _full(0)]
    opt = _muon(params, "atomic")
    for p, g in zip(params, _full(10)):
        p.grad = g
    before, moments = _snapshot(params, opt)
    _break_backend(monkeypatch, "raise")
    with pytest.raises(StepError) as info:
        opt.step()
    assert "partially" not in str(info.value) and info.value.applied == []
    after, moments_after = _snapshot(params, opt)
    assert all(torch.equal(a, b) for a, b in zip(before + moments, after + moments_after))


def test_nonfinite_gradient_skips_the_whole_streaming_step():
    params = [nn.Parameter(t) for t in _full(0)]
    opt = _muon(params, "streaming", nonfinite="skip")
    for p, g in zip(params, _full(10)):
        p.grad = g
    params[3].grad[0, 0] = float("inf")
    before, moments = _snapshot(params, opt)
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    after, moments_after = _snapshot(params, opt)
    assert all(torch.equal(a, b) for a, b in zip(before + moments, after + moments_after))


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda ps: disco.Muon(ps, commit="eventually"), "commit='eventually' is invalid"),
        (
            lambda ps: disco.NorMuon([{"params": ps, "commit": "streaming"}], lr=0.02),
            "not available for algorithm 'normuon'",
        ),
        (lambda ps: disco.Dion([{"params": ps, "commit": "streaming"}], lr=0.02), "not available for algorithm 'dion'"),
        (
            lambda ps: disco.Disco([{"params": ps, "weight_constraint": "stiefel"}], commit="streaming"),
            "weight_constraint='stiefel'",
        ),
    ],
)
def test_streaming_is_refused_where_it_cannot_hold(build, words):
    ps = [nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(4, 8))]
    with pytest.raises(ValueError, match=words):
        build(ps)


# ---- 2 gloo ranks -----------------------------------------------------------------------------------------
LAYOUTS = ["fsdp", "tp", "replicated", "experts"]


ONE_ROW = (1, 16)  # "fsdp_empty": the failing matrix has one row, so rank 1's piece of it is empty


def _dist_shapes(layout: str) -> list[tuple[int, ...]]:
    if layout == "experts":
        return [(4, *s) for s in SHAPES]
    return [*SHAPES[:4], ONE_ROW] if layout == "fsdp_empty" else SHAPES


def _body(rank, world_size, layout, fail, only_rank=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    place = {"tp": [Shard(1)], "replicated": [Replicate()]}.get(layout, [Shard(0)])
    shapes = _dist_shapes(layout)
    failing = ONE_ROW if layout == "fsdp_empty" else FAILING
    fail = fail if only_rank in (None, rank) else None
    out = {}

    def snapshot(params, opt):
        return [p.full_tensor() for p in params], [opt.state[p]["momentum_buffer"].full_tensor() for p in params]

    for commit in ("atomic", "streaming"):
        params = [nn.Parameter(distribute_tensor(t, mesh, place, src_data_rank=None)) for t in _full(0, shapes)]
        opt = _muon([(f"w{i}", p) for i, p in enumerate(params)], commit)
        error, restore, first = None, None, None
        for k in range(2):
            if k == 1:
                first = snapshot(params, opt)
                if fail:
                    restore = _break_backend(None, fail, failing)
            for p, g in zip(params, _full(10 + k, shapes)):
                p.grad = distribute_tensor(g, mesh, place, src_data_rank=None)
            try:
                opt.step()
            except StepError as e:
                error = (str(e), e.applied)
        if restore is not None:
            restore()
        out[commit] = (*snapshot(params, opt), error, first)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS)
def test_streaming_equals_atomic_on_two_ranks(layout):
    for got in run_ranks(_body, 2, layout, None, timeout=90):
        (pa, ma, ea, _), (ps, ms, es, _) = got["atomic"], got["streaming"]
        assert ea is None and es is None
        for a, b in zip(pa + ma, ps + ms):
            assert torch.equal(a, b)


@pytest.mark.dist
@pytest.mark.parametrize(
    ("layout", "how", "only_rank"),
    [
        ("fsdp", "raise", None),
        ("tp", "nan", None),
        ("replicated", "nan", None),
        ("fsdp_empty", "raise", None),  # rank 1 holds an empty piece of the failing matrix
        ("experts", "nan", 1),  # computed in place, and failing on rank 1 only
    ],
)
def test_failure_on_the_owner_is_never_committed_by_a_holder(layout, how, only_rank):
    """The failing matrix's owner sends it all-NaN: no holder commits it (pieces computed in place wait for every
    rank's verdict), every rank raises the same error, and the good matrices take the step as they do without the
    failure."""
    ref = run_ranks(_body, 2, layout, None, timeout=90)[0]["atomic"]
    out = run_ranks(_body, 2, layout, how, only_rank, timeout=90, pg_timeout=60)
    for got in out:
        (pa, ma, ea, (pa1, ma1)), (ps, ms, es, (ps1, ms1)) = got["atomic"], got["streaming"]
        assert ea is not None and "partially" not in ea[0] and ea[1] == []
        assert all(torch.equal(a, b) for a, b in zip(pa + ma, pa1 + ma1))  # atomic: nothing changed
        # Expert stacks computed in place are all held until the map's verdict: none was written, so the step
        # fails as an atomic one does (nothing changed, the nonfinite policy applies).
        applied = [] if layout == "experts" else [0, 1, 2, 3]
        assert es is not None and "w4" in es[0] and es[1] == applied
        assert ("partially applied" in es[0]) is bool(applied) and ("nothing was changed" in es[0]) is not applied
        assert torch.equal(ps[4], ps1[4]) and torch.equal(ms[4], ms1[4])  # the failed one: still after step 1
        for k in range(4):
            want = (ref[0][k], ref[1][k]) if applied else (ps1[k], ms1[k])
            assert torch.equal(ps[k], want[0]) and torch.equal(ms[k], want[1])
    assert out[0]["streaming"][2][0] == out[1]["streaming"][2][0]


@pytest.mark.filterwarnings("ignore:overlap_with_backward")
@pytest.mark.parametrize("committed", [True, False])
def test_overlap_holds_its_buckets_and_streams_the_recomputed_step(monkeypatch, committed):
    """Buckets computed in backward are held until ``step()`` validates them (never streamed from a hook); a step
    that recomputes (a gradient changed after backward) streams. Both equal the plain atomic step."""
    from test_overlap import assert_equal, batch, mlp, snapshot

    from disco.optim.rules import LMORule

    streamed = []
    real = LMORule._commit_now

    def spy(self, it, *args):
        streamed.append(it.name)
        return real(self, it, *args)

    def run(commit: str, overlap: bool):
        model = mlp()
        opt = make_opt(model, commit=commit)
        if overlap:
            opt.overlap_with_backward(bucket_bytes=1)
        for step in range(3):
            model(batch(step)).square().mean().backward()
            if not committed:
                model[0].weight.grad.mul_(1.0)  # an in-place change after backward: the step recomputes
            opt.step()
            opt.zero_grad()
        return snapshot(model, opt), opt

    want, _ = run("atomic", False)
    monkeypatch.setattr(LMORule, "_commit_now", spy)
    got, opt = run("streaming", True)
    assert_equal(got, want)
    assert (opt.overlap.committed, opt.overlap.recomputed) == ((3, 0) if committed else (0, 3))
    assert len(streamed) == (0 if committed else 9)  # 3 matrices x 3 steps


def make_opt(model, **kw):
    from test_overlap import make_opt as overlap_opt

    return overlap_opt(model, "muon", **kw)
