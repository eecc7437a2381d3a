"""The suite tests the library, not the machine: a representative subset passes under each global setting a
machine or a user may have: ``DISCO_CPU_BF16=0`` / ``=1`` (the CPU default compute dtype, read by
``disco.ops.orthogonalize``) and fp32 matmul precision ``highest`` / ``medium`` (``DISCO_TEST_MATMUL_PRECISION``,
applied by ``tests/session_setup.py`` to the session and to every gloo rank).

Each setting runs in a pytest subprocess (a setting is process-wide); its timeout is a hang detector only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HANG_S = 1800

#: fast tests that cover the optimizer classes' math against references, messages, one gloo run
SUBSET = [
    "tests/test_optim_scion.py",
    "tests/test_optim_muon.py::test_fp32_matches_float64_reference",
    "tests/test_optim_disco.py::test_light_mode_equals_normal_mode",
    "tests/test_optim_common.py::test_adamw_groups_match_torch",
    "tests/test_rule_contract.py::test_values_checked_at_construction",
    "tests/test_cpu_independence.py::test_the_setting_reaches_the_ranks",
]

SETTINGS = [
    {"DISCO_CPU_BF16": "0", "DISCO_TEST_MATMUL_PRECISION": "highest"},
    {"DISCO_CPU_BF16": "1", "DISCO_TEST_MATMUL_PRECISION": "highest"},
    {"DISCO_CPU_BF16": "0", "DISCO_TEST_MATMUL_PRECISION": "medium"},
    {"DISCO_CPU_BF16": "1", "DISCO_TEST_MATMUL_PRECISION": "medium"},
]


def _precision_of_rank(rank: int, world: int) -> str:
    return torch.get_float32_matmul_precision()


def test_the_setting_reaches_the_ranks():
    """The session's precision holds in this process and in gloo ranks (what the subprocess runs check)."""
    from dist_harness import run_ranks

    want = os.environ.get("DISCO_TEST_MATMUL_PRECISION") or "highest"
    assert torch.get_float32_matmul_precision() == want
    assert run_ranks(_precision_of_rank, 2, timeout=HANG_S) == [want, want]


@pytest.mark.skipif(bool(os.environ.get("DISCO_TEST_SUBPROCESS")), reason="already inside a setting's run")
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_subset_passes_under_setting(setting):
    env = {**os.environ, **setting, "DISCO_TEST_SUBPROCESS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUBSET],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=HANG_S,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_the_per_backend_precision_api_is_read(precision):
    """A user may set the CPU's fp32 matmul precision with torch's per-backend API (torch >= 2.9) rather than
    ``set_float32_matmul_precision``; ``torch.get_float32_matmul_precision()`` then raises. The library reads
    oneDNN's own setting: an expert stack's LMO computes (it raised in every step before), and each expert's result
    is bitwise the same whichever stack holds it (one ``mm`` per expert where fp32 matmuls may be reduced)."""
    from disco.ops import LMOSpec

    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is None:
        pytest.skip("torch < 2.9: no per-backend precision API")
    before, legacy = matmul.fp32_precision, torch.get_float32_matmul_precision()
    matmul.fp32_precision = precision
    try:
        spec = LMOSpec(backend="gram_newtonschulz5", compute_dtype=torch.float32)
        G = torch.randn(1, 5, 24, 16, generator=torch.Generator().manual_seed(0))
        whole = spec(G)[0]
        for part in (slice(0, 2), slice(2, 5)):
            assert torch.equal(spec(G[:, part])[0], whole[part]), part
    finally:
        matmul.fp32_precision = before
        torch.set_float32_matmul_precision(legacy)  # every backend as the session had it
