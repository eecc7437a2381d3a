"""Optimizer checkpoints (guarantee 7): ``load_state_dict`` checks everything before changing anything.

A table of mismatching state dicts, each refused with a ``ValueError`` that names the culprit, the optimizer
unchanged afterwards; round trips (save, ``torch.load(weights_only=True)``, load, identical continued steps);
``torch.optim.Muon`` -> ``disco.Muon`` drop-in resume; the format header through DCP under FSDP2 on 2 ranks;
DCP loading without unpickling (``WeightsOnlyLoadPlanner`` / ``WeightsOnlyFileSystemReader``).
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
from dist_harness import run_ranks
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from disco import Disco, Muon, Scion
from disco.optim import checkpoint
from disco.optim.checkpoint import FORMAT_KEY, FORMAT_VERSION

torch.set_num_threads(1)

SHAPES = {"a.weight": (8, 6), "b.weight": (6, 8), "c.weight": (6, 6), "b.bias": (6,)}


def make_params(shapes: dict = SHAPES, seed: int = 0) -> dict[str, nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {n: nn.Parameter(torch.randn(s, generator=g) / 4) for n, s in shapes.items()}


def make_opt(params: dict, cls=Disco, vec_algo: str = "adamw", **kw):
    """Matrices in group 0 (the class's algorithm), vectors in group 1 (``vec_algo``)."""
    mats = [(n, p) for n, p in params.items() if p.dim() >= 2]
    vecs = [(n, p) for n, p in params.items() if p.dim() < 2]
    groups = [{"params": [p for _, p in mats], "param_names": [n for n, _ in mats]}]
    if vecs:
        groups.append({"params": [p for _, p in vecs], "param_names": [n for n, _ in vecs], "algorithm": vec_algo})
    if cls is Scion:
        kw.setdefault("lr", 0.05)
    else:
        kw.setdefault("lr", 0.02)
    return cls(groups, **kw)


def train(opt, params: dict, steps: int, seed: int = 100) -> None:
    for s in range(steps):
        g = torch.Generator().manual_seed(seed + s)
        for n in sorted(params):
            params[n].grad = torch.randn(params[n].shape, generator=g).to(params[n].dtype)
        opt.step()


def trained_state_dict(**kw) -> dict:
    params = make_params()
    opt = make_opt(params, **kw)
    train(opt, params, 2)
    return copy.deepcopy(opt.state_dict())


def through_disk(sd: dict) -> dict:
    """``torch.save`` then ``torch.load(weights_only=True)``: what a resumed run reads."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def snapshot(opt) -> tuple[dict, list]:
    state = {
        n: {k: v.clone() for k, v in opt.state[p].items()}
        for g in opt.param_groups
        for n, p in zip(g["param_names"], g["params"])
    }
    groups = [
        {k: ([id(p) for p in v] if k == "params" else copy.deepcopy(v)) for k, v in g.items()} for g in opt.param_groups
    ]
    return state, groups


def assert_unchanged(opt, before: tuple[dict, list], same_params: bool = True) -> None:
    """``opt``'s state and groups equal ``before`` (``same_params=False``: another optimizer's snapshot)."""
    state, groups = snapshot(opt)
    if not same_params:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        before = (before[0], [{k: v for k, v in g.items() if k != "params"} for g in before[1]])
    assert groups == before[1]
    assert state.keys() == before[0].keys()
    for n, entry in before[0].items():
        assert state[n].keys() == entry.keys(), n
        for k, v in entry.items():
            assert torch.equal(state[n][k], v), (n, k)
            assert state[n][k].dtype == v.dtype


# ---- mismatches: each a (target optimizer, state dict) pair and what the message must name ------------------------
def _target(**kw):
    params = make_params()
    opt = make_opt(params, **kw)
    train(opt, params, 1, seed=7)  # non-zero state: "unchanged" means something
    return opt


def _edit(fn: Callable[[dict], None], **kw) -> Callable[[], tuple]:
    def build():
        sd = trained_state_dict(**kw)
        fn(sd)
        return _target(**kw), sd

    return build


def _adamw_into_disco():
    params = make_params()
    adamw = torch.optim.AdamW(params.values(), lr=1e-3)
    train(adamw, params, 2)
    return _target(), adamw.state_dict()


def _torch_muon_into_disco():
    params = {n: p for n, p in make_params().items() if p.dim() == 2}
    tm = torch.optim.Muon(params.values(), lr=0.02)
    train(tm, params, 1)
    target = make_opt(make_params({n: SHAPES[n] for n in params}))
    return target, tm.state_dict()


def _swapped_shapes():
    swapped = {**SHAPES, "a.weight": (6, 8), "b.weight": (8, 6)}
    params = make_params(swapped)
    opt = make_opt(params)
    train(opt, params, 2)
    return _target(), opt.state_dict()


def _other_group_count():
    params = make_params({n: s for n, s in SHAPES.items() if len(s) == 2})
    opt = make_opt(params)
    train(opt, params, 2)
    return _target(), opt.state_dict()


def _reordered():
    params = make_params()
    order = ["c.weight", "a.weight", "b.weight", "b.bias"]
    opt = make_opt({n: params[n] for n in order})
    train(opt, params, 2)
    return _target(), opt.state_dict()


def _fewer_params():
    params = make_params({n: s for n, s in SHAPES.items() if n != "c.weight"})
    opt = make_opt(params)
    train(opt, params, 2)
    return _target(), opt.state_dict()


def _scion_into_disco():
    params = make_params()
    opt = make_opt(params, cls=Scion)
    train(opt, params, 2)
    return _target(), opt.state_dict()


def _heavy_into_light():
    return _target(is_light=True, nesterov=False), trained_state_dict()


def _set(path: tuple, value) -> Callable[[dict], None]:
    def fn(sd: dict) -> None:
        d = sd
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value(d[path[-1]]) if callable(value) else value

    return fn


def _delete(path: tuple) -> Callable[[dict], None]:
    def fn(sd: dict) -> None:
        d = sd
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]

    return fn


# state ids: 0 a.weight, 1 b.weight, 2 c.weight (group 0, disco); 3 b.bias (group 1, adamw)
MISMATCHES = [
    pytest.param(
        _adamw_into_disco, ["does not come from a disco optimizer", "exp_avg_sq"], id="adamw-state-into-disco"
    ),
    pytest.param(_scion_into_disco, ["group 0 (disco)", "'scion'"], id="scion-state-into-disco"),
    pytest.param(_torch_muon_into_disco, ["group 0 (disco)", "Muon groups only"], id="torch-muon-into-disco-group"),
    pytest.param(
        _swapped_shapes, ["'a.weight' (shape (8, 6))", "shape (6, 8)", "momentum_buffer"], id="swapped-shapes"
    ),
    pytest.param(_edit(_delete(("state", 1))), ["'b.weight' (shape (6, 8))", "no state"], id="missing-entry"),
    pytest.param(
        _edit(_set(("state", 2, "momentum_buffer"), torch.zeros(6, 5))),
        ["'c.weight' (shape (6, 6))", "shape (6, 5)", "expected (6, 6)"],
        id="wrong-shape-buffer",
    ),
    pytest.param(
        _edit(_set(("state", 0, "momentum_buffer"), lambda t: t.double())),
        ["'a.weight' (shape (8, 6))", "torch.float64", "expected torch.float32"],
        id="wrong-dtype",
    ),
    pytest.param(
        _edit(_set(("state", 3, "exp_avg"), lambda t: t.bfloat16())),
        ["group 1 (adamw)", "'b.bias' (shape (6,))", "'exp_avg'", "torch.bfloat16"],
        id="wrong-dtype-adamw",
    ),
    pytest.param(_other_group_count, ["1 parameter group", "this optimizer 2"], id="group-count"),
    pytest.param(
        _edit(_set(("param_groups", 0, "param_names", 1), "b.w")),
        ["parameter 1 is 'b.weight' (shape (6, 8))", "'b.w' in the state dict"],
        id="renamed-param",
    ),
    pytest.param(_reordered, ["parameter 0 is 'a.weight' (shape (8, 6))", "'c.weight'", "position 1"], id="reordered"),
    pytest.param(_fewer_params, ["2 parameters, this one 3", "'c.weight' (shape (6, 6))"], id="fewer-params"),
    pytest.param(
        _edit(_delete(("state", 3, "exp_avg_sq"))),
        ["'b.bias' (shape (6,))", "missing ['exp_avg_sq']"],
        id="missing-state-key",
    ),
    pytest.param(
        _edit(_set(("state", 1, "extra_buffer"), torch.zeros(6, 8))),
        ["'b.weight' (shape (6, 8))", "unexpected ['extra_buffer']"],
        id="extra-state-key",
    ),
    pytest.param(
        _edit(_set(("state", 3, "step"), torch.zeros(1))),
        ["'b.bias' (shape (6,))", "'step' must be a scalar", "shape (1,)"],
        id="non-scalar-step",
    ),
    pytest.param(
        _edit(_set(("state", 3, "step"), 2)), ["'b.bias' (shape (6,))", "'step' is a int", "tensor"], id="int-step"
    ),
    pytest.param(
        _edit(lambda sd: [g.update({FORMAT_KEY: FORMAT_VERSION + 1}) for g in sd["param_groups"]]),
        [f"format version {FORMAT_VERSION + 1}", "newer"],
        id="future-format",
    ),
    pytest.param(
        _edit(_set(("param_groups", 1, FORMAT_KEY), "1")), ["group 1", "format version", "invalid"], id="bad-format"
    ),
    pytest.param(
        _edit(_set(("param_groups", 1, "algorithm"), "lion")), ["group 1 (adamw)", "'lion'"], id="other-algorithm"
    ),
    pytest.param(
        _edit(_set(("state", 17), {"momentum_buffer": torch.zeros(3)})), ["no group lists", "17"], id="unlisted-state"
    ),
    pytest.param(
        _edit(_set(("param_groups", 0, "backend"), "nope")),
        ["settings are invalid", "group 0", "'nope'"],
        id="bad-backend",
    ),
    pytest.param(
        _heavy_into_light, ["'a.weight' (shape (8, 6))", "unexpected ['momentum_buffer']"], id="heavy-into-light"
    ),
    pytest.param(lambda: (_target(), {"weights": {}}), ["not an optimizer state dict"], id="not-a-state-dict"),
]


@pytest.mark.parametrize(("build", "names"), MISMATCHES)
def test_mismatch_is_refused_and_changes_nothing(build, names):
    opt, sd = build()
    before = snapshot(opt)
    sd_before = copy.deepcopy(sd)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(sd)
    for part in names:
        assert part in str(info.value), f"{part!r} not in: {info.value}"
    assert_unchanged(opt, before)
    assert repr(sd) == repr(sd_before)  # the state dict given is not modified either


def test_optimizer_still_steps_after_a_refused_load():
    opt, sd = _swapped_shapes()
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    params = {n: p for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}
    train(opt, params, 1)


# ---- round trips ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Disco, Muon, Scion])
def test_round_trip_continues_identically(cls):
    kw = {"compute_dtype": torch.float32}
    params = make_params()
    opt = make_opt(params, cls=cls, **kw)
    train(opt, params, 3)
    sd = through_disk(opt.state_dict())

    copies = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    fresh = make_opt(copies, cls=cls, **kw)
    fresh.load_state_dict(sd)
    assert_unchanged(fresh, snapshot(opt), same_params=False)  # same state and groups right after loading
    train(opt, params, 2, seed=200)
    train(fresh, copies, 2, seed=200)
    for n in params:
        assert torch.equal(params[n], copies[n]), n
    assert_unchanged(fresh, snapshot(opt), same_params=False)


def test_higher_precision_state_keeps_its_dtype():
    """torch's load casts floating state to the parameter's dtype; a float32 momentum of a bf16 parameter (as Dion's
    ``momentum_dtype`` keeps it) must come back float32."""

    def fp32_state(opt):
        for entry in opt.state.values():
            if "momentum_buffer" in entry:
                entry["momentum_buffer"] = entry["momentum_buffer"].float()
        return opt

    params = {n: nn.Parameter(p.detach().bfloat16()) for n, p in make_params().items()}
    opt = fp32_state(make_opt(params))
    train(opt, params, 2)
    sd = through_disk(opt.state_dict())
    fresh = fp32_state(make_opt({n: nn.Parameter(p.detach().clone()) for n, p in params.items()}))
    fresh.load_state_dict(sd)
    assert_unchanged(fresh, snapshot(opt), same_params=False)
    assert fresh.state[fresh.param_groups[0]["params"][0]]["momentum_buffer"].dtype == torch.float32


def test_header_in_every_group_and_not_in_the_optimizer():
    params = make_params()
    opt = make_opt(params)
    sd = opt.state_dict()
    assert [g[FORMAT_KEY] for g in sd["param_groups"]] == [FORMAT_VERSION] * 2
    assert [g["algorithm"] for g in sd["param_groups"]] == ["disco", "adamw"]
    assert [g["param_names"] for g in sd["param_groups"]] == [["a.weight", "b.weight", "c.weight"], ["b.bias"]]
    keys = [sorted(g) for g in opt.param_groups]
    opt.load_state_dict(sd)
    assert [sorted(g) for g in opt.param_groups] == keys
    assert all(FORMAT_KEY not in g for g in opt.param_groups)


def test_loaded_settings_replace_the_optimizers_and_missing_ones_are_kept():
    """An older disco (no header, a group key it did not know yet) loads; its settings win, as in torch."""
    sd = trained_state_dict()
    for g in sd["param_groups"]:
        del g[FORMAT_KEY]
    sd["param_groups"][0]["lr"] = 0.5
    del sd["param_groups"][0]["eps"]
    opt = _target(eps=1e-5)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups[0]["eps"] == 1e-5
    params = {n: p for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}
    train(opt, params, 1)


def test_state_dict_loads_with_weights_only():
    params = make_params()
    opt = make_opt(params, cls=Muon, compute_dtype=torch.bfloat16)
    train(opt, params, 1)
    sd = through_disk(opt.state_dict())
    assert sd["param_groups"][0]["compute_dtype"] is torch.bfloat16
    assert sd["param_groups"][0][FORMAT_KEY] == FORMAT_VERSION


def test_flattened_state_dict_api_loads_and_still_checks():
    """TorchTitan's path, one process: get/set_optimizer_state_dict with ``flatten_optimizer_state_dict=True``.

    DCP's unflatten keeps only the keys the optimizer's groups have, so the header does not reach
    ``load_state_dict`` here (it loads as an unversioned disco state dict); every other check still runs."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    flat = StateDictOptions(flatten_optimizer_state_dict=True)

    def model_and_opt(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 6, bias=False))
        return model, make_opt(dict(model.named_parameters()))

    model, opt = model_and_opt(0)
    train(opt, dict(model.named_parameters()), 2)
    osd = get_optimizer_state_dict(model, opt, options=flat)
    assert osd["param_groups.0.weight." + FORMAT_KEY] == FORMAT_VERSION
    model2, opt2 = model_and_opt(1)
    set_optimizer_state_dict(model2, opt2, osd, options=flat)
    assert_unchanged(opt2, snapshot(opt), same_params=False)

    before = snapshot(opt2)
    bad = {**osd, "state.0.weight.momentum_buffer": torch.zeros(6, 8)}
    with pytest.raises(ValueError, match=r"'0\.weight' \(shape \(8, 6\)\).*shape \(6, 8\)"):
        set_optimizer_state_dict(model2, opt2, bad, options=flat)
    assert_unchanged(opt2, before)


