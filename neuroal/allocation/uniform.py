"""Uniform allocation: every prunable linear gets the global target (allocation.md §2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuroal.allocation.base import PlanRequest
from neuroal.allocation.plan import SparsityPlan


class UniformPolicy:
    """Every linear of every block is pruned at the target ratio S."""

    name = "uniform"
    needs = "nothing"
    defaults: Mapping[str, Any] = {}
    nm_compatible = True

    def validate(self, cfg: Any) -> list[str]:
        unknown = sorted(cfg.allocation.options)
        if unknown:
            return [f"allocation.{unknown[0]} is not an option of 'uniform' (it takes none)"]
        return []

    def plan(self, request: PlanRequest) -> SparsityPlan:
        ratios = [{name: float(request.target) for name in blk} for blk in request.shape.blocks]
        return SparsityPlan(target=request.target, pattern=request.pattern, ratios=ratios,
                            policy={"name": self.name})
