"""TorchTitan integration (duck-typed config) and DummyParallelDims."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from disco.dummy_parallel_dims import DummyParallelDims
from disco.groups import create_disco_param_groups
from disco.integrations.torchtitan import (
    build_disco_optimizer,
    create_disco_optimizer_kwargs_from_optimizer_config,
)
from disco.optim.defaults import DISCO_DEFAULTS


@dataclass
class TitanOptimizerConfig:
    """Mimics ``torchtitan.config.Optimizer`` (name, lr, beta1, beta2, eps, weight_decay, implementation...)."""

    name: str = "AdamW"
    lr: float = 8e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    implementation: str = "fused"
    early_step_in_backward: bool = False


@dataclass
class DiscoTitanConfig(TitanOptimizerConfig):
    """The same with Disco's extension fields, as a TorchTitan user would add them."""

    name: str = "Disco"
    lr: float = 2e-2
    momentum: float = 0.9
    nesterov: bool = False
    norm_factor: str = "spectral"
    backend: str = "polar_express"
    backend_steps: int = 6
    is_light: bool = False
    extra_param_group_split_rules: Any = field(
        default_factory=lambda: [
            {"str_match": "tok_embeddings.weight", "norm_factor": "embed_sqrt", "backend": "identity"},
            {"str_match": "output.weight", "norm_factor": "unembed_sqrt", "backend": "identity"},
        ]
    )
    name_of_embedding: str = "tok_embeddings"


class Tiny(nn.Module):
    def __init__(self, vocab: int = 24, d: int = 8):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(2)])
        self.norm = nn.LayerNorm(d)
        self.output = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.output(self.norm(h))


def test_kwargs_from_full_config():
    dims = DummyParallelDims()
    kwargs = create_disco_optimizer_kwargs_from_optimizer_config(DiscoTitanConfig(), dims)
    assert kwargs == {
        "parallel_dims": dims,
        "lr": 2e-2,
        "eps": 1e-8,
        "weight_decay": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "norm_factor": "spectral",
        "backend": "polar_express",
        "backend_steps": 6,
        "is_light": False,
        "extra_param_group_split_rules": DiscoTitanConfig().extra_param_group_split_rules,
        "name_of_embedding": "tok_embeddings",
    }
    groups, cleaned = create_disco_param_groups(Tiny(), kwargs)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["tok_embeddings.weight"]["norm_factor"] == "embed_sqrt"
    assert by_name["output.weight"]["norm_factor"] == "unembed_sqrt"
    assert "extra_param_group_split_rules" not in cleaned


def test_defaults_for_a_plain_titan_config():
    with pytest.warns(UserWarning, match="AdamW"):
        kwargs = create_disco_optimizer_kwargs_from_optimizer_config(TitanOptimizerConfig(), None)
    assert isinstance(kwargs["parallel_dims"], DummyParallelDims)  # TorchTitan 0.3.0 passes none
    assert kwargs["lr"] == 8e-4 and kwargs["weight_decay"] == 0.1 and kwargs["eps"] == 1e-8
    assert kwargs["momentum"] == 0.95 and kwargs["nesterov"] is True
    assert kwargs["norm_factor"] == "spectral" and kwargs["backend"] == "gram_newtonschulz5"
    assert kwargs["backend_steps"] == 5 and kwargs["is_light"] is False
    assert kwargs["extra_param_group_split_rules"] == []
    assert "vector_algorithm" not in kwargs and "name_of_output" not in kwargs


