"""Step 3 of routing: explain it. :func:`routing_table` renders parameter groups one row per parameter, and
``python -m disco groups MODULE:FACTORY`` prints the table for a model."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .routing import create_disco_param_groups


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _note(group: dict[str, Any]) -> str:
    notes = []
    if group.get("transposed"):
        notes.append("stored in x out (transposed)")
    if group.get("split_sizes") is not None:  # disco.optim.split: blocks of the output dim, each its own LMO
        notes.append("split " + "/".join(str(s) for s in group["split_sizes"]))
    if group.get("num_heads") is not None:
        kv = group.get("num_kv_heads")
        notes.append(f"heads {group['num_heads']}" + (f" (kv {kv})" if kv is not None else ""))
    if group.get("tied_with"):
        notes.append("tied: " + ", ".join(group["tied_with"]))
    return "; ".join(notes)


def routing_table(param_groups: Sequence[dict[str, Any]], defaults: dict[str, Any] | None = None) -> str:
    """A fixed-width table, one row per parameter: group, name, shape, algorithm, norm_factor, backend, lr, note.

    A value the group does not set comes from ``defaults`` (e.g. the optimizer kwargs), else shows ``-``. The
    note says when a weight is stored ``fan_in x fan_out`` (``transposed``), how it splits before the LMO
    (``split_sizes``, ``num_heads``) and which names a tied weight has.
    """
    defaults = defaults or {}
    header = ("group", "name", "shape", "algorithm", "norm_factor", "backend", "lr", "note")
    rows = []
    for gi, group in enumerate(param_groups):
        params = list(group["params"])
        pnames = list(group.get("param_names", [f"<param {i}>" for i in range(len(params))]))
        cols = [_fmt(group.get(k, defaults.get(k))) for k in ("algorithm", "norm_factor", "backend", "lr")]
        for name, p in zip(pnames, params):
            rows.append((str(gi), name, "x".join(str(s) for s in p.shape) or "scalar", *cols, _note(group)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n = sum(len(g["params"]) for g in param_groups)
    numel = sum(math.prod(p.shape) for g in param_groups for p in g["params"])
    lines.append(f"{n} parameters ({numel:,} elements) in {len(param_groups)} groups")
    return "\n".join(lines)


def _optimizer_defaults() -> dict[str, Any]:
    """``Disco``'s defaults (``disco.optim.defaults``), for the table's unset cells."""
    from ..optim.defaults import DISCO_DEFAULTS

    return {"algorithm": "disco", **DISCO_DEFAULTS.as_dict()}


def _load_factory(spec: str) -> Any:
    if ":" not in spec:
        raise ValueError(f"expected MODULE:FACTORY (or path/to/file.py:FACTORY), got {spec!r}")
    mod_spec, attr = spec.rsplit(":", 1)
    if mod_spec.endswith(".py") or "/" in mod_spec:
        path = Path(mod_spec)
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot import {mod_spec!r}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and "." not in sys.path:
            sys.path.insert(0, "")  # like `python -m`, let the current directory's modules be found
        module = importlib.import_module(mod_spec)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m disco groups MODULE:FACTORY [--kwargs JSON]``: print the routing table of a model."""
    parser = argparse.ArgumentParser(
        prog="python -m disco groups",
        description="Print how create_disco_param_groups routes a model's parameters.",
    )
    parser.add_argument("factory", help="MODULE:FACTORY (or path/to/file.py:FACTORY); called with no arguments")
    parser.add_argument("--kwargs", default=None, help="optimizer_kwargs as JSON (routing rules included)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        model = _load_factory(args.factory)()
    except (ImportError, AttributeError, ValueError) as e:
        print(f"error: cannot load {args.factory!r}: {e}", file=sys.stderr)
        return 2
    if not isinstance(model, nn.Module):
        print(f"error: {args.factory} returned {type(model).__name__}, not an nn.Module", file=sys.stderr)
        return 2
    kwargs = json.loads(args.kwargs) if args.kwargs else {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            groups, cleaned = create_disco_param_groups(model, kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(routing_table(groups, {**_optimizer_defaults(), **cleaned}))
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0
