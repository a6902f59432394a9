"""Recovery after pruning (recovery.md), as named steps chained by ``recover.steps``.

Every step registers in :data:`RECOVERY_STEPS`; the config layer accepts exactly those names.
Steps of stage ``prune`` are block-wise mask refiners (DSnoT, R²-DSnoT) that run inside the
final prune, per linear, between the criterion's mask and the zeroing; they also register in
:data:`REFINERS`, which the engine's worker reads. Other stages (PERP's retraining) run after
pruning and register only in :data:`RECOVERY_STEPS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from neuroal.recovery.dsnot import DSNOT, R2DSNOT, STAGE_PRUNE, MaskRefiner
from neuroal.registry import Registry


class RecoveryStep(Protocol):
    """A registered recovery step.

    Attributes:
        name: Registry name, as written in ``recover.steps``.
        label: Name used in reports (e.g. "R²-DSnoT (reconstructed)").
        stage: ``prune`` (block-wise, inside the final prune) or another stage name.
        defaults: Option names and defaults (``recover.<name>.<option>``); the config rejects
            other keys.
    """

    name: str
    label: str
    stage: str
    defaults: Mapping[str, Any]

    def validate(self, options: Mapping[str, Any], cfg: Any) -> list[str]:
        """Errors in the resolved ``options`` for the run ``cfg`` (a ``PruneConfig``)."""
        ...


RECOVERY_STEPS: Registry[RecoveryStep] = Registry("recovery step")
REFINERS: Registry[MaskRefiner] = Registry("mask refiner")


def register_refiner(refiner: MaskRefiner) -> None:
    """Register a block-wise mask refiner both as a recovery step and as a refiner."""
    RECOVERY_STEPS.add(refiner.name, refiner)
    REFINERS.add(refiner.name, refiner)


for _refiner in (DSNOT, R2DSNOT):
    register_refiner(_refiner)


def resolved_options(name: str, options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Step ``name``'s defaults overridden by ``options[name]`` (the config's per-step section)."""
    return {**RECOVERY_STEPS.get(name).defaults, **dict(options.get(name) or {})}


def refiner_needs(refine: Iterable[tuple[str, Mapping[str, Any]]]) -> frozenset[str]:
    """Statistics the listed ``(refiner name, options)`` steps need on every linear's input."""
    needs: frozenset[str] = frozenset()
    for name, _options in refine:
        needs |= REFINERS.get(name).needs
    return needs


__all__ = [
    "DSNOT",
    "R2DSNOT",
    "RECOVERY_STEPS",
    "REFINERS",
    "STAGE_PRUNE",
    "MaskRefiner",
    "RecoveryStep",
    "refiner_needs",
    "register_refiner",
    "resolved_options",
]
