"""Every ``python`` block of README.md and docs/*.md runs as pasted, each in a fresh interpreter.

A block that cannot run in one process says so on its first line, visibly in the page: ``# not run by the docs
test: <why>``; a block that imports an optional package (``transformers``, ``torchtitan``) is skipped when that
package is not installed (``make install`` installs every extra, so CI runs them all).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARKER = "# not run by the docs test:"
OPTIONAL = ("transformers", "torchtitan")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced ``python`` block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        out.append((text[: m.start()].count("\n") + 1, m.group(1)))
    return out


BLOCKS = [(page, line, code) for page in pages() for line, code in python_blocks(page.read_text())]


def test_the_pages_have_blocks():
    """The README's quickstart and the integrations' examples are among them."""
    where = {(p.name, line) for p, line, _ in BLOCKS}
    assert any(name == "README.md" for name, _ in where)
    for name in ("getting-started.md", "distributed.md", "huggingface.md", "torchtitan.md", "algorithms.md"):
        assert any(n == name for n, _ in where), name
    skipped = [(p.name, line) for p, line, code in BLOCKS if code.startswith(SKIP_MARKER)]
    assert len(skipped) <= 3, skipped  # keep them few


def test_python_blocks_are_found_exactly():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 2\nc = 3\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n"), (8, "b = 2\nc = 3\n")]


@pytest.mark.parametrize("page,line,code", BLOCKS, ids=[f"{p.name}:{line}" for p, line, _ in BLOCKS])
def test_block_runs_as_pasted(page, line, code, tmp_path):
    if code.startswith(SKIP_MARKER):
        pytest.skip(code.splitlines()[0])
    for module in OPTIONAL:
        if re.search(rf"^\s*(import|from) {module}\b", code, re.M) and importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    script = tmp_path / "block.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, f"{page.name}:{line}\n{code}\n{proc.stderr[-3000:]}"


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "--site-dir", str(site)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=config.parent, timeout=600)


def test_docs_build_strict_and_a_broken_link_fails_it(tmp_path):
    """What ``make docs`` runs: the site builds with warnings as errors; a copy with one broken link does not."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    proc = _mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("Disco") > 10  # from the docstrings
    copy = tmp_path / "copy"
    (copy / "docs").mkdir(parents=True)
    for page in (ROOT / "docs").iterdir():
        (copy / "docs" / page.name).write_bytes(page.read_bytes())
    (copy / "src").symlink_to(ROOT / "src", target_is_directory=True)
    (copy / "mkdocs.yml").write_text((ROOT / "mkdocs.yml").read_text())
    with (copy / "docs" / "benchmarks.md").open("a") as f:
        f.write("\n[a page that is not there](nowhere.md)\n")
    proc = _mkdocs(copy / "mkdocs.yml", tmp_path / "site2")
    assert proc.returncode != 0 and "nowhere.md" in proc.stderr, proc.stderr[-3000:]
