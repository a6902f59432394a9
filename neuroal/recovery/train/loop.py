"""The whole-model retraining loop (recovery.md §3.5, §4).

:func:`run_steps` drives any runner (:mod:`neuroal.recovery.train.runners`) for a number of
optimiser steps over the calibration windows, every rank taking its share of each global batch;
:func:`train` runs it in this process and :func:`retrain` is PERP end to end in memory: select
and wrap, train, merge, and check that every zero is kept (Zimmer et al., "PERP", arXiv
2312.15230; masks fixed as in §4.2 option 1, checked as in §4.4).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from neuroal.recovery.perp import (
    PerpOptions,
    PerpState,
    apply_perp,
    check_zeros_kept,
    merge_perp,
    zero_masks,
)
from neuroal.recovery.train.objective import lm_loss, sample_order
from neuroal.recovery.train.options import TrainInfo, TrainOptions
from neuroal.recovery.train.runners import Runner, TorchRunner
from neuroal.runtime.logging import get_logger
from neuroal.runtime.progress import Progress

log = get_logger(__name__)


@contextmanager
def _training_mode(model: nn.Module, checkpointing: bool) -> Iterator[None]:
    """``model.train()`` (dropout as in the reference) and optional gradient checkpointing."""
    was_training = model.training
    # transformers 5 renamed gradient_* to activation_checkpointing_*; 4.x has only the old names
    modern = hasattr(model, "activation_checkpointing_enable")
    if checkpointing and modern:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        if checkpointing:
            (model.activation_checkpointing_disable if modern else model.gradient_checkpointing_disable)()


def run_steps(runner: Runner, windows: torch.Tensor, options: TrainOptions, steps: int) -> TrainInfo:
    """Train the runner's trainable parameters for ``steps`` optimiser steps on ``windows``.

    Args:
        runner: A :class:`TorchRunner` or :class:`AcceleratorRunner`.
        windows: Calibration token ids ``(N, T)`` (every rank passes the same tensor; rank r
            takes its share of each global batch).
        options: Batch, accumulation, seed...
        steps: Optimiser steps (:meth:`TrainOptions.plan_steps`).

    Returns:
        Steps, tokens, seconds and the loss of every step (no parameter count).
    """
    per_step = options.batch_size * options.grad_accum * runner.world
    order = sample_order(windows.shape[0], steps * per_step, options.seed)
    losses = []
    t0 = time.perf_counter()
    shown = Progress(steps, "retraining", unit="step", mode=None if runner.is_main else "off")
    with _training_mode(runner.model, options.gradient_checkpointing), shown:
        for step in range(steps):
            total = 0.0
            for micro in range(options.grad_accum):
                start = step * per_step + (micro * runner.world + runner.rank) * options.batch_size
                ids = windows[order[start:start + options.batch_size]].to(runner.device)
                with runner.micro():
                    with runner.autocast():
                        loss = lm_loss(runner.module, ids)
                    runner.backward(loss)
                    if micro == options.grad_accum - 1:
                        runner.step()
                total += float(loss.detach())
            losses.append(total / options.grad_accum)
            log.debug("step %d/%d  loss %.4f", step + 1, steps, losses[-1])
            shown.update(status=f"loss {losses[-1]:.4f}")
    return TrainInfo(steps, steps * per_step * windows.shape[1], time.perf_counter() - t0, None, losses)


def train(model: nn.Module, windows: torch.Tensor, options: TrainOptions) -> TrainInfo:
    """Train ``model``'s trainable parameters in this process (plain PyTorch, one device).

    Args:
        model: A model prepared with :func:`neuroal.recovery.perp.apply_perp`.
        windows: Calibration token ids ``(N, T)``, int64.
        options: The recipe.
    """
    steps = options.plan_steps(windows.shape[1])
    return run_steps(TorchRunner(model, options, steps), windows, options, steps)


def retrain(model: nn.Module, windows: torch.Tensor, perp: PerpOptions,
            options: TrainOptions) -> tuple[TrainInfo, PerpState]:
    """PERP end to end in memory: select/wrap, train, merge, and check every zero is kept.

    Returns:
        The training info (with the parameter count) and the PERP state (already merged).

    Raises:
        RuntimeError: A pruned weight changed (must not happen).
    """
    before = zero_masks(model)
    state = apply_perp(model, perp)
    info = train(model, windows, options)
    info.count = state.count
    merge_perp(model, state)
    check_zeros_kept(before, zero_masks(model))
    log.info("PERP retraining: %d steps, %d tokens, loss %.4f -> %.4f, %.1f s", info.steps,
             info.tokens, info.losses[0], info.losses[-1], info.seconds)
    return info, state
