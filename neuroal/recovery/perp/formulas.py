"""The adapters' merge formulas as pure tensor functions (recovery.md §3.4).

Zimmer, Andoni, Spiegel, Pokutta, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of
LLMs", arXiv 2312.15230, §3.4. Weights are ``(rows, cols)`` as in ``torch.nn.Linear``:

* MaskLoRA: ``W_eff = W + s * (M * (B @ A))`` with ``M = 1[W != 0]`` and ``s = alpha / r``, so a
  pruned entry stays exactly zero after the merge.
* ScaleLoRA (rank-one form): ``W_eff = W * (u v^T)``; zeros stay zeros.
* Plain LoRA (the dense head only): ``W_eff = W + s * (B @ A)``.

Every sum is taken in float32 and cast back to the weight's dtype. No modules, devices or state.
"""

from __future__ import annotations

import torch


def mask_lora_delta(keep: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """``s * (M * (B @ A))`` in float32.

    Args:
        keep: ``M``, ``(rows, cols)`` bool, True where the weight is kept.
        a: ``A``, ``(r, cols)``.
        b: ``B``, ``(rows, r)``.
        scale: ``s = alpha / r``.
    """
    return (b.float() @ a.float()).mul(scale).mul(keep)


def mask_lora_merged(weight: torch.Tensor, keep: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``W + s * (M * (B @ A))`` in ``weight``'s dtype; every pruned entry is exactly +0.0."""
    merged = (weight.float() + mask_lora_delta(keep, a, b, scale)).to(weight.dtype)
    return merged.masked_fill_(~keep, 0.0)


def scale_merged(weight: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``W * (u v^T)`` in ``weight``'s dtype (``u``: ``(rows,)``, ``v``: ``(cols,)``); zeros stay
    +0.0 (a negative scale would otherwise give -0.0)."""
    merged = (weight.float() * row.float()[:, None] * col.float()[None, :]).to(weight.dtype)
    return merged.masked_fill_(weight == 0, 0.0)


def lora_merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``W + s * (B @ A)`` (dense; only for the unpruned head)."""
    return (weight.float() + (b.float() @ a.float()) * scale).to(weight.dtype)
