"""The test session's global torch settings, from the environment; imported by ``conftest.py`` and by every gloo
rank process (``dist_harness``), so that a setting holds in the whole suite.

``DISCO_TEST_MATMUL_PRECISION``: ``highest``, ``high`` or ``medium``, passed to
``torch.set_float32_matmul_precision`` (``medium`` lets fp32 matmuls run in bf16 where the CPU has it: the suite
must pass either way, see ``tests/test_cpu_independence.py``). Unset: torch's default (``highest``).
"""

from __future__ import annotations

import os

import torch

PRECISIONS = ("highest", "high", "medium")
PRECISION = os.environ.get("DISCO_TEST_MATMUL_PRECISION") or None

if PRECISION is not None:
    if PRECISION not in PRECISIONS:
        raise ValueError(f"DISCO_TEST_MATMUL_PRECISION={PRECISION!r}; valid: {list(PRECISIONS)}")
    torch.set_float32_matmul_precision(PRECISION)
