"""Which parameters PERP trains, and how many (recovery.md §3.3-3.4).

Zimmer et al., "PERP", arXiv 2312.15230, §3.3: every bias, every norm (LayerNorm / RMSNorm,
final norm included), an optional LoRA on the head and an adapter on every prunable block
linear. This module finds those parameters by module type (no family names), counts them from
shapes alone (meta skeletons of 70 B models work; ZeRO-3-partitioned tensors too), adds zero
biases where an architecture has a config flag for them, and unties a tied head. It does not
wrap anything (:mod:`neuroal.recovery.perp.wrap` does).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuroal.models.adapter import ModelAdapter
from neuroal.models.loading import build_skeleton
from neuroal.recovery.perp.adapters import ADAPTERS, LoRALinear
from neuroal.recovery.perp.options import PerpOptions
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class ParamCount:
    """Trainable-parameter count by group and the model's total (tied tensors counted once).

    Attributes:
        groups: ``biases``, ``norms``, ``adapters`` (block linears), ``lm_head_lora`` and
            ``weights`` (the block weights themselves, ``weights=True``: every element, of
            which the pruned ones are held at zero).
        total: Parameters of the model before PERP changed it.
    """

    groups: dict[str, int]
    total: int

    @property
    def trainable(self) -> int:
        return sum(self.groups.values())

    @property
    def fraction(self) -> float:
        """``trainable / total`` (recovery.md §3.3 reports it in per cent)."""
        return self.trainable / self.total

    def to_dict(self) -> dict[str, Any]:
        return {"groups": dict(self.groups), "trainable": self.trainable, "total": self.total,
                "fraction": self.fraction}


def is_norm(module: nn.Module) -> bool:
    """LayerNorm and every ``*Norm`` class with its own parameters (RMSNorm variants)."""
    if isinstance(module, nn.LayerNorm):
        return True
    return type(module).__name__.endswith("Norm") and any(True for _ in module.parameters(recurse=False))


def norm_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of every norm under ``module``, by qualified name."""
    return {f"{m_name}.{p_name}".lstrip("."): p for m_name, m in module.named_modules() if is_norm(m)
            for p_name, p in m.named_parameters(recurse=False)}


def bias_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every ``bias`` parameter outside norms, by qualified name."""
    return {f"{m_name}.bias".lstrip("."): m.bias for m_name, m in module.named_modules()
            if not is_norm(m) and isinstance(getattr(m, "bias", None), nn.Parameter)}


def numel(param: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (``ds_numel``)."""
    return int(getattr(param, "ds_numel", param.numel()))


def unique_numel(params: Mapping[str, nn.Parameter] | list[nn.Parameter]) -> int:
    """Elements of the distinct tensors (tied ones once); works on ``meta`` and under ZeRO-3."""
    values = params.values() if isinstance(params, Mapping) else params
    return sum(numel(p) for p in {id(p): p for p in values}.values())


@contextmanager
def gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Full values of ZeRO-3-partitioned parameters for the body (read only; no-op otherwise)."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


