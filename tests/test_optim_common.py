"""What every optimizer shares: training, state from construction on, state_dict round trips, misuse errors,
norm tracking, element-wise groups (AdamW parity with torch)."""

from __future__ import annotations

import copy

import pytest
import torch

from disco import Disco, Muon, Scion

torch.set_num_threads(1)

NAMES = ["layers.0.attention.wq", "layers.0.bias", "layers.1.feed_forward.w1", "layers.1.bias", "output"]


def make_model(seed=0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(32, 16), (32,), (32, 32), (32,), (4, 32)]
    return [torch.nn.Parameter(torch.randn(*s, generator=gen) / (s[-1] ** 0.5 if len(s) == 2 else 10)) for s in shapes]


def forward(ps, x):
    W1, b1, W2, b2, W3 = ps
    return torch.tanh(torch.tanh(x @ W1.T + b1) @ W2.T + b2) @ W3.T


_GEN = torch.Generator().manual_seed(123)
X = torch.randn(64, 16, generator=_GEN)
with torch.no_grad():
    Y = forward(make_model(seed=99), X) * 3


def loss_of(ps):
    return (forward(ps, X) - Y).pow(2).mean()


def groups(ps, vector_group):
    return [
        {"params": [ps[0], ps[2], ps[4]], "param_names": [NAMES[0], NAMES[2], NAMES[4]]},
        {"params": [ps[1], ps[3]], "param_names": [NAMES[1], NAMES[3]], **vector_group},
    ]


# name -> factory(params) for every optimizer and every kind of group inside it
FACTORIES = {
    "disco": lambda ps: Disco(groups(ps, {"norm_factor": "bias_rms"}), lr=0.02, momentum=0.9),
    "disco+adamw": lambda ps: Disco(groups(ps, {"algorithm": "adamw", "lr": 3e-3}), lr=0.02, momentum=0.9),
    "disco+lion": lambda ps: Disco(groups(ps, {"algorithm": "lion", "lr": 1e-3}), lr=0.02, momentum=0.9),
    "disco+sign": lambda ps: Disco(groups(ps, {"algorithm": "sign", "lr": 1e-3}), lr=0.02, momentum=0.9),
    "muon+adamw": lambda ps: Muon(groups(ps, {"algorithm": "adamw", "lr": 3e-3}), lr=0.02, weight_decay=0.01),
    "muon+lion": lambda ps: Muon(groups(ps, {"algorithm": "lion", "lr": 1e-3}), lr=0.02),
    "scion": lambda ps: Scion(groups(ps, {"norm_factor": "bias_rms"}), lr=0.02, constrained=False),
    "scion-constrained": lambda ps: Scion(groups(ps, {"norm_factor": "sign"}), lr=0.01, spectral_radius=10.0),
}


def run(opt, ps, steps, seed=7):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(ps)
        loss.backward()
        for p in ps:  # a little gradient noise, seeded: the same for every run with this seed
            p.grad.add_(torch.randn(p.shape, generator=gen), alpha=1e-4)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(FACTORIES))
def test_trains(name):
    ps = make_model()
    opt = FACTORIES[name](ps)
    losses = run(opt, ps, 40)
    assert losses[-1] < 0.3 * losses[0], losses[::8]  # measured 0.02-0.14 of the first loss
    for p, p0, n in zip(ps, make_model(), NAMES):
        assert (p - p0).abs().max() > 1e-3, f"{n} did not move"


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_exists_from_construction(name):
    ps = make_model()
    opt = FACTORIES[name](ps)
    for p in ps:
        assert opt.state[p], f"no state for a parameter of shape {tuple(p.shape)}"
        for t in opt.state[p].values():
            assert isinstance(t, torch.Tensor)
    before = {k: len(v) for k, v in opt.state_dict()["state"].items()}
    assert sorted(before) == list(range(len(ps)))
    run(opt, ps, 1)
    assert {k: len(v) for k, v in opt.state_dict()["state"].items()} == before  # a step adds no keys


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_round_trip(name):
    ps = make_model()
    opt = FACTORIES[name](ps)
    run(opt, ps, 3)
    saved_params = [p.detach().clone() for p in ps]
    saved = copy.deepcopy(opt.state_dict())
    run(opt, ps, 2, seed=11)

    fresh = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = FACTORIES[name](fresh)
    opt2.load_state_dict(saved)
    run(opt2, fresh, 2, seed=11)
    for a, b in zip(ps, fresh):
        assert torch.equal(a, b)

    # and without loading, the next steps differ (the state matters)
    other = [torch.nn.Parameter(p.clone()) for p in saved_params]
    run(FACTORIES[name](other), other, 2, seed=11)
    assert any(not torch.equal(a, b) for a, b in zip(ps, other))


def test_named_parameters_accepted():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    named = list(model.named_parameters())
    opt = Muon(
        [
            {"params": [(n, p) for n, p in named if p.ndim == 2]},
            {"params": [(n, p) for n, p in named if p.ndim < 2], "algorithm": "adamw"},
        ]
    )
    assert opt.param_groups[0]["param_names"] == ["0.weight", "2.weight"]
    model(torch.randn(3, 8)).sum().backward()
    opt.calculate_norm_at_next_step()
    opt.step()
    assert "track_update_rms_to_rms/2.weight" in opt.get_norms_at_current_step()


