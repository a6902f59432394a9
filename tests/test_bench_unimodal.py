"""``launch/bench.py unimodal``: unimodality of NeuroAL score curves read
from recorded trails, counted once per distinct trail."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench", REPO / "launch" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _trail(block: list[float | None], row: list[float | None]) -> list[dict]:
    return ([{"phase": "block", "value": 0.05 * (i + 1), "score": s, "chosen": False}
             for i, s in enumerate(block)] +
            [{"phase": "row", "value": 0.05 * i, "score": s, "chosen": False}
             for i, s in enumerate(row)])


def test_unimodal_counts_distinct_trails(tmp_path: Path) -> None:
    one = _trail([3.0, 2.0, 2.0, 4.0], [5.0, 4.0, 3.0, 3.5, 3.2])  # lambda yes, mu no
    plan = {"trail": {"candidates": one}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "run" / "report.json").write_text(json.dumps({"plan": plan}))  # same trail
    rows = {"rows": [{"run": "x", "trail": _trail([1.0, None, 3.0], [1.0, 2.0])},
                     {"run": "y", "trail": list(reversed(_trail([4.0, 1.0, 2.0], [2.0, 1.0, 3.0])))}]}
    (tmp_path / "search.json").write_text(json.dumps(rows))
    out = bench.unimodal(argparse.Namespace(paths=[str(tmp_path)]))
    assert out["trails"] == 3
    assert out["summary"]["block"] == {"curves": 3, "judged": 2, "unimodal": 2, "trivial": 0,
                                       "undetermined": 1}
    assert out["summary"]["row"] == {"curves": 3, "judged": 2, "unimodal": 1, "trivial": 1,
                                     "undetermined": 0}
    assert not bench._unimodal([1.0, 0.5, 0.7, 0.6]) and bench._unimodal([1.0, 1.0, 2.0])
