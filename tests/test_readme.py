"""The README's quickstart runs as pasted (the first ``python`` block after the Quickstart heading)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block under the Quickstart heading"
    return match.group(1)


def test_quickstart_runs_as_pasted(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(_quickstart())
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith("loss ") and float(first.split()[1]) < 4.1  # ln(64) = 4.16 at the start
    assert "track_update_rms_to_rms/layers.0.0.weight" in proc.stdout


def test_a_clone_named_disco_does_not_shadow_the_package(tmp_path):
    """The src layout: scripts run beside a checkout called ``disco`` import the installed package."""
    (tmp_path / "disco").symlink_to(ROOT, target_is_directory=True)
    code = "from disco import Disco; import disco; print(disco.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("__init__.py")
