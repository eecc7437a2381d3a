"""Layering: integrations -> optim -> distributed -> ops -> torch (DESIGN.md section 2), checked with ``ast``.

Importing ``torch`` already imports ``torch.distributed``, so a runtime ``sys.modules`` check cannot show that
``disco.ops`` avoids it; instead every file is parsed and each import (absolute, relative, ``from torch import
distributed``, ``importlib.import_module("...")``, ``__import__("...")``) is resolved to a module name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DISCO = SRC / "disco"

# package -> module prefixes that no file under it may import
RULES: dict[str, tuple[str, ...]] = {
    "disco.ops": (
        "torch.distributed",
        "disco.optim",
        "disco.distributed",
        "disco.integrations",
        "disco.train",
        "disco.bench",
        "disco.groups",
        "disco.tracking",
    ),
    "disco.distributed": ("disco.optim", "disco.integrations", "disco.train"),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every module name ``source`` (the text of ``module``) may import, with its line number.

    ``from a import b`` yields both ``a`` and ``a.b`` (b may be a submodule); relative imports are resolved.
    """
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.append((node.lineno, base))
            out.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def violations(source: str, module: str, forbidden: tuple[str, ...], is_package: bool = False) -> list[str]:
    bad = []
    for line, name in imported_modules(source, module, is_package):
        if any(name == f or name.startswith(f + ".") for f in forbidden):
            bad.append(f"{module}:{line} imports {name}")
    return bad


def files_under(package: str) -> list[Path]:
    return sorted((SRC / package.replace(".", "/")).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(RULES))
def test_layering_rules_hold(package):
    files = files_under(package)
    assert files or package != "disco.ops", f"no files found under {package}"
    bad = []
    for path in files:
        bad += violations(path.read_text(), module_name(path), RULES[package], is_package=path.name == "__init__.py")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_ops_imports_only_torch_stdlib_and_itself():
    allowed_roots = {"torch", "disco", "__future__", "math", "collections", "dataclasses", "typing", "functools"}
    allowed_roots |= set(getattr(sys, "stdlib_module_names", ()))
    for path in files_under("disco.ops"):
        for line, name in imported_modules(path.read_text(), module_name(path), path.name == "__init__.py"):
            root = name.split(".")[0]
            assert root in allowed_roots, f"{path}:{line} imports {name} (ops is pure torch math)"
            if root == "disco":
                assert name == "disco.ops" or name.startswith("disco.ops."), f"{path}:{line} imports {name}"


@pytest.mark.parametrize(
    "source",
    [
        "import torch.distributed as dist",
        "import torch.distributed",
        "from torch import distributed",
        "from torch.distributed import all_reduce",
        "from torch.distributed.tensor import DTensor",
        "import importlib\nimportlib.import_module('torch.distributed')",
        "__import__('torch.distributed')",
        "from ..optim import Muon",
        "from .. import distributed",
        "from disco.optim.muon import Muon",
        "from disco import train",
        "def f():\n    from ..integrations import torchtitan",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from disco.distributed import plan",
    ],
)
def test_checker_catches_violations(source):
    assert violations(source, "disco.ops.lmo", RULES["disco.ops"])


@pytest.mark.parametrize(
    "source", ["import torch", "from torch import Tensor", "from .orthogonalize import orthogonalize", "import math"]
)
def test_checker_accepts_clean_imports(source):
    assert not violations(source, "disco.ops.lmo", RULES["disco.ops"])


def test_relative_imports_resolve_from_package_init():
    assert "disco.ops.lmo" in [n for _, n in imported_modules("from .lmo import lmo", "disco.ops", True)]
    assert violations("from ..optim import x", "disco.distributed", RULES["disco.distributed"], is_package=True)


def test_importing_ops_loads_no_other_disco_layer():
    # disco/__init__.py imports the public API (optim, groups), so stand in an empty ``disco`` package first and
    # see what importing disco.ops alone pulls in.
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('disco'); pkg.__path__ = [{str(DISCO)!r}]; sys.modules['disco'] = pkg\n"
        "import disco.ops\n"
        "bad = sorted(m for m in sys.modules if m.startswith('disco.') and not m.startswith('disco.ops'))\n"
        "assert not bad, bad\n"
        "assert disco.ops.orthogonalize is not None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