# ---- torch.optim.Muon -> disco.Muon ------------------------------------------------------------------------------
MUON_SHAPES = {"l1.weight": (64, 32), "l2.weight": (32, 64), "l3.weight": (48, 32)}
TORCH_KW = dict(lr=0.02, weight_decay=0.05, momentum=0.9, nesterov=True, ns_steps=5, adjust_lr_fn="match_rms_adamw")
# Measured: max |param difference| after 3 torch steps then 2 steps each: 4.5e-4 (disco in bf16; 3.9e-4 in fp32), on
# parameters of size ~1; without loading the momentum (fresh disco.Muon, same settings) it is 1.6e-2.
MUON_TOL = 2e-3


@pytest.mark.parametrize("named", [False, True])
def test_torch_muon_state_dict_resumes_in_disco_muon(named):
    params = make_params(MUON_SHAPES)
    tm = torch.optim.Muon(list(params.items()) if named else list(params.values()), **TORCH_KW)
    train(tm, params, 3)
    sd = through_disk(tm.state_dict())

    copies = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    dm = Muon(list(copies.items()), compute_dtype=torch.bfloat16)  # torch's defaults: the checkpoint sets the rest
    dm.load_state_dict(sd)
    group = dm.param_groups[0]
    assert group["algorithm"] == "muon"
    assert (group["lr"], group["weight_decay"], group["momentum"], group["nesterov"]) == (0.02, 0.05, 0.9, True)
    assert group["backend_steps"] == 5 and group["coefficients"] == (3.4445, -4.7750, 2.0315)
    assert group["norm_factor"] == "match_rms_adamw" and group["adjust_lr_fn"] == "match_rms_adamw"
    assert group["param_names"] == list(MUON_SHAPES)
    assert "ns_steps" not in group and "ns_coefficients" not in group
    for p, q in zip(params.values(), copies.values()):
        assert torch.equal(dm.state[q]["momentum_buffer"], tm.state[p]["momentum_buffer"])

    train(tm, params, 2, seed=300)
    train(dm, copies, 2, seed=300)
    for n in params:
        torch.testing.assert_close(copies[n], params[n], atol=MUON_TOL, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


def test_torch_muon_without_buffers_yet_starts_from_zero():
    """torch creates a buffer at a parameter's first gradient: a state dict saved before it has none."""
    params = make_params(MUON_SHAPES)
    tm = torch.optim.Muon(list(params.values()), lr=0.01)
    sd = tm.state_dict()
    assert sd["state"] == {}
    dm = Muon(list(make_params(MUON_SHAPES).items()))
    dm.load_state_dict(sd)
    assert dm.param_groups[0]["lr"] == 0.01
    assert all(not dm.state[p]["momentum_buffer"].any() for p in dm.param_groups[0]["params"])


def test_torch_muon_state_dict_with_wrong_shapes_is_refused():
    params = make_params({"x": (32, 64), "y": (64, 32)})
    tm = torch.optim.Muon(list(params.values()))
    train(tm, params, 1)
    dm = Muon(list(make_params({"x": (64, 32), "y": (32, 64)}).items()))
    before = snapshot(dm)
    with pytest.raises(ValueError, match=r"'x' \(shape \(64, 32\)\).*shape \(32, 64\)"):
        dm.load_state_dict(tm.state_dict())
    assert_unchanged(dm, before)


# ---- DCP without unpickling --------------------------------------------------------------------------------------
class _Evil:
    """Unpickling it creates ``marker``: code from the checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _dcp(fn, *args, **kwargs):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return getattr(dcp, fn)(*args, **kwargs)


def _safe_load(state: dict, path: str) -> None:
    _dcp(
        "load",
        state,
        checkpoint_id=path,
        planner=checkpoint.WeightsOnlyLoadPlanner(),
        storage_reader=checkpoint.WeightsOnlyFileSystemReader(path),
    )


def test_weights_only_dcp_load_round_trips(tmp_path):
    params = make_params()
    opt = make_opt(params, cls=Muon, compute_dtype=torch.bfloat16)
    train(opt, params, 2)
    path = str(tmp_path / "ckpt")
    _dcp("save", {"optim": opt.state_dict()}, checkpoint_id=path)
    fresh = make_opt(make_params(seed=1), cls=Muon)
    state = {"optim": fresh.state_dict()}
    _safe_load(state, path)
    fresh.load_state_dict(state["optim"])
    assert fresh.param_groups[0]["compute_dtype"] is torch.bfloat16
    assert_unchanged(fresh, snapshot(opt), same_params=False)


def test_weights_only_dcp_load_refuses_code_in_values(tmp_path):
    path, marker = str(tmp_path / "ckpt"), tmp_path / "ran"
    _dcp("save", {"x": torch.zeros(2), "extra": _Evil(str(marker))}, checkpoint_id=path)
    with pytest.raises(CheckpointException, match=r"Weights only load failed[\s\S]*GLOBAL (builtins|io)\.open"):
        _safe_load({"x": torch.zeros(2), "extra": None}, path)
    assert not marker.exists()


def test_weights_only_dcp_load_refuses_code_in_metadata(tmp_path):
    path, marker = tmp_path / "ckpt", tmp_path / "ran"
    _dcp("save", {"x": torch.zeros(2)}, checkpoint_id=str(path))
    (path / ".metadata").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(CheckpointException, match=r"(builtins|io)\.open, which a DCP metadata file does not hold"):
        _safe_load({"x": torch.zeros(2)}, str(path))
    assert not marker.exists()


# ---- the header through get/set_optimizer_state_dict and DCP, FSDP2 on 2 real ranks -----------------------------
def _fsdp_model():
    from test_dist_equivalence import SHAPES as DIST_SHAPES
    from test_dist_equivalence import full_tensors
    from torch.distributed.fsdp import fully_shard

    model = nn.Module()
    for name in DIST_SHAPES:
        mod_name, attr = name.split(".")
        if not hasattr(model, mod_name):
            setattr(model, mod_name, nn.Module())
        getattr(model, mod_name).register_parameter(attr, nn.Parameter(full_tensors(DIST_SHAPES, 0)[name].clone()))
    for mod_name in ("a", "b", "c", "e"):
        fully_shard(getattr(model, mod_name))
    fully_shard(model)
    return model


def _body_dcp_header(rank, world_size, path):
    import torch.distributed.checkpoint as dcp
    from test_dist_equivalence import SHAPES as DIST_SHAPES
    from test_dist_equivalence import STEPS, _dtensor_grad, build_optimizer, full_tensors
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def grads(model, step):
        params = dict(model.named_parameters())
        for n, g in full_tensors(DIST_SHAPES, 100 + step).items():
            _dtensor_grad(params[n], g)

    model = _fsdp_model()
    opt = build_optimizer("muon", list(model.named_parameters()))
    for step in range(STEPS - 1):
        grads(model, step)
        opt.step()
    saved = get_optimizer_state_dict(model, opt)
    saved_header = [g.get(FORMAT_KEY) for g in saved["param_groups"]]
    dcp.save({"model": get_model_state_dict(model), "optim": saved}, checkpoint_id=path)

    model2 = _fsdp_model()
    opt2 = build_optimizer("muon", list(model2.named_parameters()))
    seen = []
    load = opt2.load_state_dict

    def spy(state_dict):  # DCP passes it by keyword
        seen.append([g.get(FORMAT_KEY) for g in state_dict["param_groups"]])
        return load(state_dict)

    opt2.load_state_dict = spy  # set_optimizer_state_dict calls optim.load_state_dict by name
    state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(
        state,
        checkpoint_id=path,
        planner=checkpoint.WeightsOnlyLoadPlanner(),
        storage_reader=checkpoint.WeightsOnlyFileSystemReader(path),
    )
    set_model_state_dict(model2, state["model"])

    # A checkpoint from a newer disco is refused on every rank, through DCP's state-dict API too, changing nothing.
    future = copy.copy(state["optim"])
    future["param_groups"] = [{**g, FORMAT_KEY: FORMAT_VERSION + 1} for g in state["optim"]["param_groups"]]
    before = {k: v.to_local().clone() for k, v in opt2.state[next(iter(opt2.state))].items()}
    try:
        set_optimizer_state_dict(model2, opt2, future)
        refused = ""
    except ValueError as e:
        refused = str(e)
    after = opt2.state[next(iter(opt2.state))]
    unchanged = all(torch.equal(after[k].to_local(), v) for k, v in before.items())

    set_optimizer_state_dict(model2, opt2, state["optim"])
    grads(model2, STEPS - 1)
    opt2.step()
    full = {n: p.full_tensor() for n, p in model2.named_parameters()}
    return saved_header, seen, refused, unchanged, full


@pytest.mark.dist
def test_header_survives_dcp_under_fsdp2(tmp_path):
    from test_dist_equivalence import SHAPES as DIST_SHAPES
    from test_dist_equivalence import _assert_same, reference

    want, _ = reference("muon", DIST_SHAPES)  # Muon groups and an AdamW one (its step)
    out = run_ranks(_body_dcp_header, 2, str(tmp_path / "ckpt"), timeout=120)
    for saved_header, seen, refused, unchanged, full in out:
        assert saved_header == [FORMAT_VERSION, FORMAT_VERSION]
        # what load_state_dict received: the refused future one, then the real one, header intact
        assert seen == [[FORMAT_VERSION + 1] * 2, [FORMAT_VERSION] * 2]
        assert f"format version {FORMAT_VERSION + 1}" in refused and "newer" in refused
        assert unchanged
        _assert_same(full, want)
