"""QK-clip on one process: the recorder and the clip against a float64 reference that computes every logit
explicitly, per head, with loops (MHA, GQA, MLA, fused rows and Conv1D columns, biases), the recipes for the CLI
GPT, HF Llama / GPT-2 and TorchTitan llama3, and a run whose logits blow up without it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from disco.optim.qkclip import AttentionHeads, MaxLogitRecorder, QKClip, QKClipSettings, qk_clip_scales
from disco.train.model import GPT, GPTConfig

F64 = torch.float64


def ref_max_logits(x, wq, wk, n_heads, n_kv, d, scale, causal=True, bq=None, bk=None):
    """S_h = max over b, i, j <= i of scale * (x_bi Wq_h^T + bq_h) . (x_bj Wk_g^T + bk_g), g = h // (H / Hkv)."""
    B, T, _ = x.shape
    out = torch.full((n_heads,), -math.inf, dtype=F64)
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        qh = x @ wq[h * d : (h + 1) * d].T + (0 if bq is None else bq[h * d : (h + 1) * d])
        kg = x @ wk[g * d : (g + 1) * d].T + (0 if bk is None else bk[g * d : (g + 1) * d])
        for b in range(B):
            s = scale * qh[b] @ kg[b].T
            if causal:
                s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
            out[h] = max(out[h], s.max())
    return out


def ref_clip(wq, wk, s, tau, n_heads, n_kv, d):
    """Each head: gamma = min(1, tau / S_h); MHA: sqrt(gamma) on q and k rows; GQA: the key group's smallest gamma
    sqrt'ed on its k rows, the rest of each head's gamma on its q rows."""
    wq, wk = wq.clone(), wk.clone()
    gam = [min(1.0, tau / float(v)) for v in s]
    rep = n_heads // n_kv
    for g in range(n_kv):
        gmin = min(gam[g * rep : (g + 1) * rep])
        wk[g * d : (g + 1) * d] *= math.sqrt(gmin)
        for h in range(g * rep, (g + 1) * rep):
            wq[h * d : (h + 1) * d] *= gam[h] / math.sqrt(gmin)
    return wq, wk


