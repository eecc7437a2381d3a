"""``python -m disco train`` as a user meets it: bad inputs, missing extras, checkpoints and signals, progress,
trackers. Every refusal is one line on stderr and exit status 2; runs use a one-layer model of width 32."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import disco.optim  # noqa: F401  (registers every optimizer)
from disco.optim.registry import register_optimizer, unregister_optimizer
from disco.train import cli
from disco.train.config import TrainConfig, load_config
from disco.train.report import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = (
    "model: {dim: 32, n_layers: 1, n_heads: 2}\noptimizers: adamw\nsteps: 6\nbatch_size: 4\nseq_len: 32\n"
    "warmup_steps: 1\neval_every: 0\neval_batches: 1\ndevice: cpu\n"
)


@pytest.fixture
def tiny(tmp_path):
    """``--config`` of a tiny run and an ``--out`` folder."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_YAML)
    return ["--config", str(cfg), "--out", str(tmp_path / "out")]


def call(argv):
    """``cli.main(argv)``'s exit status, argparse's ``SystemExit`` included."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def steps_logged(out, name="adamw"):
    return [r["step"] for r in read_metrics(Path(out) / name / "metrics.jsonl")]


# --- bad inputs: one line, exit 2 ------------------------------------------------------------------------------


def _files(tmp):
    files = {
        "bad.yaml": "model: [1, 2\n",
        "unknown.yaml": "foo: 1\n",
        "type.yaml": "steps: abc\n",
        "list.yaml": "- a\n- b\n",
        "heads.yaml": "model: {dim: 30, n_heads: 4}\n",
        "empty.txt": "",
        "short.txt": "hi",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "folder").mkdir()


MISUSE = [
    (["--optimizers", "nope"], "--optimizers: unknown 'nope'; valid: "),
    (["--optimizers", ","], "--optimizers ',': an empty name (two commas in a row, or one at an end)"),
    (["--optimizers", "muon,,disco"], "--optimizers 'muon,,disco': an empty name"),
    (["--optimizers", "muon,"], "--optimizers 'muon,': an empty name"),
    (["--lr", "adamw=1e-3,,muon=0.02"], "--lr 'adamw=1e-3,,muon=0.02': an empty name"),
    (["--threads", "-1"], "--threads -1: must be 0 or more"),
    (["--config", "no-such.yaml"], "no such file or built-in config (built-in: gpt_small_gpu, tiny_cpu"),
    (["--config", "{tmp}/bad.yaml"], "not valid YAML at line 2, column 1"),
    (["--config", "{tmp}/unknown.yaml"], "unknown keys foo"),
    (["--config", "{tmp}/type.yaml"], "steps: expected a whole number, got 'abc'"),
    (["--config", "{tmp}/list.yaml"], "expected a mapping of settings"),
    (["--config", "{tmp}/heads.yaml"], "model.dim 30 / n_heads 4"),
    (["--data", "{tmp}/no-such.txt"], "--data {tmp}/no-such.txt: no such file"),
    (["--data", "{tmp}/empty.txt"], "the file is empty"),
    (["--data", "{tmp}/short.txt"], "2 bytes are too few for --seq-len 128"),
    (["--data", "{tmp}/folder"], "not a file"),
    (["--lr", "abc"], "--lr abc: the learning rate 'abc' is not a positive number"),
    (["--lr", "adamw=abc"], "the learning rate of adamw 'abc' is not a positive number"),
    (["--lr", "adamx=0.1"], "'adamx=0.1' is not NAME=VALUE with a registered optimizer name"),
    (["--lr", "0"], "is not a positive number"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--steps", "-3"], "--steps -3: must be at least 1"),
    (["--steps", "x"], "argument --steps: not a whole number: 'x'"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--seq-len", "0"], "--seq-len 0: must be at least 1"),
    (["--ckpt-every", "-1"], "--ckpt-every -1: must be 0 or more"),
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
    (["--parallel", "zero"], "argument --parallel: invalid choice: 'zero'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--resume"], "--resume: no checkpoint in {tmp}/out/{adamw,muon,disco}/ckpt; run without --resume"),
    (["--out", "{tmp}/empty.txt"], "--out {tmp}/empty.txt: cannot create the folder (File exists)"),
]


@pytest.mark.parametrize("argv,message", MISUSE, ids=[" ".join(a) for a, _ in MISUSE])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _files(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert call(["--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m disco train: error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--lr", "abc"]])
def test_bad_input_from_the_shell(argv, tmp_path):
    """The real entry point: status 2, one line, no traceback."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "disco", "train", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_every_option_has_help():
    actions = [a for a in cli.build_parser()._actions if a.dest != "help"]
    assert len(actions) > 20
    assert all(a.help and len(a.help) > 10 for a in actions), [a.dest for a in actions if not a.help]


