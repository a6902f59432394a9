"""Exports are servable as written: ``architectures`` always in ``config.json`` (GGUF sources
included), every file readable by other users (0644 under the usual umask), a model card only
beside weights."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import transformers
from conftest import VOCAB, tiny_cfg
from gguf_fixture import tiny_llama, write_tiny_llama_gguf
from test_pipeline import _cfg

from neuroal.outputs.export import causal_lm_architecture, regular_mode, write_config
from neuroal.pipeline import run


def _resolves(out: Path) -> type:
    """The class ``config.json``'s ``architectures`` names, as vLLM and transformers find it."""
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.architectures, "config.json has no architectures"
    cls = getattr(transformers, config.architectures[0])
    assert cls.config_class.model_type == config.model_type
    return cls


def test_write_config_fills_architectures(tmp_path: Path) -> None:
    config = tiny_llama(seed=0, vocab_size=VOCAB).config
    config.architectures = None
    write_config(tmp_path, config, "float32")
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == \
        ["LlamaForCausalLM"]
    assert _resolves(tmp_path) is transformers.LlamaForCausalLM
    config.model_type = "no-such-model"
    assert causal_lm_architecture(config) is None


def test_gguf_export_names_its_architecture(tmp_path: Path, tokenizer_dir: Path,
                                            small_text: Path) -> None:
    (tmp_path / "g").mkdir()
    gguf_path = write_tiny_llama_gguf(tmp_path / "g" / "tiny.gguf",
                                      tiny_llama(seed=3, vocab_size=VOCAB), quant="Q8_0")
    out = tmp_path / "out"
    run(_cfg(gguf_path, out, small_text,
             model={"name": str(gguf_path), "tokenizer": str(tokenizer_dir)}))
    assert _resolves(out) is transformers.LlamaForCausalLM


def test_every_output_file_is_world_readable_and_no_card_without_weights(
        tiny_models: dict[str, Path], tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert regular_mode() == 0o644
        out = tmp_path / "out"
        run(tiny_cfg(tiny_models["llama"], out))
        files = [p for p in out.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
        assert set(modes.values()) == {0o644}, modes
        assert (out / "README.md").is_file()
        bare = tmp_path / "report-only"
        cfg = tiny_cfg(tiny_models["llama"], bare, output={"dir": str(bare), "save_model": False})
        run(cfg)
        assert (bare / "report.json").is_file()
        assert not (bare / "README.md").exists(), "a model card without a model"
    finally:
        os.umask(old)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("vllm"),
                    reason="vLLM is not installed on this machine")
def test_vllm_registry_accepts_the_export(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from vllm.model_executor.models import ModelRegistry

    out = tmp_path / "out"
    run(tiny_cfg(tiny_models["llama"], out))
    arch = transformers.AutoConfig.from_pretrained(out).architectures[0]
    assert arch in ModelRegistry.get_supported_archs()
