"""Registrations for the training CLI: each optimizer builds itself from a model, with its default lr."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from torch.optim import Optimizer

from .registry import register_optimizer

# Element-wise settings for embeddings, head and vectors when an optimizer keeps AdamW for them.
_ADAMW_SIDE = {"algorithm": "adamw", "betas": (0.9, 0.95), "adam_eps": 1e-8, "weight_decay": 0.0}


def _route(model: nn.Module, kwargs: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from ..groups import create_disco_param_groups

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CLI prints the routing table itself where asked
        return create_disco_param_groups(model, kwargs)


def head_split_rules(model: nn.Module) -> list[dict[str, Any]]:
    """Split rules giving each attention head its own LMO in the training CLI's GPT (``layers.N.attention``):
    ``wq`` / ``wk`` / ``wv`` by head, a fused ``wqkv`` (rows ``[q; k; v]``) into q, k, v and each by head.
    Under TP, which shards heads colwise, every head is then whole on one rank: no exchange over TP."""
    for name, module in model.named_modules():
        head_dim = getattr(module, "head_dim", None)
        fused = getattr(module, "wqkv", None)
        proj = fused if isinstance(fused, nn.Linear) else getattr(module, "wq", None)
        if isinstance(head_dim, int) and isinstance(proj, nn.Linear) and name.endswith("attention"):
            dim = proj.in_features
            heads = dim // head_dim
            if isinstance(fused, nn.Linear):
                return [{"str_match": r"\.attention\.wqkv\.weight$", "split_sizes": [dim] * 3, "num_heads": heads}]
            return [{"str_match": r"\.attention\.w[qkv]\.weight$", "num_heads": heads}]
    raise ValueError("split_heads=True needs the training CLI's GPT attention (layers.N.attention.wq / wqkv)")


@register_optimizer("muon", default_lr=0.02, doc="disco.Muon on hidden matrices, AdamW (lr 3e-3) on the rest")
def build_muon(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    adamw_lr: float = 3e-3,
    split_heads: bool = False,
    **kwargs: Any,
) -> Optimizer:
    from .muon import Muon

    groups = _hidden_and_adamw_side(model, adamw_lr, head_split_rules(model) if split_heads else [])
    return Muon(groups, lr=lr, weight_decay=weight_decay, **kwargs)


@register_optimizer("normuon", default_lr=0.02, doc="disco.NorMuon on hidden matrices, AdamW (lr 3e-3) on the rest")
def build_normuon(
    model: nn.Module, *, lr: float, weight_decay: float = 0.0, adamw_lr: float = 3e-3, **kwargs: Any
) -> Optimizer:
    from .normuon import NorMuon

    return NorMuon(_hidden_and_adamw_side(model, adamw_lr), lr=lr, weight_decay=weight_decay, **kwargs)


# Dion and Dion2 at 0.01: the best on the CLI's default job of 0.005 / 0.01 / 0.02 / 0.04 (Dion2: 0.005 to 0.04)
# (docs/training.md)
@register_optimizer(
    "dion2", default_lr=0.01, doc="disco.Dion2 (1/4 of the rows per step) on hidden matrices, AdamW on the rest"
)
def build_dion2(
    model: nn.Module, *, lr: float, weight_decay: float = 0.0, adamw_lr: float = 3e-3, **kwargs: Any
) -> Optimizer:
    from .dion2 import Dion2

    groups = []
    for g in _hidden_and_adamw_side(model, adamw_lr):
        stacks = [(n, p) for n, p in zip(g["param_names"], g["params"]) if p.dim() > 2]
        if g.get("algorithm") == "adamw" or not stacks:
            groups.append(g)
            continue
        # Dion2 selects rows of 2-D weights: expert stacks and convs take Muon's rule inside the same optimizer.
        flat = [(n, p) for n, p in zip(g["param_names"], g["params"]) if p.dim() <= 2]
        if flat:
            groups.append({**g, "params": [p for _, p in flat], "param_names": [n for n, _ in flat]})
        extra = {"algorithm": "muon", "nesterov": True}
        groups.append({**g, **extra, "params": [p for _, p in stacks], "param_names": [n for n, _ in stacks]})
    return Dion2(groups, lr=lr, weight_decay=weight_decay, **kwargs)


def _hidden_and_adamw_side(
    model: nn.Module, adamw_lr: float, hidden_rules: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Hidden matrices in the optimizer's default group (or ``hidden_rules``' groups); embeddings, head and
    vectors in AdamW groups."""
    side = {**_ADAMW_SIDE, "lr": adamw_lr}
    groups, _ = _route(
        model,
        {
            "extra_param_group_split_rules": [
                *(hidden_rules or []),
                {"str_match": r"(^|\.)(tok_embeddings|output)\.weight$", **side},
            ],
            "vector_algorithm": "adamw",
        },
    )
    for g in groups:
        if g.get("algorithm") == "adamw":
            g.update({k: v for k, v in side.items() if k not in g})
            g.setdefault("lr", adamw_lr)
        g.pop("norm_factor", None)
        g.pop("backend", None)
    return groups


