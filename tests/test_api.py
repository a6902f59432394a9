"""The Python API: neuroal.prune(...) and neuroal.evaluate(...) on tiny models,
validated by the same config code as the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import REPO

import neuroal
from neuroal.config.build import ConfigError

TASKS = REPO / "tests" / "tasks"


def test_prune_returns_output_report_and_plan(tiny_models: dict[str, Path], small_text: Path,
                                              tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = neuroal.prune(str(tiny_models["llama"]), sparsity=0.5, criterion="magnitude",
                           allocation="uniform", output=str(out),
                           calib={"source": f"text:{small_text}", "seqlen": 16},
                           calib__nsamples=2, eval={"datasets": []},
                           overrides=["engine.device=cpu", "engine.micro_batch=2"])
    assert isinstance(result, neuroal.Result)
    assert result.output == out and (out / "report.json").is_file()
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert result.report["config"]["calib"]["nsamples"] == 2
    assert json.loads((out / "report.json").read_text())["criterion"] == "magnitude"
    assert result.plan.granularity and result.report["plan"]["policy"] == result.plan.policy


def test_prune_rejects_bad_values_before_loading(tiny_models: dict[str, Path], no_loading: None,
                                                 tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sparsity=1\.5.*between 0 and 1") as info:
        neuroal.prune(str(tiny_models["llama"]), sparsity=1.5, criterion="wandaa",
                      output=str(tmp_path / "o"))
    assert "'wandaa'" in str(info.value)  # every error at once
    assert not (tmp_path / "o").exists()


def test_evaluate_perplexity_and_tasks(tiny_models: dict[str, Path], small_text: Path) -> None:
    common = dict(datasets=[f"text:{small_text}"], eval={"seqlen": 32, "max_windows": 3},
                  engine={"device": "cpu", "micro_batch": 2})
    one = neuroal.evaluate(str(tiny_models["llama"]), **common)
    two = neuroal.evaluate(str(tiny_models["llama"]), tasks="tiny_choice", engine__workers=2,
                           eval__include_path=str(TASKS), **common)
    spec = f"text:{small_text}"
    assert math.isfinite(one["perplexity"][spec]) and one["eval"][spec]["windows"] == 3
    assert one["perplexity"] == two["perplexity"]  # 1 vs 2 workers: bit-identical
    row = two["tasks"]["results"]["tiny_choice"]
    assert row["samples"] == 12 and 0.0 <= row["model"]["acc"] <= 1.0
    assert "tasks" not in one and two["engine"]["workers"] == 2


def test_evaluate_rejects_bad_values(tiny_models: dict[str, Path], no_loading: None) -> None:
    with pytest.raises(ConfigError, match=r"eval.limit=0"):
        neuroal.evaluate(str(tiny_models["llama"]), tasks=["tiny_choice"], eval__limit=0)
