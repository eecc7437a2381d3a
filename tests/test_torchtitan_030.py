"""TorchTitan 0.3.0 for real: its configs, ``ParallelDims``, model code, FSDP2, LR schedulers and checkpointer.

Skipped when ``torchtitan`` (or the ``triton`` its model code imports) is absent: ``pip install -e
".[torchtitan]"``. The model is TorchTitan's Llama3 (``Llama3Model``, ``GQAttention``, ``FeedForward``,
``RMSNorm``, ``ComplexRoPE``, its ``parallelize_llama``), registered as a tiny flavor the TorchTitan way (a
``llama3_configs`` entry, built through ``model_registry``). Its inner attention is TorchTitan's own
``ScaledDotProductAttention`` (causal), because ``FlexAttention`` has no CPU backward; everything else is
TorchTitan's. Two CPU-only adaptations, both in the ranks: TorchTitan picks the device type ``"cuda"`` when it
finds no accelerator, so the mesh is built on ``"cpu"``; and gloo has no ``PREMUL_SUM``, which FSDP2 uses for
TorchTitan's ``gradient_divide_factor=1.0``, so the FSDP modules reduce with ``SUM`` (the same numbers).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan")
try:  # its model code needs triton importable, and a torch as recent as TorchTitan's
    import torchtitan.models.llama3 as llama3
except Exception as e:  # ImportError (no triton), or an AttributeError from an older torch
    pytest.skip(f"torchtitan's model code does not import here: {type(e).__name__}: {e}", allow_module_level=True)

from torchtitan.components.optimizer import (  # noqa: E402
    LRSchedulersContainer,
    OptimizersContainer,
    ParamGroupConfig,
    default_adamw,
)
from torchtitan.distributed import ParallelDims  # noqa: E402

from disco import Disco  # noqa: E402
from disco.integrations.torchtitan import (  # noqa: E402
    DiscoOptimizersContainer,
    build_disco_optimizer,
    create_disco_optimizer_kwargs_from_optimizer_config,
    disco_optimizer_config,
)

FLAVOR = "disco_tiny_cpu"
VOCAB, DIM, SEQ, BATCH = 256, 64, 32, 4


def _tiny_llama3(attn_backend: str = "flex", tp_gemm_backend: str = "default"):
    """TorchTitan's debug model shape, shrunk (2 layers, width 64, vocab 256), with SDPA attention on CPU."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config

    linear = {"weight": partial(nn.init.trunc_normal_, std=0.02), "bias": nn.init.zeros_}
    norm = {"weight": nn.init.ones_}
    layers = [
        llama3.Llama3TransformerBlock.Config(
            attention_norm=RMSNorm.Config(normalized_shape=DIM, param_init=norm),
            ffn_norm=RMSNorm.Config(normalized_shape=DIM, param_init=norm),
            attention=make_gqa_config(
                dim=DIM,
                n_heads=4,
                n_kv_heads=None,
                wqkv_param_init=linear,
                wo_param_init=linear,
                inner_attention=ScaledDotProductAttention.Config(),
                fuse_qkv=True,
                rope=ComplexRoPE.Config(dim=DIM // 4, max_seq_len=SEQ, theta=10000, scaling="none"),
                tp_gemm_backend=tp_gemm_backend,
            ),
            feed_forward=make_ffn_config(
                dim=DIM,
                hidden_dim=compute_ffn_hidden_dim(DIM, multiple_of=64),
                w1_param_init=linear,
                w2w3_param_init=linear,
                tp_gemm_backend=tp_gemm_backend,
            ),
        )
        for _ in range(2)
    ]
    return llama3.Llama3Model.Config(
        dim=DIM,
        vocab_size=VOCAB,
        tok_embeddings=Embedding.Config(
            num_embeddings=VOCAB, embedding_dim=DIM, param_init={"weight": partial(nn.init.normal_, std=1.0)}
        ),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=norm),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=linear),
        layers=layers,
    )


def model_spec():
    llama3.llama3_configs.setdefault(FLAVOR, _tiny_llama3)  # registered like TorchTitan's own flavors
    return llama3.model_registry(FLAVOR)


def build_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = model_spec().model.build()
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model


