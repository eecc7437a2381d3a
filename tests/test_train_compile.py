"""``torch.compile(opt.step)`` with an embedding group (``embed_sqrt``, identity backend) equals the eager step.

A cold compile costs seconds (``tests/test_compile_step.py`` compiles every optimizer class). Inductor's CPU (C++)
backend crashes with
``InductorError: KeyError: 'bufN'`` when one graph holds a row reduction between two in-place writes, as in
``buf.lerp_(g); p.add_(buf / ||buf||_rows)``: its outer-loop fusion promotes the mutation's output to a local
buffer and then looks for a read of it (pytorch/pytorch#196570; torch 2.13). Since the typed engine (commit
e5e3621) dynamo breaks the graph in ``disco.distributed.engine.run_spec`` (it times each spec with
``time.perf_counter`` and records its outcome), so the momentum update, the LMO and the parameter update are
compiled as separate graphs. At a1d5816 they were one graph and this test failed with ``KeyError: 'buf1'``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from disco import Disco, create_disco_param_groups
from disco.dummy_parallel_dims import DummyParallelDims


class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(x)


def _optimizer(model: nn.Module) -> Disco:
    kwargs = {
        "parallel_dims": DummyParallelDims(), "is_light": False, "weight_decay": 0.0, "lr": 1e-2,
        "momentum": 0.1, "nesterov": False, "eps": 1e-20, "norm_factor": "spectral",
        "backend": "newtonschulz5", "backend_steps": 5,
        "extra_param_group_split_rules": [
            {"str_match": "tok_embeddings.weight", "lr": 1e-2, "norm_factor": "embed_sqrt", "backend": "identity"},
        ],
        "name_of_embedding": "tok_embeddings",
    }  # fmt: skip
    params, cleaned = create_disco_param_groups(model, kwargs)
    opt = Disco(params, **cleaned)
    assert [g["norm_factor"] for g in opt.param_groups] == ["embed_sqrt"]
    return opt


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo: time.perf_counter and other graph breaks
def test_compiled_step_with_an_embedding_group_matches_eager():
    torch.manual_seed(0)
    eager_model = _Embed()
    compiled_model = copy.deepcopy(eager_model)
    start = eager_model.tok_embeddings.weight.detach().clone()
    eager, compiled = _optimizer(eager_model), _optimizer(compiled_model)
    step = torch.compile(compiled.step)
    x = torch.randint(0, 64, (4, 8))
    for _ in range(2):
        for model, run in ((eager_model, eager.step), (compiled_model, step)):
            model(x).square().mean().backward()
            run()
            model.zero_grad(set_to_none=True)
    w = compiled_model.tok_embeddings.weight
    torch.testing.assert_close(w, eager_model.tok_embeddings.weight, atol=1e-6, rtol=1e-5)
    assert (w - start).abs().max() > 1e-3  # it moved
