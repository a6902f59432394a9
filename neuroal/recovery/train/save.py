"""Writing a retrained model and checking its saved zeros (recovery.md §4.4).

Safetensors shards with their index, ``config.json`` (bias and tie flags as PERP changed them)
and the tokenizer; then every prunable weight's zeros in the input checkpoint are checked to be
zeros in the written one, one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroal.models.adapter import ModelAdapter
from neuroal.models.loading import SafetensorsCheckpoint
from neuroal.outputs.compat import make_loadable
from neuroal.outputs.export import parse_size, write_config
from neuroal.recovery.perp import check_zeros_kept


def prunable_weight_names(model: nn.Module) -> list[str]:
    """``<block prefix><linear>.weight`` of every prunable block linear."""
    adapter = ModelAdapter(model)
    return [f"{adapter.block_prefix(i)}{name}.weight" for i, block in enumerate(adapter.blocks)
            for name in adapter.prunable_linears(block)]


def verify_saved_zeros(before: Path, after: Path, names: list[str]) -> dict[str, dict[str, int]]:
    """Zeros of every prunable weight in checkpoint ``before`` are zeros in ``after`` (§4.4).

    Reads one tensor at a time.

    Returns:
        ``name -> {"zeros", "numel"}`` of ``after``.

    Raises:
        RuntimeError: A weight lost zeros.
    """
    old, new = SafetensorsCheckpoint(before), SafetensorsCheckpoint(after)
    counts = {}
    for name in names:
        a = old.load([name], torch.float32, "cpu")[name] == 0
        b = new.load([name], torch.float32, "cpu")[name] == 0
        check_zeros_kept({name: a}, {name: b})
        counts[name] = {"zeros": int(b.sum()), "numel": b.numel()}
    return counts


def save_model(state_dict: Mapping[str, torch.Tensor], model: nn.Module, tokenizer: Any,
               directory: Path, dtype: torch.dtype, shard_size: str) -> None:
    """Safetensors shards + index, ``config.json`` (bias / tie flags as changed) and tokenizer."""
    from huggingface_hub import save_torch_state_dict

    adapter = ModelAdapter(model)
    tensors = {k: v.detach().to(device="cpu", dtype=dtype if v.is_floating_point() else v.dtype)
               for k, v in state_dict.items() if not adapter.export_skip(k)}
    save_torch_state_dict(tensors, directory, max_shard_size=parse_size(shard_size))
    write_config(directory, model.config, str(dtype).removeprefix("torch."))
    tokenizer.save_pretrained(directory)
    make_loadable(directory)
