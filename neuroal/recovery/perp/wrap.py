"""Putting PERP's adapters into a model and merging them back (recovery.md §3.3, §4.2).

Zimmer et al., "PERP", arXiv 2312.15230. :func:`apply_perp` freezes the model and makes the
PERP subset trainable (adapters on the block linears and the head, biases, norms; float32
trainables); :func:`merge_perp` casts back, merges every adapter into its linear and freezes
again. The base weights are frozen throughout, so no optimiser ever writes a pruned entry
(§4.2 option 1). :func:`merge_state_dict` merges a gathered (ZeRO-3) state dict instead, and
:func:`block_adapters` wraps one block for the layer-wise reconstruction. Nothing here reads or
writes files.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from neuroal.models.adapter import ModelAdapter
from neuroal.recovery.perp.adapters import (
    ADAPTERS,
    AdaptedLinear,
    LoRALinear,
    MaskLoRALinear,
)
from neuroal.recovery.perp.formulas import lora_merged, mask_lora_merged, scale_merged
from neuroal.recovery.perp.optim import HALF_DTYPES
from neuroal.recovery.perp.options import PerpOptions, ReconstructOptions
from neuroal.recovery.perp.params import (
    ParamCount,
    add_zero_biases,
    bias_parameters,
    block_weights,
    count_perp_parameters,
    norm_parameters,
    trainable_parameters,
    unique_numel,
    untie_head,
)
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)


@dataclass
class PerpState:
    """What :func:`apply_perp` changed, for :func:`merge_perp`.

    Attributes:
        wrapped: Module names now holding an :class:`AdaptedLinear`.
        dtypes: Original dtype of every upcast trainable parameter.
        added_biases: Names of zero biases added (``add_biases``).
        untied: Whether the head was untied.
        count: The formula count (total = the model before PERP).
    """

    options: PerpOptions
    wrapped: list[str] = field(default_factory=list)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    added_biases: list[str] = field(default_factory=list)
    untied: bool = False
    count: ParamCount | None = None


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _wrap(root: nn.Module, linears: Mapping[str, nn.Linear], kind: type[AdaptedLinear],
          options: PerpOptions, generator: torch.Generator,
          masks: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Replace each ``root.<name>`` linear by its adapter; returns the names."""
    for name, linear in linears.items():
        pruned = None if masks is None else masks.get(name)
        _replace_module(root, name, kind(linear, options.rank, options.alpha, generator, pruned))
    return list(linears)


def _upcast(params: Mapping[str, nn.Parameter]) -> dict[str, torch.dtype]:
    """Trainables to float32 (frozen tensors keep their 16-bit dtype); original dtypes."""
    dtypes = {}
    for name, p in params.items():
        if p.dtype in HALF_DTYPES:
            dtypes[name] = p.dtype
            p.data = p.data.float()
    return dtypes


def _cast_back(root: nn.Module, dtypes: Mapping[str, torch.dtype]) -> None:
    for name, dtype in dtypes.items():
        p = root.get_parameter(name)
        p.data = p.data.to(dtype)


def _select(root: nn.Module, options: PerpOptions) -> dict[str, nn.Parameter]:
    """Unfreeze biases / norms (and the block weights) per ``options``; returns every
    trainable parameter."""
    chosen = {**(bias_parameters(root) if options.biases else {}),
              **(norm_parameters(root) if options.norms else {}),
              **(block_weights(root) if options.weights else {})}
    for p in chosen.values():
        p.requires_grad_(True)
    return trainable_parameters(root)