def test_minimal_object_json_rules_mapping_and_light():
    class Minimal:
        lr = 1e-3
        is_light = True
        extra_param_group_split_rules = json.dumps([{"str_match": "norm", "algorithm": "adamw"}])
        vector_algorithm = "lion"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kwargs = create_disco_optimizer_kwargs_from_optimizer_config(Minimal())
    assert kwargs["extra_param_group_split_rules"] == [{"str_match": "norm", "algorithm": "adamw"}]
    assert kwargs["nesterov"] is False  # is_light without an explicit nesterov
    assert kwargs["eps"] == DISCO_DEFAULTS.eps == 1e-7 and kwargs["vector_algorithm"] == "lion"  # Disco's own
    kwargs = create_disco_optimizer_kwargs_from_optimizer_config({"lr": 0.5, "name": "disco", "momentum": 0.5})
    assert kwargs["lr"] == 0.5 and kwargs["momentum"] == 0.5
    with pytest.raises(ValueError, match="lr"):
        create_disco_optimizer_kwargs_from_optimizer_config(object())
    with pytest.raises(ValueError, match="JSON"):
        create_disco_optimizer_kwargs_from_optimizer_config({"lr": 1.0, "extra_param_group_split_rules": "[{"})


def test_build_disco_optimizer_per_model_part():
    pytest.importorskip("disco.optim.disco")
    torch.manual_seed(0)
    parts = [Tiny(), Tiny()]
    opts = build_disco_optimizer(parts, DiscoTitanConfig())  # no parallel_dims, as in TorchTitan 0.3.0
    assert len(opts) == 2
    for part, opt in zip(parts, opts):
        names = {n for g in opt.param_groups for n in g["param_names"]}
        assert names == {n for n, _ in part.named_parameters()}
        assert {p for g in opt.param_groups for p in g["params"]} == set(part.parameters())
    part, opt = parts[0], opts[0]
    part(torch.randint(0, 24, (2, 5))).square().mean().backward()
    before = part.layers[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, part.layers[0].weight)
    assert len(build_disco_optimizer(Tiny(), DiscoTitanConfig(), DummyParallelDims())) == 1


# ---------------------------------------------------------------------------------------------------------------
# DummyParallelDims


def test_dummy_parallel_dims_single_device():
    d = DummyParallelDims()
    assert (d.dp_replicate, d.dp_shard, d.cp, d.tp, d.pp, d.ep, d.world_size) == (1, 1, 1, 1, 1, 1, 1)
    assert d.world_mesh is None and d.non_data_parallel_size == 1
    flags = ("dp_enabled", "dp_replicate_enabled", "dp_shard_enabled", "fsdp_enabled", "cp_enabled")
    flags += ("tp_enabled", "pp_enabled", "ep_enabled")
    assert not any(getattr(d, f) for f in flags)


def test_dummy_parallel_dims_sizes():
    ddp = DummyParallelDims(world_size=4)  # all sizes 1 on 4 ranks: DDP replicas
    assert ddp.dp_replicate == 4 and ddp.dp_enabled and ddp.dp_replicate_enabled and not ddp.fsdp_enabled
    hsdp = DummyParallelDims(dp_replicate=2, dp_shard=-1, tp=2, world_size=8)
    assert hsdp.dp_shard == 2 and hsdp.fsdp_enabled and hsdp.tp_enabled and hsdp.non_data_parallel_size == 2
    cp = DummyParallelDims(cp=2, world_size=2)
    assert cp.fsdp_enabled and cp.cp_enabled and not cp.dp_enabled
    assert DummyParallelDims(ep=2, world_size=1).ep_enabled
    with pytest.raises(ValueError, match="world_size"):
        DummyParallelDims(tp=2, world_size=4)
    with pytest.raises(ValueError, match=">= 1"):
        DummyParallelDims(tp=0)


def _world_size_body(rank, world_size):
    d = DummyParallelDims()
    return d.world_size, d.dp_replicate, d.dp_enabled


@pytest.mark.dist
def test_dummy_parallel_dims_reads_world_size():
    from dist_harness import run_ranks

    assert run_ranks(_world_size_body, 2, timeout=60) == [(2, 2, True), (2, 2, True)]


