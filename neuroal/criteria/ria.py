"""RIA: relative importance and activations (Zhang et al., "Plug-and-Play: An Efficient
Post-training Pruning Method for Large Language Models", ICLR 2024; criteria.md §5).

Score ``S_ij = (|W_ij| / sum_i' |W_i'j| + |W_ij| / sum_j' |W_ij'|) * (sqrt(s_j)) ** a`` with
``a = 0.5``: the first term is relative to the input column, the second to the output row.
Default group ``matrix``. Channel reallocation and LSA are not implemented here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from neuroal.criteria.base import STAT_SQ_NORM, LayerStats
from neuroal.criteria.scored import ScoreCriterion, frozen, input_norm


def relative_importance(weight: torch.Tensor) -> torch.Tensor:
    """RI term ``|W_ij| / colsum_j + |W_ij| / rowsum_i`` of a ``(rows, cols)`` weight, fp32.

    An all-zero column or row contributes 0 instead of 0/0 (its weights are all zero).
    """
    magnitude = weight.detach().to(torch.float32).abs()
    tiny = torch.finfo(torch.float32).tiny
    col_sums = magnitude.sum(dim=0, keepdim=True).clamp_min(tiny)  # (1, cols)
    row_sums = magnitude.sum(dim=1, keepdim=True).clamp_min(tiny)  # (rows, 1)
    return magnitude / col_sums + magnitude / row_sums


def ria_score(weight: torch.Tensor, norm: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """RIA score.

    Args:
        weight: ``(rows, cols)`` weight.
        norm: ``(cols,)`` input-channel norms ``sqrt(s_j)``.
        a: Activation exponent (RIA's ``--a``).

    Returns:
        ``(rows, cols)`` fp32 scores.
    """
    return relative_importance(weight) * norm.to(torch.float32).pow(a).unsqueeze(0)


def _score(weight: torch.Tensor, stats: LayerStats, options: Mapping[str, Any]) -> torch.Tensor:
    return ria_score(weight, input_norm(stats, weight), float(options["a"]))


RIA = ScoreCriterion(
    name="ria",
    score_fn=_score,
    needs=frozenset({STAT_SQ_NORM}),
    default_group="matrix",
    defaults=frozen({"a": 0.5}),
)
