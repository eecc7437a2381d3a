"""The rule contract (``disco.optim.contract``): settings typed and checked when a group is added, capabilities
declared by each rule and refused where missing, counters in optimizer state, no process-wide state touched,
and a rule added by a test alone (no other module edited)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

import disco
from disco import Dion, Dion2, Disco, Muon, NorMuon, Scion
from disco.distributed.engine import local_piece
from disco.groups import create_disco_param_groups, vector_algorithms
from disco.optim.contract import RULES, Rule, Settings, check_range, register_rule, unregister_rule
from disco.optim.dion import DionRule

torch.set_num_threads(1)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 6))


def split(model: nn.Module, **matrix_keys):
    named = list(model.named_parameters())
    mats = [(n, p) for n, p in named if p.dim() >= 2]
    vecs = [(n, p) for n, p in named if p.dim() < 2]
    return [
        {"params": [p for _, p in mats], "param_names": [n for n, _ in mats], **matrix_keys},
        {"params": [p for _, p in vecs], "param_names": [n for n, _ in vecs], "algorithm": "adamw"},
    ]


def train(opt, model: nn.Module, steps: int = 3) -> None:
    for step in range(steps):
        x = torch.randn(8, 12, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


# ---- settings: refused at construction, with the message that finds the mistake ---------------------------------
@pytest.mark.parametrize(
    ("cls", "group", "key", "hint"),
    [
        (Disco, {"momentun": 0.9}, "momentun", "momentum"),
        (Muon, {"ns_step": 3}, "ns_step", None),
        (Scion, {"weight_decy": 0.1}, "weight_decy", "weight_decay"),
        (Dion, {"rank_fractoin": 0.5}, "rank_fractoin", "rank_fraction"),
        (Dion2, {"fractio": 0.5}, "fractio", "fraction"),
        (NorMuon, {"beta_2": 0.9}, "beta_2", "beta2"),
    ],
)
def test_unknown_key_is_refused(cls, group, key, hint):
    W = nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError) as info:
        cls([{"params": [W], "param_names": ["layer.weight"], **group}])
    text = str(info.value)
    assert "group 0" in text and "'layer.weight' (shape (8, 6))" in text and f"key {key!r}" in text
    assert "it accepts [" in text and "'lr'" in text
    if hint:
        assert f"did you mean {hint!r}" in text


def test_keys_of_another_rule_are_refused_in_an_elementwise_group():
    W, b = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match="key 'momentum' is not a setting of algorithm 'adamw'"):
        Muon([{"params": [W]}, {"params": [b], "algorithm": "adamw", "momentum": 0.9}])
    Muon([{"params": [W]}, {"params": [b], "algorithm": "adamw"}])  # the optimizer's own defaults are not refused


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda p: Muon(p, lr="0.02"), TypeError, r"^Muon: lr='0.02' has type str; it must be a number \(a float"),
        (lambda p: Muon(p, lr=torch.tensor([0.1, 0.2])), ValueError, r"Tensor lr must be 1-element, .* shape \(2,\)"),
        (lambda p: Muon(p, lr=-1.0), ValueError, r"^Muon: Invalid lr value: -1.0; lr must be .* in \[0, inf\)"),
        (lambda p: Muon(p, momentum=1.0), ValueError, r"Invalid momentum value: 1.0; momentum must .* in \[0, 1\)"),
        (lambda p: Muon(p, ns_coefficients=(1.0, 2.0)), ValueError, r"an \(a, b, c\) triple"),
        (lambda p: Muon(p, nesterov=1), TypeError, "nesterov=1 has type int; it must be bool"),
        (lambda p: Dion2(p, ns_steps=0), ValueError, "Invalid backend_steps value: 0"),
        (lambda p: Dion2(p, ns_steps=-1), ValueError, "Invalid backend_steps value: -1"),
        (lambda p: Dion(p, power_iters=0), ValueError, "power_iters=0 must be an int >= 1"),
        (lambda p: Dion(p, qr_method="lu"), ValueError, "qr_method='lu' is invalid"),
        (lambda p: Disco(p, backend="magic"), ValueError, "unknown backend 'magic'"),
        # arguments for the optimizer's AdamW groups are checked at construction too, groups or not
        (lambda p: Dion(p, betas=(0.9, 1.0)), ValueError, r"^Dion: Invalid beta parameter at index 1: 1.0"),
        (lambda p: Dion2(p, adam_eps=-1.0), ValueError, r"^Dion2: Invalid adam_eps value: -1.0"),
        (lambda p: Disco(p, nonfinite="ignore"), ValueError, "nonfinite='ignore' is invalid"),
    ],
)
def test_values_checked_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make([nn.Parameter(torch.randn(8, 6))])


def test_a_dion_group_in_muon_reads_dions_defaults():
    """The issue's example: ``algorithm="dion"`` in a Muon group failed on ``power_iters=None``, a key never set."""
    model = mlp()
    opt = Muon(split(model, algorithm="dion"), lr=0.02)
    train(opt, model, 2)
    W = model[0].weight
    assert set(opt.state[W]) == {"momentum_buffer", "Q", "step"} and float(opt.state[W]["step"]) == 2


