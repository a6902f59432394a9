"""PERP recovery steps chained through the pipeline (recovery.md §3): ``perp-reconstruct`` inside
the final prune, whole-model ``perp-bias-norm`` / ``perp-masklora`` / ``perp-scalelora`` after
it, chains after DSnoT / R²-DSnoT, exact masks in the exported shards and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_rejected_before_loading, save_tiny_model, tiny_cfg
from safetensors.torch import load_file

from neuroal.pipeline import run
from neuroal.recovery import RECOVERY_STEPS, chain_errors

WHOLE_MODEL = ("perp-bias-norm", "perp-masklora", "perp-scalelora", "perp-full")
FAST = {"perp-reconstruct": {"steps": 6, "batch_size": 2, "lr": 1e-2},
        **{name: {"steps": 3, "lr": 1e-3, "rank": 4} for name in WHOLE_MODEL[1:3]},
        "perp-full": {"steps": 3, "lr": 1e-3},
        "perp-bias-norm": {"steps": 3, "lr": 1e-3}}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("chain") / "llama", tokenizer_dir)


def _run(model_dir: Path, text: Path, out: Path | None, steps: list[str], **overrides):
    recover = {"steps": steps, **{s: FAST[s] for s in steps if s in FAST},
               **overrides.pop("recover", {})}
    evals = {"datasets": [f"text:{text}"], "max_windows": 2}
    return run(tiny_cfg(model_dir, out, calib={"source": f"text:{text}"}, eval=evals,
                        recover=recover, **overrides), keep_executor=True)


def _shards(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _check_export(out: Path, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every pruned weight is exactly zero in the shards, and the export loads."""
    from transformers import AutoModelForCausalLM

    tensors = _shards(out)
    for name, mask in masks.items():
        assert (tensors[name + ".weight"][mask] == 0).all(), f"{name}: a pruned weight came back"
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, mask in masks.items():
        assert (model.get_parameter(name + ".weight")[mask] == 0).all(), name
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["steps"]
    return tensors


def _step(report: dict, name: str) -> dict:
    return next(s for s in report["recovery"]["steps"] if s["name"] == name)


# --------------------------------------------------------------------------- registry and config


def test_registry_and_chain_rules() -> None:
    assert {"perp-reconstruct", *WHOLE_MODEL} <= set(RECOVERY_STEPS.names())
    assert chain_errors(["r2dsnot", "perp-reconstruct", "perp-masklora"]) == []
    assert chain_errors(["dsnot", "perp-masklora"]) == []
    assert "at most one" in chain_errors(["perp-masklora", "perp-scalelora"])[0]
    assert "cannot follow" in chain_errors(["perp-bias-norm", "perp-reconstruct"])[0]
    assert "cannot follow" in chain_errors(["perp-reconstruct", "dsnot"])[0]
    masklora = RECOVERY_STEPS.get("perp-masklora")
    assert masklora.perp_options({"rank": 4}).adapter == "mask_lora"
    assert masklora.train_options({"tokens": 512}).plan_steps(32) == 8
    assert "rank" not in RECOVERY_STEPS.get("perp-bias-norm").defaults


BAD_CHAINS = [
    (["--recover", "perp-masklora,perp-scalelora"], ["perp-masklora and perp-scalelora", "at most one"]),
    (["--recover", "perp-bias-norm,perp-reconstruct"], ["'perp-reconstruct'", "cannot follow",
                                                         "'perp-bias-norm'"]),
    (["--recover", "perp-reconstruct,r2dsnot"], ["'r2dsnot'", "cannot follow"]),
    (["--recover", "perp-reconstruct", "recover.perp-reconstruct.steps=0"], ["steps=0", "positive"]),
    (["--recover", "perp-masklora", "recover.perp-masklora.lr=-1.0"], ["lr=-1.0"]),
    (["--recover", "perp-bias-norm", "recover.perp-bias-norm.rank=4"], ["rank", "valid options"]),
    (["--recover", "perp-masklora", "recover.perp-masklora.tokens=abc"], ["tokens='abc'", "null"]),
]


@pytest.mark.parametrize(("extra", "expected"), BAD_CHAINS)
def test_bad_chains_exit_2_before_loading(extra: list[str], expected: list[str], llama_dir: Path,
                                          tmp_path: Path, no_loading: None,
                                          caplog: pytest.LogCaptureFixture) -> None:
    assert_rejected_before_loading(llama_dir, extra, expected, tmp_path, caplog)


# --------------------------------------------------------------------------- perp-reconstruct


def test_reconstruct_lowers_block_mse_and_keeps_masks(llama_dir: Path, small_text: Path,
                                                      tmp_path: Path) -> None:
    plain = _run(llama_dir, small_text, None, [])
    out = tmp_path / "rec"
    result = _run(llama_dir, small_text, out, ["perp-reconstruct"])
    masks = result.executor.masks()
    # the masks are Wanda's: block 0 sees the same inputs as the plain run
    for name, mask in masks.items():
        if ".0." in name:
            assert torch.equal(mask, plain.executor.masks()[name]), name
    tensors = _check_export(out, masks)
    assert any(not torch.equal(tensors[n], torch.ones_like(tensors[n]))
               for n in tensors if "norm" in n), "norms must be exported as trained"
    step = _step(result.report, "perp-reconstruct")
    assert step["blocks_reconstructed"] == 2 and len(step["blocks"]) == 2
    for block in step["blocks"]:
        assert block["mse_after"] < block["mse_before"], block
        assert block["trainable"] == 16384 + 2 * 64  # MaskLoRA r16 on 7 linears + 2 norms
        assert block["tokens"] == 6 * 2 * 32
    assert step["trainable_fraction"] == pytest.approx(2 * 16512 / 94528)  # tied head once
    assert step["seconds"] > 0
    assert step["ppl_after"] == {k: v["model_ppl"] for k, v in result.report["eval"].items()}
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    json.dumps(result.report)