# ---- misuse ----------------------------------------------------------------------------------------------
def _W(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize("cls", [Disco, Muon, Scion])
def test_vector_in_spectral_group(cls):
    with pytest.raises(ValueError, match=r"'layers\.0\.bias'.*\(32,\)"):
        cls([{"params": [_W(8, 4), _W(32)], "param_names": ["layers.0.w", "layers.0.bias"]}])


def test_parameter_in_two_groups():
    W = _W(8, 4)
    with pytest.raises(ValueError, match=r"'second'.*\(8, 4\).*'first'"):
        Disco([{"params": [W], "param_names": ["first"]}, {"params": [W], "param_names": ["second"]}])
    with pytest.raises(ValueError, match=r"\(8, 4\)"):
        Muon([W, W])


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("algorithm", "sgd", ["unknown algorithm", "'sgd'", "adamw"]),
        ("norm_factor", "frobenius", ["norm_factor", "'frobenius'", "spectral"]),
        ("backend", "qr", ["unknown", "backend", "'qr'", "newtonschulz5"]),
    ],
)
def test_unknown_group_settings_name_the_parameter(key, value, words):
    with pytest.raises(ValueError) as info:
        Disco([{"params": [_W(8, 4)], "param_names": ["layers.3.w"], key: value}])
    msg = str(info.value)
    for w in ["'layers.3.w'", "(8, 4)", *words]:
        assert w in msg, (w, msg)


def test_unknown_norm_to_track():
    opt = Disco([_W(8, 4)])
    with pytest.raises(ValueError, match="frobenius_typo"):
        opt.calculate_norm_at_next_step(norms=["supremum", "frobenius_typo"])


# ---- norm tracking ---------------------------------------------------------------------------------------
def test_norm_tracking_arms_exactly_one_step():
    ps = make_model()
    opt = FACTORIES["muon+adamw"](ps)
    run(opt, ps, 1)
    assert opt.get_norms_at_current_step() == {}  # not armed
    opt.calculate_norm_at_next_step()
    run(opt, ps, 1)
    norms = opt.get_norms_at_current_step()
    for name in (NAMES[0], NAMES[2], NAMES[4]):
        for kind in ("update", "param"):
            assert f"track_{kind}_rms_to_rms/{name}" in norms
            assert f"track_{kind}_supremum/{name}" in norms
    for name in (NAMES[1], NAMES[3]):
        assert f"track_update_rms/{name}" in norms and f"track_param_rms/{name}" in norms
    for key, value in norms.items():
        kind_norm, name = key.split("/", 1)
        assert kind_norm.startswith(("track_update_", "track_param_")) and name in NAMES, key
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and torch.isfinite(value), key
    # the values: param norms of the parameters after the step; Muon's update (adjusted lr) of a square matrix
    W2 = ps[2].detach()
    expected = torch.linalg.matrix_norm(W2, ord=2)  # 32 x 32: rms -> rms = spectral
    torch.testing.assert_close(norms[f"track_param_rms_to_rms/{NAMES[2]}"], expected, rtol=1e-4, atol=1e-6)
    assert 0.6 < norms[f"track_update_rms_to_rms/{NAMES[2]}"] < 1.25  # Newton-Schulz (keller): sv in [0.68, 1.14]

    run(opt, ps, 1)
    assert opt.get_norms_at_current_step() == {}  # armed for one step only


def test_norm_tracking_override():
    ps = make_model()
    opt = FACTORIES["disco"](ps)
    opt.calculate_norm_at_next_step(norms=["supremum"])
    before = [p.detach().clone() for p in ps]
    run(opt, ps, 1)
    norms = opt.get_norms_at_current_step()
    assert norms and all(k.split("/")[0] in ("track_update_supremum", "track_param_supremum") for k in norms)
    assert len(norms) == 2 * len(ps)
    for name, p, b in zip(NAMES, ps, before):
        torch.testing.assert_close(norms[f"track_param_supremum/{name}"], p.detach().abs().max())
        # update = (before - after) / lr, the LMO direction
        torch.testing.assert_close(
            norms[f"track_update_supremum/{name}"], ((b - p.detach()) / 0.02).abs().max(), rtol=1e-3, atol=1e-4
        )


# ---- element-wise groups -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Disco, Muon])
def test_adamw_groups_match_torch(cls):
    ps, ref = make_model(), make_model()
    kw = {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1}
    ours = cls([{"params": ps, "algorithm": "adamw", **kw}])
    theirs = torch.optim.AdamW(ref, **kw)
    run(ours, ps, 5)
    run(theirs, ref, 5)
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # eps = 1e-3 matters here: with the default 1e-8 the result is far off
    other = make_model()
    run(torch.optim.AdamW(other, **{**kw, "eps": 1e-8}), other, 5)
    assert max((a - b).abs().max().item() for a, b in zip(ps, other)) > 1e-4


def test_groups_added_or_changed_after_construction_are_planned_at_the_next_step():
    from disco import ops

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8, 8))
    opt = Disco([a], lr=0.1, momentum=0.0, compute_dtype=torch.float64)
    opt.add_param_group({"params": [b], "backend": "svd"})
    assert "momentum_buffer" in opt.state[b]  # state exists before any step
    opt.param_groups[0]["norm_factor"] = "original"
    ga, gb = torch.randn(16, 8), torch.randn(8, 8)
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.step()
    want_a = a0 - 0.1 * ops.lmo(ga, norm="original", compute_dtype=torch.float64)
    want_b = b0 - 0.1 * ops.lmo(gb, norm="spectral", backend="svd")
    torch.testing.assert_close(a.detach(), want_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.detach(), want_b, atol=1e-6, rtol=0)
    assert opt.engine.stats.tensors_computed == 2
