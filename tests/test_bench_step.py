"""The step benchmark runs end to end at a tiny size: one JSON object with a row per dtype, or a table."""

from __future__ import annotations

import json

import pytest
import torch

from disco.bench import main as bench_main
from disco.bench.step import LoopMuon, _as_params, make_params, transformer_shapes
from disco.bench.step import main as step_main

torch.set_num_threads(1)

ARGS = ["--layers", "1", "--width", "32", "--repeat", "1", "--warmup", "0", "--threads", "1"]


@pytest.mark.usefixtures("fp32_matmuls")  # its fp32 rows' errors against float64 are asserted
def test_step_json_rows_per_dtype_and_budget(capsys):
    assert step_main([*ARGS, "--json", "--memory", "--stack-bytes", "0,none"]) == 0
    obj = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert obj["benchmark"] == "step" and obj["shapes"] == "1 x [3w x w, w x w, 4w x w, w x 4w] at w=32"
    rows = obj["rows"]
    assert [(r["case"], r["stack_bytes"]) for r in rows] == [("bf16", 0), ("bf16", None), ("fp32", 0), ("fp32", None)]
    for row in rows:
        assert row["matrices"] == 4 and row["ours_ms"] > 0 and row["peer_ms"] > 0
        assert abs(row["ratio"] - row["ours_ms"] / row["peer_ms"]) < 1e-9
        assert row["ours_mib"] > 0 and row["peer_mib"] > 0
    assert rows[0]["peer"] == "torch.optim.Muon (bf16)" and rows[2]["peer"] == "per-parameter fp32 loop"
    assert all(r["max_abs_diff"] < 2e-2 for r in rows[:2])  # bf16 on both sides
    assert all(r["max_abs_diff"] < 1e-5 for r in rows[2:])  # the same polynomial in fp32


def test_step_table_via_dispatch(capsys):
    assert bench_main(["step", *ARGS, "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert "ours/peer" in out and "disco.Muon fp32" in out and "torch.optim.Muon" not in out


def test_shapes_and_loop_reference():
    assert transformer_shapes(1, 8) == [(24, 8), (8, 8), (32, 8), (8, 32)]
    assert transformer_shapes(2, 8, "split") == ([(8, 8)] * 4 + [(32, 8), (8, 32)]) * 2
    # the loop in bf16 is torch.optim.Muon's algorithm: the same result as torch's
    weights, grads = make_params(transformer_shapes(1, 16))
    ours, theirs = _as_params(weights, grads), _as_params(weights, grads)
    loop = LoopMuon(ours, lr=0.02, weight_decay=0.1, dtype=torch.bfloat16)
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)
    for _ in range(2):
        loop.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
