"""The check that retraining kept every pruned weight at zero (recovery.md §4.4).

PERP (Zimmer et al., arXiv 2312.15230) holds the masks fixed; every run checks it: the zeros
of every prunable block weight before are zeros after, per matrix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from neuroal.models.adapter import ModelAdapter


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``full linear name -> (rows, cols) bool`` True where a prunable block weight is zero."""
    adapter = ModelAdapter(model)
    return {adapter.block_prefix(i) + name: (lin.weight.detach() == 0).cpu()
            for i, block in enumerate(adapter.blocks)
            for name, lin in adapter.prunable_linears(block).items()}


def check_zeros_kept(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> None:
    """Every zero before is still zero (recovery.md §4.4).

    Raises:
        RuntimeError: Naming the first layers that lost zeros and how many.
    """
    lost = {name: int((mask & ~after[name]).sum()) for name, mask in before.items()}
    bad = {k: v for k, v in lost.items() if v}
    if bad:
        raise RuntimeError(f"retraining changed pruned weights in {len(bad)} layer(s), e.g. "
                           f"{dict(list(bad.items())[:3])}; the masks must stay fixed")
