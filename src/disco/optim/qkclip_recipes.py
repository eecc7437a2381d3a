"""Recipes for :class:`disco.optim.qkclip.QKClip`: install a :class:`MaxLogitRecorder` on a model's attention and
say where its heads live.

Each recipe takes ``(model, recorder)`` and returns ``{layer name: AttentionHeads}``, or ``{}`` when the model has
no attention it knows. Models are recognised by their modules' attributes, not by importing their libraries:

* :func:`disco_gpt`: the training CLI's GPT (``attention.{wq,wk}`` rows, or a fused ``wqkv`` ``[q; k; v]``); its
  attention calls ``self.logit_recorder(q, k)`` after the rotary embedding.
* :func:`hf_attention`: HF ``LlamaAttention``-like modules (``q_proj`` / ``k_proj`` rows, GQA, optional biases) and
  ``GPT2Attention`` (fused ``c_attn`` ``Conv1D``: heads are *columns* ``[q | k | v]`` of its ``[in, 3 * dim]``
  weight, and of its bias). Installed through HF's ``AttentionInterface``: the model's attention implementation
  becomes ``"disco_qk_clip"``, which records and then runs SDPA.
* :func:`torchtitan_llama3`: TorchTitan (0.3) llama3 attention (``qkv_linear.{wq,wk}`` rows, GQA), recorded by a
  forward pre-hook on its ``inner_attention`` (SDPA; a FlexAttention block mask is refused).

Only training forwards are recorded (``module.training``), so evaluation does not move the maxima.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from disco.optim.qkclip import AttentionHeads, MaxLogitRecorder

__all__ = ["disco_gpt", "hf_attention", "install", "torchtitan_llama3"]

HF_IMPLEMENTATION = "disco_qk_clip"


class _GPTHook:
    """What the CLI GPT's attention calls: ``hook(q, k)`` with ``[B, T, H, D]`` tensors after RoPE."""

    def __init__(self, recorder: MaxLogitRecorder, name: str, module: nn.Module):
        self.recorder, self.name, self.module = recorder, name, module

    def __call__(self, q: Tensor, k: Tensor) -> None:
        if self.module.training:
            scale = 1.0 / math.sqrt(q.shape[-1])  # SDPA's default, which the GPT uses
            self.recorder.record_qk(self.name, q, k, scale=scale, causal=True, layout="bthd")


