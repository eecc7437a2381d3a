"""The README as a new user reads it: short, the install and the two commands, a quickstart that runs as pasted,
the tables of algorithms and parallelisms, and links that lead somewhere (every ``python`` block of the README and
of docs/ is run by tests/test_docs_blocks.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 4)
    return README[start : end if end > 0 else len(README)]


def _quickstart() -> str:
    match = re.search(r"```python\n(.*?)```", _section("Quickstart"), re.S)
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


def test_the_readme_is_short_and_in_order():
    headings = re.findall(r"^## (.+)$", README, re.M)
    assert headings[:4] == ["Install", "The two commands", "Quickstart", "Algorithms"], headings
    assert "Parallelisms" in headings and "Documentation" in headings
    assert len(README.splitlines()) <= 170  # the rest lives in docs/
    commands = _section("The two commands")
    assert "make run " in commands and "make test " in commands  # the main job and the test command


def test_tables_of_algorithms_and_parallelisms():
    algorithms = _section("Algorithms")
    for name in ("`Disco`", "`Muon`", "`Scion`", "`NorMuon`", "`Dion`", "`Dion2`"):
        assert re.search(rf"^\| {re.escape(name)} \|", algorithms, re.M), name
    parallel = _section("Parallelisms")
    for name in ("DDP", "FSDP2", "HSDP", "TP", "EP", "CP", "PP"):
        assert re.search(rf"^\| [^|]*\b{name}\b", parallel, re.M), name
    # each parallelism names the test command that shows it, and that test file exists
    for path in re.findall(r"pytest ((?:tests/\S+\.py ?)+)", parallel):
        for file in path.split():
            assert (ROOT / file).is_file(), file


def test_links_lead_to_pages_that_exist():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert {"docs/getting-started.md", "docs/distributed.md", "docs/huggingface.md", "docs/torchtitan.md"} <= set(local)
    for link in local:
        assert (ROOT / link).exists(), link
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert page.name in nav or page.name in (ROOT / "docs" / "index.md").read_text(), page.name


def test_the_training_table_names_its_command_cpu_and_dtype():
    text = _section("Training: `python -m disco train`")
    assert re.search(r"`python -m disco train [^`]*`", text)
    head = next(line for line in text.splitlines() if line.startswith("| optimizer"))
    for column in ("lr", "final train loss", "final val loss", "steps to AdamW's final val loss", "tokens/s"):
        assert column in head, column
    assert "compute dtype" in text and "CPU" in text


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_benchmark_table_is_rows_of_the_make_bench_run_in_the_docs():
    """Each row of the README's benchmark table is a row of the ``make bench`` output pasted in
    docs/benchmarks.md (same goal, same numbers), its ratio is ours / peer, and the text names the CPU."""
    text = _section("Benchmarks")
    assert "`make bench`" in text and re.search(r"Intel Xeon|AMD EPYC", text)
    docs = [
        _cells(line) for line in (ROOT / "docs" / "benchmarks.md").read_text().splitlines() if line.startswith("| ")
    ]
    rows = [_cells(line) for line in text.splitlines() if line.startswith("| ")][2:]  # past the head and rule
    assert len(rows) >= 5
    for goal, ours, peer, ratio, target, met in rows:
        name = goal.split(" (")[0]
        assert any(d[0] == name and d[2:7] == [ours, peer, ratio, target, met] for d in docs), goal
        assert abs(float(ours) / float(peer) - float(ratio)) < 1e-3, goal


def test_a_clone_named_disco_does_not_shadow_the_package(tmp_path):
    """The src layout: scripts run beside a checkout called ``disco`` import the installed package."""
    (tmp_path / "disco").symlink_to(ROOT, target_is_directory=True)
    code = "from disco import Disco; import disco; print(disco.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("__init__.py")
