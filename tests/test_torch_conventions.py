"""torch.optim's own test inputs (``torch.testing._internal.common_optimizers``) run against ``disco.Muon``.

The error inputs of ``torch.optim.Muon``'s and ``torch.optim.AdamW``'s ``OptimizerInfo`` must raise the type torch
raises, with a message matching torch's regex; AdamW's go to an ``algorithm="adamw"`` group of ``disco.Muon``.
The sample inputs must construct and step. Where disco deliberately differs, the test says how and checks that
behaviour instead:

* 3-D parameters: ``torch.optim.Muon`` refuses them; ``disco.Muon`` steps them as a stack of matrices.
* complex parameters: torch raises ``RuntimeError`` at the first step; disco refuses them when the group is added,
  with an error that is a ``RuntimeError`` (and a ``ValueError``, as its other refusals).
* duplicate parameters in a group: torch warns ("in future, this will cause an error"); disco raises the
  ``ValueError`` with the same words (a duplicate would be stepped twice).
* torch's implementation flags (``foreach``, ``fused``, ``capturable``, ``differentiable``) and AdamW's
  ``amsgrad`` / ``maximize`` are not disco settings: refused with a ``ValueError`` naming the key.

``torch.testing._internal`` ships in torch's wheels (CPU ones too) and imports ``expecttest`` (a dev dependency).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.testing._internal.common_optimizers as common  # needs expecttest: a dev dependency, so CI runs this

from disco import Muon

UNSUPPORTED = {"foreach", "fused", "capturable", "differentiable", "amsgrad", "maximize"}


def _info(cls: type) -> object:
    return next(i for i in common.optim_db if i.optim_cls is cls)


def _params(params: object) -> object:
    return [torch.nn.Parameter(torch.randn(4, 3))] if params is None else params


def _error_inputs(cls: type) -> list[object]:
    return list(_info(cls).optim_error_inputs_func(device="cpu", dtype=torch.float32))


def _desc(e: object) -> str:
    return e.optimizer_error_input.desc  # type: ignore[attr-defined]


def _raises(error_type: type[BaseException], regex: str, fn) -> BaseException:
    with pytest.raises(error_type) as info:
        fn()
    assert re.search(regex, str(info.value)), f"{str(info.value)!r} does not match torch's {regex!r}"
    return info.value


@pytest.mark.parametrize("error_input", _error_inputs(torch.optim.Muon), ids=_desc)
def test_muon_error_inputs(error_input):
    optim_input = error_input.optimizer_error_input
    params, kwargs = optim_input.params, optim_input.kwargs
    desc = optim_input.desc
    if desc == "only support 2D parameters":  # disco: a 3-D weight is a stack of matrices
        p = params[0]
        opt = Muon([p], **kwargs)
        before = p.detach().clone()
        opt.step()
        assert (p - before).abs().max() > 0
        return
    if issubclass(error_input.error_type, Warning):  # duplicates in a group: disco refuses what torch warns of
        err = _raises(ValueError, error_input.error_regex, lambda: Muon(params, **kwargs))
        assert "(1, 1)" in str(err)  # names the parameter's shape
        return
    if error_input.error_on == common.OptimizerErrorEnum.STEP_ERROR:  # complex: refused before any step
        err = _raises(error_input.error_type, error_input.error_regex, lambda: Muon(params, **kwargs))
        assert isinstance(err, ValueError) and "complex64" in str(err) and "(2, 3)" in str(err)
        return
    _raises(error_input.error_type, error_input.error_regex, lambda: Muon(params, **kwargs))


@pytest.mark.parametrize("error_input", _error_inputs(torch.optim.AdamW), ids=_desc)
def test_adamw_error_inputs_in_an_adamw_group(error_input):
    optim_input = error_input.optimizer_error_input
    params, kwargs = optim_input.params, optim_input.kwargs

    def build() -> Muon:
        if params is None:  # torch checks the arguments; here they are an AdamW group's settings
            return Muon([{"params": _params(None), "algorithm": "adamw", **kwargs}])
        if kwargs:
            raise AssertionError("an error input with both params and kwargs")
        return Muon(params)

    unsupported = sorted(UNSUPPORTED & set(kwargs))
    if unsupported:
        _raises(ValueError, f"'{unsupported[0]}' is not a setting", build)
        return
    if issubclass(error_input.error_type, Warning):
        _raises(ValueError, error_input.error_regex, build)
        return
    _raises(error_input.error_type, error_input.error_regex, build)


def _samples(cls: type) -> list[object]:
    return list(_info(cls).optim_inputs_func(device="cpu", dtype=torch.float32))


def _step_twice(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert any((p - b).abs().max() > 0 for p, b in zip(params, before))


@pytest.mark.parametrize("sample", _samples(torch.optim.Muon), ids=lambda s: s.desc)
def test_muon_sample_inputs_construct_and_step(sample):
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4, 6))]
    opt = Muon(params, **sample.kwargs)
    _step_twice(opt, params)
    if "ns_steps" in sample.kwargs:
        assert opt.param_groups[0]["backend_steps"] == sample.kwargs["ns_steps"]


@pytest.mark.parametrize("sample", _samples(torch.optim.AdamW), ids=lambda s: s.desc)
def test_adamw_sample_inputs_in_an_adamw_group(sample):
    params = [torch.nn.Parameter(torch.randn(6))]
    group = {"params": params, "algorithm": "adamw", **sample.kwargs}
    unsupported = sorted(UNSUPPORTED & set(sample.kwargs))
    if unsupported:
        _raises(ValueError, f"'{unsupported[0]}' is not a setting", lambda: Muon([group]))
        return
    _step_twice(Muon([group]), params)


def test_the_inputs_are_there():
    """The torch lists are not empty (a renamed helper would otherwise leave these tests vacuous)."""
    assert len(_error_inputs(torch.optim.Muon)) >= 9
    assert len(_error_inputs(torch.optim.AdamW)) >= 6
    assert len(_samples(torch.optim.Muon)) >= 7
    assert len(_samples(torch.optim.AdamW)) >= 5