def _tokens(step: int, rank: int, world_size: int) -> torch.Tensor:
    from pydoc_data.topics import topics

    data = torch.tensor(list("".join(topics.values()).encode("utf-8")[:200_000]), dtype=torch.long)
    start = ((step * world_size + rank) * BATCH * (SEQ + 1)) % (len(data) - BATCH * (SEQ + 1))
    return data[start : start + BATCH * (SEQ + 1)].view(BATCH, SEQ + 1)


# ---------------------------------------------------------------------------------------------------------------
# one process: the real config objects


def test_build_disco_optimizer_from_default_adamw():
    """The issue's reproducer: TorchTitan 0.3.0's ``default_adamw`` has no top-level ``lr``."""
    model = build_model()
    with pytest.warns(UserWarning, match="'AdamW': building Disco"):
        (opt,) = build_disco_optimizer([model], default_adamw(lr=8e-4))
    assert isinstance(opt, Disco) and {g["lr"] for g in opt.param_groups} == {8e-4}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1}  # AdamW's, as the config says
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert by_name["layers.0.attention_norm.weight"]["norm_factor"] == "bias_rms"  # no 1-D error
    assert by_name["tok_embeddings.weight"]["norm_factor"] == "embed_sqrt"
    assert by_name["lm_head.weight"]["norm_factor"] == "unembed_sqrt"


def test_kwargs_from_real_configs_and_parallel_dims():
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1, world_size=1)
    config = disco_optimizer_config(lr=0.02, momentum=0.9, vector_algorithm="adamw", compute_dtype="float32")
    assert isinstance(config, OptimizersContainer.Config)
    kwargs = create_disco_optimizer_kwargs_from_optimizer_config(config, dims)
    assert kwargs["parallel_dims"] is dims and kwargs["lr"] == 0.02 and kwargs["momentum"] == 0.9
    assert kwargs["vector_algorithm"] == "adamw" and kwargs["compute_dtype"] is torch.float32
    one = ParamGroupConfig(pattern=".*", optimizer_name="Disco", optimizer_kwargs={"lr": 0.5, "betas": (0.9, 0.9)})
    with pytest.raises(ValueError, match=r"unknown keys \['betas'\]"):
        create_disco_optimizer_kwargs_from_optimizer_config(one, dims)
    two = OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(pattern="norm", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3}),
            ParamGroupConfig(pattern=".*", optimizer_name="Disco", optimizer_kwargs={"lr": 0.03}),
        ]
    )
    assert create_disco_optimizer_kwargs_from_optimizer_config(two)["lr"] == 0.03  # its one Disco group
    both = OptimizersContainer.Config(param_groups=[*two.param_groups, two.param_groups[1]])
    with pytest.raises(ValueError, match="2 'Disco' param groups"):
        create_disco_optimizer_kwargs_from_optimizer_config(both)
    with pytest.raises(NotImplementedError, match="Optimizer Disco not added"):  # torchtitan's own container
        OptimizersContainer.Config(param_groups=[one]).build(model_parts=[build_model()])


def _stages(model: nn.Module) -> list[nn.Module]:
    """Two pipeline stages sharing ``model``'s parameters under its FQNs, as TorchTitan's ``pipeline_llm`` cuts."""
    first, second = nn.Module(), nn.Module()
    first.tok_embeddings = model.tok_embeddings
    first.layers = nn.ModuleDict({"0": model.layers["0"]})
    second.layers = nn.ModuleDict({"1": model.layers["1"]})
    second.norm, second.lm_head = model.norm, model.lm_head
    return [first, second]


def test_streaming_commit_through_the_container_equals_atomic():
    """``commit="streaming"`` set in a TorchTitan config reaches every LMO group and changes no result."""
    got = {}
    for commit in ("atomic", "streaming"):
        model = build_model(0)
        kw = {} if commit == "atomic" else {"commit": commit}
        container = disco_optimizer_config(lr=0.02, vector_algorithm="adamw", **kw).build(model_parts=[model])
        (opt,) = container.optimizers
        lmo = [g for g in opt.param_groups if g["algorithm"] == "disco"]
        assert lmo and all(g.get("commit", "atomic") == commit for g in lmo)
        for step in range(2):
            x = _tokens(step, 0, 1)
            nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
            container.step()
            container.zero_grad()
        got[commit] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in got["atomic"].items():
        assert torch.equal(p, got["streaming"][n]), n


