"""Architecture discovery: block/linear discovery, the derived row-step consumer map,
and a tiny end-to-end run (NeuroAL both steps, exact counts, export) for every architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    ARCHS,
    NEW_ARCHS,
    assert_rejected_before_loading,
    save_tiny_model,
    tiny_cfg,
    tiny_config,
)
from transformers import AutoConfig, AutoModelForCausalLM

from neuroal.allocation import ALLOCATIONS
from neuroal.allocation.base import PlanRequest
from neuroal.allocation.neuroal_math import check_row_map, row_plan
from neuroal.allocation.plan import ModelShape
from neuroal.models.adapter import ModelAdapter
from neuroal.models.consumers import ConsumerMap, derive_consumer_map
from neuroal.models.known import known_config
from neuroal.models.loading import attention_kind
from neuroal.pipeline import run
from neuroal.planning import ModelLayout

_LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
_LLAMA_CONSUMERS = {"self_attn.q_proj": "self_attn.o_proj", "self_attn.k_proj": "self_attn.o_proj",
                    "self_attn.v_proj": "self_attn.o_proj", "self_attn.o_proj": "mlp.gate_proj",
                    "mlp.gate_proj": "mlp.down_proj", "mlp.up_proj": "mlp.down_proj"}
_LLAMA_HEAD = dict(blocks="model.layers", embed="model.embed_tokens", final=("model.norm",),
                   linears=_LLAMA_LINEARS, consumers=_LLAMA_CONSUMERS)
# The ArchSpec table of HEAD before discovery (commit 876f36e), written out.
HEAD_TABLE = {
    "llama": _LLAMA_HEAD, "mistral": _LLAMA_HEAD, "qwen2": _LLAMA_HEAD,
    "phi": dict(blocks="model.layers", embed="model.embed_tokens",
                final=("model.final_layernorm",),
                linears=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.dense", "mlp.fc1", "mlp.fc2"],
                consumers={"self_attn.q_proj": "self_attn.dense",
                           "self_attn.k_proj": "self_attn.dense",
                           "self_attn.v_proj": "self_attn.dense", "self_attn.dense": "mlp.fc1",
                           "mlp.fc1": "mlp.fc2"}),
    "opt": dict(blocks="model.decoder.layers", embed="model.decoder.embed_tokens",
                final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
                linears=["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                         "self_attn.out_proj", "fc1", "fc2"],
                consumers={"self_attn.k_proj": "self_attn.out_proj",
                           "self_attn.v_proj": "self_attn.out_proj",
                           "self_attn.q_proj": "self_attn.out_proj", "self_attn.out_proj": "fc1",
                           "fc1": "fc2"}),
}
_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
# model_type -> (linears in registration order, consumers, tiles, fallbacks)
EXPECTED = {
    "gpt_neox": (["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                  "mlp.dense_4h_to_h"],
                 {"mlp.dense_h_to_4h": "mlp.dense_4h_to_h"}, {}, {"attention.query_key_value"}),
    "qwen3": (_LLAMA_LINEARS, _LLAMA_CONSUMERS, {}, set()),
    "gemma2": (_LLAMA_LINEARS, _LLAMA_CONSUMERS, {}, set()),
    "gemma3_text": (_LLAMA_LINEARS, _LLAMA_CONSUMERS, {}, set()),
    "phi3": (["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"],
             {"self_attn.o_proj": "mlp.gate_up_proj", "self_attn.qkv_proj": "self_attn.o_proj",
              "mlp.gate_up_proj": "mlp.down_proj"},
             {"self_attn.qkv_proj": 3, "mlp.gate_up_proj": 2}, set()),
    "gptj": (["attn.k_proj", "attn.v_proj", "attn.q_proj", "attn.out_proj", "mlp.fc_in",
              "mlp.fc_out"],
             {"attn.k_proj": "attn.out_proj", "attn.v_proj": "attn.out_proj",
              "attn.q_proj": "attn.out_proj", "mlp.fc_in": "mlp.fc_out"}, {}, set()),
    "falcon": (["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                "mlp.dense_4h_to_h"],
               {"self_attention.query_key_value": "self_attention.dense",
                "mlp.dense_h_to_4h": "mlp.dense_4h_to_h"}, {}, set()),
}
GRIDS = {"name": "neuroal", "block_grid": [0.1], "row_grid": [0.0, 0.1], "search_samples": 2}


def _model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_config(model_type)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention_kind(config)).eval()


@pytest.mark.parametrize("model_type", ARCHS)
def test_discovery_matches_the_head_table(model_type: str) -> None:
    """The five table families: same paths, linears, order and consumers as HEAD's table,
    except Phi-2's ``dense``, whose table consumer fc1 reads the block input (delta always 0,
    uniform rows either way; see the next test)."""
    adapter = ModelAdapter(_model(model_type))
    head = HEAD_TABLE[model_type]
    assert adapter.spec.blocks == head["blocks"] and adapter.spec.embed == head["embed"]
    assert adapter.spec.final == head["final"] and adapter.spec.head == "lm_head"
    assert adapter.spec.attention == "self_attn"
    for block in adapter.blocks:
        assert list(adapter.prunable_linears(block)) == head["linears"]
    expected = {p: c for p, c in head["consumers"].items()
                if (model_type, p) != ("phi", "self_attn.dense")}
    shape = adapter.shape()
    assert dict(shape.consumers) == expected and not shape.row_tiles
    assert list(shape.consumers) == list(expected)  # producer order too
    assert derive_consumer_map(adapter.config, ModelAdapter).source == "derived"


def test_phi_dense_without_consumer_gives_the_same_row_plan() -> None:
    """Phi-2 runs attention and MLP in parallel: fc1 reads the block input, identical in the
    dense and sparse passes, so its delta is exactly 0 and the table's dense -> fc1 gave uniform
    rows, as the derived map (no consumer) does."""
    shape = ModelAdapter(_model("phi")).shape()
    gen = torch.Generator().manual_seed(0)
    deltas = [{n: torch.randn(cols, generator=gen, dtype=torch.float64) for n, (_r, cols)
               in blk.items()} for blk in shape.blocks]
    for blk in deltas:
        blk["mlp.fc1"].zero_()
    ratios = [{n: 0.5 for n in blk} for blk in shape.blocks]
    old = row_plan(ratios, deltas, HEAD_TABLE["phi"]["consumers"], shape, 0.1)
    new = row_plan(ratios, deltas, shape.consumers, shape, 0.1)
    for a, b in zip(old, new, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(torch.as_tensor(a[name]), torch.as_tensor(b[name])), name


@pytest.mark.parametrize("model_type", NEW_ARCHS)
def test_new_architecture_discovered_and_block_calls_exact(model_type: str) -> None:
    """Blocks, linears and final modules are found, and block-by-block calls (per attention
    type: Gemma's sliding/full layers) reproduce the HF forward bit for bit."""
    model = _model(model_type)
    adapter = ModelAdapter(model)
    assert adapter.num_blocks == 2
    assert list(adapter.prunable_linears(adapter.blocks[1])) == EXPECTED[model_type][0]
    ids = torch.randint(0, 320, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        hidden, _ = adapter.capture_block0(input_ids=ids)
        for index, block in enumerate(adapter.blocks):
            _, call = adapter.capture_block0(inputs_embeds=torch.zeros_like(hidden),
                                             layer_type=adapter.layer_type(index))
            hidden = adapter.call_block(block, hidden, call)
        logits = adapter.logits(hidden)
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", NEW_ARCHS)
def test_derived_consumer_map(model_type: str) -> None:
    _, consumers, tiles, fallbacks = EXPECTED[model_type]
    adapter = ModelAdapter(_model(model_type))
    cmap = adapter.consumer_map()
    assert cmap.source == "derived"
    assert dict(cmap.consumers) == consumers and dict(cmap.tiles) == tiles
    assert {p for p, _ in cmap.fallbacks} == fallbacks
    shape = adapter.shape()
    for name, n in shape.row_tiles.items():  # fused rows = n x the consumer's inputs
        rows, _ = shape.blocks[0][name]
        assert rows == n * shape.blocks[0][shape.consumers[name]][1]


def test_tiled_rows_equal_the_unfused_rows() -> None:
    """A fused gate_up_proj gets, segment by segment, the row ratios separate gate/up get."""
    cols = 6
    delta = torch.tensor([0.3, -0.1, 0.0, 0.5, 0.2, -0.4], dtype=torch.float64)
    fused = ModelShape(({"up": (2 * cols, 4), "down": (4, cols)},
                        {"up": (2 * cols, 4), "down": (4, cols)}),
                       consumers={"up": "down"}, row_tiles={"up": 2})
    split = ModelShape(({"g": (cols, 4), "u": (cols, 4), "down": (4, cols)},) * 2,
                       consumers={"g": "down", "u": "down"})
    d = [{"up": torch.zeros(4), "down": delta}] * 2
    fused_rows = row_plan([{"up": 0.5, "down": 0.5}] * 2, d, fused.consumers, fused, 0.1,
                          tiles=fused.row_tiles)[0]["up"]
    split_plan = row_plan([{"g": 0.5, "u": 0.5, "down": 0.5}] * 2,
                          [{"g": torch.zeros(4), "u": torch.zeros(4), "down": delta}] * 2,
                          split.consumers, split, 0.1)[0]
    torch.testing.assert_close(fused_rows, torch.cat([split_plan["g"], split_plan["u"]]))


def test_a_map_that_does_not_fit_fails_before_the_search() -> None:
    """Phi-3 with the old Llama table: 'mlp.gate_proj' does not exist. Refused before the
    first candidate, not after the block step (the old failure)."""
    shape = ModelShape(({"self_attn.o_proj": (8, 8), "self_attn.qkv_proj": (24, 8),
                         "mlp.gate_up_proj": (32, 8), "mlp.down_proj": (8, 16)},) * 2,
                       consumers={"self_attn.o_proj": "mlp.gate_proj"})
    with pytest.raises(ValueError, match="mlp.gate_proj"):
        check_row_map(shape)

    class NoSearch:
        def evaluate_candidates(self, *_a: object, **_k: object) -> None:
            raise AssertionError("the search started")

    request = PlanRequest(shape=shape, target=0.5, pattern="unstructured", clip=(0.01, 0.99),
                          options={"block_grid": [0.1], "row_grid": [0.0]}, executor=NoSearch(),
                          calibration=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="mlp.gate_proj"):
        ALLOCATIONS.get("neuroal").plan(request)


@pytest.mark.parametrize("model_type", ARCHS + NEW_ARCHS)
def test_prune_neuroal_export_round_trip(model_type: str, tokenizer_dir: Path, tmp_path: Path,
                                         small_text: Path) -> None:
    """Sharded checkpoint -> NeuroAL (block and row step, Wanda) -> exact counts -> export that
    ``from_pretrained`` loads with the same logits and zeros; the row map is in report.json."""
    model_dir = save_tiny_model(model_type, tmp_path / model_type, tokenizer_dir)
    out = tmp_path / "pruned"
    cfg = tiny_cfg(model_dir, out, calib={"source": f"text:{small_text}", "seqlen": 16},
                   allocation=GRIDS)
    result = run(cfg, keep_executor=True)
    assert result.plan.policy["lambda_row"] is not None  # the row step ran
    for name, layer in result.report["layers"].items():
        assert layer["zeros"] == layer["pruned"], name  # exactly the planned counts
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    report = json.loads((out / "report.json").read_text())
    row_map = report["row_map"]
    assert row_map["source"] == "derived"
    _, _, tiles, fallbacks = EXPECTED.get(model_type, ([], {}, {}, set()))
    assert set(row_map["uniform_rows"]) >= fallbacks
    block0 = result.plan.ratios[0]
    for name, n in tiles.items():  # fused rows got real (varying) per-row ratios
        assert isinstance(block0[name], torch.Tensor) and block0[name].numel() % n == 0, name
        assert not bool((block0[name] == block0[name][0]).all()), name
    for name in fallbacks:  # uniform rows: a constant per-row vector (the reference's neuron rule)
        entry = block0[name]
        assert isinstance(entry, torch.Tensor) and bool((entry == entry[0]).all()), name
    loaded = AutoModelForCausalLM.from_pretrained(
        out, attn_implementation=attention_kind(AutoConfig.from_pretrained(out))).eval()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.executor.logits(ids),
                                   rtol=0, atol=0)
    for name, mask in result.executor.masks().items():
        assert torch.equal(loaded.get_parameter(name + ".weight") == 0, mask), name


@pytest.mark.parametrize(("model_type", "fragment"), [
    ("llava", "vision/audio-language model"), ("gemma3", "vision/audio-language model"),
    ("t5", "encoder-decoder"), ("bart", "encoder-decoder")])
def test_refused_before_loading(model_type: str, fragment: str, tmp_path: Path,
                                caplog: pytest.LogCaptureFixture, no_loading: None) -> None:
    model_dir = tmp_path / model_type
    AutoConfig.for_model(model_type).save_pretrained(model_dir)
    assert_rejected_before_loading(model_dir, [], [fragment, repr(model_type)], tmp_path, caplog)


def test_map_keeps_only_pairs_every_block_has() -> None:
    """Blocks that differ (DeepSeek: dense first blocks, MoE after) keep the common pairs."""
    dense = {"o": (4, 4), "gate": (8, 4), "down": (4, 8)}
    moe = {"o": (4, 4), "experts.down": (4, 8)}
    cmap = ConsumerMap(consumers=(("o", "gate"), ("gate", "down")), tiles=(("gate", 2),))
    fitted = cmap.checked([dense, moe])
    assert fitted.consumers == () and fitted.tiles == ()
    assert {p for p, _ in fitted.fallbacks} == {"o", "gate"}
    assert cmap.checked([dense, dense]) is cmap


@pytest.mark.parametrize(("alias", "billions"), [
    ("qwen3-8b", 8.2), ("qwen3-14b", 14.8), ("qwen3-32b", 32.8), ("qwen3-30b-a3b", 30.5),
    ("llama-3.3-70b", 70.6), ("mixtral-8x7b", 46.7), ("gemma-2-27b", 27.2), ("phi-4", 14.7)])
def test_new_aliases_plan_offline_with_their_public_sizes(alias: str, billions: float) -> None:
    """Shipped configs (offline): the model cards' parameter counts, experts included."""
    layout = ModelLayout.from_config(known_config(alias), alias, repeat_block=True)
    assert layout.params == pytest.approx(billions * 1e9, rel=5e-3)
