"""PERP's layer-wise reconstruction of one block (recovery.md §3.6).

Zimmer et al., "PERP", arXiv 2312.15230, §3.6: after a block is pruned (and refined), MaskLoRA
and the block's biases and norms are fitted so that the pruned block reproduces the dense
block's outputs on the same inputs,

    min mean ||f(X; W~) - Y||^2,   W~ = M*W + s M*(B A),

then merged, so every pruned entry stays exactly zero. Workers call :func:`reconstruct_block`
on their own blocks in stream order; the caller supplies the block's forward. Nothing here
reads or writes files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from neuroal.recovery.perp.optim import (
    adamw,
    autocast_for,
    linear_warmup_decay,
    reconstruction_warmup_steps,
)
from neuroal.recovery.perp.options import ReconstructOptions
from neuroal.recovery.perp.params import unique_numel
from neuroal.recovery.perp.wrap import block_adapters
from neuroal.recovery.perp.zeros import check_zeros_kept


@dataclass
class ReconstructInfo:
    """Outcome of :func:`reconstruct_block` (MSE values are NaN when not measured)."""

    steps: int
    seconds: float
    trainable: int
    mse_before: float = float("nan")
    mse_after: float = float("nan")
    loss_first: float = float("nan")
    loss_last: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@torch.no_grad()
def block_mse(call_block_fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
              targets: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean squared error of the block's outputs against ``targets`` over all samples
    (micro-batches of ``batch_size`` moved to ``device``)."""
    total = 0.0
    for start in range(0, inputs.shape[0], batch_size):
        out = call_block_fn(inputs[start:start + batch_size].to(device)).float()
        diff = out - targets[start:start + batch_size].to(device).float()
        total += float(diff.pow(2).sum())
    return total / targets.numel()


@contextmanager
def _train_mode(block: nn.Module) -> Iterator[None]:
    """The block in training mode for the fit, as the reference (dropout active, e.g. OPT's
    0.1; the targets and the MSE passes keep the caller's mode); the mode is restored after."""
    modes = {name: m.training for name, m in block.named_modules()}
    block.train()
    try:
        yield
    finally:
        for name, m in block.named_modules():
            m.training = modes.get(name, m.training)


def _fit(call_block_fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
         targets: torch.Tensor, params: list[nn.Parameter], options: ReconstructOptions,
         device: torch.device, dtype: torch.dtype) -> list[float]:
    """AdamW + linear warm-up/decay + MSE on the dense targets; batches cycled in order."""
    optimizer = adamw(params, options.lr)
    warm = reconstruction_warmup_steps(options.steps, options.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: linear_warmup_decay(s, options.steps, warm))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    n = inputs.shape[0]
    losses = []
    for step in range(options.steps):
        index = torch.arange(step * options.batch_size, (step + 1) * options.batch_size) % n
        x, y = inputs[index].to(device), targets[index].to(device)
        with torch.enable_grad(), autocast_for(device, dtype):
            loss = F.mse_loss(call_block_fn(x).float(), y.float())
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _check_block_args(inputs: torch.Tensor, targets: torch.Tensor,
                      masks: Mapping[str, torch.Tensor], linears: Mapping[str, nn.Linear]) -> None:
    if inputs.shape != targets.shape or inputs.dim() != 3:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must "
                         "both be (N, T, h) of the same shape")
    missing = sorted(set(linears) - set(masks))
    if missing:
        raise ValueError(f"no mask for the block linears {missing}; pass one bool (rows, cols) "
                         "mask per linear (True = pruned)")


def reconstruct_block(block: nn.Module, call_block_fn: Callable[[torch.Tensor], torch.Tensor],
                      inputs: torch.Tensor, targets: torch.Tensor, masks: Mapping[str, torch.Tensor],
                      linears: Mapping[str, nn.Linear],
                      options: ReconstructOptions | None = None) -> ReconstructInfo:
    """Fit MaskLoRA + the block's biases and norms to the dense block outputs, then merge.

    ``min mean ||f(X; W~) - Y||^2`` with ``W~ = M*W + s M*(B A)`` (recovery.md §3.6), where ``X``
    are the block's inputs after the already pruned (and reconstructed) blocks and ``Y`` is the
    **dense** block applied to those same inputs. The block is modified in place; afterwards it
    holds plain linears (the same objects as in ``linears``) whose pruned entries are exactly 0.

    Args:
        block: The decoder block; it is in training mode during the fit only (dropout as in
            the reference) and gets its modes back afterwards.
        call_block_fn: ``(B, T, h) -> (B, T, h)`` forward of ``block`` for any micro-batch; it
            must not disable autograd (the caller builds the block arguments).
        inputs: ``X``, ``(N, T, h)`` on any device (batches are moved to the block's).
        targets: ``Y``, ``(N, T, h)``.
        masks: ``name -> (rows, cols)`` bool, True where pruned, for every entry of ``linears``.
        linears: The block's prunable linears by relative name (``ModelAdapter.prunable_linears``).
        options: Steps, lr, rank...; defaults are the reference's.

    Returns:
        Steps, seconds, trainable count, MSE before/after (if measured), first/last loss.

    Raises:
        ValueError: Mismatched shapes or missing masks.
        RuntimeError: A pruned weight is non-zero after merging (must not happen).
    """
    options = options or ReconstructOptions()
    _check_block_args(inputs, targets, masks, linears)
    weight = next(iter(linears.values())).weight
    device, dtype = weight.device, weight.dtype
    t0 = time.perf_counter()
    info = ReconstructInfo(steps=options.steps, seconds=0.0, trainable=0)
    if options.measure:
        info.mse_before = block_mse(call_block_fn, inputs, targets, options.batch_size, device)
    with _train_mode(block), block_adapters(block, linears, masks, options) as trainable:
        info.trainable = unique_numel(trainable)
        losses = _fit(call_block_fn, inputs, targets, list(trainable.values()), options, device, dtype)
    info.loss_first, info.loss_last = losses[0], losses[-1]
    check_zeros_kept({n: m.cpu() for n, m in masks.items()},
                     {n: (lin.weight.detach() == 0).cpu() for n, lin in linears.items()})
    if options.measure:
        info.mse_after = block_mse(call_block_fn, inputs, targets, options.batch_size, device)
    info.seconds = time.perf_counter() - t0
    return info
