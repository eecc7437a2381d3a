"""``python -m disco sweep`` as a user meets it: a 2 x 2 grid on a one-layer model (its outputs, not its numbers),
resuming, the budget refusal and bad inputs; and the best-lr table on made-up rows."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import disco.optim  # noqa: F401  (registers every optimizer)
from disco.__main__ import main as disco_main
from disco.distributed.agreement import StepError
from disco.optim.registry import get_optimizer_spec, register_optimizer, unregister_optimizer
from disco.train import cli, sweep
from disco.train.sweep_report import best_lrs, drift, format_best

TINY_YAML = (
    "model: {dim: 32, n_layers: 1, n_heads: 2}\nsteps: 3\nbatch_size: 4\nseq_len: 16\nwarmup_steps: 1\n"
    "eval_every: 0\neval_batches: 1\ndevice: cpu\n"
)
FIELDS = {
    "optimizer", "width", "depth", "lr", "lr_scale", "final_train_loss", "final_val_loss", "steps", "tokens_per_s",
    "wall_s", "diverged", "seed",
}  # fmt: skip


@pytest.fixture
def tiny(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_YAML)
    return tmp_path / "out", ["--config", str(cfg), "--out", str(tmp_path / "out"), "--budget", "0"]


def call(argv):
    try:
        return sweep.main(argv)
    except SystemExit as e:
        return e.code


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]


def test_sweep_writes_rows_table_plot_and_resumes(tiny, capsys):
    out, common = tiny
    grid = ["--optimizers", "adamw,muon", "--widths", "16,32", "--lr-scale", "0.5,2"]
    assert call(common + grid + ["--jobs", "2"]) == 0  # two worker processes
    printed = capsys.readouterr().out
    got = rows(out)
    assert len(got) == 8
    assert {tuple(sorted(r)) for r in got} == {tuple(sorted(FIELDS))}
    keys = {(r["optimizer"], r["width"], r["depth"], r["lr_scale"]) for r in got}
    assert keys == {(o, w, 1, s) for o in ("adamw", "muon") for w in (16, 32) for s in (0.5, 2.0)}
    for r in got:
        assert r["lr"] == pytest.approx(get_optimizer_spec(r["optimizer"]).default_lr * r["lr_scale"])
        assert r["steps"] == 3 and r["seed"] == 0 and isinstance(r["diverged"], bool)
        run = out / "runs" / f"{r['optimizer']}_w{r['width']}_d1_x{r['lr_scale']:g}" / r["optimizer"]
        trained = json.loads((run / "config.json").read_text())  # what the run was given, not what the row says
        assert (trained["lr"], trained["model"]["dim"], trained["model"]["n_layers"]) == (r["lr"], r["width"], 1)
        assert (trained["steps"], trained["seed"], trained["batch_size"], trained["seq_len"]) == (3, 0, 4, 16)
    assert not list(out.glob("runs/*/*/ckpt"))  # checkpoints are deleted after each run
    table = [line.split() for line in printed.splitlines()]
    for opt in ("adamw", "muon"):
        for width in ("16", "32"):
            assert any(line[:3] == [opt, "1", width] for line in table), printed
    assert "adamw (depth 1): best lr" in printed and "largest / smallest" in printed
    pytest.importorskip("matplotlib")
    assert (out / "sweep.png").stat().st_size > 0

    # the same command runs nothing again; a larger grid runs only the new points
    assert call(common + grid + ["--jobs", "1"]) == 0
    again = capsys.readouterr().out
    assert "8 runs (8 already in" in again and "[sweep 1/8]" not in again
    assert len(rows(out)) == 8
    bigger = ["--optimizers", "adamw,muon", "--widths", "16,32", "--lr-scale", "0.5,1,2", "--jobs", "1"]
    assert call(common + bigger) == 0
    more = capsys.readouterr().out
    assert "12 runs (8 already in" in more
    assert [line.split("]")[0] for line in more.splitlines() if line.startswith("[sweep ")] == [
        f"[sweep {n}/12" for n in range(9, 13)
    ]
    assert sorted(r["lr_scale"] for r in rows(out)[8:]) == [1.0] * 4
    # a smaller grid into the same folder counts its own points only (the file's other rows are not its)
    other = ["--optimizers", "adamw", "--widths", "16", "--lr-scale", "1,4", "--jobs", "1"]
    assert call(common + other) == 0
    assert "[sweep 2/2]" in capsys.readouterr().out


def test_a_point_equals_the_training_cli_with_its_settings(tiny, tmp_path, capsys):
    """The slow twin: one point of the grid trains exactly what ``python -m disco train`` trains at that lr."""
    out, common = tiny
    argv = common + ["--optimizers", "adamw", "--widths", "32", "--lr-scale", "2", "--jobs", "1", "--threads", "1"]
    assert call(argv) == 0
    (row,) = rows(out)
    twin = tmp_path / "twin"
    assert cli.main(["--config", common[1], "--optimizers", "adamw", "--lr", "0.002", "--out", str(twin)]) == 0
    capsys.readouterr()
    expected = json.loads((twin / "summary.json").read_text())["results"]["adamw"]
    assert (row["final_train_loss"], row["final_val_loss"]) == (
        expected["final_train_loss"],
        expected["final_val_loss"],
    )


@pytest.mark.parametrize("threads", [1, 2])
def test_runs_and_calibration_train_with_the_threads_asked_for(tiny, monkeypatch, threads):
    """``--threads`` reaches the training: before, the training's world setup reset every run to all the cores
    (2 jobs x 2 threads on 2 cores ran 15x slower)."""
    out, common = tiny
    seen = []
    real_step = sweep._seconds_per_run

    def calibrating(*args, **kwargs):
        seen.append(("calibrate", torch.get_num_threads()))
        return real_step(*args, **kwargs)

    def training(*args, **kwargs):
        seen.append(("train", torch.get_num_threads()))
        return real_train(*args, **kwargs)

    real_train = sweep.train_optimizer
    monkeypatch.setattr(sweep, "_seconds_per_run", calibrating)
    monkeypatch.setattr(sweep, "train_optimizer", training)
    before = torch.get_num_threads()
    try:
        args = ["--optimizers", "adamw", "--widths", "32", "--lr-scale", "1", "--jobs", "1", "--threads", str(threads)]
        assert call([*common[:-2], "--budget", "1000", *args]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [("calibrate", threads), ("train", threads)]


def test_a_huge_lr_is_flagged_diverged(tiny, capsys):
    out, common = tiny
    argv = common + ["--optimizers", "adamw", "--widths", "16", "--lr-scale", "1e5", "--jobs", "1"]
    assert call(argv) == 0
    (row,) = rows(out)
    assert row["diverged"] is True
    assert "every lr diverged" in capsys.readouterr().out


class _Refuses(torch.optim.SGD):
    """An optimizer whose second step raises the ``StepError`` of a Disco optimizer (``KIND``: what it saw)."""

    KIND = "nonfinite"

    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            raise StepError("non-finite (NaN / inf) gradients", **{self.KIND: [0]})
        return super().step(closure)


@pytest.fixture
def refuses():
    @register_optimizer("tmp_refuses", default_lr=0.1, doc="test only")
    def build(model, *, lr, weight_decay=0.0, **kw):
        return _Refuses(model.parameters(), lr=lr)

    yield "tmp_refuses"
    _Refuses.KIND = "nonfinite"
    unregister_optimizer("tmp_refuses")


def test_a_refused_nonfinite_step_is_a_divergence_and_any_other_error_stops_the_sweep(tiny, refuses, capsys):
    out, common = tiny
    argv = common + ["--optimizers", refuses, "--widths", "16", "--lr-scale", "1", "--jobs", "1"]
    assert call(argv) == 0
    (row,) = rows(out)
    assert row["diverged"] is True and row["error"].startswith("StepError: non-finite")
    assert row["final_val_loss"] is None and row["final_train_loss"] is None  # strict JSON: no NaN
    assert "DIVERGED" in capsys.readouterr().out
    _Refuses.KIND = "failed"  # an exception inside the math is a bug to see, not a divergence
    with pytest.raises(StepError):
        call(common + ["--optimizers", refuses, "--widths", "32", "--lr-scale", "1", "--jobs", "1"])
    assert len(rows(out)) == 1


def test_budget_refusal_names_the_estimate(tiny, capsys):
    out, common = tiny
    argv = common[:-2] + ["--budget", "0.0001", "--optimizers", "adamw", "--widths", "16,32", "--lr-scale", "1,2"]
    assert call(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "4 runs would take about" in err and "--budget 0.0001" in err and "timed steps" in err
    assert not (out / "sweep.jsonl").exists() or not rows(out)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--optimizers", "adamw,nope"], "unknown"),
        (["--widths", "16,30"], "head size"),
        (["--widths", "16,16"], "twice"),
        (["--widths", "a"], "not a whole number"),
        (["--lr-scale", "0"], "positive"),
        (["--lr-scale", "-1"], "not a number >= 0"),
        (["--steps", "0"], "--steps 0"),
        (["--jobs", "0"], "--jobs 0"),
        (["--steps", "2,3"], "one value"),
        (["--depths", "0"], "--depths 0"),
        (["--data", "/no/such/file"], "no such file"),
    ],
)
def test_bad_inputs_are_one_line_and_exit_2(tiny, capsys, extra, message):
    out, common = tiny
    grid = {"--optimizers": "adamw", "--widths": "16", "--lr-scale": "1"}
    for flag, value in zip(extra[::2], extra[1::2]):
        grid[flag] = value
    argv = common + [x for kv in grid.items() for x in kv]
    assert call(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_other_settings_in_the_same_out_are_refused(tiny, capsys):
    out, common = tiny
    grid = ["--optimizers", "adamw", "--widths", "16", "--lr-scale", "1", "--jobs", "1"]
    assert call(common + grid) == 0
    capsys.readouterr()
    assert call(common + grid + ["--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "seed 0 -> 1" in err
    assert len(rows(out)) == 1


def test_disco_lists_the_sweep_command(capsys):
    assert disco_main(["--help"]) == 0
    assert "sweep" in capsys.readouterr().out


# ---- the table on made-up rows ---------------------------------------------------------------------------------


def _row(opt, width, scale, val, diverged=False, depth=4):
    return {"optimizer": opt, "width": width, "depth": depth, "lr": 0.01 * scale, "lr_scale": scale,
            "final_val_loss": val, "diverged": diverged}  # fmt: skip


def test_best_lr_edges_ratio_and_all_diverged():
    made_up = [
        _row("a", 64, 0.5, 2.0), _row("a", 64, 1, 1.9), _row("a", 64, 2, 1.95),  # interior best: x1
        _row("a", 128, 0.5, 1.7), _row("a", 128, 1, 1.8), _row("a", 128, 2, math.nan, True),  # best at the low edge
        _row("b", 64, 1, 9.0, True), _row("b", 64, 2, math.nan, True),  # all diverged
    ]  # fmt: skip
    groups = best_lrs(made_up)
    (a64, a128), (b64,) = groups[("a", 4)], groups[("b", 4)]
    assert a64 is not None and (a64.lr_scale, a64.edge, a64.diverged) == (1, None, 0)
    assert a128 is not None and (a128.lr_scale, a128.edge, a128.diverged) == (0.5, "low", 1)
    assert b64 is None
    assert drift(groups[("a", 4)]) == (pytest.approx(2.0), True)
    assert drift(groups[("b", 4)]) is None
    table = format_best(made_up)
    assert "at the grid's smallest lr, 1/3 diverged" in table
    assert "every lr diverged" in table
    assert "largest / smallest = 2 (" in table


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc (no psutil); ``None`` once it is gone or reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _alive(pids) -> set[int]:
    """Those of ``pids`` still running (not gone, not zombies)."""
    return {p for p in pids if (st := _stat(p)) is not None and st[0] != "Z"}


def _children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid``."""
    kids = {int(d.name) for d in Path("/proc").glob("[0-9]*") if (st := _stat(int(d.name))) and st[1] == pid}
    return _alive(kids)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to find the worker processes")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killing_the_sweep_stops_its_workers(tiny, signum):
    """A sweep stopped by SIGTERM (a scheduler, ``kill``) or SIGKILL leaves no worker training on: before, a
    SIGTERM'd parent left its spawned workers running their points to the end, unseen."""
    out, common = tiny
    cfg = common[common.index("--config") + 1]
    long_runs = Path(cfg).read_text().replace("steps: 3", "steps: 100000")
    Path(cfg).write_text(long_runs)
    argv = [*common, "--optimizers", "adamw", "--widths", "16,32", "--lr-scale", "1", "--jobs", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "disco", "sweep", *argv], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # a hang detector: the workers import torch and start their runs
        while len(list((out / "runs").glob("*/run.log"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep's workers did not start"
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(signum)
        proc.wait(timeout=120)
        deadline = time.monotonic() + 60
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(workers), f"workers {sorted(_alive(workers))} outlived the sweep"
        if signum == signal.SIGTERM:
            assert proc.returncode == 130
    finally:
        proc.kill()
        for p in _alive(_children(proc.pid)):
            os.kill(p, signal.SIGKILL)
