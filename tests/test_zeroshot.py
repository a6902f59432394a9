"""Zero-shot evaluation through the workers: lm-eval requests scored by the executor
equal lm-eval's own HFLM on the same exported model, and 1 vs 2 workers agree exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_cfg

from neuroal.engine.executor import LocalExecutor
from neuroal.evaluation.zeroshot import ExecutorLM, TaskSpec, evaluate_tasks, task_manager
from neuroal.models.loading import load_model_config, resolve_model
from neuroal.pipeline import run
from neuroal.runtime.process import load_tokenizer

TASKS = REPO / "tests" / "tasks"
REQUESTS = [("The river flows down to the", " sea"), ("In winter the lake", " turns to ice"),
            ("", "An empty context is scored after the prefix token"),
            ("A context long enough to be cut on the left " * 12, " by the window")]


def _instances(kind: str, args: list[tuple[str, ...]]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _executor_lm(model: Path, workers: int, max_length: int = 64) -> ExecutorLM:
    source = resolve_model(str(model))
    executor = LocalExecutor(source, 2, workers, ["cpu"], "float32", micro_batch=2)
    return ExecutorLM(executor, load_tokenizer(source, False), max_length, batch_size=3)


@pytest.fixture(scope="module")
def pruned(tiny_models: dict[str, Path], small_text: Path,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny Llama pruned at 50 % with the local task in ``eval.tasks`` (2 workers), exported."""
    out = tmp_path_factory.mktemp("zeroshot") / "pruned"
    cfg = tiny_cfg(tiny_models["llama"], out, calib={"source": f"text:{small_text}"},
                   eval={"tasks": ["tiny_choice"], "include_path": str(TASKS)},
                   engine={"workers": 2, "micro_batch": 2, "device": "cpu"})
    result = run(cfg)
    return out, result.report


def test_report_holds_dense_and_pruned_accuracy(pruned: tuple[Path, dict],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from neuroal.commands.prune import summarize

    out, report = pruned
    summarize(report, out)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tiny_choice"))
    assert line.startswith("tiny_choice zero-shot (12 documents, 0-shot): dense acc ")
    assert "->  pruned acc " in line
    tasks = json.loads((out / "report.json").read_text())["eval"]["tasks"]
    assert tasks == json.loads(json.dumps(report["eval"]["tasks"]))
    assert tasks["lm_eval_version"] and tasks["tasks"] == ["tiny_choice"]
    row = tasks["results"]["tiny_choice"]
    assert row["version"] == 2.0 and row["n_shot"] == 0 and row["samples"] == 12
    for key in ("dense", "model"):
        assert set(row[key]) >= {"acc", "acc_norm"}
        assert 0.0 <= row[key]["acc"] <= 1.0


def test_accuracy_equals_hflm_on_exported_model(pruned: tuple[Path, dict]) -> None:
    """The same tasks and requests through lm-eval's HFLM (the whole exported model in one
    process) and through neuroal's workers: equal log-likelihoods (float tolerance), equal
    greedy flags and equal accuracy; the pipeline's own report agrees too."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    out, report = pruned
    hf = HFLM(pretrained=str(out), device="cpu", dtype="float32", batch_size=3, max_length=64)
    ours = _executor_lm(out, workers=2)
    for kind, args in (("loglikelihood", REQUESTS),
                       ("loglikelihood_rolling", [(c + t,) for c, t in REQUESTS])):
        expected = getattr(hf, kind)(_instances(kind, args))
        got = getattr(ours, kind)(_instances(kind, args))
        if kind == "loglikelihood":
            assert [g for _, g in got] == [g for _, g in expected]
            got, expected = [v for v, _ in got], [v for v, _ in expected]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4,
                                   rtol=1e-5)
    manager = task_manager(TaskSpec(("tiny_choice",), str(TASKS)))
    hf_acc = lm_eval.simple_evaluate(model=hf, tasks=["tiny_choice"], task_manager=manager,
                                     log_samples=False)["results"]["tiny_choice"]
    config = load_model_config(resolve_model(str(out)))
    acc = evaluate_tasks(ours.executor, ours.tokenizer, config,
                         TaskSpec(("tiny_choice",), str(TASKS), max_length=64), manager)
    for metric in ("acc", "acc_norm"):
        assert acc["tiny_choice"]["metrics"][metric] == pytest.approx(hf_acc[f"{metric},none"])
        assert report["eval"]["tasks"]["results"]["tiny_choice"]["model"][metric] == \
            pytest.approx(hf_acc[f"{metric},none"])


def test_one_and_two_workers_agree_exactly(tiny_models: dict[str, Path]) -> None:
    args = REQUESTS + [("Short", " one"), ("Another context of some length", " and more")]
    one = _executor_lm(tiny_models["llama"], workers=1)
    two = _executor_lm(tiny_models["llama"], workers=2)
    assert one.loglikelihood(_instances("loglikelihood", args)) == \
        two.loglikelihood(_instances("loglikelihood", args))
    texts = [(c + t,) for c, t in args]
    assert one.loglikelihood_rolling(_instances("loglikelihood_rolling", texts)) == \
        two.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))


def test_unknown_task_is_rejected_with_suggestions() -> None:
    from neuroal.config.build import ConfigError

    with pytest.raises(ConfigError, match=r"'tiny_choise'.*tiny_choice"):
        task_manager(TaskSpec(("tiny_choise",), str(TASKS)))