def test_config_file_values_are_checked_and_yaml_floats_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("weight_decay: 1e-3\nlr: {adamw: 3e-3}\noptimizers: adamw, muon\n")  # YAML 1.1: strings
    cfg = load_config(str(path))
    assert cfg.weight_decay == 1e-3 and cfg.lr == {"adamw": 3e-3} and cfg.optimizers == ["adamw", "muon"]
    assert TrainConfig().ckpt_every > 0 and load_config("tiny_cpu").ckpt_every > 0  # checkpoints by default


# --- missing extras ---------------------------------------------------------------------------------------------


def test_missing_pyyaml_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    assert call(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'PyYAML, not installed: pip install "disco-optim[train]"' in err


@pytest.mark.parametrize("kind,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_missing_tracker_names_the_install_command(kind, module, tiny, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)
    assert call([*tiny, "--log", kind]) == 2
    assert f"--log {kind} needs {kind}, not installed: pip install {kind}" in capsys.readouterr().err


def test_without_matplotlib_the_run_says_it_skipped_the_plot(tiny, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert call([*tiny, "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert 'skipped loss.png: matplotlib is not installed (pip install "disco-optim[train]")' in out
    assert not (Path(tiny[-1]) / "loss.png").exists() and (Path(tiny[-1]) / "summary.json").exists()


# --- progress ---------------------------------------------------------------------------------------------------


class _TTY(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("have_tqdm", [True, False])
def test_progress_bar_in_a_terminal_and_lines_without_tqdm(have_tqdm, monkeypatch, capsys):
    from disco.train.loop import Progress
    from disco.train.parallel import World

    if have_tqdm:
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(sys, "stderr", _TTY())
    world = World("none", 0, 1, torch.device("cpu"), None, 0, 1)
    progress = Progress("adamw", 4, 0, world, every=2)
    for step in range(1, 5):
        progress.update(step, {"train_loss": 5.0 - step, "tokens_per_s": 100.0})
    progress.close()
    bar, lines = sys.stderr.getvalue(), capsys.readouterr().out
    assert (progress.bar is not None) == have_tqdm
    if have_tqdm:
        assert "4/4" in bar and lines == ""
    else:
        assert lines.count("ETA") == 2 and "[adamw] step 4/4 (100%) loss 1.0000 | 0:00 elapsed, ETA 0:00" in lines


# --- checkpoints, resume, signals -------------------------------------------------------------------------------


def test_periodic_checkpoints_progress_lines_table_and_refused_resumes(tiny, capsys):
    out = Path(tiny[-1])
    argv = [*tiny, "--ckpt-every", "2", "--keep-checkpoints", "2", "--print-every", "2"]
    assert call(argv) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (out / "adamw" / "ckpt").iterdir()) == ["step_000004", "step_000006"]
    assert printed.count("ETA") == 3 and "[adamw] step 2/6 (33%) loss" in printed
    assert "train loss, val loss: mean cross-entropy (nats per byte) of the final model on 1 fixed" in printed
    assert (
        f"| none on 1 x cpu | {torch.get_num_threads()} thread" in printed
        and "(automatic: cores / processes here)" in printed
    )
    assert json.loads((out / "adamw" / "config.json").read_text())["batch_size"] == 4

    # a new run in the same folder says that it drops the old checkpoints, and does
    assert call([*argv, "--ckpt-every", "0"]) == 0
    assert "starting over in" in capsys.readouterr().out
    assert [p.name for p in (out / "adamw" / "ckpt").iterdir()] == ["step_000006"]

    # --resume refuses other settings, and a checkpoint past --steps
    assert call([*argv, "--resume", "--batch-size", "8"]) == 2
    assert "trained with other settings (batch_size 4 -> 8)" in capsys.readouterr().err
    assert call([*argv, "--resume", "--steps", "4"]) == 2
    assert "step_000006 is past --steps 4; pass --steps 6 or more" in capsys.readouterr().err

    # resuming a finished run evaluates only, and keeps the metrics
    assert call([*argv, "--resume"]) == 0
    assert "(step 6 of 6, already finished: evaluating only)" in capsys.readouterr().out
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]


_SIGNAL_AT = {"step": 0}


class _SignalSGD(torch.optim.SGD):
    """SGD that sends SIGINT to its own process after step ``_SIGNAL_AT["step"]`` (0: never)."""

    def step(self, closure=None):
        out = super().step(closure)
        self.count = getattr(self, "count", 0) + 1
        if self.count == _SIGNAL_AT["step"]:
            os.kill(os.getpid(), signal.SIGINT)
        return out


@pytest.fixture
def signal_sgd():
    @register_optimizer("tmp_signal_sgd", default_lr=0.1, doc="test only")
    def build(model, *, lr, weight_decay=0.0, **kw):
        return _SignalSGD(model.parameters(), lr=lr)

    yield "tmp_signal_sgd"
    _SIGNAL_AT["step"] = 0
    unregister_optimizer("tmp_signal_sgd")


def test_ctrl_c_writes_a_checkpoint_and_prints_the_resume_command(tiny, signal_sgd, capsys):
    out = Path(tiny[-1]) / signal_sgd
    argv = [*tiny, "--optimizers", signal_sgd, "--ckpt-every", "0"]
    before = signal.getsignal(signal.SIGINT)
    _SIGNAL_AT["step"] = 3
    assert call(argv) == 130
    captured = capsys.readouterr()
    assert "SIGINT: stopping after this step to write a checkpoint" in captured.err
    assert f"stopped by SIGINT: {signal_sgd} saved at step 3 in {out / 'ckpt' / 'step_000003'}" in captured.out
    assert f"resume with: python -m disco train {' '.join(argv)} --resume" in captured.out
    assert (out / "ckpt" / "step_000003" / ".metadata").exists() and steps_logged(out.parent, signal_sgd) == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored

    _SIGNAL_AT["step"] = 0
    assert call([*argv, "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert f"resuming from {out / 'ckpt' / 'step_000003'} (step 3 of 6, 3 to go); appending to" in resumed
    assert steps_logged(out.parent, signal_sgd) == [1, 2, 3, 4, 5, 6]


def test_sigterm_from_outside_checkpoints_and_resume_appends(tiny, capsys):
    """A real SIGTERM to ``python -m disco train``: exit 143, a checkpoint at the last logged step, then resume."""
    out = Path(tiny[-1])
    argv = [*tiny, "--steps", "5000", "--ckpt-every", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "disco", "train", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "adamw" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and "SIGTERM: stopping after this step" in stderr
    done = steps_logged(out)
    last = done[-1]
    assert done == list(range(1, last + 1)) and 3 <= last < 5000
    assert (out / "adamw" / "ckpt" / f"step_{last:06d}" / ".metadata").exists()
    assert f"resume with: python -m disco train {' '.join(argv)} --resume" in stdout

    assert call([*argv, "--resume", "--steps", str(last + 2)]) == 0
    assert f"(step {last} of {last + 2}, 2 to go)" in capsys.readouterr().out
    assert steps_logged(out) == list(range(1, last + 3))


# --- trackers ---------------------------------------------------------------------------------------------------


class _FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


class _FakeWriter:
    def __init__(self, log_dir):
        self.log_dir, self.logged, self.finished = log_dir, [], False

    def add_scalar(self, tag, value, global_step):
        self.logged.append((global_step, {tag: value}))

    def close(self):
        self.finished = True


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_trackers_get_losses_and_norms(kind, tiny, monkeypatch):
    """The calls the loop makes (packages replaced by fakes, so that this runs without them)."""
    made = []
    if kind == "wandb":
        fake = types.SimpleNamespace(init=lambda **kw: made.append(_FakeRun(**kw)) or made[-1])
        monkeypatch.setitem(sys.modules, "wandb", fake)
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        fake = types.SimpleNamespace(SummaryWriter=lambda log_dir: made.append(_FakeWriter(log_dir)) or made[-1])
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    argv = [*tiny, "--optimizers", "disco", "--steps", "2", "--track-norms-every", "2", "--eval-every", "1"]
    assert call([*argv, "--log", kind, "--qk-clip-tau", "0.01"]) == 0
    (run,) = made
    assert run.finished
    tags = {tag for _, data in run.logged for tag in data}
    assert {"loss/train", "loss/val", "lr", "tokens_per_s", "qk_clip/max_logit", "qk_clip/clipped_heads"} <= tags
    assert any(t.startswith("qk_clip/max_logit/") for t in tags)
    assert any(t.startswith("norms/track_update_") for t in tags)
    assert {step for step, _ in run.logged} == {1, 2}
    if kind == "wandb":
        assert run.kwargs["mode"] == "offline" and run.kwargs["name"] == "disco"
    else:
        assert run.log_dir == str(Path(tiny[-1]) / "tensorboard" / "disco")


def test_tensorboard_event_files(tiny):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = [*tiny, "--optimizers", "disco", "--steps", "2", "--track-norms-every", "1", "--eval-every", "2"]
    assert call([*argv, "--log", "tensorboard"]) == 0
    events = EventAccumulator(str(Path(tiny[-1]) / "tensorboard" / "disco"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss/train", "loss/val", "lr"} <= set(tags) and any(t.startswith("norms/") for t in tags)
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2]


def test_wandb_offline_run(tiny, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert call([*tiny, "--steps", "2", "--track-norms-every", "1", "--log", "wandb"]) == 0
    runs = list((Path(tiny[-1]) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_unknown_command_of_python_m_disco(capsys):
    from disco.__main__ import COMMANDS, main

    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m disco: error: unknown command 'trian'; valid: {', '.join(COMMANDS)}\n"
    assert {"train", "bench", "groups", "plan"} <= set(COMMANDS)


def test_threads_option_is_used_and_stated(tiny, capsys):
    before = torch.get_num_threads()
    try:
        assert call([*tiny, "--steps", "1", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    printed = capsys.readouterr().out
    assert printed.startswith(
        "[disco] adamw | 1 steps | batch 4 x 32 | none on 1 x cpu | 1 thread per process (--threads)"
    )
    summary = json.loads((Path(tiny[-1]) / "summary.json").read_text())
    assert summary["machine"]["threads"] == 1 and summary["machine"]["layout"] == "1 process"


# --- python -m disco groups: mistakes are one line, exit 2 ----------------------------------------------------

FACTORIES = """
import torch
def needs(width): return torch.nn.Linear(width, width)
def ok(): return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
def boom(): raise RuntimeError("no weights here")
"""

GROUPS_MISUSE = [
    ([], "the following arguments are required: factory"),
    (["fac.py:needs"], "fac.py:needs: needs() missing 1 required positional argument: 'width'"),
    (["fac.py:boom"], "fac.py:boom raised RuntimeError: no weights here"),
    (["fac.py:ok", "--kwargs", "{bad"], "--kwargs is not valid JSON (Expecting property name"),
    (["fac.py:ok", "--kwargs", "[1,2]"], "--kwargs must be a JSON object ({...}), got list: [1,2]"),
    (["fac.py:ok", "--kwargs", '"x"'], "--kwargs must be a JSON object ({...}), got str"),
    (["fac.py:nothing"], "cannot load 'fac.py:nothing'"),
]


@pytest.mark.parametrize("argv,message", GROUPS_MISUSE, ids=[" ".join(a) or "none" for a, _ in GROUPS_MISUSE])
def test_groups_mistakes_are_one_line_and_exit_2(argv, message, tmp_path):
    (tmp_path / "fac.py").write_text(FACTORIES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "disco", "groups", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_groups_prints_the_table(tmp_path, capsys):
    from disco.groups.__main__ import main

    (tmp_path / "fac.py").write_text(FACTORIES)
    assert main([str(tmp_path / "fac.py") + ":ok", "--kwargs", '{"lr": 0.5}']) == 0
    out = capsys.readouterr().out
    assert "0.weight  4x4" in out and "bias_rms" in out and "4 parameters (28 elements) in 2 groups" in out


# --- --split-heads ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", ["muon", "disco", "scion"])
def test_split_heads_orthogonalizes_each_head(name, fused):
    """The builders' split rules reach the optimizer: one step from a zero momentum moves each head's rows of q
    (and k, v) by a multiple of that head's own polar factor (SVD in float64), not the whole matrix's."""
    from disco.optim.registry import get_optimizer_spec
    from disco.train.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(dim=32, n_layers=1, n_heads=4, fused_qkv=fused))
    spec = get_optimizer_spec(name)
    opt = spec.build(model, lr=0.1, split_heads=True, compute_dtype=torch.float64)
    for group in opt.param_groups:
        if "backend" in group:
            group["backend"] = "svd"  # the exact polar factor, so that the reference can be the SVD's
    attn = model.layers[0].attention
    weights = [attn.wqkv.weight] if fused else [attn.wq.weight, attn.wk.weight, attn.wv.weight]
    before = [w.detach().double().clone() for w in weights]
    grads = [torch.randn_like(w) for w in weights]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for w, g in zip(weights, grads):
        w.grad = g.clone()
    opt.step()
    for w, w0, g in zip(weights, before, grads):
        step = (w0 - w.detach().double()).reshape(-1, 8, 32)  # rows by head (head_dim 8)
        for k, head in enumerate(g.double().reshape(-1, 8, 32)):
            u, _, vh = torch.linalg.svd(head, full_matrices=False)
            polar = u @ vh
            scale = (step[k] * polar).sum() / (polar * polar).sum()
            assert scale > 0, (name, fused, k)
            torch.testing.assert_close(step[k], scale * polar, atol=1e-6, rtol=1e-5)


def test_split_heads_flag_reaches_the_run(tiny):
    assert call([*tiny, "--optimizers", "muon", "--steps", "2", "--split-heads"]) == 0
    saved = json.loads((Path(tiny[-1]) / "muon" / "config.json").read_text())
    assert saved["split_heads"] is True
    # a resume with another setting would follow another trajectory: refused, one line
    assert call([*tiny, "--optimizers", "muon", "--steps", "4", "--resume"]) == 2
