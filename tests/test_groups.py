"""disco.groups: parameter routing, the routing table and ``python -m disco groups``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from disco.dummy_parallel_dims import DummyParallelDims
from disco.groups import ROUTING_KEYS, create_disco_param_groups, main, routing_table

VOCAB, DIM = 40, 16


class Attention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)


class FeedForward(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)


class Block(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.attention = Attention(d)
        self.feed_forward = FeedForward(d, hidden)
        self.attention_norm = nn.RMSNorm(d)
        self.ffn_norm = nn.RMSNorm(d)


class TitanLike(nn.Module):
    """TorchTitan-named toy transformer: tok_embeddings, layers.N.attention.wq..., norm, output."""

    def __init__(self, vocab: int = VOCAB, d: int = DIM, hidden: int = 2 * DIM, n_layers: int = 2):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleDict({str(i): Block(d, hidden) for i in range(n_layers)})
        self.norm = nn.RMSNorm(d)
        self.output = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            a = layer.attention
            x = layer.attention_norm(h)
            h = h + a.wo(a.wq(x) * torch.sigmoid(a.wk(x)) + a.wv(x))
            f = layer.feed_forward
            x = layer.ffn_norm(h)
            h = h + f.w2(torch.nn.functional.silu(f.w1(x)) * f.w3(x))
        return self.output(self.norm(h))


def titan_factory() -> nn.Module:
    """Factory for the CLI test: ``python -m disco groups test_groups:titan_factory``."""
    return TitanLike()


def seed_kwargs() -> dict:
    return {
        "parallel_dims": DummyParallelDims(),
        "is_light": False,
        "weight_decay": 0.0,
        "lr": 1e-2,
        "momentum": 0.1,
        "nesterov": False,
        "eps": 1e-20,
        "norm_factor": "spectral",
        "backend": "newtonschulz5",
        "backend_steps": 5,
        "extra_param_group_split_rules": [
            {"str_match": "tok_embeddings.weight", "lr": 1e-2, "norm_factor": "embed_sqrt", "backend": "identity"},
            {"str_match": "output.weight", "lr": 1e-2, "norm_factor": "unembed_sqrt", "backend": "identity"},
        ],
        "name_of_embedding": "tok_embeddings",
    }


def route(model: nn.Module, kwargs: dict) -> tuple[dict[str, dict], list[dict], dict]:
    """(name -> {setting: value} with each group's overrides, groups, cleaned kwargs); checks invariants."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fail on unexpected warnings
        groups, cleaned = create_disco_param_groups(model, kwargs)
    table: dict[str, dict] = {}
    for gi, g in enumerate(groups):
        assert g["params"], "empty group kept"
        assert len(g["params"]) == len(g["param_names"])
        for n in g["param_names"]:
            assert n not in table, f"{n} routed twice"
            table[n] = {"group": gi, **{k: v for k, v in g.items() if k not in ("params", "param_names")}}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a tensor appears in two groups"
    return table, groups, cleaned


def settings(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "group"}


def test_seed_kwargs_route_every_parameter():
    model = TitanLike()
    kwargs = seed_kwargs()
    table, groups, cleaned = route(model, kwargs)
    assert set(table) == {n for n, _ in model.named_parameters()}
    embed = {"lr": 1e-2, "norm_factor": "embed_sqrt", "backend": "identity"}
    head = {"lr": 1e-2, "norm_factor": "unembed_sqrt", "backend": "identity"}
    vector = {"norm_factor": "bias_rms", "backend": "identity"}
    for name, entry in table.items():
        if name == "tok_embeddings.weight":
            assert settings(entry) == embed
        elif name == "output.weight":
            assert settings(entry) == head
        elif name.endswith("norm.weight"):
            assert settings(entry) == vector, name
        else:
            assert settings(entry) == {}, name  # hidden matrices: the optimizer defaults
    hidden_groups = {table[n]["group"] for n in table if ".attention.w" in n or ".feed_forward.w" in n}
    assert len(hidden_groups) == 1
    # cleaned kwargs: routing keys gone, everything else (parallel_dims, name_of_embedding) kept, input untouched
    assert "extra_param_group_split_rules" in kwargs
    assert set(cleaned) == set(kwargs) - set(ROUTING_KEYS)
    assert cleaned["parallel_dims"] is kwargs["parallel_dims"] and cleaned["name_of_embedding"] == "tok_embeddings"
    # the groups are a valid torch optimizer input, in model order
    opt = torch.optim.SGD(groups, lr=0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert groups[0]["param_names"][0] == "tok_embeddings.weight"


def test_automatic_routing_without_rules():
    table, _, _ = route(TitanLike(), {"lr": 0.1, "name_of_embedding": "tok_embeddings"})
    assert settings(table["tok_embeddings.weight"]) == {"norm_factor": "embed_sqrt", "backend": "identity"}
    assert settings(table["output.weight"]) == {"norm_factor": "unembed_sqrt", "backend": "identity"}
    assert settings(table["norm.weight"]) == {"norm_factor": "bias_rms", "backend": "identity"}
    assert settings(table["layers.0.attention.wq.weight"]) == {}


def test_vector_algorithm():
    kwargs = {"vector_algorithm": "adamw", "lr": 0.1}
    table, _, cleaned = route(TitanLike(), kwargs)
    assert settings(table["norm.weight"]) == {"algorithm": "adamw"}
    assert "vector_algorithm" not in cleaned and kwargs["vector_algorithm"] == "adamw"
    with pytest.raises(ValueError, match="vector_algorithm.*valid"):
        create_disco_param_groups(TitanLike(), {"vector_algorithm": "sgd"})


def test_first_matching_rule_wins_and_rule_beats_auto():
    rules = [
        {"str_match": r"layers\.0\..*\.w[qk]\.", "lr": 1.0, "algorithm": "adamw"},
        {"str_match": r"attention", "lr": 2.0},
        {"str_match": r"norm", "norm_factor": "sign"},  # a vector routed by a rule, not automatically
    ]
    table, groups, _ = route(TitanLike(), {"extra_param_group_split_rules": rules})
    assert settings(table["layers.0.attention.wq.weight"]) == {"lr": 1.0, "algorithm": "adamw"}
    assert settings(table["layers.1.attention.wq.weight"]) == {"lr": 2.0}
    assert settings(table["layers.0.attention.wo.weight"]) == {"lr": 2.0}
    assert settings(table["layers.0.attention_norm.weight"]) == {"lr": 2.0}  # "attention" comes first
    assert settings(table["layers.0.ffn_norm.weight"]) == {"norm_factor": "sign"}
    assert settings(table["norm.weight"]) == {"norm_factor": "sign"}
    assert len({table[n]["group"] for n in table if n.endswith("norm.weight") and "attention" not in n}) == 1


def test_rule_matching_nothing_warns():
    rules = [{"str_match": "no_such_param", "lr": 1.0}, {"str_match": "output", "lr": 2.0}]
    with pytest.warns(UserWarning, match="no_such_param"):
        groups, _ = create_disco_param_groups(TitanLike(), {"extra_param_group_split_rules": rules})
    assert all("no_such_param" not in str(g) for g in groups)


def test_invalid_names_raise():
    model = TitanLike()
    bad = [
        ({"str_match": "wq", "norm_factor": "spectrall"}, "spectrall.*valid.*spectral"),
        ({"str_match": "wq", "backend": "newton"}, "newton.*valid.*newtonschulz5"),
        ({"str_match": "wq", "algorithm": "sgd"}, "sgd.*valid.*adamw"),
        ({"str_match": "(unclosed"}, "invalid regex"),
        ({"lr": 1.0}, "str_match"),
    ]
    for rule, msg in bad:
        with pytest.raises(ValueError, match=msg):
            create_disco_param_groups(model, {"extra_param_group_split_rules": [rule]})
    with pytest.raises(ValueError, match="valid"):
        create_disco_param_groups(model, {"norm_factor": "bogus"})


def test_rules_as_json_string():
    rules = json.dumps([{"str_match": "output", "lr": 3.0}])
    table, _, _ = route(TitanLike(), {"extra_param_group_split_rules": rules})
    assert settings(table["output.weight"]) == {"lr": 3.0}


class Unnamed(nn.Module):
    """Embedding plus a head named ``proj``: found only by its shape (out_features == vocab)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.up = nn.Linear(DIM, VOCAB)  # same shape as the head, but not the last such Linear
        self.proj = nn.Linear(VOCAB, DIM)
        self.proj2 = nn.Linear(DIM, VOCAB, bias=False)


def test_head_guessed_by_shape_warns_once():
    with pytest.warns(UserWarning, match=r"by shape.*\['proj2.weight'\]") as rec:
        groups, _ = create_disco_param_groups(Unnamed(), {})
    assert len([w for w in rec if "by shape" in str(w.message)]) == 1
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["proj2.weight"]["norm_factor"] == "unembed_sqrt"
    assert by_name["emb.weight"]["norm_factor"] == "embed_sqrt"
    assert "norm_factor" not in by_name["up.weight"]  # only the last candidate is the head
    assert by_name["up.bias"]["norm_factor"] == "bias_rms"
    # naming the head removes the guess (and the warning)
    table, _, cleaned = route(Unnamed(), {"name_of_output": "proj2"})
    assert table["proj2.weight"]["norm_factor"] == "unembed_sqrt" and "name_of_output" not in cleaned


def test_no_guess_when_a_head_is_named():
    # TitanLike's w1/w3 have out_features 2*DIM; with vocab == 2*DIM they would look like heads
    table, _, _ = route(TitanLike(vocab=2 * DIM), {})
    assert settings(table["layers.0.feed_forward.w1.weight"]) == {}
    assert settings(table["output.weight"])["norm_factor"] == "unembed_sqrt"


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3)  # 3-D, but a conv: not experts
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.experts = nn.Parameter(torch.randn(4, 16, 8))  # 3-D, not a conv: a batch of experts
        self.raw4d = nn.Parameter(torch.randn(2, 3, 2, 2))  # 4-D, not a conv module: guessed conv
        self.scalar = nn.Parameter(torch.tensor(1.0))
        self.lin = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_conv_experts_frozen_scalar():
    with pytest.warns(UserWarning, match="raw4d"):
        groups, _ = create_disco_param_groups(Mixed(), {})
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["conv1.weight"]["norm_factor"] == "conv_spectral"
    assert by_name["conv2.weight"]["norm_factor"] == "conv_spectral"
    assert by_name["raw4d"]["norm_factor"] == "conv_spectral"
    assert "norm_factor" not in by_name["experts"] and by_name["experts"] is by_name["lin.weight"]
    assert by_name["scalar"]["norm_factor"] == "bias_rms" and by_name["conv1.bias"] is by_name["scalar"]
    assert not any(n.startswith("frozen") for n in by_name)


def test_tied_weights_appear_once():
    model = TitanLike()
    model.output.weight = model.tok_embeddings.weight
    table, groups, _ = route(model, seed_kwargs() | {"extra_param_group_split_rules": []})
    assert "output.weight" not in table
    assert settings(table["tok_embeddings.weight"]) == {"norm_factor": "embed_sqrt", "backend": "identity"}
    # a rule on the second name of a tied weight still applies to it (names are matched with all aliases)
    table, _, _ = route(model, {"extra_param_group_split_rules": [{"str_match": "^output", "lr": 5.0}]})
    assert settings(table["tok_embeddings.weight"]) == {"lr": 5.0}


def test_embedding_by_name_only():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embeddings = nn.Module()
            self.tok_embeddings.table = nn.Parameter(torch.randn(VOCAB, DIM))
            self.hidden = nn.Linear(DIM, DIM)

    table, _, _ = route(Raw(), {"name_of_embedding": "tok_embeddings"})
    assert table["tok_embeddings.table"]["norm_factor"] == "embed_sqrt"
    table, _, _ = route(Raw(), {})
    assert "norm_factor" not in table["tok_embeddings.table"]


def test_routing_table_text():
    groups, cleaned = create_disco_param_groups(TitanLike(), seed_kwargs())
    text = routing_table(groups, {"algorithm": "disco", **cleaned})
    lines = text.splitlines()
    assert lines[0].split() == ["group", "name", "shape", "algorithm", "norm_factor", "backend", "lr"]
    row = next(line for line in lines if "layers.0.attention.wq.weight" in line).split()
    assert row[2:] == [f"{DIM}x{DIM}", "disco", "spectral", "newtonschulz5", "0.01"]
    row = next(line for line in lines if line.split()[1:2] == ["output.weight"]).split()
    assert row[2:] == [f"{VOCAB}x{DIM}", "disco", "unembed_sqrt", "identity", "0.01"]
    n_params = len(list(TitanLike().parameters()))
    assert len(lines) == n_params + 3 and f"{n_params} parameters" in lines[-1]
    # fixed width: every column starts at the same offset in every row
    starts = [lines[0].index(h) for h in ("name", "shape", "lr")]
    assert all(line[s - 2 : s] == "  " for line in lines[2:-1] for s in starts)
    assert "-" in routing_table(groups)  # unset values without defaults


def test_cli_prints_table(capsys):
    rc = main(["test_groups:titan_factory", "--kwargs", json.dumps({"name_of_embedding": "tok_embeddings"})])
    out = capsys.readouterr().out
    assert rc == 0
    assert "tok_embeddings.weight" in out and "embed_sqrt" in out and "unembed_sqrt" in out
    assert "layers.1.feed_forward.w3.weight" in out


def test_cli_through_disco_main(capsys, tmp_path):
    from disco.__main__ import main as disco_main

    path = tmp_path / "factory_mod.py"
    path.write_text("import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(4, 8))\n")
    assert disco_main(["groups", f"{path}:make"]) == 0
    out = capsys.readouterr().out
    assert "0.weight" in out and "8x4" in out and "bias_rms" in out
    assert main(["no_such_module_xyz:make"]) == 2
    assert main(["test_groups:seed_kwargs"]) == 2  # not an nn.Module


def test_seed_example_runs_with_disco():
    disco_mod = pytest.importorskip("disco.optim.disco")
    torch.manual_seed(0)
    model = TitanLike()
    params, cleaned = create_disco_param_groups(model, seed_kwargs())
    opt = disco_mod.Disco(params, **cleaned)
    tokens = torch.randint(0, VOCAB, (2, 8))
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), torch.randint(0, VOCAB, (16,)))
    loss.backward()
    before = model.layers["0"].attention.wq.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.layers["0"].attention.wq.weight)
