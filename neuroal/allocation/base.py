"""The allocation-policy interface (allocation.md §1.6)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from neuroal.allocation.plan import ModelShape, SparsityPlan

# An option rule: (predicate on the value, what was expected, for the error message).
Rule = tuple[Callable[[Any], bool], str]


@dataclass(frozen=True)
class PlanRequest:
    """What a policy gets: the model's linear shapes, the target and its options.

    ``executor`` is the running executor (``neuroal.engine.executor.Executor``) for policies that
    need statistics (``dense_block_metrics``), weight metrics (``weight_metrics``) or a search;
    data-free policies ignore it. ``calibration`` holds the calibration ids ``(N, T)``.
    ``model_key`` identifies the model's weights (for on-disk caches under ``cache_dir``).
    ``state`` (optional) stores every finished search candidate so ``--resume`` skips it.
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
    state: Any = None  # neuroal.outputs.checkpoint.RunState: finished search candidates (resume)
    exact_count: bool = True  # mask.exact_count, for masks a policy builds itself (search)


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


def option_errors(policy: str, options: Mapping[str, Any], rules: Mapping[str, Rule]) -> list[str]:
    """Unknown keys and values breaking ``rules[key] = (predicate, expectation)``."""
    errors = []
    for key in sorted(set(options) - set(rules)):
        errors.append(f"allocation.{key} is not an option of {policy!r}; valid options: "
                      f"{', '.join(sorted(rules))}")
    for key, value in options.items():
        if key in rules and not rules[key][0](value):
            errors.append(f"allocation.{key}={value!r}: expected {rules[key][1]}")
    return errors


def choice(*values: str) -> Callable[[Any], bool]:
    """A rule predicate accepting exactly the strings ``values``."""
    return lambda v: isinstance(v, str) and v in values
