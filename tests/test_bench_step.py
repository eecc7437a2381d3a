"""The step benchmark runs end to end at a tiny size: one JSON object with both ratios, or a table."""

from __future__ import annotations

import json

import torch

from disco.bench import main as bench_main
from disco.bench.step import LoopMuon, _as_params, make_params, transformer_shapes
from disco.bench.step import main as step_main

torch.set_num_threads(1)

ARGS = ["--layers", "1", "--width", "64", "--repeat", "1", "--warmup", "0", "--threads", "1"]


def test_step_json(capsys):
    assert step_main([*ARGS, "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert obj["benchmark"] == "step" and obj["a"] == "1 layers x 64" and obj["b"] == "1 layers x 64"
    assert obj["ratio_fp32_batched_vs_loop"] > 0 and obj["ratio_bf16_vs_torch"] > 0
    a, b = obj["rows"]
    assert (a["case"], b["case"]) == ("a", "b")
    for row in (a, b):
        assert row["matrices"] == 6 and row["ours_ms"] > 0 and row["peer_ms"] > 0
        assert abs(row["ratio"] - row["ours_ms"] / row["peer_ms"]) < 1e-9
    assert a["ratio"] == obj["ratio_fp32_batched_vs_loop"] and b["ratio"] == obj["ratio_bf16_vs_torch"]
    assert a["max_abs_diff"] < 1e-5  # the same algorithm in fp32
    assert b["max_abs_diff"] < 2e-2  # bf16 on both sides


def test_step_table_via_dispatch(capsys):
    assert bench_main(["step", *ARGS, "--bf16-layers", "0"]) == 0
    out = capsys.readouterr().out
    assert "ours/peer" in out and "disco.Muon fp32 (batched)" in out and "# b: skipped" in out
    assert "torch.optim.Muon" not in out


def test_shapes_and_loop_reference():
    assert transformer_shapes(2, 8) == [(8, 8)] * 4 + [(32, 8), (8, 32)] + [(8, 8)] * 4 + [(32, 8), (8, 32)]
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