def _qk(x, wq, wk, d, layout="bthd"):
    B, T, _ = x.shape
    q, k = (x @ wq.T).view(B, T, -1, d), (x @ wk.T).view(B, T, -1, d)
    return (q, k) if layout == "bthd" else (q.transpose(1, 2), k.transpose(1, 2))


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (6, 1)])
def test_recorder_and_clip_equal_the_float64_reference(n_heads, n_kv):
    g = torch.Generator().manual_seed(n_heads * 10 + n_kv)
    d, dim, B, T = 8, 24, 3, 7
    x = torch.randn(B, T, dim, generator=g, dtype=F64)
    wq = (
        torch.randn(n_heads * d, dim, generator=g, dtype=F64)
        * torch.linspace(0.2, 1.5, n_heads * d, dtype=F64)[:, None]
    )
    wk = torch.randn(n_kv * d, dim, generator=g, dtype=F64)
    scale = d**-0.5
    s_ref = ref_max_logits(x, wq, wk, n_heads, n_kv, d, scale)
    tau = float(s_ref.median())
    assert (s_ref > tau).any() and (s_ref < tau).any()  # both kinds of head are exercised

    rec = MaxLogitRecorder()
    q, k = _qk(x, wq, wk, d)
    rec.record_qk("a", q[:2], k[:2], scale=scale, layout="bthd")  # two micro-batches: the max runs over both
    rec.record_qk("a", q[2:], k[2:], scale=scale, layout="bthd")
    torch.testing.assert_close(rec.maxima()["a"].double(), s_ref, rtol=1e-6, atol=0)

    pq, pk = nn.Parameter(wq.clone()), nn.Parameter(wk.clone())
    clip = QKClip({"a": AttentionHeads(pq, pk, n_heads=n_heads, head_dim=d, n_kv_heads=n_kv)}, tau, rec)
    s = clip.step()["a"]
    wq_ref, wk_ref = ref_clip(wq, wk, s.double(), tau, n_heads, n_kv, d)
    torch.testing.assert_close(pq.data, wq_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(pk.data, wk_ref, rtol=1e-12, atol=0)
    assert not rec.maxima()  # reset after the step
    after = ref_max_logits(x, pq.data, pk.data, n_heads, n_kv, d, scale)
    torch.testing.assert_close(after, torch.minimum(s_ref, torch.tensor(tau, dtype=F64)), rtol=1e-6, atol=0)


def test_scales_math():
    s = torch.tensor([10.0, 2.0, 8.0, 1.0])
    mha = qk_clip_scales(s, 4.0)
    torch.testing.assert_close(mha.gamma, torch.tensor([0.4, 1.0, 0.5, 1.0], dtype=F64))
    torch.testing.assert_close(mha.q * mha.k, mha.gamma)
    torch.testing.assert_close(mha.q, mha.gamma.sqrt())
    gqa = qk_clip_scales(s, 4.0, n_kv_heads=2)
    torch.testing.assert_close(gqa.k, torch.tensor([0.4, 0.5], dtype=F64).sqrt())
    torch.testing.assert_close(gqa.q * gqa.k.repeat_interleave(2), gqa.gamma)  # each head exactly gamma_h
    assert torch.equal(qk_clip_scales(torch.tensor([-3.0, 4.0]), 4.0).gamma, torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        qk_clip_scales(s, 4.0, n_kv_heads=3)


def test_mla_form():
    """MLA: head h scores scale * (q_nope . k_nope + q_rope . k_rope_shared); q_nope and k_nope rows get
    sqrt(gamma), q_rope rows gamma, the shared rotary key and the value rows of wkv_b nothing."""
    g = torch.Generator().manual_seed(3)
    H, dn, dr, dv, dim, B, T = 3, 6, 4, 5, 16, 2, 5
    x = torch.randn(B, T, dim, generator=g, dtype=F64)
    wq = torch.randn(H * (dn + dr), dim, generator=g, dtype=F64)  # per head [nope; rope]
    wkv = torch.randn(H * (dn + dv), dim, generator=g, dtype=F64)  # per head [k_nope; v]
    wkr = torch.randn(dr, dim, generator=g, dtype=F64)  # shared rotary key
    scale = (dn + dr) ** -0.5

    def logits(wq, wkv, wkr):
        q = (x @ wq.T).view(B, T, H, dn + dr)
        kv = (x @ wkv.T).view(B, T, H, dn + dv)
        k = torch.cat([kv[..., :dn], (x @ wkr.T)[:, :, None].expand(B, T, H, dr)], dim=-1)
        return q, k

    q, k = logits(wq, wkv, wkr)
    rec = MaxLogitRecorder()
    rec.record_qk("mla", q, k, scale=scale, layout="bthd")
    s0 = rec.maxima()["mla"].double()
    explicit = torch.tensor(
        [
            max((scale * (q[b, i, h] @ k[b, j, h])).item() for b in range(B) for i in range(T) for j in range(i + 1))
            for h in range(H)
        ],
        dtype=F64,
    )
    torch.testing.assert_close(s0, explicit, rtol=1e-6, atol=0)
    tau = float(s0.median())
    assert (s0 > tau).any() and (s0 < tau).any()
    pq, pkv, pkr = (nn.Parameter(t.clone()) for t in (wq, wkv, wkr))
    heads = AttentionHeads(pq, pkv, n_heads=H, head_dim=dn, q_rope_dim=dr, k_stride=dn + dv)
    QKClip({"mla": heads}, tau, rec).step()
    gam = torch.where(s0 > tau, tau / s0, torch.ones_like(s0))
    for h in range(H):
        r = h * (dn + dr)
        torch.testing.assert_close(pq.data[r : r + dn], wq[r : r + dn] * gam[h].sqrt())
        torch.testing.assert_close(pq.data[r + dn : r + dn + dr], wq[r + dn : r + dn + dr] * gam[h])
        c = h * (dn + dv)
        torch.testing.assert_close(pkv.data[c : c + dn], wkv[c : c + dn] * gam[h].sqrt())
        assert torch.equal(pkv.data[c + dn : c + dn + dv], wkv[c + dn : c + dn + dv])  # values untouched
    assert torch.equal(pkr.data, wkr)
    q, k = logits(pq.data, pkv.data, pkr.data)
    rec.record_qk("mla", q, k, scale=scale, layout="bthd")
    torch.testing.assert_close(rec.maxima()["mla"].double(), torch.clamp(s0, max=tau), rtol=1e-6, atol=0)


def test_fused_rows_and_conv1d_columns_with_bias_equal_separate_weights():
    g = torch.Generator().manual_seed(5)
    H, d, dim, tau = 4, 4, 12, 2.0
    wq, wk, wv = (torch.randn(H * d, dim, generator=g, dtype=F64) for _ in range(3))
    bq, bk, bv = (torch.randn(H * d, generator=g, dtype=F64) for _ in range(3))
    s = torch.tensor([5.0, 1.0, 3.0, 2.5], dtype=F64)
    sep = [nn.Parameter(t.clone()) for t in (wq, wk, bq, bk)]
    fused = nn.Parameter(torch.cat([wq, wk, wv]))  # rows [q; k; v]
    conv = nn.Parameter(torch.cat([wq, wk, wv]).T.clone())  # Conv1D: [in, 3 * dim], columns [q | k | v]
    conv_b = nn.Parameter(torch.cat([bq, bk, bv]))
    layers = {
        "sep": AttentionHeads(sep[0], sep[1], n_heads=H, head_dim=d, q_bias=sep[2], k_bias=sep[3]),
        "fused": AttentionHeads(fused, fused, n_heads=H, head_dim=d, k_start=H * d),
        "conv": AttentionHeads(conv, conv, n_heads=H, head_dim=d, k_start=H * d, axis=1, q_bias=conv_b, k_bias=conv_b),
    }
    rec = MaxLogitRecorder()
    for name in layers:
        rec.record_logits(name, s.view(1, H, 1, 1).expand(2, H, 3, 3))
    QKClip(layers, tau, rec).step()
    gam = torch.clamp(tau / s, max=1.0).sqrt().repeat_interleave(d)
    torch.testing.assert_close(sep[0].data, wq * gam[:, None])
    torch.testing.assert_close(sep[1].data, wk * gam[:, None])
    torch.testing.assert_close(sep[2].data, bq * gam)
    torch.testing.assert_close(sep[3].data, bk * gam)
    torch.testing.assert_close(fused.data, torch.cat([sep[0].data, sep[1].data, wv]))
    torch.testing.assert_close(conv.data, fused.data.T)
    torch.testing.assert_close(conv_b.data, torch.cat([sep[2].data, sep[3].data, bv]))


@pytest.mark.parametrize("block", [1 << 24, 7])  # 7 logits at a time: one query row per block
def test_record_logits_equals_record_qk_with_mask_and_offsets(block, monkeypatch):
    import disco.optim.qkclip as qkclip

    monkeypatch.setattr(qkclip, "_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 4, 4, 5, generator=g), torch.randn(2, 2, 6, 5, generator=g)  # GQA: 2 heads per key
    mask = torch.rand(2, 1, 4, 6, generator=g) > 0.3
    mask[..., 0] = True
    a, b = MaxLogitRecorder(), MaxLogitRecorder()
    a.record_qk("x", q, k, scale=0.5, causal=True, q_offset=2, mask=mask)
    allowed = mask & (torch.arange(6)[None, :] <= 2 + torch.arange(4)[:, None])
    logits = (0.5 * q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)).masked_fill(~allowed, -math.inf)
    b.record_logits("x", logits)
    torch.testing.assert_close(a.maxima()["x"], b.maxima()["x"])


def test_bad_inputs_raise_clear_errors():
    w, w2 = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8, 4))
    for tau in (0.0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="tau"):
            QKClipSettings(tau)
    with pytest.raises(ValueError, match=r"shape \(8, 4\)"):
        QKClip({"l": AttentionHeads(w, w2, n_heads=3, head_dim=4)}, 1.0)
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        QKClip({"l": AttentionHeads(w, w2, n_heads=2, head_dim=4, n_kv_heads=3)}, 1.0)
    with pytest.raises(ValueError, match="overlap"):
        QKClip({"l": AttentionHeads(w, w, n_heads=2, head_dim=2, k_start=2)}, 1.0)
    clip = QKClip({"l": AttentionHeads(w, w, n_heads=2, head_dim=2, k_start=4)}, 1.0)
    with pytest.raises(RuntimeError, match="no logits recorded for \\['l'\\]"):
        clip.step()
    clip.recorder.record_logits("l", torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="l has 2 heads, recorded 3"):
        clip.step()
    with pytest.raises(TypeError, match="no recipe knows the attention of Linear"):
        QKClip(nn.Linear(2, 2), 1.0)


