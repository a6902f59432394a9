"""Checkpoint layouts that differ from the module tree (mixture-of-experts checkpoints).

transformers 5 builds MoE experts as fused 3-D parameters (``mlp.experts.gate_up_proj`` of shape
``(experts, 2 * inter, hidden)``, ``mlp.experts.down_proj``), but the checkpoints on the Hub, and
the files ``save_pretrained`` writes, keep one tensor per expert and matrix
(``mlp.experts.3.gate_proj.weight``; Mixtral: ``block_sparse_moe.experts.3.w1.weight``).
transformers ships the rules between the two layouts as data (``conversion_mapping``): renamings
and converters (stack the experts, concatenate gate and up). This module applies those same rules
to single tensors, so a worker reads only the tensors of the blocks it owns, and writes its
shard back in the layout ``save_pretrained`` would write (loadable by ``from_pretrained`` of
transformers 4 and 5 and by vLLM).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Source:
    """Checkpoint tensors that make one model parameter.

    Attributes:
        target: The parameter's name in the model (e.g. ``model.layers.0.mlp.experts.down_proj``).
        converter: transformers' ``WeightConverter`` that builds it, or None for a plain rename.
        keys: Checkpoint keys by the converter's source pattern, in natural (expert) order.
    """

    target: str
    converter: Any = None
    keys: dict[str, list[str]] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [k for keys in self.keys.values() for k in keys]


def _transforms(model: nn.Module) -> tuple[list[Any], list[Any]]:
    """transformers' (renamings, converters) for this model; empty for plain layouts."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # pragma: no cover - transformers < 5 has no conversion rules
        return [], []
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def checkpoint_sources(model: nn.Module, names: Iterable[str], wanted: Iterable[str],
                       ) -> dict[str, Source]:
    """Where each of ``wanted`` (model parameter names absent from the checkpoint) comes from.

    Every checkpoint key is renamed as ``from_pretrained`` would rename it (key names only, no
    tensor is read); keys whose new name is wanted are grouped by target, in natural order (so
    experts stack as 0, 1, ..., 10). Wanted names no key maps to are left out.
    """
    wanted = set(wanted)
    if not wanted:
        return {}
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters = _transforms(model)
    if not renamings and not converters:
        return {}
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    out: dict[str, Source] = {}
    for key in sorted(names, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters)
        if target not in wanted:
            continue
        source = out.setdefault(target, Source(target, by_pattern.get(pattern) if pattern else None))
        source.keys.setdefault(pattern or key, []).append(key)
    return out


def build_parameter(source: Source, tensors: Mapping[str, torch.Tensor], model: nn.Module,
                    ) -> torch.Tensor:
    """The parameter ``source.target`` from its loaded checkpoint tensors (``key -> tensor``)."""
    if source.converter is None:
        return tensors[source.names()[0]]
    converter = deepcopy(source.converter)
    for pattern, keys in source.keys.items():
        for key in keys:
            converter.add_tensor(source.target, key, pattern, tensors[key])
    built = converter.convert(source.target, model=model, config=getattr(model, "config", None))
    if source.target not in built:
        raise KeyError(f"converting {source.names()[:2]}... gave {sorted(built)}, not "
                       f"{source.target!r}")
    value = built[source.target]
    return value[0] if isinstance(value, list) else value


def to_checkpoint_layout(model: nn.Module, state: Mapping[str, torch.Tensor],
                         ) -> dict[str, torch.Tensor]:
    """``state`` (model parameter names, e.g. fused experts) in the layout ``save_pretrained``
    writes (one tensor per expert and matrix); unchanged for models without converters (dense
    models keep their module names).

    Works on any subset of the model's parameters (one worker's blocks).
    """
    _renamings, converters = _transforms(model)
    if not converters:
        return dict(state)
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, dict(state)))