def test_torch_muon_group_keys():
    W = nn.Parameter(torch.randn(8, 6))
    opt = Muon([{"params": [W], "ns_steps": 3, "ns_coefficients": [3.0, -3.0, 1.0], "adjust_lr_fn": "match_rms_adamw"}])
    s = opt._items()[0].settings
    assert (s.backend_steps, s.coefficients, s.norm_factor) == (3, (3.0, -3.0, 1.0), "match_rms_adamw")


# ---- capabilities --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Dion, Dion2])
def test_weight_constraint_refused_where_not_supported(cls):
    with pytest.raises(ValueError, match=r"weight_constraint='stiefel' is not supported by algorithm 'dion2?'"):
        cls([{"params": [nn.Parameter(torch.randn(8, 6))], "weight_constraint": "stiefel"}])


@pytest.mark.parametrize("algorithm", sorted(RULES))
def test_every_rules_capabilities_are_honoured_or_refused(algorithm):
    """For every registered rule: each capability it declares works, each it lacks is refused at construction."""
    cls = RULES[algorithm]
    W = nn.Parameter(torch.randn(8, 6))

    def build(**keys):
        return Disco([{"params": [W], "param_names": ["w"], "algorithm": algorithm, **keys}])

    for constraint in ("spectral_clip", "stiefel", "hyperball"):
        if constraint in cls.weight_constraints:
            build(weight_constraint=constraint)
        else:
            with pytest.raises(ValueError, match="is not supported by algorithm"):
                build(weight_constraint=constraint)
    if cls.streams:
        build(commit="streaming")
    else:
        with pytest.raises(ValueError, match="commit='streaming' is not available"):
            build(commit="streaming")
    if "transposed" in cls.views:
        build(transposed=True)
    else:
        with pytest.raises(ValueError, match="transposed=True"):
            build(transposed=True)


def test_stiefel_constraint_holds_where_declared():
    model = mlp()
    opt = Muon(split(model, weight_constraint="stiefel"), lr=0.05, compute_dtype=torch.float32)
    train(opt, model, 2)
    sv = torch.linalg.svdvals(model[2].weight.detach().double())
    torch.testing.assert_close(sv, torch.ones_like(sv), rtol=0, atol=1e-4)


def _overlapped(algorithm: str, overlap: bool):
    model = mlp(1)
    opt = Disco(split(model, algorithm=algorithm), lr=0.02, compute_dtype=torch.float32)
    if overlap:
        opt.overlap_with_backward()
    train(opt, model, 3)
    return model, opt


@pytest.mark.parametrize("algorithm", sorted(a for a, c in RULES.items() if c.runs_ahead))
def test_overlap_equals_the_plain_step_for_every_rule_that_runs_ahead(algorithm):
    want, _ = _overlapped(algorithm, False)
    got, opt = _overlapped(algorithm, True)
    assert opt.overlap is not None and opt.overlap.committed == 3 and opt.overlap.recomputed == 0
    for (n, a), b in zip(got.named_parameters(), want.parameters()):
        assert torch.equal(a, b), n


# ---- counters live in state ----------------------------------------------------------------------------------------
def test_dion_step_counts_each_parameters_steps_and_survives_checkpoints(tmp_path):
    model = mlp()
    opt = Dion(split(model), lr=0.02, qr_method="cqr", cqr_warmup_steps=2)
    mats = [p for p in model.parameters() if p.dim() >= 2]
    settings = opt._items()[0].settings
    assert DionRule._spec(settings, opt.state[mats[0]]).method == "qr"
    train(opt, model, 2)
    assert [float(opt.state[p]["step"]) for p in mats] == [2.0, 2.0, 2.0]  # not 2 x 3 (one per parameter)
    assert DionRule._spec(settings, opt.state[mats[0]]).method == "cqr"  # warm-up over after 2 steps, not 1
    assert "dion_step" not in opt.param_groups[0]

    again = Dion(split(mlp()), lr=0.02, qr_method="cqr", cqr_warmup_steps=2)
    again.load_state_dict(opt.state_dict())
    assert [float(again.state[p]["step"]) for p in again.param_groups[0]["params"]] == [2.0, 2.0, 2.0]

    sd = opt.state_dict()
    dcp.save({"optim": sd}, checkpoint_id=str(tmp_path))
    third = Dion(split(mlp()), lr=0.02, qr_method="cqr", cqr_warmup_steps=2)
    target = {"optim": third.state_dict()}
    dcp.load(target, checkpoint_id=str(tmp_path))
    third.load_state_dict(target["optim"])
    assert [float(third.state[p]["step"]) for p in third.param_groups[0]["params"]] == [2.0, 2.0, 2.0]