@register_optimizer(
    "dion", default_lr=0.01, doc="disco.Dion (rank 1/4) on hidden matrices, AdamW (lr 3e-3) on the rest"
)
def build_dion(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    adamw_lr: float = 3e-3,
    rank_fraction: float = 0.25,
    **kwargs: Any,
) -> Optimizer:
    from .dion import Dion

    # The training loop's DDP / FSDP already average gradients: Dion only shards (the seed's "Mode 2").
    kwargs.setdefault("replicate_mesh_grad_sync", False)
    groups = _hidden_and_adamw_side(model, adamw_lr)
    return Dion(groups, lr=lr, weight_decay=weight_decay, rank_fraction=rank_fraction, **kwargs)


@register_optimizer("dion-full", default_lr=0.02, doc="disco.Dion at full rank (rank_fraction 1), AdamW on the rest")
def build_dion_full(model: nn.Module, *, lr: float, weight_decay: float = 0.0, **kwargs: Any) -> Optimizer:
    kwargs.setdefault("rank_fraction", 1.0)
    return build_dion(model, lr=lr, weight_decay=weight_decay, **kwargs)


@register_optimizer("disco", default_lr=0.02, doc="disco.Disco: spectral hidden, embed_sqrt / unembed_sqrt, bias_rms")
def build_disco(
    model: nn.Module, *, lr: float, weight_decay: float = 0.0, split_heads: bool = False, **kwargs: Any
) -> Optimizer:
    from .disco import Disco

    opt_kwargs = {  # the rest are Disco's defaults (disco.optim.defaults)
        "lr": lr,
        "weight_decay": weight_decay,
        "name_of_embedding": "tok_embeddings",
        "extra_param_group_split_rules": [
            *(head_split_rules(model) if split_heads else []),
            {"str_match": r"(^|\.)tok_embeddings\.weight$", "norm_factor": "embed_sqrt", "backend": "identity"},
            {"str_match": r"(^|\.)output\.weight$", "norm_factor": "unembed_sqrt", "backend": "identity"},
        ],
        **kwargs,
    }
    groups, cleaned = _route(model, opt_kwargs)
    return Disco(groups, **cleaned)


@register_optimizer("scion", default_lr=0.02, doc="disco.Scion, unconstrained, spectral hidden / row-norm embeddings")
def build_scion(
    model: nn.Module, *, lr: float, weight_decay: float = 0.0, split_heads: bool = False, **kwargs: Any
) -> Optimizer:
    from .scion import Scion

    groups, _ = _route(
        model,
        {
            "extra_param_group_split_rules": [
                *(head_split_rules(model) if split_heads else []),
                {"str_match": r"(^|\.)tok_embeddings\.weight$", "norm_factor": "embed_sqrt", "backend": "identity"},
                {"str_match": r"(^|\.)output\.weight$", "norm_factor": "unembed_sqrt", "backend": "identity"},
            ],
        },
    )
    kwargs.setdefault("constrained", False)
    return Scion(groups, lr=lr, weight_decay=weight_decay, **kwargs)
