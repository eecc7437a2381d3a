"""disco.groups as three steps: classify parameters into roles, route through typed split rules, explain."""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest
import torch
from torch import nn

import disco
from disco.groups import (
    GROUP_SETTINGS,
    ClassifiedParam,
    Role,
    SplitRule,
    classify_parameters,
    compile_split_rules,
    create_disco_param_groups,
    route_parameters,
    routing_table,
)

VOCAB, DIM, EXPERTS = 40, 16, 4


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``, re-declared: ``weight`` is stored ``nx x nf`` (in x out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


class Experts(nn.Module):
    """A mixture-of-experts layer: a 3-D stack of expert matrices; each token goes to its top expert, gated."""

    def __init__(self, d: int, n_experts: int):
        super().__init__()
        self.router = nn.Linear(d, n_experts, bias=False)
        self.w = nn.Parameter(torch.randn(n_experts, d, d) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.router(x).softmax(-1)
        chosen = gate.argmax(-1)
        return torch.einsum("...i,...oi->...o", x, self.w[chosen]) * gate.gather(-1, chosen[..., None])


class EveryRole(nn.Module):
    """A small language model holding one parameter of every role: a tied embedding / head, a transposed
    ``Conv1D``, a convolution, an expert stack, a hidden ``nn.Linear``, norm gains and biases."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(8, DIM)  # an embedding of its own (not tied)
        self.conv = nn.Conv1d(DIM, DIM, 3, padding=1)
        self.c_attn = Conv1D(DIM, DIM)
        self.moe = Experts(DIM, EXPERTS)
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.wte(tokens) + self.pos(torch.arange(tokens.shape[-1]))
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.c_attn(h)
        h = h + self.moe(h)
        return self.lm_head(self.norm(h))


EXPECTED_ROLES = {
    "wte.weight": Role.OUTPUT,  # tied to lm_head: the head's role
    "pos.weight": Role.EMBEDDING,
    "conv.weight": Role.CONV,
    "conv.bias": Role.VECTOR,
    "c_attn.weight": Role.HIDDEN,
    "c_attn.bias": Role.VECTOR,
    "moe.w": Role.EXPERTS,  # a module's own parameters come before its children's
    "moe.router.weight": Role.HIDDEN,
    "norm.weight": Role.VECTOR,
    "norm.bias": Role.VECTOR,
}


def test_the_model_trains():
    """EveryRole is a real model: one step of Disco over its routed groups changes every parameter."""
    torch.manual_seed(0)
    model = EveryRole()
    with pytest.warns(UserWarning, match="tied"):
        groups, cleaned = create_disco_param_groups(model, {"lr": 0.01})
    opt = disco.Disco(groups, **cleaned)
    tokens = torch.randint(0, VOCAB, (2, 8))
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        assert p.grad is not None
        if p.grad.any():  # an expert no token chose has no gradient, hence no update
            assert not torch.equal(before[name], p), name


def test_classify_gives_every_parameter_its_role():
    model = EveryRole()
    classified = classify_parameters(model)
    assert all(isinstance(c, ClassifiedParam) for c in classified)
    by_name = {c.name: c for c in classified}
    assert list(by_name) == list(EXPECTED_ROLES)  # model order, the tied weight once under its first name
    assert {name: c.role for name, c in by_name.items()} == EXPECTED_ROLES
    tied = by_name["wte.weight"]
    assert tied.aliases == ("wte.weight", "lm_head.weight") and tied.tied_with == ["lm_head.weight"]
    assert tied.is_embedding and not tied.guessed
    assert [n for n, c in by_name.items() if c.tied_with] == ["wte.weight"]
    # only the Conv1D's 2-D weight is stored in x out; its bias and nn.Linear / the expert stack are not
    assert [n for n, c in by_name.items() if c.transposed] == ["c_attn.weight"]
    assert by_name["moe.w"].param is model.moe.w and by_name["wte.weight"].param is model.lm_head.weight
    assert not any(c.guessed for c in classified)


def test_classify_marks_guesses_and_reads_the_whole_model():
    class Unnamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, DIM)
            self.proj = nn.Linear(DIM, VOCAB)  # no head by name: the last Linear with out_features == VOCAB
            self.raw = nn.Parameter(torch.randn(2, 3, 2, 2))  # 4-D, no conv module

    model = Unnamed()
    by_name = {c.name: c for c in classify_parameters(model)}
    assert by_name["proj.weight"].role is Role.OUTPUT and by_name["proj.weight"].guessed
    assert by_name["raw"].role is Role.CONV and by_name["raw"].guessed
    assert by_name["emb.weight"].role is Role.EMBEDDING and not by_name["emb.weight"].guessed
    # naming the head removes the guess; `only` classifies a subset with the whole model as context
    by_name = {c.name: c for c in classify_parameters(model, name_of_output="proj", only={"proj.weight"})}
    assert list(by_name) == ["proj.weight"] and by_name["proj.weight"].role is Role.OUTPUT
    assert not by_name["proj.weight"].guessed
    model.emb.requires_grad_(False)  # frozen parameters are not classified
    assert "emb.weight" not in {c.name for c in classify_parameters(model)}


def test_route_maps_roles_to_their_groups():
    classified = classify_parameters(EveryRole())
    groups, notes = route_parameters(classified, [])
    settings = {
        n: {k: v for k, v in g.items() if k not in ("params", "param_names")} for g in groups for n in g["param_names"]
    }
    assert settings["wte.weight"] == {
        "norm_factor": "unembed_sqrt",
        "backend": "identity",
        "tied_with": ["lm_head.weight"],
    }
    assert settings["pos.weight"] == {"norm_factor": "embed_sqrt", "backend": "identity"}
    assert settings["conv.weight"] == {"norm_factor": "conv_spectral"}
    assert settings["c_attn.weight"] == {"transposed": True}
    assert settings["moe.w"] == settings["moe.router.weight"] == {}  # hidden matrices and expert stacks: defaults
    assert settings["norm.weight"] == {"norm_factor": "bias_rms", "backend": "identity"}
    assert notes.tied == ["wte.weight = lm_head.weight -> the output head (tied to an embedding)"]
    assert notes.heads_by_shape == notes.convs_by_dims == notes.unmatched_rules == []
    # the same groups, with the same warnings, as the public composition
    with pytest.warns(UserWarning, match="tied weights") as caught:
        public, _ = create_disco_param_groups(EveryRole(), {})
    assert len(caught) == 1
    assert [g["param_names"] for g in public] == [g["param_names"] for g in groups]


def test_split_rules_from_dicts_are_typed_and_frozen():
    seed = [
        {"str_match": "pos.weight", "lr": 1e-2, "norm_factor": "embed_sqrt", "backend": "identity"},
        {"str_match": "lm_head.weight", "lr": 1e-2, "norm_factor": "unembed_sqrt", "backend": "identity"},
    ]
    rules = compile_split_rules(seed)
    assert [r.str_match for r in rules] == ["pos.weight", "lm_head.weight"]
    assert dict(rules[0].overrides) == {"lr": 1e-2, "norm_factor": "embed_sqrt", "backend": "identity"}
    assert rules[1].where == "extra_param_group_split_rules[1] (str_match='lm_head.weight')"
    assert rules[1].matches(["wte.weight", "lm_head.weight"]) and not rules[1].matches(["pos.weight"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules[0].str_match = "other"  # type: ignore[misc]  # assigning a frozen field is the point of the test
    with pytest.raises(TypeError):
        rules[0].overrides["lr"] = 1.0  # type: ignore[index]  # the overrides are a read-only view
    seed[0]["lr"] = 5.0  # the caller's dict stays the caller's
    assert rules[0].overrides["lr"] == 1e-2
    # a SplitRule in the list routes exactly like its dict
    as_objects = [SplitRule("pos.weight", {"lr": 1e-2, "norm_factor": "embed_sqrt", "backend": "identity"}), seed[1]]
    seed[0]["lr"] = 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_dicts, _ = create_disco_param_groups(EveryRole(), {"extra_param_group_split_rules": seed})
        by_objects, _ = create_disco_param_groups(EveryRole(), {"extra_param_group_split_rules": as_objects})
    assert [{k: v for k, v in g.items() if k != "params"} for g in by_dicts] == [
        {k: v for k, v in g.items() if k != "params"} for g in by_objects
    ]
    assert SplitRule("a", {"lr": 1.0}) == SplitRule("a", {"lr": 1.0}, label="elsewhere")
    assert hash(SplitRule("a", {"lr": 1.0})) == hash(SplitRule("a", {"lr": 2.0}))  # hashable despite a dict


@pytest.mark.parametrize(
    ("rule", "error", "message"),
    [
        ({"str_match": "wte", "lrr": 1.0}, ValueError, r"unknown setting\(s\) \['lrr'\].*a rule may set: .*lr"),
        ({"str_match": "wte", "vector_algorithm": "adamw"}, ValueError, r"unknown setting\(s\) \['vector_algorithm'\]"),
        (
            {"str_match": "wte", "tied_with": ["x"]},
            ValueError,
            "a rule may not set 'params', 'param_names' or 'tied_with'",
        ),
        ({"str_match": "wte", 3: 1.0}, TypeError, r"setting names are strings, got 3"),
        ({"str_match": "wte", "lr": "fast"}, TypeError, r"'lr' must be a number, got 'fast'"),
        ({"str_match": "wte", "weight_decay": True}, TypeError, r"'weight_decay' must be a number, got True"),
        ({"str_match": "wte", "norm_factor": 5}, TypeError, r"'norm_factor' must be a name \(a string\), got 5"),
        ({"str_match": "wte", "algorithm": ["adamw"]}, TypeError, r"'algorithm' must be a name"),
        ({"str_match": "wte", "transposed": "yes"}, ValueError, "'transposed' must be True or False"),
        ({"str_match": 7}, TypeError, "'str_match' must be a regex string, got int"),
    ],
)
def test_invalid_split_rules_name_the_rule(rule, error, message):
    rules = [{"str_match": "pos", "lr": 0.1}, rule]
    where = re.escape(f"extra_param_group_split_rules[1] (str_match={rule['str_match']!r}): ")
    with pytest.raises(error, match=where + message):
        create_disco_param_groups(EveryRole(), {"extra_param_group_split_rules": rules})


def test_valid_number_settings_pass():
    rule = SplitRule("moe", {"lr": torch.tensor(0.02), "weight_decay": 0, "momentum": None, "betas": (0.9, 0.95)})
    assert rule.where == "SplitRule(str_match='moe')"
    with pytest.raises(TypeError, match=r"SplitRule\(str_match='moe'\): overrides must be a mapping"):
        SplitRule("moe", [("lr", 1.0)])  # type: ignore[arg-type]  # a list of pairs is refused, not converted


def test_group_settings_cover_every_optimizers_groups():
    """A rule may set any key that an optimizer of disco.optim fills into its groups or a registered rule reads."""
    from disco.optim import contract

    for optimizer_type in (disco.Disco, disco.Muon, disco.Scion, disco.Dion, disco.Dion2, disco.NorMuon):
        opt = optimizer_type([nn.Parameter(torch.randn(8, 4))], lr=0.01)
        settings = set(opt.param_groups[0]) - {"params", "param_names"}
        assert settings <= GROUP_SETTINGS, (optimizer_type.__name__, sorted(settings - GROUP_SETTINGS))
        SplitRule("x", {k: v for k, v in opt.param_groups[0].items() if k in settings})  # accepted as is
    for algorithm in contract.algorithms_where(lambda rule: True):
        read = set(contract.rule_class(algorithm).settings_for(algorithm).keys())
        assert read <= GROUP_SETTINGS, (algorithm, sorted(read - GROUP_SETTINGS))


def test_explain_shows_every_role():
    model = EveryRole()
    with pytest.warns(UserWarning, match="tied"):
        groups, cleaned = create_disco_param_groups(model, {"norm_factor": "spectral"})
    rows = {line.split()[1]: line for line in routing_table(groups, cleaned).splitlines()[2:-1]}
    shape = {n: "x".join(map(str, p.shape)) for n, p in model.named_parameters()}
    shown = {  # what the table's row says about a parameter of each role
        Role.OUTPUT: "unembed_sqrt",
        Role.EMBEDDING: "embed_sqrt",
        Role.CONV: "conv_spectral",
        Role.HIDDEN: "spectral",
        Role.EXPERTS: "spectral",
        Role.VECTOR: "bias_rms",
    }
    for c in classify_parameters(model):
        cells = rows[c.name].split()
        assert cells[2] == shape[c.name] and cells[4] == shown[c.role], (c.name, rows[c.name])
        assert rows[c.name].endswith("stored in x out (transposed)") == c.transposed, c.name
        assert ("tied: lm_head.weight" in rows[c.name]) == bool(c.tied_with), c.name
    assert rows["moe.w"].split()[2] == f"{EXPERTS}x{DIM}x{DIM}"  # an expert stack shows its three dims
    assert set(rows) == set(EXPECTED_ROLES)


@pytest.mark.parametrize(
    "rules, error, message",
    [
        (
            5,
            TypeError,
            r"must be a rule \(a dict with a 'str_match' regex\), a list of rules or their JSON string, got 5",
        ),
        ('[{"str_match": "x"', ValueError, "is a string but not valid JSON"),
        ({1, 2}, TypeError, "got {1, 2} \\(set\\)"),
    ],
)
def test_split_rules_of_the_wrong_shape_are_named(rules, error, message):
    with pytest.raises(error, match=message):
        compile_split_rules(rules)
