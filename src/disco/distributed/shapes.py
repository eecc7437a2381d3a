"""Built-in parameter shape sets for ``python -m disco plan --model NAME``.

Only the matrices that an orthogonalizing optimizer sees are listed: token / position embeddings and the output
head are **excluded** (they usually go to AdamW or an embedding norm), and so are norms and biases. Every entry
carries a tensor-parallel role used by the ``fsdp+tp`` layout: ``"col"`` (column-wise parallel: the output dim,
dim 0 of an ``nn.Linear`` weight, is split over TP) or ``"row"`` (row-wise parallel: the input dim, dim 1).
3-D entries are expert stacks ``(experts, out, in)``; the role then refers to the last two dims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ShapeSpec:
    name: str
    shape: tuple[int, ...]
    tp: str = "col"  # "col" | "row"


def role_by_shape(shape: tuple[int, ...]) -> str:
    """TP role of a bare shape (shapes files): ``out < in`` (a down projection) is row-wise, else column-wise."""
    out_dim, in_dim = shape[-2], shape[-1]
    return "row" if out_dim < in_dim else "col"


def transformer(
    layers: int,
    width: int,
    ffn: int,
    *,
    kv_width: int | None = None,
    gated: bool = False,
    fused_qkv: bool = False,
) -> list[ShapeSpec]:
    kv = width if kv_width is None else kv_width
    out: list[ShapeSpec] = []
    for layer in range(layers):
        p = f"layers.{layer}"
        if fused_qkv:
            out.append(ShapeSpec(f"{p}.attn.qkv", (width + 2 * kv, width), "col"))
        else:
            out.append(ShapeSpec(f"{p}.attn.q", (width, width), "col"))
            out.append(ShapeSpec(f"{p}.attn.k", (kv, width), "col"))
            out.append(ShapeSpec(f"{p}.attn.v", (kv, width), "col"))
        out.append(ShapeSpec(f"{p}.attn.out", (width, width), "row"))
        out.append(ShapeSpec(f"{p}.mlp.w1", (ffn, width), "col"))
        if gated:
            out.append(ShapeSpec(f"{p}.mlp.w3", (ffn, width), "col"))
        out.append(ShapeSpec(f"{p}.mlp.w2", (width, ffn), "row"))
    return out


def gpt2_small() -> list[ShapeSpec]:
    """12 layers x (q, k, v: 768x768; out 768x768; fc 3072x768; proj 768x3072): 72 matrices, 85M elements."""
    return transformer(12, 768, 3072)


def gpt2_medium() -> list[ShapeSpec]:
    """24 layers, width 1024, MLP 4096: 144 matrices."""
    return transformer(24, 1024, 4096)


def llama_1b() -> list[ShapeSpec]:
    """Llama-3.2-1B-like: 16 layers, width 2048, 8 KV heads of 64 (k, v: 512x2048), SwiGLU 8192: 112 matrices."""
    return transformer(16, 2048, 8192, kv_width=512, gated=True)


def moe_small() -> list[ShapeSpec]:
    """8 layers, width 512, attention as 4 matrices, a router 8x512 and 8 SwiGLU experts of 1024 as 3-D stacks."""
    out: list[ShapeSpec] = []
    for layer in range(8):
        p = f"layers.{layer}"
        for name in ("q", "k", "v"):
            out.append(ShapeSpec(f"{p}.attn.{name}", (512, 512), "col"))
        out.append(ShapeSpec(f"{p}.attn.out", (512, 512), "row"))
        out.append(ShapeSpec(f"{p}.moe.router", (8, 512), "col"))
        out.append(ShapeSpec(f"{p}.moe.w1", (8, 1024, 512), "col"))
        out.append(ShapeSpec(f"{p}.moe.w3", (8, 1024, 512), "col"))
        out.append(ShapeSpec(f"{p}.moe.w2", (8, 512, 1024), "row"))
    return out


def llama3_8b() -> list[ShapeSpec]:
    """Llama-3-8B-like: 32 layers, width 4096, 8 KV heads of 128 (k, v: 1024x4096), SwiGLU 14336: 224 matrices."""
    return transformer(32, 4096, 14336, kv_width=1024, gated=True)


def llama3_70b() -> list[ShapeSpec]:
    """Llama-3-70B-like: 80 layers, width 8192, 8 KV heads of 128, SwiGLU 28672: 560 matrices."""
    return transformer(80, 8192, 28672, kv_width=1024, gated=True)


def llama3_405b() -> list[ShapeSpec]:
    """Llama-3-405B-like: 126 layers, width 16384, 8 KV heads of 128, SwiGLU 53248: 882 matrices."""
    return transformer(126, 16384, 53248, kv_width=1024, gated=True)


def moe_64e() -> list[ShapeSpec]:
    """DeepSeek-MoE-16B-like: 28 layers, width 2048, attention as 4 matrices, a router 64x2048 and 64 SwiGLU
    experts of 1408 as 3-D stacks (plus 2 shared experts as one SwiGLU of 2816)."""
    out: list[ShapeSpec] = []
    for layer in range(28):
        p = f"layers.{layer}"
        for name in ("q", "k", "v"):
            out.append(ShapeSpec(f"{p}.attn.{name}", (2048, 2048), "col"))
        out.append(ShapeSpec(f"{p}.attn.out", (2048, 2048), "row"))
        out.append(ShapeSpec(f"{p}.moe.router", (64, 2048), "col"))
        out.append(ShapeSpec(f"{p}.moe.w1", (64, 1408, 2048), "col"))
        out.append(ShapeSpec(f"{p}.moe.w3", (64, 1408, 2048), "col"))
        out.append(ShapeSpec(f"{p}.moe.w2", (64, 2048, 1408), "row"))
        out.append(ShapeSpec(f"{p}.moe.shared.w1", (2816, 2048), "col"))
        out.append(ShapeSpec(f"{p}.moe.shared.w3", (2816, 2048), "col"))
        out.append(ShapeSpec(f"{p}.moe.shared.w2", (2048, 2816), "row"))
    return out


MODELS: dict[str, Callable[[], list[ShapeSpec]]] = {
    "llama3-8b": llama3_8b,
    "llama3-70b": llama3_70b,
    "llama3-405b": llama3_405b,
    "moe-64e": moe_64e,
    "gpt2-small": gpt2_small,
    "gpt2-medium": gpt2_medium,
    "llama-1b": llama_1b,
    "moe-small": moe_small,
}


def pipeline_stages(specs: list[ShapeSpec], stages: int) -> list[list[ShapeSpec]]:
    """``specs`` cut into ``stages`` contiguous runs of whole layers (``layers.K.`` prefixes), as even as the layer
    count allows; entries outside a layer go to the first stage."""
    layer_of = [int(s.name.split(".")[1]) if s.name.startswith("layers.") else -1 for s in specs]
    layers = sorted({k for k in layer_of if k >= 0})
    if stages < 1 or stages > max(len(layers), 1):
        raise ValueError(f"{stages} pipeline stages for {len(layers)} layers; valid: 1..{max(len(layers), 1)}")
    stage_of = {k: (i * stages) // len(layers) for i, k in enumerate(layers)}
    out: list[list[ShapeSpec]] = [[] for _ in range(stages)]
    for s, k in zip(specs, layer_of):
        out[stage_of.get(k, 0)].append(s)
    return out


def model_shapes(name: str) -> list[ShapeSpec]:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; built-in: {', '.join(MODELS)}")
    return MODELS[name]()
