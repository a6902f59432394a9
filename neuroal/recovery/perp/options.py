"""PERP's options: what whole-model PERP trains, its named variants, and the settings of the
layer-wise reconstruction of one block.

Zimmer et al., "PERP", arXiv 2312.15230: the trainable subset (§3.3-3.4, recovery.md) and the
layer-wise reconstruction (§3.6). Variants are data: :data:`PERP_VARIANTS` holds presets of
:class:`PerpOptions`. Plain frozen dataclasses; values are checked on construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from neuroal.recovery.perp.adapters import ADAPTERS
from neuroal.runtime.registry import Registry


@dataclass(frozen=True)
class PerpOptions:
    """Which parameters PERP trains (recovery.md §3.3-3.4; defaults are the reference's).

    Attributes:
        adapter: Registered adapter for every prunable block linear (``mask_lora``,
            ``scale_lora``) or ``None`` for biases and norms only.
        rank: LoRA rank ``r`` (MaskLoRA and the head LoRA).
        alpha: LoRA ``alpha``; the update is scaled by ``alpha / rank``.
        biases: Train every existing bias of the model.
        norms: Train every norm's weight (and bias).
        lm_head_lora: A standard (dense, mergeable) LoRA on the head; a tied head is untied.
        add_biases: Add zero biases to the block linears that lack them, where the architecture
            has a config flag for them (e.g. ``attention_bias``), so the export still loads.
            Not in the reference (there Llama/Mistral simply have no biases).
        weights: Train the prunable block weights themselves, re-masked around every optimiser
            step (:mod:`neuroal.recovery.remask`; recovery.md §4.2 option 2, opt-in). Needs
            ``adapter=None``.
        seed: Seed of the adapters' initialisation.
    """

    adapter: str | None = "mask_lora"
    rank: int = 16
    alpha: float = 32.0
    biases: bool = True
    norms: bool = True
    lm_head_lora: bool = True
    add_biases: bool = False
    weights: bool = False
    seed: int = 42

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"PERP rank={self.rank}, alpha={self.alpha}: expected rank >= 1 and "
                             "alpha > 0 (reference: rank 16, alpha 32)")
        if self.weights and self.adapter is not None:
            raise ValueError(f"PERP weights=true with adapter={self.adapter!r}: training the block "
                             "weights directly excludes an adapter on them; set adapter to null")
        if self.adapter is not None:
            ADAPTERS.canonical(self.adapter)

    @property
    def scale(self) -> float:
        """``alpha / rank`` (2 with the reference's r 16, alpha 32)."""
        return self.alpha / self.rank


PERP_VARIANTS: Registry[PerpOptions] = Registry("PERP variant")
"""Named presets (variants are data): ``bias-norm`` trains biases and norms only (the
0.01-0.05 % setting of v3); ``masklora`` / ``scalelora`` add the adapter and the head LoRA."""
# aliases: the step names of prune's --recover (perp-masklora), the one spelling docs use
PERP_VARIANTS.add("bias-norm", PerpOptions(adapter=None, lm_head_lora=False), "bias_norm",
                  "perp-bias-norm")
PERP_VARIANTS.add("masklora", PerpOptions(adapter="mask_lora"), "mask_lora", "perp-masklora")
PERP_VARIANTS.add("scalelora", PerpOptions(adapter="scale_lora"), "scale_lora", "perp-scalelora")
PERP_VARIANTS.add("full", PerpOptions(adapter=None, lm_head_lora=False, weights=True), "perp-full")


@dataclass(frozen=True)
class ReconstructOptions:
    """Layer-wise reconstruction of one block (recovery.md §3.6).

    Attributes:
        steps: Optimiser steps ``T`` (reference default 20, batch 1; paper values unknown).
        batch_size: Samples per step, cycled over the calibration set in fixed order.
        lr: AdamW learning rate (reference code default 5e-4).
        warmup: Warm-up fraction of the linear schedule (10 %; ``floor(warmup * steps)`` steps
            as in the reference's reconstruction loop).
        rank, alpha: MaskLoRA rank and alpha.
        biases, norms: Also train the block's biases / norms.
        measure: Compute the block MSE before and after (two extra passes).
        seed: Seed of A's initialisation.
    """

    steps: int = 20
    batch_size: int = 1
    lr: float = 5e-4
    warmup: float = 0.1
    rank: int = 16
    alpha: float = 32.0
    biases: bool = True
    norms: bool = True
    measure: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"reconstruction steps={self.steps}, batch_size={self.batch_size}, "
                             f"lr={self.lr}: expected positive values")
