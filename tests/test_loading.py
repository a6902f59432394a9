"""Lazy per-slice loading: a worker materialises only what it owns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neuroal.engine.worker import Worker, WorkerSpec
from neuroal.models.loading import ModelSourceError, resolve_model


def _spec(model_dir: Path, start: int, stop: int, rank: int = 0) -> WorkerSpec:
    return WorkerSpec(resolve_model(str(model_dir)), start, stop, 2, "cpu", "float32", 2,
                      rank=rank)


def test_middle_slice_reads_only_its_shards(tiny_models: dict[str, Path]) -> None:
    model_dir = tiny_models["qwen2"]  # untied: embedding and head are separate tensors
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    worker = Worker(_spec(model_dir, 1, 2, rank=1))  # last worker: block 1 + norm + head

    params = dict(worker.adapter.model.named_parameters(remove_duplicate=False))
    owned_prefix = worker.adapter.block_prefix(1)
    for name, param in params.items():
        mine = name.startswith(owned_prefix) or name in ("model.norm.weight", "lm_head.weight")
        assert (param.device.type == "meta") != mine, name

    needed = {weight_map[n] for n in weight_map if n.startswith(owned_prefix)
              or n in ("model.norm.weight", "lm_head.weight")}
    others = set(weight_map.values()) - needed
    assert others, "fixture should spread tensors over several shards"
    assert worker.checkpoint.opened == needed
    assert not (worker.checkpoint.opened & others)


def test_first_slice_owns_embedding_not_head(tiny_models: dict[str, Path]) -> None:
    worker = Worker(_spec(tiny_models["llama"], 0, 1))
    adapter = worker.adapter
    assert adapter.embed.weight.device.type == "cpu"
    assert adapter.blocks[1].self_attn.q_proj.weight.device.type == "meta"
    assert adapter.model.model.norm.weight.device.type == "meta"


def test_tied_head_on_last_worker_reads_embedding(tiny_models: dict[str, Path]) -> None:
    """Llama fixture ties lm_head to the embedding: the last worker loads that tensor."""
    from safetensors import safe_open

    model_dir = tiny_models["llama"]
    worker = Worker(_spec(model_dir, 1, 2, rank=1))
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    fname = weight_map["model.embed_tokens.weight"]
    with safe_open(str(model_dir / fname), "pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(worker.adapter.head.weight, embedding)
    assert worker.adapter.embed.weight.device.type == "meta"
    assert "lm_head.weight" not in worker.state_items()


def test_resolve_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelSourceError, match="GGUF file"):
        resolve_model(str(tmp_path / "x.gguf"))
    assert resolve_model("org/name").kind == "hub"
    assert resolve_model("smollm2-135m").kind == "gguf"
