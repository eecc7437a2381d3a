"""disco.groups: parameter routing, the routing table and ``python -m disco groups``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from disco.dummy_parallel_dims import DummyParallelDims
from disco.groups import ROUTING_KEYS, create_disco_param_groups, main, routing_table, split_vector_params

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


def test_tied_embedding_and_head_take_the_heads_route_and_warn():
    model = TitanLike()
    model.output.weight = model.tok_embeddings.weight
    with pytest.warns(UserWarning, match=r"tok_embeddings\.weight = output\.weight -> the output head") as rec:
        groups, _ = create_disco_param_groups(model, seed_kwargs() | {"extra_param_group_split_rules": []})
    assert len([w for w in rec if "tied" in str(w.message)]) == 1
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert "output.weight" not in by_name  # routed once, under its first name
    tied = by_name["tok_embeddings.weight"]
    assert tied["norm_factor"] == "unembed_sqrt" and tied["backend"] == "identity"
    assert tied["tied_with"] == ["output.weight"] and tied["param_names"] == ["tok_embeddings.weight"]
    row = next(line for line in routing_table(groups).splitlines() if "tok_embeddings.weight" in line)
    assert row.endswith("tied: output.weight") and "unembed_sqrt" in row
    # a rule on either name makes the choice explicit: no warning, still marked as tied
    for pattern in ("^output", "^tok_embeddings"):
        rules = [{"str_match": pattern, "norm_factor": "embed_sqrt", "backend": "identity"}]
        table, _, _ = route(model, {"extra_param_group_split_rules": rules})
        assert settings(table["tok_embeddings.weight"]) == {
            "norm_factor": "embed_sqrt",
            "backend": "identity",
            "tied_with": ["output.weight"],
        }


def test_other_tied_weights_take_their_first_names_route():
    model = TitanLike()
    model.layers["1"].attention.wq.weight = model.layers["0"].attention.wq.weight
    with pytest.warns(UserWarning, match=r"layers\.0\.attention\.wq\.weight = layers\.1\.attention\.wq\.weight"):
        groups, _ = create_disco_param_groups(model, {})
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert "norm_factor" not in by_name["layers.0.attention.wq.weight"]  # the default (matrix) route
    assert by_name["layers.0.attention.wq.weight"]["tied_with"] == ["layers.1.attention.wq.weight"]
    assert "layers.1.attention.wq.weight" not in by_name
    assert "tied_with" not in by_name["layers.0.attention.wk.weight"]


class Conv1D(nn.Module):
    """Hugging Face's ``transformers.pytorch_utils.Conv1D``, re-declared: weight ``nx x nf`` (in x out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


class SubConv1D(Conv1D):
    pass


class GPT2Like(nn.Module):
    def __init__(self, d: int = DIM):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, d)
        self.c_attn = Conv1D(3 * d, d)  # stored d x 3d
        self.c_proj = SubConv1D(d, 4 * d)  # a subclass, stored 4d x d
        self.lin = nn.Linear(d, 2 * d)  # nn.Linear: out x in, not transposed
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight


def test_transposed_layers_are_recognised_by_type_name():
    with pytest.warns(UserWarning, match="tied"):
        groups, _ = create_disco_param_groups(GPT2Like(), {"lr": 0.1})
    by_name = {n: g for g in groups for n in g["param_names"]}
    for name in ("c_attn.weight", "c_proj.weight"):
        assert by_name[name]["transposed"] is True and "norm_factor" not in by_name[name], name
    assert by_name["c_attn.weight"] is by_name["c_proj.weight"]  # one transposed default group
    assert "transposed" not in by_name["lin.weight"] and "transposed" not in by_name["c_attn.bias"]
    assert by_name["c_attn.bias"]["norm_factor"] == "bias_rms"
    text = routing_table(groups)
    row = next(line for line in text.splitlines() if line.split()[1:2] == ["c_attn.weight"])
    assert row.split()[2] == f"{DIM}x{3 * DIM}" and row.endswith("stored in x out (transposed)")
    row = next(line for line in text.splitlines() if line.split()[1:2] == ["lin.weight"])
    assert "transposed" not in row
    # a rule keeps the orientation of what it matches, and may set it itself
    rules = [{"str_match": "c_attn|lin", "lr": 2.0}, {"str_match": "c_proj.weight", "transposed": False}]
    with pytest.warns(UserWarning, match="tied"):
        groups, _ = create_disco_param_groups(GPT2Like(), {"extra_param_group_split_rules": rules})
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["c_attn.weight"]["transposed"] is True and by_name["c_attn.weight"]["lr"] == 2.0
    assert "transposed" not in by_name["lin.weight"] and by_name["lin.weight"]["lr"] == 2.0
    assert by_name["c_proj.weight"]["transposed"] is False
    for rule, msg in (
        ({"str_match": "x", "transposed": 1}, "True or False"),
        ({"str_match": "bias", "transposed": True}, "needs a matrix"),
    ):
        with pytest.raises(ValueError, match=f"transposed.*{msg}"):
            create_disco_param_groups(GPT2Like(), {"extra_param_group_split_rules": [rule]})


