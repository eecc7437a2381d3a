"""Hugging Face GPT-2 (a tiny one, built from its config: no download): Conv1D orientation, the tied
embedding / head, one step's update norms, the Muon recipe, and ``transformers.Trainer`` (20 steps, save and
resume). Skipped when ``transformers`` is not installed (``pip install -e ".[hf]"``)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from disco import Disco, Muon, create_disco_param_groups, routing_table  # noqa: E402
from disco.integrations import hf  # noqa: E402

HIDDEN = {  # name in block 0 -> (stored shape, fan_out, fan_in)
    "attn.c_attn.weight": ((64, 192), 192, 64),
    "attn.c_proj.weight": ((64, 64), 64, 64),
    "mlp.c_fc.weight": ((64, 256), 256, 64),
    "mlp.c_proj.weight": ((256, 64), 64, 256),
}


def gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # deterministic: resume must be exact
    return transformers.GPT2LMHeadModel(config)


def route(model: torch.nn.Module, kwargs: dict) -> dict[str, dict]:
    with pytest.warns(UserWarning, match=r"transformer\.wte\.weight = lm_head\.weight -> the output head"):
        groups, _ = create_disco_param_groups(model, kwargs)
    return {n: g for g in groups for n in g["param_names"]}


def test_routing_orientation_and_tied_head():
    model = gpt2()
    by_name = route(model, {})
    assert {n for n, _ in model.named_parameters()} == set(by_name)
    for layer in (0, 1):
        for suffix, (shape, _, _) in HIDDEN.items():
            g = by_name[f"transformer.h.{layer}.{suffix}"]
            assert tuple(model.get_parameter(f"transformer.h.{layer}.{suffix}").shape) == shape
            assert g["transposed"] is True and "norm_factor" not in g, suffix
    wte = by_name["transformer.wte.weight"]  # tied to lm_head: the head's route, marked
    assert wte["norm_factor"] == "unembed_sqrt" and wte["tied_with"] == ["lm_head.weight"]
    assert by_name["transformer.wpe.weight"]["norm_factor"] == "embed_sqrt"
    assert by_name["transformer.h.0.ln_1.weight"]["norm_factor"] == "bias_rms"
    assert "transposed" not in by_name["transformer.h.0.mlp.c_fc.bias"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups, _ = create_disco_param_groups(model, {})
    lines = routing_table(groups).splitlines()
    row = next(line for line in lines if line.split()[1:2] == ["transformer.h.0.mlp.c_fc.weight"])
    assert row.split()[2] == "64x256" and row.endswith("stored in x out (transposed)")
    row = next(line for line in lines if line.split()[1:2] == ["transformer.wte.weight"])
    assert "unembed_sqrt" in row and row.endswith("tied: lm_head.weight")
    # the HF helper finds the same embedding and head through the model's own accessors
    assert hf.embedding_and_head_names(model) == (["transformer.wte", "transformer.wpe"], "lm_head")
    with pytest.warns(UserWarning, match="tied"):
        hf_groups, cleaned = hf.disco_param_groups(model)
    assert [g["param_names"] for g in hf_groups] == [g["param_names"] for g in groups]
    assert cleaned == {"name_of_embedding": "transformer.wte"}


def _one_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    model(input_ids=x, labels=x).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def _spectral(t: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(t.double(), ord=2).item()


def test_one_disco_step_moves_conv1d_weights_by_sqrt_fan_out_over_fan_in():
    """The issue's reproducer: lr=1, momentum=0, exact SVD; the update's spectral norm is sqrt(fan_out/fan_in)
    (2.0 for c_fc, 1.73 for c_attn, 0.5 for mlp.c_proj; 0.5, 0.58 and 2.0 with the stored orientation)."""
    model = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups, _ = create_disco_param_groups(model, {})
    opt = Disco(groups, lr=1.0, momentum=0.0, backend="svd")
    opt.calculate_norm_at_next_step()
    delta = _one_step(model, opt)
    norms = opt.get_norms_at_current_step()
    for layer in (0, 1):
        for suffix, (_, fan_out, fan_in) in HIDDEN.items():
            name = f"transformer.h.{layer}.{suffix}"
            assert _spectral(delta[name]) == pytest.approx(math.sqrt(fan_out / fan_in), rel=1e-5), name
            # tracked norms read the fan_out x fan_in view too: rms_to_rms = sigma_max * sqrt(fan_in / fan_out)
            assert norms[f"track_update_rms_to_rms/{name}"].item() == pytest.approx(1.0, rel=1e-4), name
            p = model.get_parameter(name).detach()
            want = _spectral(p) * math.sqrt(fan_in / fan_out)
            assert norms[f"track_param_rms_to_rms/{name}"].item() == pytest.approx(want, rel=1e-4), name
    # the tied embedding / head took unembed_sqrt: every row of the update has l2 norm 1/sqrt(64)
    rows = torch.linalg.vector_norm(delta["transformer.wte.weight"], dim=1)
    assert torch.allclose(rows, torch.full_like(rows, 1 / 8), rtol=1e-4)


def test_muon_recipe_for_any_hf_model():
    model = gpt2()
    groups = hf.muon_param_groups(model, adamw_lr=1e-3)
    by_name = {n: g for g in groups for n in g["param_names"]}
    adamw = {n for n, g in by_name.items() if g.get("algorithm") == "adamw"}
    want_adamw = {n for n, p in model.named_parameters() if p.dim() < 2} | {
        "transformer.wte.weight",  # tied with lm_head.weight
        "transformer.wpe.weight",
    }
    assert adamw == want_adamw
    assert by_name["transformer.wte.weight"]["tied_with"] == ["lm_head.weight"]
    assert all(by_name[n]["lr"] == 1e-3 and by_name[n]["betas"] == (0.9, 0.95) for n in adamw)
    assert all(by_name[f"transformer.h.0.{s}"]["transposed"] is True for s in HIDDEN)
    # disco.Muon: "original" scaling sqrt(max(1, fan_out / fan_in)) on the fan_out x fan_in view
    opt = Muon(groups, lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0, backend="svd")
    delta = _one_step(model, opt)
    for suffix, (_, fan_out, fan_in) in HIDDEN.items():
        want = math.sqrt(max(1.0, fan_out / fan_in))
        assert _spectral(delta[f"transformer.h.0.{suffix}"]) == pytest.approx(want, rel=1e-5), suffix
    # AdamW's first step moves every entry with a gradient by about adamw_lr
    step = delta["transformer.wpe.weight"][:32].abs()
    assert step.max().item() == pytest.approx(1e-3, rel=1e-3)


def _byte_dataset(n_seq: int, seq_len: int = 32) -> list[dict[str, torch.Tensor]]:
    from pydoc_data.topics import topics

    data = torch.tensor(list("".join(topics.values()).encode("utf-8")[: n_seq * seq_len]), dtype=torch.long)
    return [{"input_ids": row, "labels": row} for row in data.view(n_seq, seq_len)]


def _args(out: str, steps: int, **kwargs) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        **kwargs,
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="steps",
        save_steps=10,
        seed=0,
        data_seed=0,
        lr_scheduler_type="constant",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_muon_recipe_trains_saves_and_resumes(tmp_path):
    data = _byte_dataset(160)
    model = gpt2()
    trainer = transformers.Trainer(
        model=model,
        args=_args(str(tmp_path / "run"), 20),
        train_dataset=data,
        optimizer_cls_and_kwargs=hf.trainer_optimizer(model, "muon", lr=0.02, weight_decay=0.0, adamw_lr=3e-3),
    )
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 20 and isinstance(trainer.optimizer.optimizer, Muon)
    assert losses[-1] < losses[0] - 1.0, losses  # byte-level text: about 5.6 -> 3.2
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    resumed_model = gpt2(seed=1)  # other weights: all of them must come from the checkpoint
    resumed = transformers.Trainer(
        model=resumed_model,
        args=_args(str(tmp_path / "run"), 20),
        train_dataset=data,
        optimizer_cls_and_kwargs=hf.trainer_optimizer(resumed_model, "muon", lr=0.02, weight_decay=0.0, adamw_lr=3e-3),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-10"))
    assert _losses(resumed) == pytest.approx(losses, abs=1e-6)  # steps 1-10 from the checkpoint, 11-20 rerun
    for n, p in resumed_model.named_parameters():
        torch.testing.assert_close(p.detach(), final[n], rtol=0, atol=1e-6, msg=n)


def test_trainer_with_the_disco_class_and_trainers_own_groups(tmp_path):
    """``optimizer_cls_and_kwargs=(disco.Disco, {...})``: Trainer's weight-decay groups hold the biases and norm
    gains; Disco routes them to bias_rms inside instead of refusing a 1-D tensor in a matrix group."""
    model = gpt2()
    trainer = transformers.Trainer(
        model=model,
        args=_args(str(tmp_path / "plain"), 10, weight_decay=0.01),
        train_dataset=_byte_dataset(80),
        optimizer_cls_and_kwargs=(Disco, {"lr": 0.02}),
    )
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5, losses
    opt = trainer.optimizer.optimizer
    matrices = [g for g in opt.param_groups if all(p.dim() >= 2 for p in g["params"])]
    vectors = [g for g in opt.param_groups if all(p.dim() < 2 for p in g["params"])]
    assert len(matrices) + len(vectors) == len(opt.param_groups)
    assert {g["norm_factor"] for g in vectors} == {"bias_rms"} and {g["norm_factor"] for g in matrices} == {"spectral"}
    assert {g["weight_decay"] for g in matrices} == {0.01} and {g["weight_decay"] for g in vectors} == {0.0}