def test_container_mixes_disco_and_adamw_by_pattern_with_flat_state_dict():
    model = build_model(0)
    parts = _stages(model)
    config = DiscoOptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=r"^(tok_embeddings|lm_head)\.",
                optimizer_name="AdamW",
                optimizer_kwargs={"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0},
            ),
            ParamGroupConfig(pattern=r"\.attention(_norm)?\.", optimizer_name="Disco", optimizer_kwargs={"lr": 0.05}),
            ParamGroupConfig(
                pattern=r".*", optimizer_name="Disco", optimizer_kwargs={"lr": 0.02, "vector_algorithm": "adamw"}
            ),
        ],
        implementation="for-loop",
    )
    container = config.build(model_parts=parts)  # TorchTitan's own build path
    assert isinstance(container, DiscoOptimizersContainer) and isinstance(container, OptimizersContainer)
    assert [type(o).__name__ for o in container] == ["Disco", "AdamW", "Disco", "AdamW"]  # one Disco per part
    by_name = {n: g for o in container.optimizers[::2] for g in o.param_groups for n in g["param_names"]}
    adamw = {n for o in container.optimizers[1::2] for g in o.param_groups for n in g["param_names"]}
    assert adamw == {"tok_embeddings.weight", "lm_head.weight"} and not adamw & set(by_name)
    for layer in ("0", "1"):  # two "Disco" configs in each part's one Disco, each with its own settings
        assert by_name[f"layers.{layer}.attention.wo.weight"]["lr"] == 0.05
        assert by_name[f"layers.{layer}.feed_forward.w1.weight"]["lr"] == 0.02
        assert by_name[f"layers.{layer}.attention_norm.weight"]["norm_factor"] == "bias_rms"  # routed, no 1-D error
        assert by_name[f"layers.{layer}.ffn_norm.weight"]["algorithm"] == "adamw"  # the second's vector_algorithm
    assert by_name["norm.weight"]["algorithm"] == "adamw" and by_name["norm.weight"]["lr"] == 0.02
    unmatched = DiscoOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern="nothing", optimizer_name="Disco", optimizer_kwargs={"lr": 1.0})]
    )
    with pytest.raises(ValueError, match="'nothing' matched no parameters"):
        unmatched.build(model_parts=parts)

    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=container, training_steps=10)
    for step in range(3):
        x = _tokens(step, 0, 1)
        nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        container.step()
        schedulers.step()
        container.zero_grad()
    factor = schedulers.schedulers[0].lr_lambdas[0](3)  # TorchTitan's warmup-stable-decay at step 3
    assert 0 < factor < 1 and by_name["layers.1.feed_forward.w1.weight"]["lr"] == pytest.approx(0.02 * factor)
    assert by_name["layers.0.attention.wo.weight"]["lr"] == pytest.approx(0.05 * factor)
    sd = container.state_dict()
    assert "state.layers.0.attention.wo.weight.momentum_buffer" in sd
    assert "state.tok_embeddings.weight.exp_avg" in sd and "param_groups.norm.weight.algorithm" in sd
    # a fresh container loads the flat dict back into every optimizer
    fresh = config.build(model_parts=_stages(build_model(2)))
    fresh.load_state_dict({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()})
    for a, b in zip(container, fresh):
        for pa, pb in zip(
            (p for g in a.param_groups for p in g["params"]), (p for g in b.param_groups for p in g["params"])
        ):
            for key, value in a.state[pa].items():
                torch.testing.assert_close(b.state[pb][key], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# two gloo ranks: FSDP2 by TorchTitan's parallelize_llama, training, checkpoint save and resume

STEPS, SAVE_AT = 12, 6


def _rank_setup(rank, world_size, folder, seed):
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig

    parallel_dims_module.device_type = "cpu"  # TorchTitan falls back to "cuda" without an accelerator
    parallelism = ParallelismConfig(data_parallel_shard_degree=world_size, spmd_backend="partial_dtensor")
    parallel_dims = ParallelDims.from_config(parallelism, world_size)
    parallel_dims.build_mesh()
    spec = model_spec()
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = spec.model.build()
    training = TrainingConfig(mixed_precision_param="float32", mixed_precision_reduce="float32")
    model = spec.parallelize_fn(
        model,
        parallel_dims=parallel_dims,
        training=training,
        parallelism=parallelism,
        compile_config=CompileConfig(),
        ac_config=None,
        dump_folder=folder,
    )
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)  # gloo: SUM instead of PREMUL_SUM(1/1.0)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    optimizers = disco_optimizer_config(lr=0.1, vector_algorithm="adamw").build(
        model_parts=[model], parallel_dims=parallel_dims
    )
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.3).build(
        optimizers=optimizers, training_steps=STEPS
    )

    class TrainState:
        step = 0

        def state_dict(self):
            return {"step": torch.tensor(self.step)}

        def load_state_dict(self, sd):
            self.step = int(sd["step"])

    state = TrainState()
    checkpointer = CheckpointManager.Config(
        enable=True, folder="checkpoint", interval=SAVE_AT, last_save_model_only=False
    ).build(
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={"train_state": state},
        sd_adapter=None,
        base_folder=folder,
    )
    return model, optimizers, schedulers, checkpointer, state


