"""Shared pytest setup. Keep this tiny: heavy fixtures belong in the test modules that need them."""

import os
import sys

import pytest
import torch

# tests/ is not a package: make its helpers (dist_harness) importable, here and in the rank processes.
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
_ROOT = os.path.dirname(_TESTS)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

# The CPU default compute dtype follows the CPU (bf16 where it multiplies bf16 natively): pin it to fp32 so that
# tolerances do not depend on the machine; tests of the detection and of bf16 set it explicitly.
os.environ.setdefault("DISCO_CPU_BF16", "0")

# DISCO_TEST_MATMUL_PRECISION=medium|high|highest: torch.set_float32_matmul_precision for the whole session, here
# and in the rank processes (session_setup is imported by both).
# The forkserver of the rank processes starts a fresh interpreter: tests/ on its path too, so that it imports it.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)
import session_setup  # noqa: E402, F401


def _matmul_precision(precision):
    """``precision`` for the test in this process (and, through ``dist_harness``, in its ranks), restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield precision
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.fixture
def fp32_matmuls():
    """fp32 matmuls in fp32 for this test, whatever the session's precision (``DISCO_TEST_MATMUL_PRECISION``):
    for tests of an update's formula against a reference computed differently (another op order, float64), where
    "medium" (bf16 matmuls on AMX CPUs and GPUs) flips bf16 roundings of nearly equal inputs. The library under
    "medium" is tested by ``tests/test_cpu_independence.py`` and the precision tests of ``test_optim_scion``."""
    yield from _matmul_precision("highest")


@pytest.fixture
def medium_matmuls():
    """fp32 matmul precision "medium" for this test, as a user may set it (bf16 matmuls on AMX CPUs and GPUs);
    yields ``"medium"``."""
    yield from _matmul_precision("medium")
