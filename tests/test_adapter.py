"""The model adapter on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_config
from transformers import AutoModelForCausalLM

from neuroal.models.adapter import ModelAdapter

EXPECTED_LINEARS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
            "fc1", "fc2"],
    "phi": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
            "mlp.fc1", "mlp.fc2"],
}
EXPECTED_LINEARS["mistral"] = EXPECTED_LINEARS["qwen2"] = EXPECTED_LINEARS["llama"]


def _model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type),
                                            attn_implementation="sdpa").eval()


@pytest.mark.parametrize("model_type", ARCHS)
def test_finds_blocks_linears_and_shapes(model_type: str) -> None:
    adapter = ModelAdapter(_model(model_type))
    assert adapter.num_blocks == 2
    assert list(adapter.prunable_linears(adapter.blocks[0])) == EXPECTED_LINEARS[model_type]
    shape = adapter.shape()
    for name, (rows, cols) in shape.blocks[1].items():
        lin = adapter.prunable_linears(adapter.blocks[1])[name]
        assert (rows, cols) == tuple(lin.weight.shape)
    if model_type in ("llama", "mistral", "qwen2"):
        assert shape.blocks[0]["self_attn.k_proj"] == (32, 64)  # GQA: 2 KV heads of 16


@pytest.mark.parametrize("model_type", ARCHS)
def test_block_by_block_equals_full_forward(model_type: str) -> None:
    """Captured block-0 call + block calls + final modules/head == the HF forward."""
    model = _model(model_type)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 320, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        hidden, call = adapter.capture_block0(input_ids=ids)
        _, call_from_zeros = adapter.capture_block0(inputs_embeds=torch.zeros_like(hidden))
        for block in adapter.blocks:
            hidden = adapter.call_block(block, hidden, call_from_zeros)
        logits = adapter.logits(hidden)
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    assert set(call.kwargs) == set(call_from_zeros.kwargs)
    if model_type != "opt":
        assert "position_embeddings" in call.kwargs


@pytest.mark.parametrize("model_type", ARCHS)
def test_owned_modules_and_tied_head(model_type: str) -> None:
    adapter = ModelAdapter(_model(model_type))
    first = adapter.owned_module_names(0, 1, first=True, last=False)
    last = adapter.owned_module_names(1, 2, first=False, last=True)
    assert adapter.spec.embed in first and adapter.spec.embed not in last
    assert adapter.spec.head in last and adapter.spec.head not in first
    assert not any(n.startswith(adapter.block_prefix(1)[:-1]) for n in first)
    if adapter.tied:
        assert adapter.checkpoint_key("lm_head.weight") == f"{adapter.spec.embed}.weight"
        assert adapter.export_skip("lm_head.weight")