def _train(rank, world_size, model, optimizers, schedulers, checkpointer, state, until):
    losses = []
    while state.step < until:
        state.step += 1
        x = _tokens(state.step, rank, world_size)
        logits = model(x[:, :-1])
        # TorchTitan's loss: summed over the local tokens, divided by the global token count
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        loss = loss / (x[:, 1:].numel() * world_size)
        loss.backward()
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        checkpointer.save(state.step, last_step=state.step == until)
        losses.append(loss.detach() * world_size)
    checkpointer.maybe_wait_for_saving()
    return torch.stack(losses)


def _full(model, optimizers):
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    (opt,) = optimizers.optimizers
    momentum = {
        n: opt.state[p]["momentum_buffer"].full_tensor()
        for g in opt.param_groups
        for n, p in zip(g["param_names"], g["params"])
        if "momentum_buffer" in opt.state[p]
    }
    return params, momentum


def _body_fsdp_train_and_resume(rank, world_size, folder):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    model, optimizers, schedulers, checkpointer, state = _rank_setup(rank, world_size, folder, seed=0)
    (opt,) = optimizers.optimizers
    routed = {
        n: g["norm_factor"] if g["algorithm"] == "disco" else g["algorithm"]
        for g in opt.param_groups
        for n in g["param_names"]
    }
    layouts = {type(p).__name__ for g in opt.param_groups for p in g["params"]}
    owned = {i for ids in opt.assignments.values() for i in ids}
    losses = _train(rank, world_size, model, optimizers, schedulers, checkpointer, state, STEPS)
    final = _full(model, optimizers)
    lr_at_end = [g["lr"] for g in opt.param_groups]
    checkpointer.close()

    # resume in fresh objects, from other initial weights: everything must come from the checkpoint
    model, optimizers, schedulers, checkpointer, state = _rank_setup(rank, world_size, folder, seed=1)
    assert checkpointer.load(step=SAVE_AT) and state.step == SAVE_AT
    (opt,) = optimizers.optimizers
    assert all(
        isinstance(opt.state[p]["momentum_buffer"], DTensor)
        for g in opt.param_groups
        for p in g["params"]
        if "momentum_buffer" in opt.state[p]
    )
    resumed_losses = _train(rank, world_size, model, optimizers, schedulers, checkpointer, state, STEPS)
    resumed = _full(model, optimizers)
    checkpointer.close()
    dist.barrier()
    return {
        "routed": routed,
        "layouts": sorted(layouts),
        "owned": sorted(owned),
        "losses": losses,
        "resumed_losses": resumed_losses,
        "final": final,
        "resumed": resumed,
        "lr": (lr_at_end, [g["lr"] for g in opt.param_groups]),
    }


