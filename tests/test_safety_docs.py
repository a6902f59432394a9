"""docs/safety.md's verdict table is generated from benchmarks/reliability.json
(``launch/readme_figures.py reliability``), and the reliability catalogue judges outcomes as documented."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


figures = _load("readme_figures")
bench = _load("bench_reliability")

RESULT = {"cases": [{"id": "dup-key", "group": "yaml", "expected": "clear error before loading",
                     "verdict": "clear error before loading", "ok": True, "note": ""},
                    {"id": "bomb", "group": "yaml", "expected": "clear error before loading",
                     "verdict": "traceback", "ok": False, "note": "measured twice"}],
          "summary": {"clear error before loading": 1, "traceback": 1}, "expected_met": 1,
          "total": 2, "wall_s": 12.3, "command": "python launch/bench.py reliability"}


def test_the_table_is_generated_between_markers(tmp_path: Path) -> None:
    doc = tmp_path / "safety.md"
    doc.write_text("intro\n<!-- reliability:begin -->\nold 99\n<!-- reliability:end -->\nend\n")
    data = tmp_path / "r.json"
    data.write_text(json.dumps(RESULT))
    cmd = [sys.executable, str(REPO / "launch" / "readme_figures.py"), "reliability", str(data),
           "--readme", str(doc)]
    assert subprocess.run([*cmd, "--check"]).returncode == 1
    assert subprocess.run(cmd).returncode == 0
    text = doc.read_text()
    assert "2 hostile cases, 1 with the verdict" in text and "| traceback | 1 |" in text
    assert "| yaml | bomb | clear error before loading | traceback |" in text
    assert "`bomb`: measured twice" in text and "old 99" not in text
    assert text.startswith("intro\n") and text.endswith("end\n")
    assert subprocess.run([*cmd, "--check"]).returncode == 0


def test_missing_markers_exit_2(tmp_path: Path) -> None:
    doc = tmp_path / "safety.md"
    doc.write_text("no markers\n")
    data = tmp_path / "r.json"
    data.write_text(json.dumps(RESULT))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "readme_figures.py"),
                           "reliability", str(data), "--readme", str(doc)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "reliability:begin" in proc.stderr
    assert doc.read_text() == "no markers\n"


def test_docs_match_the_committed_catalogue_run() -> None:
    """The table in docs/safety.md is the one generated from benchmarks/reliability.json, and
    that run covers every case of the catalogue."""
    assert figures.render("reliability", check=True)[0] == 0
    result = json.loads((REPO / "benchmarks" / "reliability.json").read_text())
    assert [r["id"] for r in result["cases"]] == [c.id for c in bench.CASES]
    assert result["total"] == len(result["cases"]) == sum(result["summary"].values())


def test_verdicts_follow_the_documented_rules(tmp_path: Path) -> None:
    case = bench.Case("x", "g", "prune", lambda f, w: [], fragments=("named",))
    judge = bench.judge
    assert judge(case, 2, "ERROR named", None, False, [], tmp_path) == "clear error before loading"
    assert judge(case, 2, "ERROR vague", None, False, [], tmp_path) == "unclear"
    assert judge(case, 2, "ERROR named", None, True, [], tmp_path) == "error after work"
    assert judge(case, None, "", "Traceback ...", False, [], tmp_path) == "traceback"
    assert judge(case, 2, "Traceback (most recent call last)\nnamed", None, False, [],
                 tmp_path) == "traceback"
    assert judge(case, 0, "", None, False, [], tmp_path) == "silent"
    assert judge(case, 0, "", None, False, ["notes.txt"], tmp_path) == "data loss"
    ran = bench.Case("y", "g", "prune", lambda f, w: [], expect="ran", fragments=("warned",))
    assert judge(ran, 0, "WARNING warned", None, True, [], tmp_path) == "ran"
    assert judge(ran, 0, "nothing", None, True, [], tmp_path) == "unclear"
