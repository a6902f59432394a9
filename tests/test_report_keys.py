"""One name per concept in the JSON neuroal writes: ``dense_*`` for the dense reference,
``model_ppl`` / ``model`` for the evaluated model, in ``prune``'s report.json and ``evaluate``'s
output alike; readers still accept the older ``sparse_ppl`` / ``sparse`` / ``ppl``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import REPO, tiny_cfg

from neuroal.outputs.report_keys import MODEL, MODEL_PPL, final_ppl, model_metrics, model_ppl

spec = importlib.util.spec_from_file_location("readme_figures", REPO / "launch" / "readme_figures.py")
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)


def _report(ppl_key: str, task_key: str) -> dict:
    """A prune report with the evaluated model's scores under the given keys."""
    return {
        "model": "m", "criterion": "wanda", "allocation": "neuroal", "pattern": "unstructured",
        "target_sparsity": 0.6, "achieved_sparsity": 0.6, "timings": {"total": 1.0},
        "calibration": {"source": "text:calib.txt"},
        "eval": {"wikitext2": {"dense_ppl": 35.755, ppl_key: 151.171, "windows": 4, "seqlen": 8},
                 "tasks": {"results": {"qa": {"samples": 40, "n_shot": 0,
                                              "dense": {"acc": 0.9}, task_key: {"acc": 0.75}}}}},
        "compare": [{"allocation": "uniform", ppl_key: {"wikitext2": 218.024},
                     "achieved_sparsity": 0.6}],
        "plan": {"policy": {"lambda_block": 0.1, "lambda_row": 0.15}},
    }


@pytest.mark.parametrize(("ppl_key", "task_key"), [("model_ppl", "model"),
                                                   ("sparse_ppl", "sparse")])
def test_readers_accept_new_and_old_keys(ppl_key: str, task_key: str,
                                         capsys: pytest.CaptureFixture) -> None:
    from neuroal.commands.prune import summarize

    report = _report(ppl_key, task_key)
    ev = report["eval"]["wikitext2"]
    assert model_ppl(ev) == final_ppl(ev) == 151.171
    assert model_metrics(report["eval"]["tasks"]["results"]["qa"]) == {"acc": 0.75}
    assert "uniform Wanda 218.02 and Wanda + NeuroAL 151.17" in figures.quickstart_text(report)
    summarize(report, None)
    out = capsys.readouterr().out
    assert "dense 35.755  ->  pruned 151.171" in out and "instead (achieved 0.6000): 218.024" in out
    assert "dense acc 0.900" in out and "pruned acc 0.750" in out


def test_evaluates_old_ppl_key_and_recovered_ppl() -> None:
    assert model_ppl({"ppl": 3.0, "windows": 1}) == 3.0  # evaluate's JSON before the scheme
    assert final_ppl({"model_ppl": 3.0, "recovered_ppl": 2.5}) == 2.5
    assert model_ppl({"windows": 1}) is None and model_metrics(None) is None


def test_ood_table_reads_new_benchmark_rows() -> None:
    result = {"step": "perp-full", "eval": {"wikitext2": {
        "dense_ppl": 35.0, "model_ppl": 200.0, "recovered_ppl": 100.0, "windows": 4, "seqlen": 8}}}
    assert "| 35.00 | 200.00 | 100.00 | -50.0% |" in figures.ood_text(result)


def test_committed_benchmarks_still_render() -> None:
    """The committed JSON keeps its older keys and is read unchanged."""
    ood = json.loads((REPO / "benchmarks" / "ood.json").read_text())
    assert all("sparse_ppl" in ev for ev in ood["eval"].values())
    assert figures.ood_text(ood).count("\n") == len(ood["eval"]) + 1


def test_prune_and_evaluate_write_the_same_keys(tiny_models: dict[str, Path], small_text: Path,
                                                tmp_path: Path) -> None:
    """A prune's report and ``evaluate`` on its export name the scores alike."""
    import neuroal
    from neuroal.pipeline import run

    out, spec = tmp_path / "out", f"text:{small_text}"
    report = run(tiny_cfg(tiny_models["llama"], out,
                          eval={"datasets": [spec], "max_windows": 2, "seqlen": 32})).report
    ev = report["eval"][spec]
    assert {"dense_ppl", MODEL_PPL} <= set(ev) and "sparse_ppl" not in ev
    scores = neuroal.evaluate(str(out), datasets=[spec], eval={"seqlen": 32, "max_windows": 2},
                              engine={"device": "cpu"})
    again = scores["eval"][spec]
    assert MODEL_PPL in again and "ppl" not in again
    assert again[MODEL_PPL] == pytest.approx(ev[MODEL_PPL], rel=1e-4)
    assert MODEL == "model"
