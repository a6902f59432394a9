"""docs/parallelism.md's measured table is generated from benchmarks/parallel.json
(``launch/bench.py parallel``), never typed by hand."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "readme_figures.py"
spec = importlib.util.spec_from_file_location("readme_figures", SCRIPT)
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)

SETTINGS = {"model": "smollm2-135m", "dtype": "float32", "sparsity": 0.5, "nsamples": 16,
            "seqlen": 256, "micro_batch": 2, "threads_per_worker": 1, "cpus": 2,
            "loadavg_before": [3.5, 2.0, 1.0], "loadavg_after": [4.25, 2.0, 1.0]}


def test_parallel_table_from_json(tmp_path: Path) -> None:
    rows = [{"criterion": "wanda", "workers": 1, "mode": "pipeline", "seconds": 80.0,
             "speedup": 1.0, "identical": True},
            {"criterion": "wanda", "workers": 2, "mode": "data", "seconds": 43.21,
             "speedup": 80.0 / 43.21, "identical": False}]
    text = figures.parallel_text({"rows": rows, "settings": SETTINGS})
    assert "| wanda | 1 | pipeline | 80.0 | 1.00x | yes |" in text
    assert "| wanda | 2 | data | 43.2 | 1.85x | NO |" in text
    assert "16 x 256 calibration tokens" in text and "3.5 -> 4.2" in text
    doc = tmp_path / "doc.md"
    doc.write_text("x\n<!-- parallel:begin -->\nold\n<!-- parallel:end -->\ny\n")
    data = tmp_path / "parallel.json"
    data.write_text(__import__("json").dumps({"rows": rows, "settings": SETTINGS}))
    cmd = [sys.executable, str(SCRIPT), "parallel", str(data), "--readme", str(doc)]
    assert subprocess.run([*cmd, "--check"]).returncode == 1
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert "43.2" in doc.read_text() and subprocess.run([*cmd, "--check"]).returncode == 0


def test_doc_matches_the_committed_benchmark() -> None:
    """The table in docs/parallelism.md is the one generated from benchmarks/parallel.json."""
    cmd = [sys.executable, str(SCRIPT), "parallel", str(REPO / "benchmarks" / "parallel.json"),
           "--readme", str(REPO / "docs" / "parallelism.md"), "--check"]
    assert subprocess.run(cmd).returncode == 0
