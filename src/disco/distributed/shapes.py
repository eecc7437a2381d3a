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


MODELS: dict[str, Callable[[], list[ShapeSpec]]] = {
    "gpt2-small": gpt2_small,
    "gpt2-medium": gpt2_medium,
    "llama-1b": llama_1b,
    "moe-small": moe_small,
}


def model_shapes(name: str) -> list[ShapeSpec]:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; built-in: {', '.join(MODELS)}")
    return MODELS[name]()
