"""PERP: parameter-efficient retraining after pruning with the masks held fixed (recovery.md §3).

Zimmer, Andoni, Spiegel, Pokutta, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of
LLMs", arXiv 2312.15230. After pruning, only a tiny subset is trained (§3.3): every bias, every
norm (LayerNorm / RMSNorm, final norm included), an optional standard LoRA on the head, and a
sparsity-preserving adapter on every prunable linear of the blocks (§3.4): MaskLoRA
``W + s * (M * (B @ A))`` or ScaleLoRA ``W * (u v^T)``, both merged so that pruned entries stay
exactly zero. The base weights are frozen, so no optimiser ever writes a pruned entry (§4.2
option 1).

One concept per module, lower ones first:

* :mod:`~neuroal.recovery.perp.formulas`: the merge formulas, pure tensor functions.
* :mod:`~neuroal.recovery.perp.optim`: AdamW, the linear schedule, autocast (the recipe).
* :mod:`~neuroal.recovery.perp.adapters`: the adapter modules and their registry.
* :mod:`~neuroal.recovery.perp.options`: :class:`PerpOptions`, the variants, the reconstruction
  options.
* :mod:`~neuroal.recovery.perp.params`: which parameters are trained, and how many.
* :mod:`~neuroal.recovery.perp.wrap`: wrapping a model (or one block) and merging back.
* :mod:`~neuroal.recovery.perp.zeros`: the check that every pruned weight stayed zero.
* :mod:`~neuroal.recovery.perp.reconstruct`: the layer-wise reconstruction of one block (§3.6).

Whole-model training loops live in :mod:`neuroal.recovery.train`. This package only re-exports;
``from neuroal.recovery.perp import X`` is the stable import path.
"""

from __future__ import annotations

from neuroal.recovery.perp.adapters import (
    ADAPTERS,
    AdaptedLinear,
    LoRALinear,
    MaskLoRALinear,
    ScaleLoRALinear,
    lora_init,
)
from neuroal.recovery.perp.formulas import lora_merged, mask_lora_delta, mask_lora_merged, scale_merged
from neuroal.recovery.perp.optim import (
    ADAM_EPS,
    HALF_DTYPES,
    LR_SCALE,
    adamw,
    autocast_for,
    linear_warmup_decay,
    reconstruction_warmup_steps,
    warmup_steps,
)
from neuroal.recovery.perp.options import PERP_VARIANTS, PerpOptions, ReconstructOptions
from neuroal.recovery.perp.params import (
    ParamCount,
    add_zero_biases,
    bias_config_flags,
    bias_parameters,
    block_weights,
    count_perp_parameters,
    gathered,
    is_norm,
    norm_parameters,
    numel,
    total_parameters,
    trainable_parameters,
    unique_numel,
    untie_head,
)
from neuroal.recovery.perp.reconstruct import ReconstructInfo, block_mse, reconstruct_block
from neuroal.recovery.perp.wrap import (
    PerpState,
    apply_perp,
    block_adapters,
    merge_perp,
    merge_state_dict,
    unwrap,
)
from neuroal.recovery.perp.zeros import check_zeros_kept, zero_masks

__all__ = [
    "ADAM_EPS",
    "ADAPTERS",
    "HALF_DTYPES",
    "LR_SCALE",
    "PERP_VARIANTS",
    "AdaptedLinear",
    "LoRALinear",
    "MaskLoRALinear",
    "ParamCount",
    "PerpOptions",
    "PerpState",
    "ReconstructInfo",
    "ReconstructOptions",
    "ScaleLoRALinear",
    "adamw",
    "add_zero_biases",
    "apply_perp",
    "autocast_for",
    "bias_config_flags",
    "bias_parameters",
    "block_adapters",
    "block_mse",
    "block_weights",
    "check_zeros_kept",
    "count_perp_parameters",
    "gathered",
    "is_norm",
    "linear_warmup_decay",
    "lora_init",
    "lora_merged",
    "mask_lora_delta",
    "mask_lora_merged",
    "merge_perp",
    "merge_state_dict",
    "norm_parameters",
    "numel",
    "reconstruct_block",
    "reconstruction_warmup_steps",
    "scale_merged",
    "total_parameters",
    "trainable_parameters",
    "unique_numel",
    "untie_head",
    "unwrap",
    "warmup_steps",
    "zero_masks",
]
