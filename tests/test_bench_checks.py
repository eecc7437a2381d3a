"""``python -m disco bench checks`` runs on real gloo ranks and prints each check's share of the step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_json():
    argv = ["--ranks", "2", "--layers", "1", "--width", "32", "--steps", "1", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "disco", "bench", "checks", *argv], capture_output=True, text=True, cwd=ROOT, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["what"]: r for r in json.loads(proc.stdout)["rows"]}
    assert set(rows) == {"step", "checks", "scan", "settings"}
    assert rows["step"]["ms"] > 0 and all(r["ms"] >= 0 for r in rows.values())
