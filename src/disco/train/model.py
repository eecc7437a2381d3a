"""A small, readable GPT with TorchTitan-style parameter names.

Names the optimizer routing relies on::

    tok_embeddings.weight                         [vocab, dim]
    layers.{i}.attention_norm.weight              [dim]
    layers.{i}.attention.{wq,wk,wv,wo}.weight     [dim, dim]   (or attention.wqkv.weight [3*dim, dim])
    layers.{i}.ffn_norm.weight                    [dim]
    layers.{i}.feed_forward.{w1,w3}.weight        [hidden, dim]   (SwiGLU; w2 is [dim, hidden])
    layers.{i}.moe.router.weight                  [n_experts, dim]   (when n_experts > 0)
    layers.{i}.moe.experts.{w1,w3}                [n_experts, hidden, dim]   (w2 is [n_experts, dim, hidden])
    norm.weight                                   [dim]
    output.weight                                 [vocab, dim]   (untied head)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class GPTConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 128
    ffn_hidden: int = 0  # 0: about 8/3 * dim, rounded up to a multiple of 32
    fused_qkv: bool = False
    n_experts: int = 0  # > 0: every block uses a top-k mixture of experts instead of the dense SwiGLU
    top_k: int = 2
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 32 * math.ceil(8 * self.dim / 3 / 32)


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, each ``[seq_len, head_dim // 2]``."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of the last dim of ``x: [B, T, H, D]``."""
    T, half = x.shape[1], x.shape[-1] // 2
    cos, sin = cos[:T, None, :].to(x.dtype), sin[:T, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0, "dim must be divisible by n_heads"
        self.head_dim = cfg.dim // cfg.n_heads
        self.fused = cfg.fused_qkv
        if self.fused:
            self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # rows: [q; k; v]
        else:
            self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
            self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
            self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        # QK-clip: disco.optim.qkclip_recipes.disco_gpt installs a recorder called with q, k [B, T, H, D] after RoPE
        self.logit_recorder: Callable[[Tensor, Tensor], None] | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        if self.fused:
            q, k, v = self.wqkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        # -1 heads: under tensor parallelism each rank holds only its own heads
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.logit_recorder is not None:
            self.logit_recorder(q, k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        out: Tensor = self.wo(y.transpose(1, 2).reshape(B, T, -1))
        return out


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return out


class Experts(nn.Module):
    """``n`` SwiGLU experts stored as 3-D weights ``[n_experts, out, in]``."""

    def __init__(self, n: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, hidden))

    def forward(self, x: Tensor, e: int) -> Tensor:
        return (F.silu(x @ self.w1[e].T) * (x @ self.w3[e].T)) @ self.w2[e].T


class MoE(nn.Module):
    """Top-k routing: each token goes to its k best experts, outputs mixed by renormalised router weights."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, cfg.dim, cfg.hidden)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.router(flat).softmax(dim=-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e in range(self.router.out_features):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, self.experts(flat[token], e) * weights[token, slot, None])
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.moe: MoE | None = MoE(cfg) if cfg.n_experts > 0 else None
        self.feed_forward: FeedForward | None = None if self.moe else FeedForward(cfg.dim, cfg.hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        ffn = self.moe if self.moe is not None else self.feed_forward
        assert ffn is not None
        out: Tensor = x + ffn(self.ffn_norm(x))
        return out


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices; output projections (wo, w2) scaled down by sqrt(2 * n_layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim < 2:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight", "experts.w2")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids ``[B, T]`` -> logits ``[B, T, vocab]``."""
        h = self.tok_embeddings(idx)
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        logits: Tensor = self.output(self.norm(h))
        return logits


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
