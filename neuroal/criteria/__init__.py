"""Pruning criteria, registered by name in :data:`CRITERIA` (criteria.md).

Each criterion maps ``(weight, statistics, target, options)`` to a mask (and, for SparseGPT,
an updated weight); see :class:`neuroal.criteria.base.Criterion`.
"""

from __future__ import annotations

from neuroal.criteria.base import (
    STAT_HESSIAN,
    STAT_OUT_SQ_NORM,
    STAT_SQ_NORM,
    Criterion,
    LayerPruneResult,
    LayerStats,
    LayerTarget,
    NMPattern,
)
from neuroal.criteria.magnitude import MAGNITUDE, magnitude_score
from neuroal.criteria.multiflow import MULTIFLOW, multiflow_score
from neuroal.criteria.ria import RIA, relative_importance, ria_score
from neuroal.criteria.scored import ScoreCriterion
from neuroal.criteria.sparsegpt import SPARSEGPT, CholeskyFailureError, SparseGPTCriterion
from neuroal.criteria.symmetric import (
    OWANDA,
    RIA_LP,
    STOCH_RIA,
    SYMWANDA,
    owanda_score,
    ria_lp_score,
    stoch_ria_score,
    symwanda_score,
)
from neuroal.criteria.wanda import WANDA, wanda_score
from neuroal.runtime.registry import Registry

CRITERIA: Registry[Criterion] = Registry("criterion")
for _criterion in (MAGNITUDE, WANDA, RIA, MULTIFLOW, SPARSEGPT, SYMWANDA, OWANDA, RIA_LP, STOCH_RIA):
    CRITERIA.add(_criterion.name, _criterion)


def criterion_label(name: str) -> str:
    """The name reports show for criterion ``name``: its ``label`` (e.g. "SymWanda
    (reconstructed)", specs README status tags) or the registry name."""
    return getattr(CRITERIA.get(name), "label", None) or CRITERIA.canonical(name)


__all__ = [
    "CRITERIA",
    "STAT_HESSIAN",
    "STAT_OUT_SQ_NORM",
    "STAT_SQ_NORM",
    "CholeskyFailureError",
    "Criterion",
    "LayerPruneResult",
    "LayerStats",
    "LayerTarget",
    "NMPattern",
    "ScoreCriterion",
    "SparseGPTCriterion",
    "magnitude_score",
    "multiflow_score",
    "owanda_score",
    "relative_importance",
    "ria_lp_score",
    "ria_score",
    "stoch_ria_score",
    "criterion_label",
    "symwanda_score",
    "wanda_score",
]
