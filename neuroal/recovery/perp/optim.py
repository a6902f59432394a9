"""The optimiser recipe shared by whole-model retraining and block reconstruction.

Zimmer et al., "PERP", arXiv 2312.15230 (recovery.md §3.5-3.6): AdamW with betas (0.9, 0.999),
eps 1e-8 and no weight decay; a linear schedule with warm-up; 16-bit models run under autocast
with float32 trainables. ScaleLoRA's two vectors carry an lr (and eps) factor ``sqrt(r)``
(:data:`LR_SCALE`): in the authors' rank-r form ``B A`` initialised to ones, ``u = sqrt(r) b``
while each entry of ``B`` sees the gradient ``dL/du / sqrt(r)``, and Adam's step does not scale
with the gradient, so ``u`` moves ``sqrt(r)`` times faster than a vector trained at the same lr.
With the factor the two forms are the same optimisation.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """LR factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``
    (the HF Trainer's ``linear`` schedule, recovery.md §3.5-3.6)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def warmup_steps(total: int, ratio: float) -> int:
    """``ceil(ratio * total)`` warm-up steps (the HF Trainer's ``warmup_ratio``, which the
    reference's whole-model retraining uses)."""
    return math.ceil(ratio * total)


def reconstruction_warmup_steps(total: int, ratio: float) -> int:
    """``floor(ratio * total)`` warm-up steps: the reference's layer-wise reconstruction builds
    its schedule itself and truncates (``int``), unlike the Trainer (e.g. 1, not 2, of 15)."""
    return int(ratio * total)


LR_SCALE = "_neuroal_lr_scale"
"""Attribute a parameter may carry: its lr (and Adam eps) factor, read by :func:`adamw`."""
ADAM_EPS = 1e-8


def adamw(params: list[nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW with the reference's settings: betas (0.9, 0.999), eps 1e-8, weight decay 0.

    Parameters tagged with :data:`LR_SCALE` (ScaleLoRA's vectors: ``sqrt(r)``) form their own
    group whose lr and eps are multiplied by the factor, so that they follow the authors'
    rank-r parametrisation step for step (module docstring).
    """
    groups: dict[float, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(float(getattr(p, LR_SCALE, 1.0)), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lr * f, "eps": ADAM_EPS * f}
                              for f, ps in groups.items()],
                             lr=lr, betas=(0.9, 0.999), eps=ADAM_EPS, weight_decay=0.0)


def autocast_for(device: torch.device, dtype: torch.dtype) -> Any:
    """Autocast to the model's 16-bit dtype (trainables are fp32); nothing for fp32 models."""
    if dtype in HALF_DTYPES:
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()
