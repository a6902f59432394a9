"""docs/memory.md's measured table comes from benchmarks/memory_sparsegpt.json, never typed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "memory_figures.py"
spec = importlib.util.spec_from_file_location("memory_figures", SCRIPT)
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)

PARTS = {"weights": 2.75e9, "activations": 2.7e7, "statistics": 4.09e9, "transients": 6.1e9,
         "overhead": 4.5e8, "host_weights": 0}
RESULT = {"command": "bench_scale.py --blocks 1", "tolerance": 0.25, "pass": True,
          "settings": {"blocks": 1, "workers": 1, "dtype": "bfloat16", "nsamples": 4,
                       "seqlen": 128, "micro_batch": 4},
          "workers": [{"rank": 0, "blocks": [0, 1], "baseline_rss": 4e8, "peak_rss": 12.1e9,
                       "predicted": 13.42e9, "predicted_parts": PARTS, "error": -0.0984,
                       "error_above_baseline": -0.1, "total_s": 900.0}],
          "plan_24gb": {"command": "python launch/plan.py --model llama-2-70b", "fits": True,
                        "onload": "host", "limit_bytes": 24e9,
                        "workers": [{"weights": 3.95e9, "activations": 4.29e9,
                                     "statistics": 4.09e9, "transients": 7.99e9,
                                     "overhead": 1.07e9, "total": 21.4e9,
                                     "host_weights": 68.45e9}]}}


def test_table_and_plan_sentence() -> None:
    text = figures.memory_text(RESULT)
    assert "Llama-2-70B width" in text
    assert "| 0 | 0-0 | 2.75 | 0.027 | 4.09 | 6.10 | 0.45 | 13.42 | 12.10 | -9.8% |" in text
    assert "within 25% of the planner: yes." in text
    assert "answers **fits** with `engine.onload=host`: 21.40 GB per worker" in text
    assert "68.45 GB of pinned host memory" in text
    off = {**RESULT, "workers": [{**RESULT["workers"][0], "error": 0.4}]}
    assert "planner: NO." in figures.memory_text(off)


def test_doc_block_is_rewritten_and_checked(tmp_path: Path) -> None:
    doc = tmp_path / "memory.md"
    doc.write_text("a\n<!-- memory:begin -->\nold\n<!-- memory:end -->\nb\n")
    data = tmp_path / "m.json"
    data.write_text(json.dumps(RESULT))
    cmd = [sys.executable, str(SCRIPT), "doc", str(data), "--doc", str(doc)]
    assert subprocess.run([*cmd, "--check"]).returncode == 1
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert "13.42" in doc.read_text() and doc.read_text().endswith("b\n")
    assert subprocess.run([*cmd, "--check"]).returncode == 0
    doc.write_text("no markers\n")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "memory:begin" in proc.stderr


def test_repo_doc_matches_the_committed_measurement() -> None:
    """docs/memory.md's block is the one generated from benchmarks/memory_sparsegpt.json, whose
    2 x 24 GB answer is what the planner says today."""
    path = REPO / "benchmarks" / "memory_sparsegpt.json"
    assert subprocess.run([sys.executable, str(SCRIPT), "doc", str(path), "--check"]).returncode == 0
    recorded = json.loads(path.read_text())
    assert recorded["plan_24gb"]["fits"]
    assert all(abs(w["error"]) <= 0.25 for w in recorded["workers"])
