"""The whole-model retraining recipe and what a run reports (recovery.md §3.5).

Zimmer et al., "PERP", arXiv 2312.15230, §3.5: AdamW at a peak lr, a linear schedule with 10 %
warm-up, gradient-norm clipping at 1.0, micro-batches with gradient accumulation; the length is
a step count or a token budget. Plain frozen dataclasses; values are checked on construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from neuroal.recovery.perp import ParamCount


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation settings (recovery.md §3.5; defaults are the reference code's debug ones).

    Attributes:
        lr: Peak AdamW learning rate.
        steps: Optimiser steps; ignored when ``tokens`` is set.
        tokens: Token budget; ``steps = ceil(tokens / (batch_size * grad_accum * T * ranks))``.
        batch_size: Windows per micro-batch (per rank).
        grad_accum: Micro-batches per optimiser step.
        warmup: Warm-up fraction of the linear schedule.
        max_grad_norm: Gradient-norm clipping.
        seed: Seed of the window order (reshuffled every epoch, as the Trainer does).
        gradient_checkpointing: Recompute block activations in the backward pass.
        eval_batch_size: Windows per forward when measuring perplexity.
    """

    lr: float = 5e-4
    steps: int = 20
    tokens: int | None = None
    batch_size: int = 1
    grad_accum: int = 2
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 42
    gradient_checkpointing: bool = False
    eval_batch_size: int = 4

    def __post_init__(self) -> None:
        bad = [f"{k}={v}" for k, v in (("lr", self.lr), ("steps", self.steps),
                                         ("batch_size", self.batch_size),
                                         ("grad_accum", self.grad_accum),
                                         ("tokens", self.tokens or 1)) if v <= 0]
        if bad or not 0 <= self.warmup < 1:
            raise ValueError(f"training options {', '.join(bad) or f'warmup={self.warmup}'}: "
                             "expected positive lr/steps/sizes/tokens and 0 <= warmup < 1")

    def plan_steps(self, seqlen: int, ranks: int = 1) -> int:
        """Optimiser steps: ``steps``, or enough to spend the ``tokens`` budget."""
        if self.tokens is None:
            return self.steps
        return math.ceil(self.tokens / (self.batch_size * self.grad_accum * seqlen * ranks))


@dataclass
class TrainInfo:
    """What a retraining run did.

    Attributes:
        steps: Optimiser steps.
        tokens: Tokens trained on (all ranks; packed windows, so no padding).
        seconds: Wall time of the loop.
        count: Trainable parameters by group, total and fraction (the spec's formulas).
        losses: Mean training loss of every optimiser step (rank 0's micro-batches).
    """

    steps: int
    tokens: int
    seconds: float
    count: ParamCount | None = None
    losses: list[float] = field(default_factory=list)

    def loss_summary(self) -> dict[str, float]:
        """First, last, min and the means of the first and last 10 % of steps."""
        k = max(1, len(self.losses) // 10)
        return {"first": self.losses[0], "last": self.losses[-1], "min": min(self.losses),
                "head_mean": sum(self.losses[:k]) / k, "tail_mean": sum(self.losses[-k:]) / k}

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "seconds": self.seconds,
                "params": self.count.to_dict() if self.count else None,
                "loss": self.loss_summary() if self.losses else None}
