"""Model card, plots and the Hub upload; offline (the Hub API is mocked)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import tiny_cfg

from neuroal.outputs.card import base_model_id, hub_dataset, prune_card, recovery_card


def _front(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


@pytest.fixture(scope="module")
def neuroal_run(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    from neuroal.pipeline import run

    out = tmp_path_factory.mktemp("card") / "out"
    cfg = tiny_cfg(tiny_models["llama"], out,
                   allocation={"name": "neuroal", "search_samples": 2, "block_grid": [0.0, 0.1],
                               "row_grid": [0.0, 0.1]},
                   eval={"datasets": ["wikitext2"], "max_windows": 2})
    return run(cfg), out


def test_output_has_card_with_valid_front_matter_and_plots(neuroal_run) -> None:
    result, out = neuroal_run
    text = (out / "README.md").read_text()
    front = _front(text)
    assert "base_model" not in front  # a local directory is no hub id
    assert front["tags"].count("neuroal") == 1 and "wanda" in front["tags"]
    assert front["datasets"] == ["Salesforce/wikitext"]
    assert front["pipeline_tag"] == "text-generation"
    # 2 windows are a subset of wikitext-2 test: labelled so, never a model-index result
    assert "model-index" not in front
    assert "not a full test-set result" in text and "first windows x tokens (a subset)" in text
    full = dict(result.report, config={**result.report["config"],
                                       "eval": {**result.report["config"]["eval"],
                                                "max_windows": None}})
    metric = _front(prune_card(full))["model-index"][0]["results"][0]
    assert metric["dataset"]["type"] == "Salesforce/wikitext"
    assert metric["metrics"][0]["type"] == "perplexity"
    assert metric["metrics"][0]["value"] == pytest.approx(
        result.report["eval"]["wikitext2"]["model_ppl"], rel=1e-4)
    assert str(out.parent) not in text  # no absolute path of this machine
    assert "## How to load / serve" in text and "vllm serve" in text
    assert "no speed-up and no memory saving" in text
    plots = json.loads((out / "report.json").read_text())["plots"]
    assert plots == ["plots/sparsity_per_block.png", "plots/sparsity_per_linear.png",
                     "plots/search_trail.png", "plots/alignment_per_block.png"]
    for plot in plots:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in text
    alignment = result.report["search"]["alignment"]
    assert set(alignment) == {"block", "row"} and len(alignment["block"]) == 2


def test_card_front_matter_for_hub_models_and_local_data(neuroal_run, small_text: Path) -> None:
    report = dict(neuroal_run[0].report)
    report.update(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0",
                  calibration={**report["calibration"], "source": f"text:{small_text}"})
    front = _front(prune_card(report))
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["license"] == "apache-2.0"
    assert "datasets" not in front  # a local text file is not a dataset id
    assert len(front["tags"]) == len(set(front["tags"]))


def test_hub_dataset_ids(tmp_path: Path) -> None:
    assert hub_dataset("c4") == ("allenai/c4", "en", "train")
    assert hub_dataset("wikitext2", "evaluation") == ("Salesforce/wikitext", "wikitext-2-raw-v1",
                                                      "test")
    assert hub_dataset("hf:HuggingFaceH4/ultrachat_200k::train_sft:messages") == (
        "HuggingFaceH4/ultrachat_200k", None, "train_sft")
    assert hub_dataset(f"hf:{tmp_path}") is None and hub_dataset("self") is None
    assert base_model_id(str(tmp_path)) is None and base_model_id("a/b") == "a/b"


def test_recovery_card_inherits_from_the_pruned_card(neuroal_run) -> None:
    report = {"model": "outputs/pruned", "variant": "masklora", "backend": "torch",
              "calib": "wikitext2", "achieved_sparsity": 0.5, "train": {"steps": 3, "tokens": 96},
              "perplexity": {"spec": "wikitext2", "windows": 2, "seqlen": 32, "before": 90.0,
                             "after": 60.0}}
    source = prune_card({**neuroal_run[0].report, "base_model": "org/base", "license": "mit"})
    front = _front(recovery_card(report, source))
    assert front["base_model"] == "org/base" and front["license"] == "mit"
    assert "perp" in front["tags"] and "masklora" in front["tags"]
    assert "model-index" not in front  # 2 windows: a subset, not a test-set result
    full = {**report, "perplexity": {**report["perplexity"], "windows": None}}
    front = _front(recovery_card(full, source))
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == 60.0


def test_card_names_no_absolute_path_and_the_command_as_typed() -> None:
    from neuroal.outputs.card import display_name, portable_command

    cmd = "neuroal prune --model /home/u/models/llama --output '/data/out dir/x' calib.data_dir=/d/w"
    assert portable_command(cmd) == \
        "neuroal prune --model .../llama --output .../x calib.data_dir=.../w"
    assert portable_command("python launch/prune.py --model ./m") == \
        "python launch/prune.py --model ./m"
    assert display_name("/home/u/models/llama") == "llama"
    assert display_name("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_plots_skipped_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture, neuroal_run) -> None:
    from neuroal import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    logger = logging.getLogger("neuroal")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="neuroal"):
            assert plots.write_plots(tmp_path, neuroal_run[0].report) == []
    finally:
        logger.removeHandler(caplog.handler)
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "plots").exists()


class FakeApi:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        if self.fail:
            raise ConnectionError("offline")
        self.calls.append(("upload_folder", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"


def test_push_to_hub_calls_the_api(neuroal_run) -> None:
    from neuroal.outputs.hub import push_output

    _, out = neuroal_run
    api = FakeApi()
    url = push_output(out, "me/tiny-pruned", api=api)
    assert url.endswith("/commit/abc")
    assert api.calls[0] == ("create_repo", {"repo_id": "me/tiny-pruned", "repo_type": "model",
                                            "private": None, "exist_ok": True})
    name, kwargs = api.calls[1]
    assert name == "upload_folder" and kwargs["folder_path"] == str(out)
    assert kwargs["repo_id"] == "me/tiny-pruned" and kwargs["repo_type"] == "model"
    with pytest.raises(ValueError, match="owner/name"):
        push_output(out, "no-owner", api=api)


def test_failed_upload_keeps_the_output_and_is_reported(neuroal_run) -> None:
    from neuroal.outputs.hub import push
    from neuroal.pipeline import RunResult

    result, out = neuroal_run
    copy = RunResult(dict(result.report), result.plan, out)
    push("me/x", copy, api=FakeApi(fail=True))
    assert copy.report["hub"]["error"].startswith("ConnectionError") and out.is_dir()


def test_upload_hint_names_the_installed_hub_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub >= 0.34 ships ``hf`` and no longer ``huggingface-cli``: the hint must
    name a command that exists here."""
    import shutil
    import sys

    from neuroal import hub

    cli = hub.hub_cli()
    assert shutil.which(cli) or (Path(sys.executable).parent / cli).exists()
    assert hub.upload_hint("me/x", "out dir") == f"{cli} upload me/x 'out dir' ."
    monkeypatch.setattr(shutil, "which", lambda name: "/bin/x" if name == "huggingface-cli" else None)
    monkeypatch.setattr(hub.sys, "executable", "/nowhere/python")
    assert hub.hub_cli() == "huggingface-cli"


