"""``python -m disco bench dist``: a tiny run returns valid JSON with the fields the report needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from disco.bench import dist as bench_dist

ROOT = Path(__file__).resolve().parents[1]


#: a hang detector, not a speed test: the run itself takes seconds, but a loaded 2-core machine (parallel test
#: sessions, compiles) has taken over 120 s to start the rank processes and import torch in each
HANG_S = 900


def test_tiny_run_json():
    argv = ["--layers", "1", "--width", "32", "--ranks", "1,2", "--steps", "1", "--warmup", "0", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "disco", "bench", "dist", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=HANG_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(proc.stdout)
    assert data["benchmark"] == "dist" and data["matrices"] == 6
    rows = {(r["ranks"], r["method"]): r for r in data["rows"]}
    assert {(1, "disco"), (2, "disco"), (1, "naive_full_tensor"), (2, "naive_full_tensor")} <= set(rows)
    for ranks in (1, 2):
        d = rows[(ranks, "disco")]
        assert d["ms"] > 0 and d["x_1rank"] > 0
        assert d["redundancy"] == 1.0  # each matrix orthogonalized once over all ranks
        assert d["bytes_total"] == d["bytes_lower_bound"]  # executor's count == planner's lower bound
        assert d["at_lower_bound"] is True
        naive = rows[(ranks, "naive_full_tensor")]
        assert naive["redundancy"] == ranks  # every rank does everything
        assert naive["max_diff"] < 1e-5  # the same update as disco's
    assert rows[(1, "disco")]["bytes_total"] == 0
    # 2 ranks, fp32 matrices of 32 x 128 and smaller: each rank sends half of every matrix it does not own
    assert rows[(2, "disco")]["bytes_total"] > 0 and rows[(2, "disco")]["collectives"] == 6


def test_bad_arguments_exit_2(capsys):
    assert bench_dist.main(["--ranks", "0"]) == 2
    assert bench_dist.main(["--width", "0"]) == 2
    assert bench_dist.main(["--no-such-flag"]) == 2
    capsys.readouterr()
