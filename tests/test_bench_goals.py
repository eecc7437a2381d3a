"""``make bench``'s table runs end to end (``--quick``: tiny sizes, the numbers mean nothing) with every goal."""

from __future__ import annotations

import json

from disco.bench.goals import main as goals_main


def test_goals_quick_lists_every_goal(capsys):
    assert goals_main(["--quick", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    goals = [r["goal"] for r in obj["rows"]]
    for g in ("1 step bf16", "1 step fp32", "2 memory", "3 gram", "4 cpu dtype", "5 overlap", "6 2 ranks", "7 planner"):
        assert g in goals
    for r in obj["rows"]:
        assert r["ours"] > 0 and r["peer"] > 0 and r["met"] in ("yes", "no", "-")
        assert abs(r["ratio"] - r["ours"] / r["peer"]) < 1e-9
