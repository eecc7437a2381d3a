"""The test session's global torch settings, from the environment; imported by ``conftest.py`` and by every gloo
rank process (``dist_harness``), so that a setting holds in the whole suite.

``DISCO_TEST_MATMUL_PRECISION``: ``highest``, ``high`` or ``medium``, passed to
``torch.set_float32_matmul_precision`` (``medium`` lets fp32 matmuls run in bf16 where the CPU has it: the suite
must pass either way, see ``tests/test_cpu_independence.py``). Unset: torch's default (``highest``).

``DISCO_DEVICE``: ``auto`` (unset: the default), ``cpu`` or ``cuda``: where the distributed tests' ranks run
(``disco.distributed.launch.choose_device``: ``auto`` is CUDA + NCCL where every rank gets its own GPU, else CPU +
gloo; ``cuda`` fails a test that has more ranks than GPUs). Checked here, so that a typo fails the session at once.
"""

from __future__ import annotations

import os

import torch

from disco.distributed.launch import DEVICE_ENV, DEVICES

PRECISIONS = ("highest", "high", "medium")
PRECISION = os.environ.get("DISCO_TEST_MATMUL_PRECISION") or None

if PRECISION is not None:
    if PRECISION not in PRECISIONS:
        raise ValueError(f"DISCO_TEST_MATMUL_PRECISION={PRECISION!r}; valid: {list(PRECISIONS)}")
    torch.set_float32_matmul_precision(PRECISION)

DEVICE = os.environ.get(DEVICE_ENV) or "auto"
if DEVICE not in DEVICES:
    raise ValueError(f"{DEVICE_ENV}={DEVICE!r}; valid: {list(DEVICES)}")
