"""``python -m disco plan``: JSON keys, speed at 4096 ranks, shapes files, layouts, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
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


def test_json_4096_ranks_gpt2_small_subprocess():
    """Its speed is a benchmark's (``bench plan``, ``bench goals`` row 7), not a test's: timeout is a hang detector."""
    proc = subprocess.run(
        [sys.executable, "-m", "disco", "plan", "--world-size", "4096", "--model", "gpt2-small", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) >= KEYS
    assert data["world_size"] == 4096 and data["tensors"] == 72
    assert data["redundancy"] == 1.0
    assert data["bytes_total"] == data["bytes_lower_bound"]


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


# ---- per-rank figures (plan_report) against a per-tensor, per-rank recount ---------------------------------------
def _recount(plan, element_size=4, state_bytes=4):
    """The obvious loops: every tensor, every rank."""
    from disco.distributed.plan_report import newton_schulz_flops

    owned = {r: 0 for r in plan.ranks}
    flops = {r: 0.0 for r in plan.ranks}
    state = {r: 0.0 for r in plan.ranks}
    for i, lay in enumerate(plan.layouts):
        for r in plan.ranks:
            piece = lay.local_numel(r)
            state[r] += piece * state_bytes
            if plan.owners[i] < 0 and piece:
                owned[r] += 1
                flops[r] += newton_schulz_flops(lay.shape) * piece / lay.numel
        if plan.owners[i] >= 0:
            owned[plan.owners[i]] += 1
            flops[plan.owners[i]] += newton_schulz_flops(lay.shape)
    peak = dict.fromkeys(plan.ranks, 0.0)
    for bucket in plan.buckets:
        for r in plan.ranks:
            now = sum(2 * plan.layouts[i].local_numel(r) * element_size for i in bucket)
            now += sum(2 * plan.layouts[i].numel * element_size for i in bucket if plan.owners[i] == r)
            peak[r] = max(peak[r], now)
    traffic = plan.bytes_per_rank(element_size)
    return (
        [owned[r] for r in plan.ranks],
        [flops[r] for r in plan.ranks],
        [traffic[r]["sent"] for r in plan.ranks],
        [traffic[r]["received"] for r in plan.ranks],
        [state[r] + peak[r] for r in plan.ranks],
    )


@pytest.mark.parametrize("layout, n", [("fsdp", 5), ("fsdp+tp:3x2", 6), ("hsdp:2x3", 6), ("ddp", 3)])
def test_rank_figures_equal_a_per_rank_recount(layout, n):
    from disco.distributed.plan_report import newton_schulz_flops, rank_figures
    from disco.distributed.shapes import ShapeSpec, role_by_shape

    shapes = [(97, 64), (32, 97), (18, 32), (10, 16, 12), (97, 64), (64, 64)]
    specs = [ShapeSpec(f"t{i}", s, role_by_shape(s)) for i, s in enumerate(shapes)]
    plan = plan_cli.build_plan(specs, layout, n, bucket_size=2)
    fig = rank_figures(plan, element_size=2, state_bytes=4)
    owned, flops, sent, received, peak = _recount(plan, element_size=2, state_bytes=4)
    assert (fig.owned, fig.sent, fig.received) == (owned, sent, received)
    assert fig.flops == pytest.approx(flops, rel=1e-12)
    assert fig.peak_bytes == pytest.approx(peak, rel=1e-12)
    assert sum(fig.flops) == pytest.approx(sum(newton_schulz_flops(s) for s in shapes), rel=1e-12)
    summary = fig.summary()
    for row in summary.values():  # no plan beats a lower bound
        assert math.isnan(row["lower_bound"]) or row["max"] >= row["lower_bound"] * (1 - 1e-12)


def test_per_rank_summary_pipeline_stages_and_plot(tmp_path, capsys):
    png = tmp_path / "load.png"
    argv = ["-n", "32", "--model", "llama3-8b", "--layout", "fsdp+tp:4x2", "--pp", "4", "--plot", str(png), "--json"]
    rc, out, _ = _run(argv, capsys)
    assert rc == 0
    data = json.loads(out)
    assert data["pp"] == 4 and data["world_size"] == 8  # totals of stage 0, on 32 / 4 ranks
    assert data["tensors"] == 56  # 8 of llama3-8b's 32 layers x 7 matrices
    per = data["per_rank"]
    assert set(per) == {"owned_matrices", "flops", "bytes_sent_received", "peak_optimizer_bytes"}
    assert per["owned_matrices"]["mean"] * 32 == pytest.approx(224)  # every matrix owned once over all stages
    assert png.stat().st_size > 10_000
    rc, out, _ = _run(["-n", "32", "--model", "llama3-8b", "--layout", "fsdp+tp:4x2", "--pp", "4"], capsys)
    assert rc == 0 and "per rank (32 ranks)" in out and "max/bound" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-n", "8", "--model", "llama3-8b", "--pp", "3"], "must be >= 1 and divide --world-size 8"),
        (["-n", "64", "--model", "llama3-8b", "--pp", "64"], "64 pipeline stages for 32 layers"),
        (["-n", "8", "--model", "llama3-8b", "--layout", "fsdp+tp:4x2", "--pp", "2"], "each of the --pp 2 stages"),
    ],
)
def test_bad_pipeline_stages_exit_2(argv, message, capsys):
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and message in err and "Traceback" not in err
