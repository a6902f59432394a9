"""Whole-model PERP retraining of a pruned causal LM (recovery.md §3.5, §4).

Two runners share one loop: :class:`TorchRunner` (plain PyTorch on one device: what tests and
single-GPU runs use) and :class:`AcceleratorRunner` (accelerate; under ``accelerate launch
--use_deepspeed --deepspeed_config_file configs/deepspeed/zero3.json`` this is DeepSpeed ZeRO-3).
Masks stay fixed the preferred way (§4.2 option 1): the pruned base weights are frozen, the
trainable subset is biases, norms and sparsity-preserving adapters, and the merge keeps every
zero. Every run checks it again (§4.4): zeros before ⊆ zeros after, per matrix.

Recipe (§3.5 of Zimmer et al., "PERP", arXiv 2312.15230): AdamW (0.9, 0.999), eps 1e-8, weight
decay 0; linear schedule with 10 % warm-up; gradient-norm clipping at 1.0; fp32 trainables on
16-bit frozen weights with autocast (fp16 adds a GradScaler); data are packed calibration windows
(no padding, so every token counts).

One concept per module, lower ones first:

* :mod:`~neuroal.recovery.train.options`: :class:`TrainOptions` (the recipe), :class:`TrainInfo`.
* :mod:`~neuroal.recovery.train.objective`: the loss, the per-window NLL, the window order.
* :mod:`~neuroal.recovery.train.runners`: optimiser, schedule and step on one device or under
  accelerate / DeepSpeed.
* :mod:`~neuroal.recovery.train.loop`: :func:`run_steps`, :func:`train`, :func:`retrain`.
* :mod:`~neuroal.recovery.train.save`: writing the retrained model, checking its saved zeros.
* :mod:`~neuroal.recovery.train.job`: one ``neuroal recover`` run end to end.

This package only re-exports; ``from neuroal.recovery.train import X`` is the stable import path.
"""

from __future__ import annotations

from neuroal.recovery.train.job import BACKENDS, RecoverJob, recover
from neuroal.recovery.train.loop import retrain, run_steps, train
from neuroal.recovery.train.objective import lm_loss, sample_order, window_nll
from neuroal.recovery.train.options import TrainInfo, TrainOptions
from neuroal.recovery.train.runners import (
    AcceleratorRunner,
    Runner,
    TorchRunner,
    fill_deepspeed_auto,
    model_dtype,
)
from neuroal.recovery.train.save import prunable_weight_names, save_model, verify_saved_zeros

__all__ = ["BACKENDS", "AcceleratorRunner", "RecoverJob", "Runner", "TorchRunner", "TrainInfo",
           "TrainOptions", "fill_deepspeed_auto", "lm_loss", "model_dtype", "prunable_weight_names",
           "recover", "retrain", "run_steps", "sample_order", "save_model", "train",
           "verify_saved_zeros", "window_nll"]
