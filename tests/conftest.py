"""Shared pytest setup. Keep this tiny: heavy fixtures belong in the test modules that need them."""

import os
import sys

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
import session_setup  # noqa: E402, F401
