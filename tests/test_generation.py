"""Generation tasks (lm-eval ``generate_until``): greedy decoding through the workers equals a
plain greedy loop on the transformers model, for 1 and 2 workers; ``neuroal evaluate`` hands
them to lm-eval's ``hf`` backend for a model directory, writes lm-eval's own results files with
``--output_path``, accepts lm-eval's flag spellings, and a prune runs them through its workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_cfg

from neuroal.engine.executor import LocalExecutor
from neuroal.evaluation.zeroshot import (
    ExecutorLM,
    TaskSpec,
    generation_backend,
    generation_tasks,
    task_manager,
)
from neuroal.models.loading import resolve_model
from neuroal.pipeline import run
from neuroal.runtime.process import load_tokenizer

TASKS = REPO / "tests" / "tasks"
PROMPTS = ["Question: What colour is the sky? Answer:", "The river flows down to the"]


def _instances(args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type="generate_until", doc={}, arguments=a, idx=i)
            for i, a in enumerate(args)]


def _greedy_reference(model_dir: Path, prompt: str, steps: int, tokenizer) -> list[int]:
    """Greedy decoding with the transformers model, whole sequence per step, no cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.encode(prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + new]), use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return new


@pytest.mark.parametrize("workers", [1, 2])
def test_generation_through_workers_matches_transformers(tiny_models: dict[str, Path],
                                                         workers: int) -> None:
    source = resolve_model(str(tiny_models["llama"]))
    tokenizer = load_tokenizer(source, False)
    lm = ExecutorLM(LocalExecutor(source, 2, workers, ["cpu"], "float32", micro_batch=2),
                    tokenizer, max_length=64)
    answers = lm.generate_until(_instances([(p, {"until": [], "max_gen_toks": 5})
                                            for p in PROMPTS]), disable_tqdm=True)
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        expected = tokenizer.decode(_greedy_reference(tiny_models["llama"], prompt, 5, tokenizer))
        assert answer == expected
    # a stop string cuts the answer there
    stop = answers[0][1:3] if len(answers[0]) > 3 else None
    if stop:
        cut = lm.generate_until(_instances([(PROMPTS[0], {"until": [stop], "max_gen_toks": 5})]),
                                disable_tqdm=True)[0]
        assert stop not in cut and answers[0].startswith(cut)


def test_generation_tasks_are_found_and_routed() -> None:
    spec = TaskSpec(("tiny_gen", "tiny_choice"), include_path=str(TASKS))
    manager = task_manager(spec)
    assert generation_tasks(spec, manager) == ["tiny_gen"]
    assert generation_backend("auto", None, cuda=True) == "workers"
    assert generation_backend("auto", "/some/dir", cuda=False) == "hf"
    assert generation_backend("workers", "/some/dir", cuda=True) == "workers"


def test_prune_runs_generation_tasks_through_its_workers(tiny_models: dict[str, Path],
                                                         small_text: Path) -> None:
    cfg = tiny_cfg(tiny_models["llama"], None, calib={"source": f"text:{small_text}"},
                   eval={"tasks": ["tiny_gen"], "include_path": str(TASKS), "dense": False},
                   engine={"workers": 2, "micro_batch": 2, "device": "cpu"})
    row = run(cfg).report["eval"]["tasks"]["results"]["tiny_gen"]
    assert row["samples"] == 6 and "exact_match" in row["model"]


def test_evaluate_hands_generation_to_lm_eval_hf_and_writes_its_schema(
        tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lm-eval's spellings are accepted; the hf backend answers the generation task on the
    model directory with the same greedy answers the workers give; --output_path writes
    lm-eval's own results file."""
    from neuroal.commands.evaluate import main

    model = str(tiny_models["llama"])
    common = [model, "--eval", "none", "--include_path", str(TASKS), "--num_fewshot", "0",
              "--tasks", "tiny_gen,tiny_choice", "--device", "cpu", "--eval-seqlen", "64"]
    results, answers = {}, {}
    for backend in ("hf", "workers"):
        out = tmp_path / backend
        assert main([*common, "--generation", backend, "--json", str(tmp_path / f"{backend}.json"),
                     "--output_path", str(out), "--log_samples"]) == 0
        report = json.loads((tmp_path / f"{backend}.json").read_text())
        assert report["tasks"]["generation"] == {"tasks": ["tiny_gen"], "backend": backend}
        files = sorted(out.rglob("results_*.json"))
        assert len(files) == 1 and sorted(out.rglob("samples_tiny_gen_*.jsonl"))
        lm_eval_schema = json.loads(files[0].read_text())
        assert {"results", "configs", "versions", "n-shot"} <= lm_eval_schema.keys()
        assert {"tiny_gen", "tiny_choice"} <= lm_eval_schema["results"].keys()
        results[backend] = report["tasks"]["results"]
        rows = [json.loads(line) for line in
                next(out.rglob("samples_tiny_gen_*.jsonl")).read_text().splitlines()]
        answers[backend] = {row["doc_id"]: row["filtered_resps"] for row in rows}
    assert len(answers["hf"]) == 6 and answers["hf"] == answers["workers"]
    assert results["hf"]["tiny_gen"]["model"] == results["workers"]["tiny_gen"]["model"]
    assert results["hf"]["tiny_choice"] == results["workers"]["tiny_choice"]
    assert "lm-eval results:" in capsys.readouterr().out


def test_log_samples_needs_an_output_path(tiny_models: dict[str, Path], caplog) -> None:
    from conftest import run_cli_logged

    code, text = run_cli_logged(["evaluate", str(tiny_models["llama"]), "--eval", "none",
                                 "--tasks", "tiny_gen", "--include_path", str(TASKS),
                                 "--eval-seqlen", "64", "--log_samples"], caplog)
    assert code == 2 and "--output-path" in text


def test_evaluate_api_is_typed_and_lists_its_own_keys(tiny_models: dict[str, Path]) -> None:
    import neuroal
    from neuroal.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown argument.*criterion.*it takes datasets"):
        neuroal.evaluate(str(tiny_models["llama"]), criterion={"name": "wanda"})
    with pytest.raises(TypeError):
        neuroal.evaluate(str(tiny_models["llama"]), "wikitext2")  # keywords only
