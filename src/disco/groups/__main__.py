"""``python -m disco groups MODULE:FACTORY [--kwargs JSON]`` (also ``python -m disco.groups``): the routing table.

A mistake (no factory, bad ``--kwargs`` JSON or not a JSON object, a factory that needs arguments or raises)
is one line on stderr and exit status 2; the table itself comes from :func:`disco.groups.explain.main`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from .explain import main as _explain_main

PROG = "python -m disco groups"


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (and a pointer to ``--help``), not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Print how create_disco_param_groups routes a model's parameters.")
    p.add_argument("factory", help="MODULE:FACTORY (or path/to/file.py:FACTORY), called with no arguments")
    p.add_argument("--kwargs", default=None, help="optimizer_kwargs as a JSON object, e.g. '{\"lr\": 0.02}'")
    return p


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.kwargs is not None:
        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as e:
            return _fail(f"--kwargs is not valid JSON ({e.msg} at column {e.colno}): {args.kwargs}")
        if not isinstance(kwargs, dict):
            return _fail(f"--kwargs must be a JSON object ({{...}}), got {type(kwargs).__name__}: {args.kwargs}")
    try:
        return _explain_main(argv)
    except TypeError as e:  # the factory's call (needs arguments) or a wrongly typed routing value
        return _fail(f"{args.factory}: {e}")
    except Exception as e:  # the factory itself raised: its error in one line, not a traceback
        return _fail(f"{args.factory} raised {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