def _gpt(fused=False, n_layers=1, seed=0, scale=25.0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, dim=32, n_heads=4, n_layers=n_layers, max_seq_len=16, fused_qkv=fused)
    model = GPT(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attention.w" in name and "wo" not in name and "wv" not in name:
                p.mul_(scale)
    return model


@pytest.mark.parametrize("fused", [False, True])
def test_cli_gpt_recipe(fused):
    model = _gpt(fused)
    clip = QKClip(model, tau=6.0)
    x = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    attn = model.layers[0].attention
    wq = attn.wqkv.weight[:32] if fused else attn.wq.weight
    wk = attn.wqkv.weight[32:64] if fused else attn.wk.weight
    h = model.layers[0].attention_norm(model.tok_embeddings(x))
    B, T, _ = h.shape
    q, k = (t.view(B, T, 4, 8) for t in (h @ wq.T, h @ wk.T))
    from disco.train.model import apply_rope

    q, k = apply_rope(q, model.rope_cos, model.rope_sin), apply_rope(k, model.rope_cos, model.rope_sin)
    explicit = torch.tensor(
        [
            max(
                (q[b, i, hh] @ k[b, j, hh]).item() / math.sqrt(8)
                for b in range(B)
                for i in range(T)
                for j in range(i + 1)
            )
            for hh in range(4)
        ],
        dtype=F64,
    )
    v_before = attn.wqkv.weight[64:].clone() if fused else attn.wv.weight.clone()
    model.eval()
    model(x)  # evaluation is not recorded
    assert not clip.recorder.maxima()
    model.train()
    model(x)
    s = clip.step()["layers.0.attention"]
    torch.testing.assert_close(s.double(), explicit, rtol=1e-6, atol=0)
    assert (s > 6.0).sum() >= 2
    torch.testing.assert_close(attn.wqkv.weight[64:] if fused else attn.wv.weight, v_before, rtol=0, atol=0)
    model(x)
    torch.testing.assert_close(
        clip.max_logits()["layers.0.attention"].double(), explicit.clamp(max=6.0), rtol=1e-5, atol=0
    )


transformers = pytest.importorskip("transformers")


def _first_layer_clipped(model, inputs, layer):
    clip = QKClip(model, tau=1.0)
    model.train()
    model(**inputs)
    s = clip.max_logits()[layer]
    tau = float(s.median())
    clip.settings = QKClipSettings(tau)
    s = clip.step()[layer]
    assert (s > tau).any() and (s < tau).any()
    model(**inputs)
    after = clip.max_logits()[layer]
    torch.testing.assert_close(after.double(), s.double().clamp(max=tau), rtol=1e-5, atol=0)
    return s


def test_hf_llama_recipe_gqa_and_bias():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, max_position_embeddings=32, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight.mul_(40)
        attn.k_proj.weight.mul_(torch.tensor([8.0, 1.0]).repeat_interleave(8)[:, None])
        attn.q_proj.bias.normal_()
        attn.k_proj.bias.normal_()
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    handle.remove()
    x, (cos, sin) = seen["hidden_states"], seen["position_embeddings"]
    q = attn.q_proj(x).view(2, 12, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(2, 12, 2, 8).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    explicit = torch.tensor(
        [
            max(
                (q[b, h, i] @ k[b, h // 2, j]).item() * 8**-0.5
                for b in range(2)
                for i in range(12)
                for j in range(i + 1)
            )
            for h in range(4)
        ],
        dtype=F64,
    )
    s = _first_layer_clipped(model, {"input_ids": ids}, "model.layers.0.self_attn")
    torch.testing.assert_close(s.double(), explicit, rtol=1e-6, atol=0)


def test_hf_gpt2_recipe_conv1d_columns():
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.c_attn.weight[:, :64].mul_(40)
    v_before = attn.c_attn.weight[:, 64:].clone()
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0]), with_kwargs=True)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    handle.remove()
    qkv = seen["x"] @ attn.c_attn.weight + attn.c_attn.bias
    q, k = qkv[..., :32].view(2, 12, 4, 8), qkv[..., 32:64].view(2, 12, 4, 8)
    explicit = torch.tensor(
        [
            max((q[b, i, h] @ k[b, j, h]).item() * 8**-0.5 for b in range(2) for i in range(12) for j in range(i + 1))
            for h in range(4)
        ],
        dtype=F64,
    )
    s = _first_layer_clipped(model, {"input_ids": ids}, "transformer.h.0.attn")
    torch.testing.assert_close(s.double(), explicit, rtol=1e-6, atol=0)
    assert torch.equal(attn.c_attn.weight[:, 64:], v_before)


@pytest.mark.usefixtures("fp32_matmuls")  # logits against an fp32 formula
def test_torchtitan_llama3_recipe():
    pytest.importorskip("torchtitan")
    try:
        import test_torchtitan_030 as tt
    except BaseException as e:  # its module-level skip when torchtitan's model code does not import
        pytest.skip(f"torchtitan model code: {e}")
    model = tt.build_model()
    attn = model.layers["0"].attention if isinstance(model.layers, nn.ModuleDict) else model.layers[0].attention
    with torch.no_grad():
        w = attn.qkv_linear.wqkv.weight
        w.mul_(torch.linspace(5, 60, w.shape[0])[:, None])
    tokens = tt._tokens(0, 0, 1)[:, :-1]
    name = [n for n, m in model.named_modules() if m is attn][0]
    from disco.optim.qkclip_recipes import torchtitan_llama3

    probe = MaxLogitRecorder()
    assert name in torchtitan_llama3(model, probe)
    model.train()
    model(tokens)
    s0 = probe.maxima()[name]
    tau = float(s0.median())
    clip = QKClip(model, tau=tau)
    model(tokens)
    s = clip.step()[name]
    torch.testing.assert_close(s, s0)
    assert (s > tau).any()
    model(tokens)
    torch.testing.assert_close(clip.max_logits()[name], s.clamp(max=tau), rtol=1e-4, atol=0)


def _blowup_run(tau, steps=40):
    """The CLI GPT with disco's Muon at a large lr (0.3): its attention logits grow by two orders of magnitude in
    a few dozen steps. Returns the losses, the recorded maxima before each clip, and after each clip the maxima of
    a second forward over the same batch."""
    import disco.optim  # noqa: F401  (registers the optimizers)
    from disco.optim.qkclip_recipes import disco_gpt
    from disco.optim.registry import get_optimizer_spec

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, dim=32, n_heads=4, n_layers=2, max_seq_len=32))
    opt = get_optimizer_spec("muon").build(model, lr=0.3, weight_decay=0.0)
    rec = MaxLogitRecorder()
    heads = disco_gpt(model, rec)
    clip = QKClip(heads, tau, rec) if tau else None
    g = torch.Generator().manual_seed(0)
    data = (torch.randint(0, 64, (4000,), generator=g) % 8) * (torch.arange(4000) % 3)
    losses, before, after = [], [], []
    for _ in range(steps):
        idx = torch.randint(0, 4000 - 33, (8,), generator=g)
        xy = torch.stack([data[i : i + 33] for i in idx])
        loss = nn.functional.cross_entropy(model(xy[:, :-1]).flatten(0, 1), xy[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if clip is None:
            before.append(rec.maxima())
            rec.reset()
            continue
        before.append(clip.step())
        with torch.no_grad():
            model(xy[:, :-1])
        after.append(rec.maxima())
        rec.reset()
    return losses, before, after


def test_logits_that_blow_up_without_the_clip_stay_bounded_with_it():
    """S_h comes from the step's forward (the weights before the update) and the clip scales the updated weights,
    as in Kimi K2: so the cap holds exactly for the weights that produced S_h (the tests above) and within one
    update's growth for the new ones. Here: 17x tau without the clip, under 1.6x tau with it at every step."""
    from disco.distributed.launch import rank_threads

    tau = 20.0
    with rank_threads():  # one thread: a loaded machine does not slow it down much
        _, before, _ = _blowup_run(0.0)
        assert max(float(s.max()) for s in before[-1].values()) > 10 * tau  # it does blow up
        losses, before, after = _blowup_run(tau)
    assert all(math.isfinite(x) for x in losses)
    assert sum(int((s > tau).sum()) for b in before for s in b.values()) >= 20  # the clip was at work
    for seen in (before, after):
        assert max(float(s.max()) for b in seen for s in b.values()) < 1.6 * tau


def test_training_cli_logs_max_logits(tmp_path, capsys):
    import json

    from disco.train.cli import main

    common = ["--optimizers", "muon", "--steps", "3", "--eval-every", "0", "--seq-len", "32", "--batch-size", "4"]
    common += ["--threads", "1", "--ckpt-every", "0"]
    assert main([*common, "--out", str(tmp_path / "a"), "--qk-clip-tau", "0.1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "muon" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["max_logit"] > 0.1 and r["clipped_heads"] > 0 for r in rows)
    layers = rows[0]["max_logit_layers"]
    assert (
        sorted(layers) == [f"layers.{i}.attention" for i in range(4)] and max(layers.values()) == rows[0]["max_logit"]
    )
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    assert "max_logit" not in (tmp_path / "b" / "muon" / "metrics.jsonl").read_text()
    assert main([*common, "--out", str(tmp_path / "c"), "--qk-clip-tau", "-1"]) == 2
    assert "--qk-clip-tau -1.0: must be" in capsys.readouterr().err


def test_resume_refuses_another_tau(tmp_path, capsys):
    from disco.train.cli import main

    common = ["--optimizers", "muon", "--eval-every", "0", "--seq-len", "32", "--batch-size", "4", "--threads", "1"]
    common += ["--out", str(tmp_path)]
    assert main([*common, "--steps", "2", "--qk-clip-tau", "0.1"]) == 0
    capsys.readouterr()
    assert main([*common, "--steps", "3", "--qk-clip-tau", "0.2", "--resume"]) == 2
    assert "qk_clip_tau 0.1 -> 0.2" in capsys.readouterr().err
    assert main([*common, "--steps", "3", "--qk-clip-tau", "0.1", "--resume"]) == 0


def test_low_precision_weights_are_scaled_in_fp32_and_rounded_once():
    g = torch.Generator().manual_seed(11)
    w32 = torch.randn(8, 6, generator=g)
    wq, wk = nn.Parameter(w32.bfloat16()), nn.Parameter(w32.flip(0).bfloat16())
    rec = MaxLogitRecorder()
    rec.record_logits("l", torch.tensor([9.0, 1.0]).view(1, 2, 1, 1))
    QKClip({"l": AttentionHeads(wq, wk, n_heads=2, head_dim=4)}, 3.0, rec).step()
    f = torch.tensor([1 / 3, 1.0], dtype=F64).sqrt().repeat_interleave(4)[:, None]
    assert wq.dtype == torch.bfloat16
    assert torch.equal(wq.data, (w32.bfloat16().float() * f.float()).bfloat16())
    assert torch.equal(wk.data, (w32.flip(0).bfloat16().float() * f.float()).bfloat16())
