"""Wanda: pruning by weights and activations (Sun et al., arXiv 2306.11695; criteria.md §4).

Score ``S_ij = |W_ij| * sqrt(s_j)`` with ``s_j`` the mean squared input of channel j, i.e.
``|W|`` times the input-channel L2 norm up to a constant. Default group ``row``; no update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from neuroal.criteria.base import STAT_SQ_NORM, LayerStats
from neuroal.criteria.scored import ScoreCriterion, input_norm


def wanda_score(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Wanda score.

    Args:
        weight: ``(rows, cols)`` weight.
        norm: ``(cols,)`` input-channel norms ``a_j = sqrt(s_j)``.

    Returns:
        ``(rows, cols)`` fp32 scores ``|W_ij| * a_j``.
    """
    return weight.detach().to(torch.float32).abs() * norm.to(torch.float32).unsqueeze(0)


def _score(weight: torch.Tensor, stats: LayerStats, options: Mapping[str, Any]) -> torch.Tensor:
    return wanda_score(weight, input_norm(stats, weight))


WANDA = ScoreCriterion(
    name="wanda", score_fn=_score, needs=frozenset({STAT_SQ_NORM}), default_group="row"
)