def test_recover_output_gets_a_card_and_a_log(neuroal_run, tmp_path: Path) -> None:
    from conftest import DATA_DIR

    from neuroal.recovery.perp import PERP_VARIANTS
    from neuroal.recovery.train import RecoverJob, TrainOptions, recover

    _, pruned = neuroal_run
    out = tmp_path / "perp"
    job = RecoverJob(model=str(pruned), output=str(out), variant="bias-norm",
                     perp=PERP_VARIANTS.get("bias-norm"),
                     train=TrainOptions(steps=1, batch_size=1, grad_accum=1), nsamples=4,
                     seqlen=32, eval_windows=2, data_dir=str(DATA_DIR), device="cpu")
    report = recover(job)
    front = _front((out / "README.md").read_text())
    assert "perp" in front["tags"] and "bias-norm" in front["tags"]
    assert front["datasets"] == ["Salesforce/wikitext"]
    assert "model-index" not in front  # eval_windows=2: a subset, labelled in the body
    assert "a subset of the split" in (out / "README.md").read_text()
    assert f"{report['perplexity']['after']:.3f}" in (out / "README.md").read_text()
    assert "PERP retraining" in (out / "neuroal.log").read_text() or \
        "retraining" in (out / "neuroal.log").read_text() or (out / "neuroal.log").is_file()
