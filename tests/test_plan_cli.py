"""``python -m disco plan``: JSON keys, speed at 4096 ranks, shapes files, layouts, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from disco.distributed import plan_cli

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "world_size",
    "imbalance",
    "redundancy",
    "bytes_per_rank_max",
    "bytes_lower_bound",
    "collectives_per_step",
    "bytes_total",
    "tensors",
}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = plan_cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_4096_ranks_gpt2_small_subprocess_fast():
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "disco", "plan", "--world-size", "4096", "--model", "gpt2-small", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) >= KEYS
    assert data["world_size"] == 4096 and data["tensors"] == 72
    assert data["redundancy"] == 1.0
    assert data["bytes_total"] == data["bytes_lower_bound"]
    assert elapsed < 20, f"plan for 4096 ranks took {elapsed:.1f} s"


def test_json_8_ranks(capsys):
    rc, out, _ = _run(["--world-size", "8", "--model", "gpt2-small", "--json"], capsys)
    assert rc == 0
    data = json.loads(out)
    assert set(data) >= KEYS
    assert data["imbalance"] <= 1.05 and data["redundancy"] == 1.0
    assert data["collectives_per_step"] == 6 and data["bytes_total"] == data["bytes_lower_bound"]


def test_human_table(capsys):
    rc, out, _ = _run(["-n", "4", "--model", "gpt2-small"], capsys)
    assert rc == 0
    for word in ("imbalance", "redundancy", "bytes/rank max", "lower bound", "collectives/step", "rank"):
        assert word in out
    assert len([ln for ln in out.splitlines() if ln.strip().startswith(("0 ", "1 ", "2 ", "3 "))]) == 4


def test_shapes_file(tmp_path, capsys):
    f = tmp_path / "shapes.json"
    f.write_text(json.dumps([[97, 64], [32, 97], [18, 32], [4, 16, 12]]))
    rc, out, _ = _run(["-n", "3", "--shapes", str(f), "--json"], capsys)
    assert rc == 0
    data = json.loads(out)
    assert data["tensors"] == 4 and data["redundancy"] == pytest.approx(1.0)
    assert data["local_buckets"] == 1  # the expert stack is sharded on the expert dim: computed in place


@pytest.mark.parametrize("layout", ["hsdp:2x4", "fsdp+tp:4x2", "fsdp+tp:2x4", "ddp"])
def test_layouts(layout, capsys):
    rc, out, _ = _run(["-n", "8", "--model", "gpt2-small", "--layout", layout, "--json"], capsys)
    assert rc == 0
    data = json.loads(out)
    assert data["layout"] == layout and data["redundancy"] == 1.0
    assert data["bytes_total"] == data["bytes_lower_bound"]


def test_moe_fsdp_tp_and_bucket_size(capsys):
    argv = ["-n", "8", "--model", "moe-small", "--layout", "fsdp+tp:4x2", "--bucket-size", "3", "--json"]
    rc, out, _ = _run(argv, capsys)
    assert rc == 0
    data = json.loads(out)
    # 32 x 512x512, 8 routers, 16 x (8,1024,512), 8 x (8,512,1024), at most 3 per bucket
    assert data["buckets"] == 11 + 3 + 6 + 3
    assert data["collectives_per_step"] == 2 * data["buckets"]


def _bad_json(tmp_path, text):
    f = tmp_path / "bad.json"
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-n", "8", "--shapes", "/nonexistent/shapes.json"], "not found"),
        (["-n", "8", "--shapes", "BAD:not json"], "not valid JSON"),
        (["-n", "8", "--shapes", "BAD:[[768, 768], [3, 4, 5, 6]]"], "entry 1"),
        (["-n", "8", "--shapes", "BAD:[[768, 0]]"], "positive integers"),
        (["-n", "8", "--shapes", "BAD:[[768]]"], "2 or 3"),
        (["-n", "8", "--shapes", "BAD:[[1.5, 2]]"], "entry 0"),
        (["-n", "8", "--shapes", 'BAD:{"a": 1}'], "JSON list"),
        (["-n", "8", "--shapes", "BAD:[]"], "non-empty"),
        (["-n", "8", "--model", "gpt2-small", "--layout", "hsdp:3x3"], "holds 9 ranks"),
        (["-n", "8", "--model", "gpt2-small", "--layout", "fsdp+tp:2x2"], "holds 4 ranks"),
        (["-n", "8", "--model", "gpt2-small", "--layout", "hsdp:2"], "hsdp:AxB"),
        (["-n", "8", "--model", "gpt2-small", "--layout", "hsdp:axb"], "hsdp:AxB"),
        (["-n", "8", "--model", "gpt2-small", "--layout", "zero3"], "unknown layout"),
        (["-n", "8", "--model", "gpt2-small", "--layout", "fsdp:2x4"], "takes no mesh"),
        (["-n", "0", "--model", "gpt2-small"], "--world-size"),
        (["-n", "8", "--model", "gpt2-small", "--bucket-size", "0"], "--bucket-size"),
        (["-n", "8", "--model", "no-such-model"], "invalid choice"),
        (["-n", "8"], "required"),
        (["--model", "gpt2-small"], "required"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, tmp_path, capsys):
    argv = [_bad_json(tmp_path, a[4:]) if a.startswith("BAD:") else a for a in argv]
    rc, out, err = _run(argv, capsys)
    assert rc == 2
    assert message in err, err
    assert out == ""


def test_bad_input_exit_code_from_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "disco", "plan", "-n", "8", "--model", "gpt2-small", "--layout", "hsdp:3x3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "hsdp:3x3" in proc.stderr and "Traceback" not in proc.stderr


def test_help_exits_0(capsys):
    rc, out, _ = _run(["--help"], capsys)
    assert rc == 0 and "--world-size" in out


@pytest.mark.parametrize("layout", ["fsdp", "ddp", "hsdp:256x256", "fsdp+tp:8192x8"])
def test_1000_matrices_on_65536_ranks(layout, tmp_path, capsys):
    """Issue #13's size, in process: every matrix gets its own owner, nothing is computed twice."""
    f = tmp_path / "shapes.json"
    f.write_text(json.dumps([[768, 768], [768, 768], [768, 768], [768, 768], [3072, 768], [768, 3072]] * 167))
    rc, out, _ = _run(["-n", "65536", "--shapes", str(f), "--layout", layout, "--json"], capsys)
    assert rc == 0
    data = json.loads(out)
    assert data["tensors"] == 1002 and data["ranks_with_work"] == 1002 and data["redundancy"] == 1.0
    assert data["bytes_total"] >= data["bytes_lower_bound"] > 0