@pytest.mark.dist
def test_fsdp2_training_and_checkpoint_resume_on_two_ranks(tmp_path):
    from dist_harness import run_ranks

    out = run_ranks(
        _body_fsdp_train_and_resume,
        2,
        str(tmp_path),
        timeout=240,
        preload=["torchtitan.models.llama3", "torchtitan.components.checkpoint"],
    )
    r0, r1 = out
    routed = r0["routed"]
    assert routed["layers.0.attention.qkv_linear.wqkv.weight"] == "spectral"
    assert routed["layers.0.attention_norm.weight"] == "adamw"  # vectors: routed, not a 1-D error
    assert routed["tok_embeddings.weight"] == "embed_sqrt" and routed["lm_head.weight"] == "unembed_sqrt"
    assert r0["layouts"] == ["DTensor"]  # FSDP2 shards
    # every LMO matrix is orthogonalized by exactly one rank: the owners' sets are disjoint and cover them
    assert r0["owned"] == r1["owned"] and len(r0["owned"]) == len(routed) - sum(v == "adamw" for v in routed.values())
    for r in out:
        losses = r["losses"]
        assert losses[-3:].mean() < losses[:3].mean() - 1.0, losses  # byte-level text: about 5.55 -> 3.2
        torch.testing.assert_close(r["resumed_losses"], losses[SAVE_AT:], rtol=0, atol=1e-6)
        for key in ("final", "resumed"):
            assert set(r[key][0]) == set(r0["final"][0])
        for n, v in r["final"][0].items():
            torch.testing.assert_close(r["resumed"][0][n], v, rtol=0, atol=1e-6, msg=n)
        for n, v in r["final"][1].items():
            torch.testing.assert_close(r["resumed"][1][n], v, rtol=0, atol=1e-6, msg=n)
        assert r["lr"][0] == pytest.approx(r["lr"][1])  # the LR scheduler resumed too
    for n, v in r0["final"][0].items():  # ranks agree on the trained model
        torch.testing.assert_close(r1["final"][0][n], v, rtol=0, atol=0, msg=n)


def test_lower_case_names_build_disco_and_torchtitan_optimizers():
    """``optimizer_name`` in any case: ``disco`` (routed), Disco's other classes (``muon``, ``dion``...) over
    their pattern, TorchTitan's own (``adamw``); an unknown name is a ValueError listing the valid ones, not
    TorchTitan's bare NotImplementedError."""
    from disco import Dion, Muon

    model = build_model(0)
    config = DiscoOptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=r"^(tok_embeddings|lm_head)\.", optimizer_name="adamw", optimizer_kwargs={"lr": 3e-3}
            ),
            ParamGroupConfig(pattern=r"\.attention\.w", optimizer_name="muon", optimizer_kwargs={"lr": 0.02}),
            ParamGroupConfig(pattern=r"\.feed_forward\.", optimizer_name="DION", optimizer_kwargs={"lr": 0.02}),
            ParamGroupConfig(pattern=r".*", optimizer_name="disco", optimizer_kwargs={"lr": 0.02}),
        ],
        implementation="for-loop",
        optimizer_factory_kwargs_by_name={"muon": {"nonfinite": "skip"}},
    )
    container = config.build(model_parts=[model])
    kinds = {type(o): o for o in container}
    assert set(kinds) == {Disco, torch.optim.AdamW, Muon, Dion}
    names = {cls: {n for g in o.param_groups for n in g["param_names"]} for cls, o in kinds.items()}
    assert names[torch.optim.AdamW] == {"tok_embeddings.weight", "lm_head.weight"}
    assert names[Muon] and all(".attention.w" in n for n in names[Muon])
    assert names[Dion] and all(".feed_forward." in n for n in names[Dion])
    assert "norm.weight" in names[Disco] and kinds[Muon].param_groups[0]["nonfinite"] == "skip"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = _tokens(0, 0, 1)
    nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    container.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # every optimizer stepped
    bad = DiscoOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name="lamb", optimizer_kwargs={"lr": 1.0})]
    )
    with pytest.raises(ValueError, match=r"optimizer_name 'lamb' is unknown; valid \(any case\): Disco, .*Muon.*AdamW"):
        bad.build(model_parts=[build_model(0)])
