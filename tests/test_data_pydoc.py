"""The ``pydoc`` source: the standard library's help topics as a second,
out-of-domain evaluation corpus; registered by name, deterministic, tokenised into windows."""

from __future__ import annotations

from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from conftest import tiny_cfg
from transformers import AutoTokenizer

from neuroal.config.build import validate
from neuroal.data import SOURCES, eval_text, load_calibration, load_eval_windows, parse_source
from neuroal.pipeline import run


def test_pydoc_text_is_the_sorted_topics_joined() -> None:
    loaded = eval_text("pydoc")
    keys = sorted(topics)
    assert loaded.text == "\n\n".join(topics[k].strip() for k in keys)
    assert loaded.text.startswith(topics[keys[0]].strip())
    assert loaded.text.endswith(topics[keys[-1]].strip())
    info = loaded.info
    assert (info.spec, info.purpose, info.origin) == ("pydoc", "evaluation", "stdlib")
    assert info.n_documents == len(topics) and info.n_chars == len(loaded.text)
    assert "pydoc_data.topics" in info.location and len(info.sha256) == 64
    assert eval_text("pydoc").info.sha256 == info.sha256


def test_pydoc_is_registered_by_name_and_takes_no_argument() -> None:
    assert "pydoc" in SOURCES.names()
    assert parse_source("pydoc").name == "pydoc"
    with pytest.raises(ValueError, match="takes no argument"):
        parse_source("pydoc:x")


def test_pydoc_windows_are_deterministic(tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    first = load_eval_windows("pydoc", tok, seqlen=64, max_windows=5)
    again = load_eval_windows("pydoc", tok, seqlen=64, max_windows=5)
    assert first.windows.shape == (5, 64) and first.windows.dtype == torch.int64
    assert torch.equal(first.windows, again.windows)
    expected = tok(eval_text("pydoc").text, return_tensors="pt")["input_ids"][0]
    assert torch.equal(first.windows.flatten(), expected[:5 * 64])
    calib = load_calibration("pydoc", tok, 3, 32, 0)
    assert calib.windows.shape == (3, 32) and calib.source_info.purpose == "calibration"


def test_prune_evaluates_on_wikitext2_and_pydoc(tiny_models: dict[str, Path]) -> None:
    cfg = tiny_cfg(tiny_models["llama"], None,
                   eval={"datasets": ["wikitext2", "pydoc"], "max_windows": 2})
    validate(cfg)
    report = run(cfg).report
    assert set(report["eval"]) >= {"wikitext2", "pydoc"}
    for spec in ("wikitext2", "pydoc"):
        ev = report["eval"][spec]
        assert ev["windows"] == 2 and ev["seqlen"] == 32
        assert ev["model_ppl"] > 1.0 and ev["dense_ppl"] > 1.0
    assert report["eval"]["pydoc"]["model_ppl"] != report["eval"]["wikitext2"]["model_ppl"]