def test_same_named_layer_with_another_layout_is_not_transposed():
    class Other(nn.Module):  # a "Conv1D" whose weight is not nx x nf (e.g. a real 1-D conv of another library)
        def __init__(self):
            super().__init__()
            self.nx, self.nf = 4, 8
            self.weight = nn.Parameter(torch.randn(8, 4))

    Other.__name__ = "Conv1D"
    table, _, _ = route(nn.ModuleDict({"a": Other()}), {})
    assert "transposed" not in table["a.weight"]


def test_only_routes_the_named_parameters_with_the_whole_models_context():
    model = TitanLike()
    wanted = {"output.weight", "layers.0.attention.wq.weight", "norm.weight"}
    groups, _ = create_disco_param_groups(model, {}, only=wanted)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert set(by_name) == wanted
    assert by_name["output.weight"]["norm_factor"] == "unembed_sqrt"  # recognised although embeddings are left out
    assert by_name["norm.weight"]["norm_factor"] == "bias_rms"
    assert create_disco_param_groups(model, {}, only=()) == ([], {})


def test_split_vector_params_of_a_plain_group():
    model = TitanLike()
    decay = {"params": [p for n, p in model.named_parameters() if "norm" not in n], "weight_decay": 0.1}
    no_decay = {"params": [p for n, p in model.named_parameters() if "norm" in n], "weight_decay": 0.0}
    assert split_vector_params(decay) == [decay]
    assert split_vector_params(no_decay) == [no_decay | {"norm_factor": "bias_rms", "backend": "identity"}]
    mixed = {"params": list(model.parameters()), "weight_decay": 0.1, "lr": 0.5}
    mats, vecs = split_vector_params(mixed)
    assert all(p.dim() == 2 for p in mats["params"]) and all(p.dim() == 1 for p in vecs["params"])
    assert len(mats["params"]) + len(vecs["params"]) == len(mixed["params"])
    assert vecs["norm_factor"] == "bias_rms" and vecs["backend"] == "identity" and vecs["weight_decay"] == 0.1
    assert "norm_factor" not in mats and mats["lr"] == 0.5
    named = {"params": list(model.named_parameters()), "param_names": [n for n, _ in model.named_parameters()]}
    mats, vecs = split_vector_params(named, {"algorithm": "adamw"})
    assert vecs["algorithm"] == "adamw" and all(n.endswith("norm.weight") for n in vecs["param_names"])
    assert [n for n, _ in vecs["params"]] == vecs["param_names"]
    explicit = {"params": list(model.parameters()), "norm_factor": "sign"}
    assert split_vector_params(explicit) == [explicit]
    (once,) = split_vector_params({"params": (p for n, p in model.named_parameters() if "norm" not in n)})
    assert len(once["params"]) == len(decay["params"])  # a generator is read once, into a list


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
    assert lines[0].split() == ["group", "name", "shape", "algorithm", "norm_factor", "backend", "lr", "note"]
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


def test_init_follows_the_routed_orientation():
    from disco.init import init_param_groups_, scaled_orthogonal_, scion_normal_

    model = GPT2Like()
    with pytest.warns(UserWarning, match="tied"):
        groups, _ = create_disco_param_groups(model, {})
    embed_before = model.wte.weight.detach().clone()
    done = init_param_groups_(groups, "spectral", generator=torch.Generator().manual_seed(0))
    assert sorted(done) == ["c_attn.weight", "c_proj.weight", "lin.weight"]  # hidden matrices only
    assert torch.equal(model.wte.weight, embed_before)  # the tied embedding / head keeps its own init
    for w, fan_out, fan_in in ((model.c_attn.weight, 3 * DIM, DIM), (model.c_proj.weight, DIM, 4 * DIM)):
        s = torch.linalg.svdvals(w.double())
        assert torch.allclose(s, torch.full_like(s, (fan_out / fan_in) ** 0.5), atol=1e-5), (fan_out, fan_in)
    s = torch.linalg.svdvals(model.lin.weight.double())
    assert torch.allclose(s, torch.full_like(s, 2**0.5), atol=1e-5)  # nn.Linear(16, 32): sqrt(32/16)
    # stored transposed == the transpose of the nn.Linear init with the same generator state
    for fn, kw in ((scaled_orthogonal_, {}), (scion_normal_, {"kind": "hidden"}), (scion_normal_, {"kind": "input"})):
        linear = torch.empty(3 * DIM, DIM)
        conv1d = torch.empty(DIM, 3 * DIM)
        fn(linear, generator=torch.Generator().manual_seed(1), **kw)
        fn(conv1d, generator=torch.Generator().manual_seed(1), transposed=True, **kw)
        assert torch.equal(conv1d, linear.mT), (fn.__name__, kw)
    experts = torch.empty(2, DIM, 3 * DIM)  # a stack of transposed expert matrices
    scaled_orthogonal_(experts, transposed=True)
    s = torch.linalg.svdvals(experts.double())
    assert torch.allclose(s, torch.full_like(s, 3**0.5), atol=1e-5)
    with pytest.raises(ValueError, match="transposed=True needs a matrix"):
        scaled_orthogonal_(torch.empty(2, 3, 4, 5), transposed=True)


def test_routing_knows_every_algorithm_the_optimizers_serve():
    import disco  # noqa: F401  (registers every rule)
    from disco.groups import ALGORITHMS
    from disco.optim.contract import RULES

    assert set(ALGORITHMS) == set(RULES)
