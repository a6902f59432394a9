"""A GGUF checkpoint and a safetensors copy of the same (de-quantised) model prune alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from gguf_fixture import tiny_llama, write_tiny_llama_gguf
from test_pipeline import _cfg

from neuroal.pipeline import run


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_gguf_and_safetensors_copy_give_identical_masks(criterion: str, tmp_path: Path,
                                                        tokenizer_dir: Path,
                                                        small_text: Path) -> None:
    from transformers import AutoModelForCausalLM

    (tmp_path / "g").mkdir()
    gguf_path = write_tiny_llama_gguf(tmp_path / "g" / "tiny.gguf",
                                      tiny_llama(seed=3, vocab_size=VOCAB), quant="Q8_0")
    dequantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    copy = AutoModelForCausalLM.from_config(config)
    copy.load_state_dict(dequantised.state_dict())
    st_dir = tmp_path / "st"
    copy.save_pretrained(st_dir, max_shard_size="50KB")

    masks = {}
    for label, model in (("gguf", gguf_path), ("st", st_dir)):
        cfg = _cfg(model, None, small_text, criterion={"name": criterion},
                   model={"name": str(model), "tokenizer": str(tokenizer_dir)},
                   engine={"workers": 2})
        masks[label] = run(cfg, keep_executor=True).executor.masks()
    assert masks["gguf"].keys() == masks["st"].keys() and masks["gguf"]
    for name, mask in masks["gguf"].items():
        assert torch.equal(mask, masks["st"][name]), name
