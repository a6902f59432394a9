"""End-to-end runs on tiny random models: exact sparsity for every criterion x pattern x
architecture, export round-trips, and 1-worker vs 3-worker equality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, save_tiny_model, tiny_cfg
from transformers import AutoModelForCausalLM

from neuroal.pipeline import run

CRITERIA = ("magnitude", "wanda", "ria", "sparsegpt", "multiflow")
PATTERNS = ("unstructured", "2:4", "4:8")


def _cfg(model_dir: Path, out: Path | None, text: Path, **overrides):
    calib = {"source": f"text:{text}", **overrides.pop("calib", {})}
    return tiny_cfg(model_dir, out, calib=calib, **overrides)


def _check_counts(masks: dict[str, torch.Tensor], pattern: str, sparsity: float,
                  criterion: str) -> None:
    """The planned count exactly, in the criterion's comparison group."""
    for name, mask in masks.items():
        rows, cols = mask.shape
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            kept = (~mask).reshape(rows, cols // m, m).sum(-1)
            assert torch.all(kept == n), f"{name}: N:M violated"
        elif criterion in ("wanda", "multiflow"):
            assert torch.all(mask.sum(1) == int(sparsity * cols)), f"{name}: per-row count"
        elif criterion == "sparsegpt":
            for c0 in range(0, cols, 128):
                width = min(128, cols - c0)
                assert int(mask[:, c0:c0 + width].sum()) == int(sparsity * rows * width), name
        else:
            assert int(mask.sum()) == int(sparsity * rows * cols), f"{name}: per-matrix count"


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_criterion_reaches_exact_sparsity(model_type: str, pattern: str,
                                                tiny_models: dict[str, Path],
                                                small_text: Path) -> None:
    for criterion in CRITERIA:
        cfg = _cfg(tiny_models[model_type], None, small_text, pattern=pattern,
                   criterion={"name": criterion})
        result = run(cfg, keep_executor=True)
        masks = result.executor.masks()
        assert set(masks) == set(result.report["layers"])
        _check_counts(masks, pattern, cfg.target_sparsity, criterion)
        assert result.report["achieved_sparsity"] == pytest.approx(cfg.target_sparsity, abs=0.01)


@pytest.mark.parametrize("model_type", ARCHS)
def test_export_round_trip(model_type: str, tiny_models: dict[str, Path], small_text: Path,
                           tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    cfg = _cfg(tiny_models[model_type], out, small_text, criterion={"name": "sparsegpt"},
               eval={"datasets": [f"text:{small_text}"], "max_windows": 2})
    result = run(cfg, keep_executor=True)
    assert out.is_dir() and not (tmp_path / "pruned.neuroal-tmp").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all((out / f).is_file() for f in set(index["weight_map"].values()))
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "criterion", "allocation", "pattern", "target_sparsity",
                "achieved_sparsity", "layers", "eval", "timings", "peak_memory_bytes", "config"):
        assert key in report, key
    assert report["eval"][f"text:{small_text}"]["model_ppl"] > 1.0

    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.executor.logits(ids)
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    masks = result.executor.masks()
    for name, mask in masks.items():
        weight = loaded.get_parameter(name + ".weight")
        assert torch.equal(weight == 0, mask)
        assert not torch.signbit(weight[mask]).any(), "pruned weights must be +0.0"


def test_one_and_three_workers_identical(tokenizer_dir: Path, tmp_path: Path,
                                         small_text: Path) -> None:
    model_dir = save_tiny_model("llama", tmp_path / "llama4", tokenizer_dir, num_layers=4)
    results = {}
    for workers in (1, 3):
        cfg = _cfg(model_dir, None, small_text, criterion={"name": "sparsegpt"},
                   engine={"workers": workers},
                   eval={"datasets": [f"text:{small_text}"], "max_windows": 3})
        result = run(cfg, keep_executor=True)
        assert len(result.executor.workers) == workers
        results[workers] = result
    m1, m3 = results[1].executor.masks(), results[3].executor.masks()
    assert m1.keys() == m3.keys()
    for name in m1:
        assert torch.equal(m1[name], m3[name]), name
    assert results[1].report["eval"] == results[3].report["eval"]
    slices = [tuple(s) for s in results[3].report["slices"]]
    assert len(slices) == 3 and slices[0][0] == 0 and slices[-1][1] == 4
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))


def test_self_calibration_and_gguf_export(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Data-free calibration (sequences sampled from the model) on a GGUF input, exported as
    safetensors that transformers loads with the same zeros."""
    from conftest import VOCAB
    from gguf_fixture import tiny_llama, write_tiny_llama_gguf

    (tmp_path / "g").mkdir()
    gguf_path = write_tiny_llama_gguf(tmp_path / "g" / "tiny.gguf",
                                      tiny_llama(seed=1, vocab_size=VOCAB), quant="Q8_0")
    out = tmp_path / "out"
    cfg = tiny_cfg(gguf_path, out, calib={"source": "self", "nsamples": 3, "seqlen": 12},
                   model={"name": str(gguf_path), "tokenizer": str(tokenizer_dir)})
    result = run(cfg, keep_executor=True)
    assert result.report["calibration"]["source"] == "self"
    assert result.report["export_dtype"] == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, mask in result.executor.masks().items():
        assert torch.equal(loaded.get_parameter(name + ".weight") == 0, mask), name
    assert sorted(p.suffix for p in out.glob("model-*")) == [".safetensors"]


def test_compare_runs_other_allocations_side_by_side(tiny_models: dict[str, Path],
                                                     small_text: Path) -> None:
    cfg = _cfg(tiny_models["llama"], None, small_text, sparsity=0.6, compare=["uniform"],
               allocation={"name": "owl", "lam": 0.05},
               eval={"datasets": [f"text:{small_text}"], "max_windows": 2})
    report = run(cfg).report
    (row,) = report["compare"]
    assert row["allocation"] == "uniform" and row["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    spec = f"text:{small_text}"
    assert row["model_ppl"][spec] != report["eval"][spec]["model_ppl"]  # OWL differs from uniform
    assert report["timings"]["prune[uniform]"] > 0
