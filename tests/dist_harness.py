"""The tests' multi-process launcher: :func:`disco.distributed.launch.run_ranks` with ``pytest`` preloaded and
its timeouts made hang detectors.

Usage and guarantees are documented in :mod:`disco.distributed.launch`; tests keep writing
``from dist_harness import run_ranks, RankError``.

A subprocess timeout in the suite detects a hang; it must not time the machine (a loaded 2-core CI runner takes
minutes where a quiet one takes seconds). So whatever a test passes, ``timeout`` (all ranks to report) is at least
``HANG_S`` and ``pg_timeout`` (a rank waiting at one collective for its peers) at least ``PG_HANG_S``: set
``DISCO_TEST_HANG_S`` (seconds, default 900) to move both. A test *about* the launcher's own timeout passes
``exact_timeout=True`` and gets its values as given.

The ranks run at the caller's fp32 matmul precision at the moment of the call: the session's
(``DISCO_TEST_MATMUL_PRECISION``), or "highest" inside a test that pins it with the ``fp32_matmuls`` fixture (its
oracle is exact fp32 math: the one-process run beside the ranks is pinned too).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from disco.distributed import launch
from disco.distributed.launch import HOST, RankError

__all__ = ["HANG_S", "HOST", "PG_HANG_S", "RankError", "run_ranks"]

# Added to the launcher's preload: the test modules the ranks import use pytest; session_setup applies the
# session's torch settings (DISCO_TEST_MATMUL_PRECISION) in every rank.
PRELOAD = ["pytest", "session_setup"]

#: the least ``timeout`` of a ``run_ranks`` call, seconds (``DISCO_TEST_HANG_S``, default 900)
HANG_S = float(os.environ.get("DISCO_TEST_HANG_S") or 900.0)
#: the least ``pg_timeout``: a third of ``HANG_S``, so that a rank stuck at a collective raises its own timeout
#: error (naming the collective) before the launcher gives up on it
PG_HANG_S = HANG_S / 3


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    preload: Sequence[str] | None = None,
    exact_timeout: bool = False,
    **kwargs: Any,
) -> list[Any]:
    """:func:`disco.distributed.launch.run_ranks` (same arguments), with ``pytest`` added to ``preload``, the
    caller's matmul precision in the ranks and, unless ``exact_timeout``, ``timeout`` raised to ``HANG_S`` and a
    given ``pg_timeout`` to ``PG_HANG_S``."""
    if not exact_timeout:
        kwargs["timeout"] = max(float(kwargs.get("timeout", 0.0)), HANG_S)
        if kwargs.get("pg_timeout") is not None:
            kwargs["pg_timeout"] = max(float(kwargs["pg_timeout"]), PG_HANG_S)
    kwargs.setdefault("matmul_precision", torch.get_float32_matmul_precision())
    return launch.run_ranks(fn, world_size, *args, preload=[*PRELOAD, *(preload or ())], **kwargs)
