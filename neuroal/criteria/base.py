"""The criterion contract: pure functions from (weight, statistics, target) to a mask.

Orientation follows ``torch.nn.Linear``: ``W`` has shape ``(rows, cols) = (out_features,
in_features)``; row ``i`` is an output neuron, column ``j`` an input channel
(``shared/specs/criteria.md`` §1.1). Masks are ``torch.bool`` with ``True`` = pruned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# The statistic names and N:M patterns live in the leaf neuroal.runtime.jobs; re-exported here, where the
# criterion contract names them.
from neuroal.runtime.jobs import (  # noqa: F401
    INPUT_STATS,
    STAT_HESSIAN,
    STAT_MEAN,
    STAT_OUT_SQ_NORM,
    STAT_SQ_NORM,
    STAT_SQ_NORM_WINDOWED,
    STAT_VAR,
    NMPattern,
)


@dataclass(frozen=True)
class LayerStats:
    """Calibration statistics of one linear's input (criteria.md §1.2).

    Attributes:
        nsamples: Number of calibration sequences seen (the normaliser N).
        sq_norm: ``s_j = (1/N) sum_seq sum_tok x_j^2``, shape ``(cols,)``, fp32.
        hessian: ``H = (2/N) sum_seq sum_tok x x^T``, shape ``(cols, cols)``, fp32.
        mean: ``m_j = (1/N) sum_seq sum_tok x_j`` (the per-sequence *sum*, averaged over
            sequences; recovery.md §1.1), shape ``(cols,)``, fp32.
        var: ``v_j``: the within-sequence population variance of ``x_j`` over the tokens of a
            sequence, averaged over sequences (recovery.md §1.1; not the variance over all
            tokens), shape ``(cols,)``, fp32.
        out_sq_norm: ``z_i = (1/N) sum_seq sum_tok y_i^2`` on the layer's *output*
            (criteria.md §1.2, the symmetric output term), shape ``(rows,)``, fp32.
        sq_norm_windowed: ``(2/N) sum_k (sum_tok x_kj^2) / k`` over the sequences ``k = 1..N``
            in order: what the reference's SparseGPT wrapper accumulates next to its Hessian
            (a running mean whose new term is already scaled by ``2/k``), used by NeuroAL's
            SparseGPT search as its alignment statistic (neuroal.md §A11), shape ``(cols,)``.
    """

    nsamples: int = 0
    sq_norm: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None
    out_sq_norm: torch.Tensor | None = None
    sq_norm_windowed: torch.Tensor | None = None


@dataclass(frozen=True)
class LayerTarget:
    """How much of one linear to prune.

    Attributes:
        ratio: A scalar sparsity in (0, 1), or a float64 tensor of shape ``(rows,)`` with one
            sparsity per output row (NeuroAL's ``neuron`` masks, neuroal.md §A3).
        nm: The N:M pattern, or ``None`` for unstructured sparsity.
        group: Comparison group (``row``, ``matrix``, ``block128``); ``None`` = criterion default.
        exact_count: Prune exactly the planned count (default) instead of the references'
            inclusive threshold (criteria.md §2).
    """

    ratio: float | torch.Tensor
    nm: NMPattern | None = None
    group: str | None = None
    exact_count: bool = True


@dataclass
class LayerPruneResult:
    """Outcome of pruning one linear.

    Attributes:
        mask: ``(rows, cols)`` bool, ``True`` where the weight is pruned.
        weight: The updated weight (SparseGPT's compensation) in the input dtype, with exact
            zeros where ``mask`` is true; ``None`` when the criterion does not update weights.
        info: Small JSON-able facts for the report (e.g. SparseGPT error, dampening retries).
    """

    mask: torch.Tensor
    weight: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Criterion(Protocol):
    """A registered pruning criterion (``neuroal.criteria.CRITERIA``).

    Attributes:
        name: Registry name.
        needs: Statistics the engine must collect (subset of ``{"sq_norm", "hessian"}``).
        default_group: Comparison group used when the target names none.
        groups: Comparison groups this criterion accepts.
        defaults: Option names and default values (``criterion.<key>`` in configs); the config
            layer rejects keys not listed here.
        supports_row_ratios: Whether per-row ratio vectors are accepted.
        changes_values: Whether :meth:`prune` returns updated weights (SparseGPT) rather than
            only a mask: the resume state stores weights for such a criterion, bit-packed masks
            otherwise (:mod:`neuroal.outputs.checkpoint`).
    """

    name: str
    needs: frozenset[str]
    default_group: str
    groups: frozenset[str]
    defaults: Mapping[str, Any]
    supports_row_ratios: bool
    changes_values: bool

    def prune(
        self,
        weight: torch.Tensor,
        stats: LayerStats,
        target: LayerTarget,
        options: Mapping[str, Any],
    ) -> LayerPruneResult:
        """Select (and, for SparseGPT, update) the weights of one linear.

        Args:
            weight: ``(rows, cols)`` weight, any float dtype; never modified in place.
            stats: Statistics listed in ``needs``.
            target: The sparsity to reach and the mask rule.
            options: Resolved options (``defaults`` overridden by the config).

        Returns:
            The mask and, when the criterion updates weights, the new weight.
        """
        ...
