"""The tests' multi-process launcher: :func:`disco.distributed.launch.run_ranks` with ``pytest`` preloaded.

Usage and guarantees are documented in :mod:`disco.distributed.launch`; tests keep writing
``from dist_harness import run_ranks, RankError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from disco.distributed import launch
from disco.distributed.launch import HOST, RankError

__all__ = ["HOST", "RankError", "run_ranks"]

# Added to the launcher's preload: the test modules the ranks import use pytest; session_setup applies the
# session's torch settings (DISCO_TEST_MATMUL_PRECISION) in every rank.
PRELOAD = ["pytest", "session_setup"]


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    preload: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """:func:`disco.distributed.launch.run_ranks` (same arguments), with ``pytest`` added to ``preload``."""
    return launch.run_ranks(fn, world_size, *args, preload=[*PRELOAD, *(preload or ())], **kwargs)
