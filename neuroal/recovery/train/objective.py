"""The retraining objective, the evaluation loss and the window order (recovery.md §3.5).

Next-token cross-entropy on packed calibration windows (no padding, so every token counts),
the per-window NLL the perplexity protocol averages, and a seeded order that reshuffles the
windows every epoch as the Hugging Face Trainer does. Functions of a model and token ids only:
no optimiser, hooks or I/O; the device is passed in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``(B, T)`` ids (fp32 logits)."""
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int,
               device: torch.device) -> torch.Tensor:
    """Mean next-token NLL per window, ``(k, T) -> (k,)`` float64 (evaluation protocol).

    Feed it to :func:`neuroal.data.evaluation.perplexity`. The model's mode is restored.
    """
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        out.append(nll.mean(1).double().cpu())
    model.train(was_training)
    return torch.cat(out)


def sample_order(n: int, count: int, seed: int) -> torch.Tensor:
    """``count`` window indices: a fresh seeded permutation of ``range(n)`` per epoch."""
    generator = torch.Generator().manual_seed(seed)
    epochs = -(-count // n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])[:count]