def total_parameters(model: nn.Module) -> int:
    """Parameters of the model, tied tensors counted once (meta skeletons work)."""
    return unique_numel(list(model.parameters()))


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with ``requires_grad``, by name (tied ones once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _skeleton_parameters(config: Any) -> dict[str, tuple[str, int]]:
    """``name -> (owner class, numel)`` of a meta skeleton built from ``config``."""
    model = build_skeleton(config, torch.float32)
    return {name: (type(model.get_submodule(name.rpartition(".")[0])).__name__, p.numel())
            for name, p in model.named_parameters()}


def bias_config_flags(config: Any) -> tuple[dict[str, bool], dict[str, int]]:
    """Config flags that add biases to linears, and the bias tensors they add.

    Generic (no family names): every boolean config entry whose name contains ``bias`` and is
    False is switched on alone on a meta skeleton; it is accepted if every parameter it adds is
    the ``bias`` of an ``nn.Linear`` (so an export with the flag set loads in transformers).

    Returns:
        ``({flag: True}, {bias name: numel})``; empty when the architecture has no such flag.
    """
    base = _skeleton_parameters(config)
    flags: dict[str, bool] = {}
    added: dict[str, int] = {}
    for key, value in config.to_dict().items():
        if "bias" not in key.lower() or value is not False:
            continue
        trial = _skeleton_parameters(config.__class__.from_dict({**config.to_dict(), key: True}))
        new = {n: v for n, v in trial.items() if n not in base}
        if new and all(n.endswith(".bias") and cls == "Linear" for n, (cls, _) in new.items()):
            flags[key] = True
            added.update({n: numel for n, (_, numel) in new.items()})
    return flags, added


def add_zero_biases(model: nn.Module) -> list[str]:
    """Give linears zero biases where a config flag makes the export loadable; sets the flags.

    Returns:
        Names of the added biases (empty, with a warning, when the architecture has no flag).
    """
    flags, added = bias_config_flags(model.config)
    if not flags:
        lacking = sum(1 for m in model.modules() if isinstance(m, nn.Linear) and m.bias is None)
        if lacking:
            log.warning("model_type %r has no config flag for linear biases; %d linears keep "
                        "no bias (an export with extra biases would not load)",
                        getattr(model.config, "model_type", "?"), lacking)
        return []
    for name in added:
        owner = model.get_submodule(name.rpartition(".")[0])
        if owner.bias is None:
            weight = owner.weight
            owner.bias = nn.Parameter(torch.zeros(owner.out_features, dtype=weight.dtype,
                                                  device=weight.device), requires_grad=False)
    for key, value in flags.items():
        setattr(model.config, key, value)
    log.info("added %d zero biases; config flags set: %s", len(added), ", ".join(flags))
    return sorted(added)


def untie_head(adapter: ModelAdapter) -> bool:
    """Give a tied head its own copy of the embedding (peft #2018) and record it in the config.

    Returns:
        Whether the head was tied.
    """
    head = adapter.head
    if head.weight is not adapter.embed.weight and not adapter.tied:
        return False
    with gathered([head.weight]):
        copy = head.weight.detach().clone()
    head.weight = nn.Parameter(copy, requires_grad=False)
    adapter.config.tie_word_embeddings = False
    return True


def block_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every prunable block linear, by qualified name."""
    adapter = ModelAdapter(model)
    return {f"{adapter.block_prefix(i)}{n}.weight": lin.weight
            for i, block in enumerate(adapter.blocks)
            for n, lin in adapter.prunable_linears(block).items()}


def count_perp_parameters(model: nn.Module, options: PerpOptions) -> ParamCount:
    """Trainable parameters PERP would add, from shapes only (meta skeletons of 70 B work).

    Formulas (recovery.md §3.3-3.4): biases and norms by their element counts (plus the zero
    biases ``add_biases`` would add), LoRA ``r (in + out)`` per block linear and on the head,
    ScaleLoRA ``in + out`` per block linear (its rank-one form).
    """
    adapter = ModelAdapter(model)
    groups = {"biases": 0, "norms": 0, "adapters": 0, "lm_head_lora": 0, "weights": 0}
    if options.biases:
        groups["biases"] = unique_numel(bias_parameters(model))
        if options.add_biases:
            groups["biases"] += sum(bias_config_flags(model.config)[1].values())
    if options.norms:
        groups["norms"] = unique_numel(norm_parameters(model))
    if options.adapter is not None:
        kind = ADAPTERS.get(options.adapter)
        groups["adapters"] = sum(kind.count(lin.out_features, lin.in_features, options.rank)
                                 for block in adapter.blocks
                                 for lin in adapter.prunable_linears(block).values())
    if options.weights:
        groups["weights"] = sum(numel(w) for w in block_weights(model).values())
    if options.lm_head_lora:
        head = adapter.head
        groups["lm_head_lora"] = LoRALinear.count(head.out_features, head.in_features, options.rank)
    total = total_parameters(model)
    if adapter.tied and adapter.head.weight is not adapter.embed.weight:
        total -= numel(adapter.head.weight)  # meta skeletons may leave a tied head untied
    return ParamCount(groups, total)