def test_defaults_have_one_source():
    """Disco's constructor, the routing table, the CLI builder and this integration agree (disco.optim.defaults)."""
    import inspect

    from disco import Disco
    from disco.groups import _optimizer_defaults
    from disco.integrations.torchtitan import DISCO_DEFAULTS as TITAN

    sig = inspect.signature(Disco.__init__).parameters
    for k, v in DISCO_DEFAULTS.as_dict().items():
        if k != "nesterov":
            assert sig[k].default == v, k
        assert _optimizer_defaults()[k] == v
        if k != "lr":
            assert TITAN[k] == v
    W = nn.Parameter(torch.randn(4, 4))
    assert Disco([W]).param_groups[0]["nesterov"] is DISCO_DEFAULTS.nesterov is True
    assert Disco([W := nn.Parameter(torch.randn(4, 4))], is_light=True).param_groups[0]["nesterov"] is False


# ---------------------------------------------------------------------------------------------------------------
# TorchTitan 0.3.0's config shapes, without torchtitan (tests/test_torchtitan_030.py uses the real classes)


@dataclass
class ParamGroupConfig030:
    pattern: str
    optimizer_name: str
    optimizer_kwargs: dict = field(default_factory=dict)


@dataclass
class Container030:
    param_groups: list = field(default_factory=list)
    implementation: str = "fused"


def test_kwargs_from_030_shaped_configs():
    adamw = ParamGroupConfig030(".*", "AdamW", {"lr": 8e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1})
    with pytest.warns(UserWarning, match="'AdamW': building Disco"):
        kwargs = create_disco_optimizer_kwargs_from_optimizer_config(Container030([adamw]))  # default_adamw's shape
    assert kwargs["lr"] == 8e-4 and kwargs["eps"] == 1e-8 and kwargs["weight_decay"] == 0.1
    disco = ParamGroupConfig030(".*", "Disco", {"lr": 0.02, "compute_dtype": "bfloat16", "vector_algorithm": "adamw"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kwargs = create_disco_optimizer_kwargs_from_optimizer_config(Container030([adamw, disco]))
    assert kwargs["lr"] == 0.02 and kwargs["compute_dtype"] is torch.bfloat16 and kwargs["vector_algorithm"] == "adamw"
    assert kwargs["momentum"] == DISCO_DEFAULTS.momentum  # unset: Disco's own
    with pytest.raises(ValueError, match=r"unknown keys \['momentun'\]"):
        create_disco_optimizer_kwargs_from_optimizer_config(
            ParamGroupConfig030(".*", "Disco", {"lr": 1, "momentun": 0})
        )
    with pytest.raises(ValueError, match="compute_dtype='float33'"):
        create_disco_optimizer_kwargs_from_optimizer_config({"lr": 1.0, "compute_dtype": "float33"})
    with pytest.raises(ValueError, match="0 'Disco' param groups"):
        create_disco_optimizer_kwargs_from_optimizer_config(Container030([adamw, adamw]))
    with pytest.raises(ValueError, match="DiscoOptimizersContainer"):
        create_disco_optimizer_kwargs_from_optimizer_config(Container030([disco, disco]))


def test_build_disco_optimizer_from_030_default_adamw_shape():
    pytest.importorskip("disco.optim.disco")
    torch.manual_seed(0)
    config = Container030([ParamGroupConfig030(".*", "AdamW", {"lr": 8e-4, "weight_decay": 0.1})])
    with pytest.warns(UserWarning, match="AdamW"):
        (opt,) = build_disco_optimizer([Tiny()], config)
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert by_name["norm.weight"]["norm_factor"] == "bias_rms" and opt.param_groups[0]["lr"] == 8e-4


def _parallel_dims_mismatch_body(rank, world_size):
    try:
        create_disco_optimizer_kwargs_from_optimizer_config({"lr": 1.0}, DummyParallelDims(world_size=1))
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.dist
def test_parallel_dims_must_match_the_process_group():
    from dist_harness import run_ranks

    out = run_ranks(_parallel_dims_mismatch_body, 2, timeout=60)
    assert all("world_size=1 but the default process group has 2 ranks" in m for m in out)