def apply_perp(model: nn.Module, options: PerpOptions, upcast: bool = True) -> PerpState:
    """Freeze the model, then make the PERP subset trainable (recovery.md §3.3).

    Adds zero biases (if asked), unties and wraps the head with LoRA, wraps every prunable block
    linear with the adapter, unfreezes biases and norms, and upcasts trainables to float32.

    Args:
        model: A ``*ForCausalLM`` with pruned (zeroed) block linears.
        options: What to train.
        upcast: Upcast 16-bit trainables (off under DeepSpeed, which keeps fp32 masters).

    Returns:
        The state :func:`merge_perp` needs.
    """
    state = PerpState(options, count=count_perp_parameters(model, options))
    for p in model.parameters():
        p.requires_grad_(False)
    if options.add_biases:
        state.added_biases = add_zero_biases(model)
    adapter = ModelAdapter(model)
    generator = torch.Generator().manual_seed(options.seed)
    if options.lm_head_lora:
        state.untied = untie_head(adapter)
        head_name = adapter.spec.head
        _replace_module(model, head_name, LoRALinear(adapter.head, options.rank, options.alpha, generator))
        state.wrapped.append(head_name)
    if options.adapter is not None:
        kind = ADAPTERS.get(options.adapter)
        for index, block in enumerate(adapter.blocks):
            prefix = adapter.block_prefix(index)
            names = _wrap(block, adapter.prunable_linears(block), kind, options, generator)
            state.wrapped += [prefix + n for n in names]
    trainable = _select(model, options)
    state.dtypes = _upcast(trainable) if upcast else {}
    log.info("PERP: %d trainable parameters (%.4f %% of %d)", unique_numel(trainable),
             100 * state.count.fraction, state.count.total)
    return state


def unwrap(root: nn.Module, names: list[str]) -> None:
    """Merge every adapter named in ``names`` and put the plain linear back."""
    for name in names:
        module = root.get_submodule(name)
        if isinstance(module, AdaptedLinear):
            _replace_module(root, name, module.merge())


def merge_perp(model: nn.Module, state: PerpState) -> None:
    """Cast trainables back to their dtype, merge the adapters and freeze the model."""
    _cast_back(model, state.dtypes)
    unwrap(model, state.wrapped)
    for p in model.parameters():
        p.requires_grad_(False)


def merge_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge adapters in a (gathered) state dict, e.g. the one ZeRO-3 consolidates on rank 0.

    Args:
        model: The (unwrapped) model still holding the adapter modules (only their kind and
            hyper-parameters are read, never their possibly partitioned tensors).
        state_dict: Full tensors by name, adapter tensors included.

    Returns:
        A new state dict with merged weights and without adapter tensors.
    """
    out = dict(state_dict)
    for name, module in model.named_modules():
        if not isinstance(module, AdaptedLinear):
            continue
        tensors = {k: out.pop(f"{name}.{k}") for k, _ in module.named_parameters(recurse=False)
                   if k not in ("weight", "bias")}
        weight = out[f"{name}.weight"]
        if isinstance(module, MaskLoRALinear):
            out[f"{name}.weight"] = mask_lora_merged(weight, weight != 0, tensors["lora_a"],
                                                     tensors["lora_b"], module.scale)
        elif isinstance(module, LoRALinear):
            out[f"{name}.weight"] = lora_merged(weight, tensors["lora_a"], tensors["lora_b"], module.scale)
        else:
            out[f"{name}.weight"] = scale_merged(weight, tensors["row_scale"], tensors["col_scale"])
    return out


@contextmanager
def block_adapters(block: nn.Module, linears: Mapping[str, nn.Linear],
                   masks: Mapping[str, torch.Tensor], options: ReconstructOptions
                   ) -> Iterator[dict[str, nn.Parameter]]:
    """MaskLoRA on ``linears`` (+ block biases and norms) for the body; merged on exit.

    The block's previous ``requires_grad`` flags and dtypes are restored afterwards.
    """
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    perp = PerpOptions(adapter="mask_lora", rank=options.rank, alpha=options.alpha,
                       biases=options.biases, norms=options.norms, lm_head_lora=False, seed=options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    names = _wrap(block, linears, MaskLoRALinear, perp, generator, masks)
    dtypes: dict[str, torch.dtype] = {}
    try:
        trainable = _select(block, perp)
        dtypes = _upcast(trainable)
        yield trainable
    finally:
        _cast_back(block, dtypes)
        unwrap(block, names)
        for n, p in block.named_parameters():
            p.requires_grad_(flags.get(n, False))
