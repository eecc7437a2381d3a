"""The ortho benchmark runs end to end at a tiny size and prints one valid JSON object / a table."""

from __future__ import annotations

import io
import json

import pytest
import torch

from disco.bench import main as bench_main
from disco.bench.common import emit, print_table

torch.set_num_threads(1)

ROW_KEYS = {"backend", "table", "shape", "m", "n", "steps", "ms", "ms_min", "x_svd", "rel_err", "sv_min", "sv_max"}


@pytest.mark.usefixtures("fp32_matmuls")  # its fp32 rows' errors against float64 are asserted
def test_ortho_json(capsys):
    assert bench_main(["ortho", "--sizes", "64", "--json", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    obj = json.loads(out)  # exactly one JSON object on stdout
    assert obj["benchmark"] == "ortho" and obj["steps"] == 5 and "torch" in obj
    rows = obj["rows"]
    assert {(r["backend"], r["table"]) for r in rows} == {
        ("newtonschulz5", "keller"),
        ("newtonschulz5", "you"),
        ("polar_express", "polar_express"),
        ("polar_express", "polar_express_5"),
        ("gram_newtonschulz5", "keller"),
        ("gram_polar_express", "polar_express"),
        ("svd", "-"),
    }
    assert {r["shape"] for r in rows} == {"64x64", "64x16"}
    for r in rows:
        assert set(r) >= ROW_KEYS
        assert r["ms"] > 0 and 0 < r["sv_min"] <= r["sv_max"] < 1.25
        if r["backend"] == "svd":
            assert r["rel_err"] < 1e-5 and r["x_svd"] == 1.0
        if r["table"] == "you" and r["shape"] == "64x16":
            assert r["rel_err"] < 0.03


def test_ortho_table_and_usage(capsys):
    assert bench_main(["ortho", "--sizes", "16", "--repeat", "1", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "rel_err" in out and "polar_express_5" in out and "16x4" in out
    assert bench_main([]) == 0
    assert "ortho" in capsys.readouterr().out
    assert bench_main(["nope"]) == 2


def test_common_table_and_emit():
    buf = io.StringIO()
    print_table(
        [{"a": "x", "b": 1.23456, "c": None}, {"a": "long", "b": 10.0, "c": 3}], ["a", ("b", "B", ".2f"), "c"], buf
    )
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == ["a", "B", "c"] and lines[2].split() == ["x", "1.23", "-"]
    ends = {line.index(tok) + len(tok) for line, tok in zip([lines[0], *lines[2:]], ["B", "1.23", "10.00"])}
    assert len(ends) == 1  # numbers right-aligned under their header
    buf = io.StringIO()
    emit([{"k": 1}], True, meta={"benchmark": "t"}, file=buf)
    assert json.loads(buf.getvalue()) == {"benchmark": "t", "rows": [{"k": 1}]}
