"""Recovery figures in docs/results.md come from benchmark JSON, like the
quickstart sentence: the ScaleLoRA table, the per-row magnitude comparison, the pydoc row."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "readme_figures.py"
spec = importlib.util.spec_from_file_location("readme_figures", SCRIPT)
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)

RECOVERY = {"rows": [
    {"run": "wanda-neuroal-70", "ppl": 470.0, "lambda_block": 0.15, "lambda_row": 0.1},
    {"run": "wanda-neuroal-70+perp-scalelora", "ppl": 470.04, "recovered_ppl": 250.123,
     "step_s": 160.4, "wall_s": 250.6},
    {"run": "wanda-uniform-60+perp-scalelora", "ppl": 218.024, "recovered_ppl": 101.005,
     "step_s": 150.0, "wall_s": 230.0},
]}


def test_scalelora_table_rows_in_table_order() -> None:
    lines = figures.scalelora_text({**RECOVERY, "stale": {"wanda-uniform-60": 112.39},
                                    "masklora": {"wanda-uniform-60": 80.0}}).splitlines()
    assert len(lines) == 2 + 8
    assert lines[2] == ("| Wanda 60 % uniform | 218.02 | 101.00 (150 s / 230 s) | 112.39 | "
                        "80.00 | +26.3% |")
    assert lines[3] == "| Wanda 60 % NeuroAL | not rerun | not rerun | - | - | - |"
    assert lines[5] == ("| Wanda 70 % NeuroAL, lambda 0.15 / 0.1 | 470.04 | "
                        "250.12 (160 s / 251 s) | - | - | - |")
    assert lines[-1].startswith("| SparseGPT 70 % NeuroAL | not rerun")
    # without those columns in the JSON the table has none (no hand-copied figures)
    default = figures.scalelora_text(RECOVERY).splitlines()
    assert default[0] == "| base | before (same run) | perp-scalelora (step s / run wall s) |"
    assert default[4] == "| Wanda 70 % uniform | not rerun | not rerun |"
    assert default[5].endswith("| 470.04 | 250.12 (160 s / 251 s) |")


def test_magnitude_ratio_is_computed_from_both_rows() -> None:
    text = figures.magnitude_text({"rows": [{"run": "magnitude-uniform-row-70", "ppl": 30000.0},
                                            {"run": "magnitude-neuroal-70", "ppl": 12000.0}]})
    assert "30000.0" in text and "(12000)" in text and "2.50x" in text
    assert "rerun" not in text
    rerun = figures.magnitude_text({"rows": [
        {"run": "magnitude-uniform-row-70", "ppl": 30000.0},
        {"run": "magnitude-neuroal-70", "ppl": 15000.0, "lambda_block": 0.01, "lambda_row": 0.2,
         "wall_s": 700.4, "before_row_step_fix": 12000}]})
    assert "2.00x" in rerun and "(700 s): lambda 0.01 / 0.2 now scores 15000, 12000 before" in rerun
    with pytest.raises(KeyError):
        figures.magnitude_text({"rows": [{"run": "magnitude-neuroal-70", "ppl": 1.0}]})


def test_ood_table_one_line_per_corpus() -> None:
    result = {"step": "perp-masklora", "tokens": 8192, "eval": {
        "wikitext2": {"dense_ppl": 35.76, "sparse_ppl": 200.0, "recovered_ppl": 100.0,
                      "windows": 16, "seqlen": 512},
        "pydoc": {"dense_ppl": 20.0, "sparse_ppl": 80.0, "recovered_ppl": 88.0,
                  "windows": 16, "seqlen": 512}}}
    lines = figures.ood_text(result).splitlines()
    assert lines[0].startswith("| corpus | dense | pruned | after perp-masklora (8,192 tokens) |")
    assert lines[2] == "| wikitext2 (16 x 512) | 35.76 | 200.00 | 100.00 | -50.0% |"
    assert lines[3] == "| pydoc (16 x 512) | 20.00 | 80.00 | 88.00 | +10.0% |"


@pytest.mark.parametrize("kind", ["magnitude", "ood", "scalelora"])
def test_repo_readme_matches_the_committed_figures(kind: str) -> None:
    """Each block between the README's markers is the one generated from the committed JSON
    (benchmarks/*.json: the measured rows, subsets of the bench suites' output)."""
    path = REPO / "benchmarks" / {"magnitude": "magnitude_row.json", "ood": "ood.json",
                                   "scalelora": "recovery_scalelora.json"}[kind]
    assert json.loads(path.read_text())
    assert subprocess.run([sys.executable, str(SCRIPT), kind, str(path),
                           "--check"]).returncode == 0
