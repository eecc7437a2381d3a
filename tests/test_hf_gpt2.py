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

from disco import Dion, Dion2, Disco, Muon, NorMuon, Scion, create_disco_param_groups, routing_table  # noqa: E402
from disco.integrations import hf  # noqa: E402

# steps of real HF models against formulas in exact fp32: fp32 matmuls in fp32 whatever the session's precision
pytestmark = pytest.mark.usefixtures("fp32_matmuls")

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


def llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


CLASSES = [Disco, Muon, Scion, NorMuon, Dion, Dion2]


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_trainer_with_a_plain_class_refuses_with_the_fix(tmp_path, make, cls):
    """``optimizer_cls_and_kwargs=(disco.X, {...})``: Trainer's own groups hold no names, so the tied / Conv1D /
    embedding / head weights would take a hidden matrix's update (GPT-2's c_fc 0.5 instead of 2.0): refused
    before any step, naming the parameter and ``hf.trainer_optimizer``."""
    model = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = transformers.Trainer(
        model=model,
        args=_args(str(tmp_path / "plain"), 2),
        train_dataset=_byte_dataset(16),
        optimizer_cls_and_kwargs=(cls, {"lr": 0.02}),
    )
    first = "'transformer.wte.weight' (shape (256, 64))" if make is gpt2 else "'model.embed_tokens.weight'"
    why = "tied with lm_head.weight" if make is gpt2 else "the model's embedding"
    fix = f"disco.integrations.hf.trainer_optimizer(model, 'muon', optimizer=disco.{cls.__name__}, lr=...)"
    with pytest.raises(ValueError) as e:
        trainer.train()
    assert first in str(e.value) and why in str(e.value) and fix in str(e.value), str(e.value)
    assert str(e.value).startswith(f"{cls.__name__}: transformers.Trainer passed its own parameter groups")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_trainer_refuses_a_conv1d_weight_in_the_plain_group(tmp_path):
    """Untied GPT-2: the first misrouted weight is then a Conv1D one (stored in x out)."""
    model = gpt2()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.transformer.wte.requires_grad_(False)
    model.transformer.wpe.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    trainer = transformers.Trainer(
        model=model, args=_args(str(tmp_path), 1), train_dataset=_byte_dataset(8), optimizer_cls_and_kwargs=(Disco, {})
    )
    with pytest.raises(
        ValueError,
        match=r"'transformer\.h\.0\.attn\.c_attn\.weight' \(shape \(64, 192\)\).*"
        r"stored fan_in x fan_out by Conv1D.*hf\.trainer_optimizer",
    ):
        trainer.create_optimizer()


class _MLP(torch.nn.Module):
    """No embedding, no head by name: hidden matrices and vectors only, which the plain groups route right."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 64)
        self.norm = torch.nn.LayerNorm(64)
        self.fc2 = torch.nn.Linear(64, 32)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.nn.functional.one_hot(input_ids % 32, 32).float().mean(1)
        y = self.fc2(self.norm(torch.relu(self.fc1(x))))
        return {"loss": (y - torch.nn.functional.one_hot(labels[:, 0] % 32, 32).float()).pow(2).mean()}


def test_trainer_with_the_disco_class_on_hidden_matrices_only(tmp_path):
    """A model with hidden matrices and vectors only: Trainer's groups pass; Disco routes their vectors to
    bias_rms inside, keeping Trainer's weight decay per group."""
    model = _MLP()
    trainer = transformers.Trainer(
        model=model,
        args=_args(str(tmp_path / "plain"), 3, weight_decay=0.01),
        train_dataset=_byte_dataset(24),
        optimizer_cls_and_kwargs=(Disco, {"lr": 0.02}),
    )
    trainer.train()
    opt = trainer.optimizer.optimizer
    matrices = [g for g in opt.param_groups if all(p.dim() >= 2 for p in g["params"])]
    vectors = [g for g in opt.param_groups if all(p.dim() < 2 for p in g["params"])]
    assert len(matrices) + len(vectors) == len(opt.param_groups) and matrices and vectors
    assert {g["norm_factor"] for g in vectors} == {"bias_rms"} and {g["norm_factor"] for g in matrices} == {"spectral"}
    assert {g["weight_decay"] for g in matrices} == {0.01} and {g["weight_decay"] for g in vectors} == {0.0}


def test_trainer_optimizer_routes_gpt2_right_in_a_real_trainer(tmp_path):
    """The issue's numbers through the real Trainer: one step with lr=1, momentum=0 and the exact SVD moves
    c_fc by spectral norm 2.0 (not 0.5) and every row of the tied wte by 1/8 (not a spectral update)."""
    model = gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="tied"):
        cls_kwargs = hf.trainer_optimizer(model, "disco", lr=1.0, momentum=0.0, backend="svd", weight_decay=0.0)
    trainer = transformers.Trainer(
        model=model,
        args=_args(str(tmp_path), 1, max_grad_norm=0.0),
        train_dataset=_byte_dataset(8),
        optimizer_cls_and_kwargs=cls_kwargs,
    )
    trainer.train()
    delta = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    for suffix, (_, fan_out, fan_in) in HIDDEN.items():
        got = _spectral(delta[f"transformer.h.0.{suffix}"])
        assert got == pytest.approx(math.sqrt(fan_out / fan_in), rel=1e-5), suffix
    rows = torch.linalg.vector_norm(delta["transformer.wte.weight"], dim=1)
    assert torch.allclose(rows, torch.full_like(rows, 1 / 8), rtol=1e-4)


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_trainer_optimizer_with_every_class(tmp_path, make, cls):
    """``hf.trainer_optimizer(model, 'muon', optimizer=cls)`` trains, or (Dion, Dion2 on GPT-2's Conv1D, whose
    math reads the stored layout) refuses naming the transposed weights; ``optimizers=`` takes the same groups."""
    model = make()
    kwargs = {"lr": 0.02} if cls in (Dion, Dion2) else {"lr": 0.02, "weight_decay": 0.0}
    cls_kwargs = hf.trainer_optimizer(model, "muon", optimizer=cls, **kwargs)
    if make is gpt2 and cls in (Dion, Dion2):
        with pytest.raises(ValueError, match=r"c_attn\.weight.*stored \(fan_out x fan_in\) layout"):
            cls_kwargs[0](**cls_kwargs[1])
        return
    built, groups = cls_kwargs
    optimizer = built(**groups)  # optimizers=(optimizer, None): the same groups, built by the user
    trainer = transformers.Trainer(
        model=model, args=_args(str(tmp_path), 3), train_dataset=_byte_dataset(24), optimizers=(optimizer, None)
    )
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and trainer.optimizer.optimizer is optimizer
    names = {n for g in optimizer.param_groups for n in g["param_names"]}
    assert names == {n for n, p in model.named_parameters()}  # routed by the model's names, every one once