# ---- no process-wide state -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["highest", "medium"])
@pytest.mark.parametrize("cls", [Disco, Muon, Scion, NorMuon, Dion, Dion2])
def test_a_step_leaves_torch_global_state_alone(cls, precision):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)  # what an AMX CPU makes of fp32 matmuls
    try:
        model = mlp()
        opt = cls(split(model), lr=0.01)
        dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
        seen = []
        opt.engine.stats.observers.append(lambda spec, X: seen.append(torch.get_float32_matmul_precision()))
        train(opt, model, 2)
        assert torch.get_float32_matmul_precision() == precision
        assert set(seen) <= {precision}
        assert (torch.get_default_dtype(), torch.get_num_threads()) == (dtype, threads)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        torch.set_float32_matmul_precision(previous)


# ---- a rule added by a test alone ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ToySettings(Settings):
    """``W <- W - lr * gain * mean_over_replicas(G) / ||G||_F`` (whole-tensor norm through the engine)."""

    gain: float = 1.0

    def check(self, at: str) -> None:
        super().check(at)
        check_range(self, "gain", at, lo=0.0)


class ToyRule(Rule):
    algorithms = ("toy_normalized_sgd",)
    settings = ToySettings

    def compute(self, items, ctx):
        grads = [ctx.grad_of(it.param) for it in items]
        sums = [g.double().pow(2).sum().reshape(1) for g in grads]
        ctx.engine.all_reduce(sums, [ctx.engine.layout(it.index) for it in items], over="shards", op="sum")

        def commit() -> list[Tensor]:
            out = []
            for it, g, s in zip(items, grads, sums):
                update = g / math.sqrt(float(s))
                local_piece(it.param).add_(update, alpha=-it.settings.lr * it.settings.gain)
                out.append(update)
            return out

        return commit


def test_a_toy_rule_registered_in_a_test():
    register_rule(ToyRule)
    try:
        W = nn.Parameter(torch.randn(8, 6))
        W0, G = W.detach().clone(), torch.randn(8, 6)
        opt = Disco([{"params": [W], "algorithm": "toy_normalized_sgd", "gain": 2.0, "lr": 0.1}])
        W.grad = G.clone()
        opt.step()
        torch.testing.assert_close(W.detach(), W0 - 0.1 * 2.0 * G / G.norm(), rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="did you mean 'gain'"):
            Disco([{"params": [nn.Parameter(torch.randn(4, 4))], "algorithm": "toy_normalized_sgd", "gian": 1.0}])
        with pytest.raises(ValueError, match=r"Invalid gain value: -1.0; gain must be a finite number in \[0, inf\)"):
            Disco([{"params": [nn.Parameter(torch.randn(4, 4))], "algorithm": "toy_normalized_sgd", "gain": -1.0}])
        with pytest.raises(ValueError, match="cannot compute ahead in backward"):
            opt.overlap_with_backward()  # it declares no runs_ahead: refused, not skipped
        with pytest.raises(ValueError, match="is already served"):
            register_rule(type("Other", (ToyRule,), {}))
        # routing reads the registry: the toy's name and setting are valid in a split rule, and it is element-wise
        # for vector_algorithm only if it declares that it exchanges nothing (it does exchange)
        groups, _ = create_disco_param_groups(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4)), _TOY_ROUTE)
        assert [g["gain"] for g in groups if g.get("algorithm") == "toy_normalized_sgd"] == [3.0]
        Disco(groups)
        assert "toy_normalized_sgd" not in vector_algorithms()
    finally:
        unregister_rule(ToyRule)
    assert "toy_normalized_sgd" not in RULES
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['gain'\]"):
        create_disco_param_groups(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4)), _TOY_ROUTE)


_TOY_ROUTE = {
    "extra_param_group_split_rules": [{"str_match": r"^0\.weight$", "algorithm": "toy_normalized_sgd", "gain": 3.0}]
}


def test_the_public_optimizers_are_registered_rules():
    assert {"disco", "muon", "scion", "normuon", "dion", "dion2", "adamw", "lion", "sign"} <= set(RULES)
    assert disco.Disco is Disco
