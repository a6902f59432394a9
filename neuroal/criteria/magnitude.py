"""Magnitude pruning: score ``|W_ij|`` (criteria.md §3).

The classic baseline, e.g. Han et al. 2015 and the magnitude rows of Wanda (arXiv 2306.11695).
Default group ``matrix``; needs no calibration data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from neuroal.criteria.base import LayerStats
from neuroal.criteria.scored import ScoreCriterion


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij|`` for a ``(rows, cols)`` weight, returned in fp32."""
    return weight.detach().to(torch.float32).abs()


def _score(weight: torch.Tensor, stats: LayerStats, options: Mapping[str, Any]) -> torch.Tensor:
    return magnitude_score(weight)


MAGNITUDE = ScoreCriterion(name="magnitude", score_fn=_score, default_group="matrix")
