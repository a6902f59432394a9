"""Shared machinery for criteria that rank weights by a static score (no weight update).

A score criterion is a score function plus metadata; :class:`ScoreCriterion` turns the score
into a mask with :func:`neuroal.criteria.masking.build_mask`. Scores are computed in fp32 on the
weight's device; inputs are never modified in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from neuroal.criteria.base import STAT_SQ_NORM, LayerPruneResult, LayerStats, LayerTarget
from neuroal.criteria.masking import GROUPS, build_mask, check_finite, rule_name

ScoreFn = Callable[[torch.Tensor, LayerStats, Mapping[str, Any]], torch.Tensor]
"""``score(weight_fp32 (rows, cols), stats, options) -> scores (rows, cols)``, lowest pruned."""


def as_fp32(weight: torch.Tensor) -> torch.Tensor:
    """``(rows, cols)`` fp32 view or copy of ``weight`` (callers must not write into it)."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (rows, cols), got shape {tuple(weight.shape)}")
    return weight.detach().to(torch.float32)


def input_norm(stats: LayerStats, weight: torch.Tensor) -> torch.Tensor:
    """Input-channel norm ``a_j = sqrt(s_j)``, shape ``(cols,)``, fp32 on the weight's device.

    Raises:
        ValueError: If ``sq_norm`` is missing, has the wrong shape, is negative or not finite.
    """
    return stat_norm(stats.sq_norm, STAT_SQ_NORM, weight.shape[1], weight.device)


def stat_vector(values: torch.Tensor | None, name: str, length: int,
                device: torch.device) -> torch.Tensor:
    """A per-channel statistic ``name`` of shape ``(length,)`` as fp32 on ``device``.

    Raises:
        ValueError: If the statistic is missing, has the wrong shape or is not finite.
    """
    if values is None:
        raise ValueError(f"this step needs the {name!r} statistic; none collected")
    if tuple(values.shape) != (length,):
        raise ValueError(f"{name} has shape {tuple(values.shape)}; expected ({length},)")
    values = values.detach().to(device=device, dtype=torch.float32)
    check_finite(values, what=f"{name} statistics")
    return values


def stat_norm(values: torch.Tensor | None, name: str, length: int,
              device: torch.device) -> torch.Tensor:
    """``sqrt`` of a mean-of-squares statistic (see :func:`stat_vector`).

    Raises:
        ValueError: As :func:`stat_vector`, or if the statistic has negative entries.
    """
    values = stat_vector(values, name, length, device)
    if bool((values < 0).any()):
        raise ValueError(f"{name} has negative entries; it must be a mean of squares")
    return values.sqrt()


def merged_options(defaults: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` overridden by ``options`` (the config layer has rejected unknown keys)."""
    return {**defaults, **options}


def frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    """A read-only mapping for criterion ``defaults``."""
    return MappingProxyType(dict(mapping or {}))


@dataclass(eq=False)
class ScoreCriterion:
    """A criterion that prunes the lowest static scores inside a comparison group.

    Attributes:
        name: Registry name.
        score_fn: The score, see :data:`ScoreFn`.
        needs: Statistics the engine must collect.
        default_group: Comparison group used when the target names none.
        groups: Accepted comparison groups.
        defaults: Options and their default values.
        supports_row_ratios: Whether per-row ratio vectors are accepted.
        label: Name in reports when it must say more than ``name`` (e.g. "(reconstructed)",
            specs README: a method not confirmed by any primary source is labelled so).
        changes_values: Whether pruning changes the kept weights' values (never: a score
            criterion only chooses a mask; the resume state then stores bit-packed masks).
    """

    name: str
    score_fn: ScoreFn
    needs: frozenset[str] = frozenset()
    default_group: str = "row"
    groups: frozenset[str] = GROUPS
    defaults: Mapping[str, Any] = field(default_factory=frozen)
    supports_row_ratios: bool = True
    label: str | None = None
    changes_values: bool = False

    def score(
        self, weight: torch.Tensor, stats: LayerStats, options: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """fp32 scores of shape ``(rows, cols)`` on the weight's device (lowest pruned first)."""
        return self.score_fn(as_fp32(weight), stats, merged_options(self.defaults, options or {}))

    def prune(
        self,
        weight: torch.Tensor,
        stats: LayerStats,
        target: LayerTarget,
        options: Mapping[str, Any],
    ) -> LayerPruneResult:
        """Score ``weight`` (rows, cols) and build the mask; no weight update."""
        rule = rule_name(target, self.default_group)
        if target.nm is None and rule != "row_ratios" and rule not in self.groups:
            raise ValueError(
                f"criterion {self.name!r} does not support group {rule!r}; "
                f"available: {', '.join(sorted(self.groups))}"
            )
        scores = self.score(weight, stats, options)
        mask = build_mask(scores, target, self.default_group)
        return LayerPruneResult(mask=mask, weight=None, info={"rule": rule})
