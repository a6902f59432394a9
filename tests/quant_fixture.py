"""Tiny FP8 checkpoints written the way real ones are, from a saved dense tiny model.

Two layouts, each as its config declares it:

* ``block``: DeepSeek-V3 / transformers fine-grained FP8: ``quant_method: fp8``,
  ``weight_block_size``, ``<linear>.weight`` in float8_e4m3fn and ``<linear>.weight_scale_inv`` of
  shape ``(ceil(rows / br), ceil(cols / bc))``;
* ``channel``: llm-compressor's FP8 export: ``quant_method: compressed-tensors``, ``format:
  float-quantized``, channel strategy, ``<linear>.weight_scale`` of shape ``(rows, 1)`` (and a
  static ``input_scale``, which a dense model ignores).

Every 2-D ``*_proj.weight`` is quantized (attention, MLP, shared and routed experts); embeddings,
norms, routers and the head stay dense, as in the real checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FP8_MAX = 448.0  # largest float8_e4m3fn value
BLOCK = (16, 16)


def _tile_amax(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = w.shape
    out = torch.empty(-(-rows // block[0]), -(-cols // block[1]))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            tile = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            out[i, j] = tile.abs().max()
    return out


def quantize(w: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q float8_e4m3fn, scale float32)`` with ``w ~ q * scale`` broadcast per layout."""
    w = w.float()
    if layout == "block":
        scale = _tile_amax(w, BLOCK).clamp_min(1e-12) / FP8_MAX
        full = scale.repeat_interleave(BLOCK[0], 0)[: w.shape[0]]
        full = full.repeat_interleave(BLOCK[1], 1)[:, : w.shape[1]]
    else:  # channel
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
        full = scale
    return (w / full).to(torch.float8_e4m3fn), scale


QUANT_CONFIGS = {
    "block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": list(BLOCK)},
    "channel": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "quantization_status": "compressed", "ignore": ["lm_head"], "kv_cache_scheme": None,
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                        "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                  "symmetric": True, "dynamic": False}}}},
}
SCALE_NAME = {"block": "weight_scale_inv", "channel": "weight_scale"}


def to_fp8(directory: Path, layout: str) -> dict[str, torch.Tensor]:
    """Quantize the dense model saved in ``directory`` in place; returns its true weights."""
    from safetensors.torch import load_file, save_file

    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    true: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(directory / fname))
        out = {}
        for name, t in tensors.items():
            true[name] = t.clone()
            if name.endswith("_proj.weight") and t.dim() == 2:
                q, scale = quantize(t, layout)
                stem = name[: -len("weight")]
                out[name], out[stem + SCALE_NAME[layout]] = q, scale
                index["weight_map"][stem + SCALE_NAME[layout]] = fname
                if layout == "channel":
                    out[stem + "input_scale"] = torch.ones(1)
                    index["weight_map"][stem + "input_scale"] = fname
            else:
                out[name] = t
        save_file(out, str(directory / fname), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIGS[layout]
    (directory / "config.json").write_text(json.dumps(config))
    return true


def with_quantization(directory: Path, target: Path, quantization_config: dict) -> Path:
    """A copy of ``directory`` (symlinked files) whose config declares ``quantization_config``."""
    target.mkdir()
    for f in directory.iterdir():
        if f.name != "config.json":
            (target / f.name).symlink_to(f)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (target / "config.json").write_text(json.dumps(config))
    return target
