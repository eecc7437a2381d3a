"""``python -m disco <command>``: train, sweep, bench, groups, plan."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("disco.train.cli", "Train a small GPT with any optimizer and parallelism (the main job)."),
    "sweep": ("disco.train.sweep", "Sweep lr x width (x depth) per optimizer: does the best lr transfer?"),
    "bench": ("disco.bench", "Benchmarks: ortho | step | dist."),
    "groups": ("disco.groups.__main__", "Print the parameter routing table of MODULE:FACTORY."),
    "plan": ("disco.distributed.plan_cli", "Print the distribution plan for a world size and a list of shapes."),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        print(f"python -m disco: error: unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m disco {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:8s} {doc}")
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