def test_reconstruct_one_and_two_workers_identical(llama_dir: Path, small_text: Path,
                                                   tmp_path: Path) -> None:
    one = _run(llama_dir, small_text, tmp_path / "one", ["perp-reconstruct"])
    two = _run(llama_dir, small_text, tmp_path / "two", ["perp-reconstruct"],
               engine={"workers": 2})
    a, b = _shards(tmp_path / "one"), _shards(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert one.report["eval"] == two.report["eval"]


def test_r2dsnot_then_reconstruct(llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "chain"
    result = _run(llama_dir, small_text, out, ["r2dsnot", "perp-reconstruct"],
                  recover={"baseline": True})
    _check_export(out, result.executor.masks())
    r2, rec = _step(result.report, "r2dsnot"), _step(result.report, "perp-reconstruct")
    assert r2["swaps"] > 0 and rec["mse_after"] < rec["mse_before"]
    key = f"text:{small_text}"
    assert rec["ppl_before"][key] == result.report["recovery"]["baseline"]["model_ppl"][key]
    assert rec["ppl_after"][key] < rec["ppl_before"][key]


# --------------------------------------------------------------------------- whole-model PERP


@pytest.mark.parametrize("name", WHOLE_MODEL)
def test_whole_model_step_keeps_masks_and_reports(name: str, llama_dir: Path, small_text: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / name
    result = _run(llama_dir, small_text, out, [name])
    masks = result.executor.masks()
    tensors = _check_export(out, masks)
    step = _step(result.report, name)
    key = f"text:{small_text}"
    for field in ("seconds", "trainable", "trainable_fraction", "tokens", "ppl_before", "ppl_after"):
        assert step[field] is not None, field
    assert step["tokens"] == 3 * 1 * 2 * 32 and step["steps"] == 3
    assert 0 < step["trainable_fraction"] < (1.0 if name == "perp-full" else 0.5)
    assert step["achieved_sparsity_after"] == pytest.approx(result.report["achieved_sparsity"])
    assert result.report["eval"][key]["recovered_ppl"] == step["ppl_after"][key]
    # the model entering the step is the pruned export: its perplexity is the pipeline's
    assert step["ppl_before"][key] == pytest.approx(result.report["eval"][key]["model_ppl"], rel=1e-4)
    moved = [n for n in masks if not torch.equal(tensors[n + ".weight"],
                                                   result.executor.workers[0].adapter.model
                                                   .get_parameter(n + ".weight").float())]
    if name == "perp-bias-norm":
        assert not moved and step["params"]["groups"]["adapters"] == 0
    elif name == "perp-full":  # the weights themselves, re-masked: every matrix moved
        assert len(moved) == len(masks) and step["params"]["groups"]["weights"] > 0
    else:
        assert moved and step["untied_head"] is True and "lm_head.weight" in tensors
    on_disk = json.loads((out / "report.json").read_text())
    assert _step(on_disk, name)["ppl_after"] == step["ppl_after"]


def test_dsnot_then_masklora_without_saving(llama_dir: Path, small_text: Path) -> None:
    result = _run(llama_dir, small_text, None, ["dsnot", "perp-masklora"])
    assert result.output is None
    steps = result.report["recovery"]["steps"]
    assert [s["name"] for s in steps] == ["dsnot", "perp-masklora"]
    assert steps[1]["ppl_after"] and steps[1]["trainable"] > 0


def test_reconstruct_job_and_report_pickle() -> None:
    """Ray and torch.distributed ship PruneJob and BlockReport by pickling: plain values only."""
    import pickle

    from neuroal.engine.worker import BlockReport, LayerReport, PruneJob
    from neuroal.recovery.handoff import reconstruct_options

    cfg = tiny_cfg(Path("unused"), None, recover={"steps": ["perp-reconstruct"],
                                                   "perp-reconstruct": {"steps": 3}})
    job = PruneJob("wanda", reconstruct=reconstruct_options(cfg))
    assert pickle.loads(pickle.dumps(job)) == job and job.reconstruct["steps"] == 3
    report = BlockReport(0, [LayerReport("q", 0.5, 2, 2, 4)], 1.0, {"perp-reconstruct": {"mse_after": 0.1}})
    assert pickle.loads(pickle.dumps(report)) == report
    assert BlockReport.from_dict(report.to_dict()) == report


class _InterruptError(Exception):
    pass


def test_reconstruct_resumes_to_identical_output(llama_dir: Path, small_text: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume state of a reconstructed block holds its norms too (not only the linears)."""
    from neuroal.engine.worker import Worker

    _run(llama_dir, small_text, tmp_path / "ref", ["perp-reconstruct"])
    out = tmp_path / "out"
    original = Worker.prune_one
    calls = {"n": 0}

    def crash_second(self, *args, **kwargs):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] > 1:
            raise _InterruptError("crash in block 1")
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Worker, "prune_one", crash_second)
        with pytest.raises(_InterruptError):
            _run(llama_dir, small_text, out, ["perp-reconstruct"])
    _run(llama_dir, small_text, out, ["perp-reconstruct"], output={"dir": str(out), "resume": True})
    a, b = _shards(out), _shards(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
