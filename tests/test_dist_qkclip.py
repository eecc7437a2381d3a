"""QK-clip on gloo ranks equals one process: the training CLI's GPT trained a few steps with AdamW and QK-clip
under DDP x2, FSDP2 x2 (q/k rows sharded), TP x2 (heads sharded: each rank records and scales its own heads) and
FSDP x TP 2x2, and the first layer under context parallelism (the sequence split over 2 ranks, keys exchanged as
ring attention does); the logged maxima and the final weights match the single-process run.

CPU only (``device="cpu"``, also on a machine with GPUs): the oracle is the single-process CPU run to 1e-12."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks

from disco.distributed.launch import rank_threads
from disco.optim.qkclip import QKClip
from disco.train.model import GPT, GPTConfig

CFG = GPTConfig(vocab_size=64, dim=32, n_heads=4, n_layers=2, max_seq_len=16)
B, T, STEPS, TAU, LR = 4, 16, 3, 3.0, 0.03


@pytest.fixture(autouse=True)
def _rank_threads():
    with rank_threads():
        yield


def _model():
    torch.manual_seed(0)
    model = GPT(CFG).double()
    with torch.no_grad():  # large q / k so that several heads start above tau
        for block in model.layers:
            block.attention.wq.weight.mul_(torch.linspace(5, 40, 32, dtype=torch.float64)[:, None])
            block.attention.wk.weight.mul_(8)
    return model


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def _train(model, fwd, mesh, rows):
    """STEPS of AdamW + QK-clip; ``rows``: this rank's slice of the batch. Returns the maxima of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, foreach=False)
    clip = QKClip(model, TAU, mesh=mesh)
    seen = []
    for step in range(STEPS):
        x, y = _batch(step)
        logits = fwd(x[rows])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[rows].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        seen.append({k: v.clone() for k, v in clip.step().items()})
    return seen


def _full(model):
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


def _reference():
    model = _model()
    seen = _train(model, model, None, slice(None))
    return seen, _full(model)


def _body(rank, world_size, layout):
    from torch.distributed.device_mesh import init_device_mesh

    from disco.train.parallel import apply_fsdp, apply_tp

    model = _model()
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    if layout == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
        fwd, rows = DistributedDataParallel(model, process_group=mesh.get_group()), half
    elif layout == "fsdp":
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
        apply_fsdp(model, mesh)
        fwd, rows = model, half
    elif layout == "tp":
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        apply_tp(model, mesh)
        fwd, rows = model, slice(None)
    else:  # fsdp_tp
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
        apply_tp(model, mesh["tp"])
        apply_fsdp(model, mesh["dp_shard"])
        dp = mesh["dp_shard"].get_local_rank()
        fwd, rows = model, slice(dp * B // 2, (dp + 1) * B // 2)
    wq = model.layers[0].attention.wq.weight
    placements = tuple(str(p) for p in getattr(wq, "placements", ()))
    local_rows = (wq.to_local() if hasattr(wq, "to_local") else wq).shape[0]
    seen = _train(model, fwd, mesh, rows)
    return seen, _full(model), placements, local_rows


@pytest.mark.parametrize("layout,world", [("ddp", 2), ("fsdp", 2), ("tp", 2), ("fsdp_tp", 4)])
def test_parallel_equals_one_process(layout, world):
    ref_seen, ref_w = _reference()
    assert (torch.cat(list(ref_seen[0].values())) > TAU).sum() >= 4  # the clip works on several heads
    assert (torch.cat(list(ref_seen[-1].values())) > TAU).any()  # ... after the first step too
    for seen, weights, placements, local_rows in run_ranks(_body, world, layout, timeout=600, device="cpu"):
        if layout in ("fsdp", "tp"):
            assert placements == ("S(0)",) and local_rows == 16  # each rank scales only its rows
        for got, want in zip(seen, ref_seen, strict=True):
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
        for name, w in ref_w.items():
            torch.testing.assert_close(weights[name], w, rtol=1e-7, atol=1e-9, msg=name)


def _layer0_qk(model, x, start):
    """Layer 0's q, k ``[B, Tc, H, D]`` after RoPE for the tokens ``x`` at positions ``start ...``."""
    from disco.train.model import apply_rope

    attn = model.layers[0].attention
    h = model.layers[0].attention_norm(model.tok_embeddings(x))
    Bx, Tc, _ = h.shape
    q, k = (t.view(Bx, Tc, -1, attn.head_dim) for t in (attn.wq(h), attn.wk(h)))
    cos, sin = model.rope_cos[start:], model.rope_sin[start:]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _cp_body(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from disco.optim.qkclip import MaxLogitRecorder
    from disco.optim.qkclip_recipes import disco_gpt

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    model = _model()
    rec = MaxLogitRecorder()
    heads = {"layers.0.attention": disco_gpt(model, MaxLogitRecorder())["layers.0.attention"]}
    clip = QKClip(heads, TAU, rec, mesh=mesh)
    x, _ = _batch(0)
    tc = T // 2
    with torch.no_grad():
        q, k = _layer0_qk(model, x[:, rank * tc : (rank + 1) * tc], rank * tc)
        chunks = [torch.empty_like(k) for _ in range(2)]
        dist.all_gather(chunks, k.contiguous())
    for src, kc in enumerate(chunks):  # as ring attention: this rank's queries against each key chunk in turn
        rec.record_qk(
            "layers.0.attention",
            q,
            kc,
            scale=8**-0.5,
            causal=True,
            q_offset=rank * tc,
            k_offset=src * tc,
            layout="bthd",
        )
    seen = clip.step()
    bad = []
    for mesh in (init_device_mesh("cpu", (2,), mesh_dim_names=("pp",)), None):
        try:
            QKClip(heads, TAU, rec, mesh=mesh)
        except ValueError as e:
            bad.append(str(e))
    return seen, _full(model), bad


def test_context_parallel_equals_one_process():
    from disco.optim.qkclip import MaxLogitRecorder
    from disco.optim.qkclip_recipes import disco_gpt

    model = _model()
    heads = {"layers.0.attention": disco_gpt(model, MaxLogitRecorder())["layers.0.attention"]}
    clip = QKClip(heads, TAU)
    x, _ = _batch(0)
    with torch.no_grad():
        q, k = _layer0_qk(model, x, 0)
    clip.recorder.record_qk("layers.0.attention", q, k, scale=8**-0.5, causal=True, layout="bthd")
    ref_seen = clip.step()
    assert (ref_seen["layers.0.attention"] > TAU).any()
    ref_w = _full(model)
    for seen, weights, bad in run_ranks(_cp_body, 2, timeout=300, device="cpu"):
        torch.testing.assert_close(seen["layers.0.attention"], ref_seen["layers.0.attention"], rtol=1e-6, atol=0)
        for name, w in ref_w.items():
            torch.testing.assert_close(weights[name], w, rtol=1e-12, atol=0, msg=name)
        assert len(bad) == 2 and "'pp'" in bad[0] and "batch_dims=" in bad[0] and "needs mesh=" in bad[1]