def disco_gpt(model: nn.Module, recorder: MaxLogitRecorder) -> dict[str, AttentionHeads]:
    """The training CLI's GPT (``disco.train.model``): one entry per ``layers.{i}.attention``."""
    out = {}
    for name, m in model.named_modules():
        if not (hasattr(m, "logit_recorder") and hasattr(m, "head_dim")):
            continue
        d = int(m.head_dim)
        if getattr(m, "fused", False):
            w = m.wqkv.weight
            out[name] = AttentionHeads(w, w, n_heads=w.shape[0] // 3 // d, head_dim=d, k_start=w.shape[0] // 3)
        else:
            q, k = m.wq.weight, m.wk.weight
            out[name] = AttentionHeads(q, k, n_heads=q.shape[0] // d, head_dim=d, n_kv_heads=k.shape[0] // d)
        m.logit_recorder = _GPTHook(recorder, name, m)
    return out


def _hf_attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    """HF attention function: record (``[B, H, T, D]`` after RoPE) when training, then SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    hook: Callable[[Tensor, Tensor, Tensor | None, float | None], None] | None = getattr(module, "_disco_qk", None)
    if hook is not None and module.training:
        hook(query, key, attention_mask, kwargs.get("scaling"))
    out: tuple[Tensor, Tensor | None] = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out


def _register_hf() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HF_IMPLEMENTATION, _hf_attention_forward)
    AttentionMaskInterface.register(HF_IMPLEMENTATION, sdpa_mask)  # boolean masks, True where allowed


def hf_attention(model: nn.Module, recorder: MaxLogitRecorder) -> dict[str, AttentionHeads]:
    """HF Llama-like (``q_proj``, ``k_proj``) and GPT-2 (``c_attn``) self-attention modules of ``model``."""
    out: dict[str, AttentionHeads] = {}
    for name, m in model.named_modules():
        d = getattr(m, "head_dim", None)
        if d is None or not hasattr(m, "config"):
            continue
        if hasattr(m, "q_proj") and hasattr(m, "k_proj"):
            q, k = m.q_proj, m.k_proj
            out[name] = AttentionHeads(
                q.weight,
                k.weight,
                n_heads=q.weight.shape[0] // d,
                head_dim=d,
                n_kv_heads=k.weight.shape[0] // d,
                q_bias=q.bias,
                k_bias=k.bias,
            )
        elif hasattr(m, "c_attn") and not getattr(m, "is_cross_attention", False):
            w, b, width = m.c_attn.weight, m.c_attn.bias, int(m.split_size)
            out[name] = AttentionHeads(
                w, w, n_heads=width // d, head_dim=d, k_start=width, axis=1, q_bias=b, k_bias=b
            )  # Conv1D weight is [in, 3 * width]: heads are columns
        else:
            continue
        m._disco_qk = _hf_hook(recorder, name, m)
    if out:
        _register_hf()
        set_impl = getattr(model, "set_attn_implementation", None)
        if set_impl is None:
            raise TypeError(f"{type(model).__name__}: an HF model with set_attn_implementation() is needed")
        set_impl(HF_IMPLEMENTATION)
    return out


def _hf_hook(
    recorder: MaxLogitRecorder, name: str, module: nn.Module
) -> Callable[[Tensor, Tensor, Tensor | None, float | None], None]:
    def hook(q: Tensor, k: Tensor, mask: Tensor | None, scaling: float | None) -> None:
        scale = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
        if mask is None:  # SDPA's is_causal path
            recorder.record_qk(name, q, k, scale=scale, causal=bool(getattr(module, "is_causal", True)))
            return
        if mask.dtype.is_floating_point or mask.ndim != 4:
            raise TypeError(f"{name}: QK-clip reads boolean 4-D attention masks, got {mask.dtype} {tuple(mask.shape)}")
        tk = k.shape[2]
        recorder.record_qk(name, q, k, scale=scale, causal=False, mask=mask[..., :tk])

    return hook


class _TitanHook:
    def __init__(self, recorder: MaxLogitRecorder, name: str, module: nn.Module):
        self.recorder, self.name, self.module = recorder, name, module

    def __call__(self, _inner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.module.training:
            return
        if kwargs.get("attention_masks") is not None:
            raise ValueError(f"{self.name}: QK-clip records SDPA attention only (causal or not), not a block mask")
        q, k = args[0], args[1]
        scale = kwargs.get("scale")
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        causal = bool(kwargs.get("is_causal", True))
        self.recorder.record_qk(self.name, q, k, scale=scale, causal=causal, layout="bthd")


def torchtitan_llama3(model: nn.Module, recorder: MaxLogitRecorder) -> dict[str, AttentionHeads]:
    """TorchTitan (0.3) llama3 ``GQAttention``: ``qkv_linear.{wq,wk}`` rows, or the fused ``qkv_linear.wqkv`` whose
    rows are, per key group, its ``heads_per_kv`` query heads, its key, its value; recorded by a forward pre-hook
    on ``inner_attention``."""
    out = {}
    for name, m in model.named_modules():
        lin, inner = getattr(m, "qkv_linear", None), getattr(m, "inner_attention", None)
        if lin is None or inner is None:
            continue
        d = int(lin.head_dim)
        if hasattr(lin, "wqkv"):
            w, hpk = lin.wqkv.weight, int(lin.heads_per_kv)
            n_kv = w.shape[0] // ((hpk + 2) * d)
            group = torch.arange(n_kv)[:, None, None] * (hpk + 2) * d
            q_idx = (group + torch.arange(hpk)[None, :, None] * d + torch.arange(d)).reshape(n_kv * hpk, d)
            k_idx = group[:, 0] + hpk * d + torch.arange(d)
            b = getattr(lin.wqkv, "bias", None)
            out[name] = AttentionHeads(
                w, w, n_heads=n_kv * hpk, head_dim=d, n_kv_heads=n_kv, q_index=q_idx, k_index=k_idx, q_bias=b, k_bias=b
            )
        elif hasattr(lin, "wq") and hasattr(lin, "wk"):
            q, k = lin.wq.weight, lin.wk.weight
            out[name] = AttentionHeads(
                q,
                k,
                n_heads=q.shape[0] // d,
                head_dim=d,
                n_kv_heads=k.shape[0] // d,
                q_bias=getattr(lin.wq, "bias", None),
                k_bias=getattr(lin.wk, "bias", None),
            )
        else:
            continue
        inner.register_forward_pre_hook(_TitanHook(recorder, name, m), with_kwargs=True)
    return out


RECIPES: tuple[Callable[[nn.Module, MaxLogitRecorder], dict[str, AttentionHeads]], ...] = (
    disco_gpt,
    torchtitan_llama3,
    hf_attention,
)


def install(model: nn.Module, recorder: MaxLogitRecorder) -> dict[str, AttentionHeads]:
    """The first recipe that finds attention in ``model``; TypeError naming the model when none does."""
    for recipe in RECIPES:
        heads = recipe(model, recorder)
        if heads:
            return heads
    raise TypeError(
        f"QKClip: no recipe knows the attention of {type(model).__name__}; pass a mapping of layer name ->"
        " AttentionHeads and call the recorder from the attention (see docs/qkclip.md)"
    )
