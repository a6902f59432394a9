"""The allocation-policy interface (allocation.md §1.6)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from neuroal.allocation.plan import ModelShape, SparsityPlan


@dataclass(frozen=True)
class PlanRequest:
    """What a policy gets: the model's linear shapes, the target and its options.

    ``executor`` is the running executor (``neuroal.engine.executor.Executor``) for policies that
    need statistics (``dense_block_metrics``), weight metrics (``weight_metrics``) or a search;
    data-free policies ignore it. ``calibration`` holds the calibration ids ``(N, T)``.
    ``model_key`` identifies the model's weights (for on-disk caches under ``cache_dir``).
    """

    shape: ModelShape
    target: float
    pattern: str
    clip: tuple[float, float]
    options: Mapping[str, Any] = field(default_factory=dict)
    executor: Any = None
    calibration: Any = None
    model_key: str = ""
    cache_dir: str | None = None
    criterion: str = "wanda"
    criterion_options: Mapping[str, Any] = field(default_factory=dict)


class AllocationPolicy(Protocol):
    """A registered policy (``neuroal.allocation.ALLOCATIONS``).

    Attributes:
        name: Registry name.
        needs: ``nothing``, ``weights``, ``stats`` or ``search``: which machinery the pipeline
            must make available through ``PlanRequest.executor``.
        defaults: Option names and defaults (``allocation.<key>`` in configs).
        nm_compatible: Whether the policy may be combined with an N:M pattern.
    """

    name: str
    needs: str
    defaults: Mapping[str, Any]
    nm_compatible: bool

    def validate(self, cfg: Any) -> list[str]:
        """Config errors specific to this policy (empty when fine)."""
        ...

    def plan(self, request: PlanRequest) -> SparsityPlan:
        """Produce a validated plan."""
        ...
