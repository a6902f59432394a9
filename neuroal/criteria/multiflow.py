"""Multiflow score as NeuroAL implements it (Farina et al., "MULTIFLOW: Shifting Towards
Task-Agnostic Vision-Language Pruning", CVPR 2024; criteria.md §7).

With ``m_ij = |W_ij| * a_j`` (``a_j = sqrt(s_j)``), ``o_i = mean_j m_ij`` and
``n_j = mean_i m_ij``, the score is ``|W_ij| * o_i * n_j``. Default group ``row``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from neuroal.criteria.base import STAT_SQ_NORM, LayerStats
from neuroal.criteria.scored import ScoreCriterion, input_norm


def multiflow_score(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Multiflow score.

    Args:
        weight: ``(rows, cols)`` weight.
        norm: ``(cols,)`` input-channel norms ``a_j``.

    Returns:
        ``(rows, cols)`` fp32 scores ``|W_ij| * o_i * n_j``.
    """
    magnitude = weight.detach().to(torch.float32).abs()
    flow = magnitude * norm.to(torch.float32).unsqueeze(0)  # m_ij, (rows, cols)
    out_mean = flow.mean(dim=1, keepdim=True)  # o_i, (rows, 1)
    in_mean = flow.mean(dim=0, keepdim=True)  # n_j, (1, cols)
    return magnitude * out_mean * in_mean


def _score(weight: torch.Tensor, stats: LayerStats, options: Mapping[str, Any]) -> torch.Tensor:
    return multiflow_score(weight, input_norm(stats, weight))


MULTIFLOW = ScoreCriterion(
    name="multiflow", score_fn=_score, needs=frozenset({STAT_SQ_NORM}), default_group="row"
)
