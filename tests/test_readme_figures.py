"""README and docs figures come from benchmark JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "readme_figures.py"
spec = importlib.util.spec_from_file_location("readme_figures", SCRIPT)
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)

REPORT = {"eval": {"wikitext2": {"dense_ppl": 35.755, "sparse_ppl": 151.171}},
          "compare": [{"allocation": "uniform", "sparse_ppl": {"wikitext2": 218.024}}],
          "plan": {"policy": {"lambda_block": 0.1, "lambda_row": 0.15}}}


def test_quickstart_sentence_and_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- quickstart:begin -->\nold 213.8\n<!-- quickstart:end -->\nb\n")
    report = tmp_path / "report.json"
    report.write_text(json.dumps(REPORT))
    cmd = [sys.executable, str(SCRIPT), "quickstart", str(report), "--readme", str(readme)]
    assert subprocess.run([*cmd, "--check"]).returncode == 1
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    text = readme.read_text()
    assert "uniform Wanda 218.02 and Wanda + NeuroAL 151.17" in text and "213.8" not in text
    assert "lambda_row 0.15" in text and text.startswith("a\n") and text.endswith("b\n")
    assert subprocess.run([*cmd, "--check"]).returncode == 0


def test_missing_markers_exit_2(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    report = tmp_path / "report.json"
    report.write_text(json.dumps(REPORT))
    proc = subprocess.run([sys.executable, str(SCRIPT), "quickstart", str(report), "--readme",
                           str(readme)], capture_output=True, text=True)
    assert proc.returncode == 2 and "quickstart:begin" in proc.stderr
    assert readme.read_text() == "no markers\n"


def test_repo_readme_matches_the_measured_quickstart() -> None:
    """The README's quickstart sentence is the one generated from the committed figures of the
    last measured ``make quickstart`` (benchmarks/quickstart.json, a subset of its report)."""
    report = REPO / "benchmarks" / "quickstart.json"
    assert subprocess.run([sys.executable, str(SCRIPT), "quickstart", str(report),
                           "--check"]).returncode == 0


def test_search_and_unimodal_figures_are_generated(tmp_path: Path) -> None:
    """The early-stopping table and the unimodality sentence come from the bench JSON."""
    row = {"run": "early", "search_s": 301.4, "fully_evaluated": 7, "candidates": 12,
           "blocks_evaluated": 300, "blocks_total": 360, "lambda_block": 0.15, "lambda_row": 0.1,
           "winner": [["block", 0.15, 0.0010026640171600042], ["row", 0.1, 0.000943008174689]]}
    table = figures.search_text({"rows": [row]})
    assert "| early | 301 | 7 / 12 | 300 / 360 | 0.15 / 0.1 | 0.001002664017 / 0.000943008174" in table
    assert table.endswith("identical across the rows: yes.")
    other = {**row, "winner": [["block", 0.1, 0.0011], row["winner"][1]]}
    assert figures.search_text({"rows": [row, other]}).endswith("rows: NO.")
    summary = {ph: {"curves": 2, "judged": 1, "unimodal": u, "trivial": 1, "undetermined": 0}
               for ph, u in (("block", 1), ("row", 0))}
    text = figures.unimodal_text({"trails": 2, "summary": summary})
    assert "2 distinct search trails" in text and "lambda 1 of 1 and over mu 0 of 1" in text


def test_repo_readme_matches_the_measured_search() -> None:
    """The README's early-stopping table and unimodality sentence are the ones generated from
    the committed benchmark JSON (benchmarks/search.json, benchmarks/unimodal.json)."""
    for kind in ("search", "unimodal"):
        path = REPO / "benchmarks" / f"{kind}.json"
        assert subprocess.run([sys.executable, str(SCRIPT), kind, str(path),
                               "--check"]).returncode == 0, kind
