"""Recovery after pruning (recovery.md), as named steps chained by ``recover.steps``.

Every step registers in :data:`RECOVERY_STEPS`; the config layer accepts exactly those names.
A chain runs in three phases, in this order (:func:`chain_errors` enforces it):

1. ``refine`` (stage ``prune``): block-wise mask refiners (DSnoT, R²-DSnoT) inside the final
   prune, per linear, between the criterion's mask and the zeroing; they also register in
   :data:`REFINERS`, which the engine's worker reads. At most one.
2. ``reconstruct`` (stage ``prune``): PERP's layer-wise reconstruction (recovery.md §3.6),
   inside the final prune, per block, after the block is pruned and refined. At most one.
3. ``retrain`` (stage ``model``): whole-model PERP (recovery.md §3.3-3.5) on the exported
   pruned model, after the final prune. At most one, last.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Protocol

from neuroal.recovery.dsnot import DSNOT, R2DSNOT, STAGE_PRUNE, MaskRefiner
from neuroal.recovery.perp import PERP_VARIANTS, PerpOptions, ReconstructOptions
from neuroal.recovery.train import TrainOptions
from neuroal.runtime.registry import Registry

STAGE_MODEL = "model"
PHASES = ("refine", "reconstruct", "retrain")


class RecoveryStep(Protocol):
    """A registered recovery step.

    Attributes:
        name: Registry name, as written in ``recover.steps``.
        label: Name used in reports (e.g. "R²-DSnoT (reconstructed)").
        stage: ``prune`` (block-wise, inside the final prune) or ``model`` (whole model, after).
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


# --------------------------------------------------------------------------- PERP steps


def _type_error(key: str, value: Any, default: Any) -> str | None:
    """The expectation ``value`` violates given the type of its ``default``, or None."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if default is None and key == "tokens":  # the token budget: null means use ``steps``
        return None if value is None or (is_int and value > 0) else "a positive integer or null"
    if isinstance(default, int) and key == "seed":
        return None if is_int and value >= 0 else "an integer >= 0"
    if isinstance(default, int):
        return None if is_int and value > 0 else "a positive integer"
    if isinstance(default, float):
        return None if is_int or isinstance(value, float) else "a number"
    return None


def _option_errors(name: str, options: Mapping[str, Any], defaults: Mapping[str, Any],
                   build: Any) -> list[str]:
    """Type errors per key, then the value checks of the options dataclass ``build(options)``."""
    errors = []
    for key, value in options.items():
        expected = _type_error(key, value, defaults.get(key))
        if expected is not None:
            errors.append(f"recover.{name}.{key}={value!r}: expected {expected} "
                          f"(default {defaults.get(key)!r})")
    if not errors:
        try:
            build(options)
        except (ValueError, KeyError) as exc:
            errors.append(f"recover.{name}: {exc}")
    return errors


def _pick(cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in options.items() if k in names}


@dataclass(frozen=True, eq=False)
class ReconstructStep:
    """``perp-reconstruct``: MaskLoRA + block biases and norms fitted per block to the dense
    block's outputs, inside the final prune (recovery.md §3.6). Options are
    :class:`~neuroal.recovery.perp.ReconstructOptions`' fields."""

    name: str = "perp-reconstruct"
    label: str = "PERP layer-wise reconstruction (MaskLoRA)"
    stage: str = STAGE_PRUNE
    phase: str = "reconstruct"
    defaults: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType(asdict(ReconstructOptions())))

    def options(self, options: Mapping[str, Any]) -> ReconstructOptions:
        """The typed options (``options`` over the defaults)."""
        return ReconstructOptions(**{**self.defaults, **options})

    def validate(self, options: Mapping[str, Any], cfg: Any) -> list[str]:
        errors = _option_errors(self.name, options, self.defaults, self.options)
        warmup = options.get("warmup", 0.1)
        if isinstance(warmup, (int, float)) and not 0 <= warmup < 1:
            errors.append(f"recover.{self.name}.warmup={warmup!r}: expected 0 <= warmup < 1")
        return errors


def _retrain_defaults(variant: PerpOptions, **train: Any) -> Mapping[str, Any]:
    """Training options plus the variant's PERP switches (the adapter is the step itself;
    rank, alpha and the head LoRA only where the variant has adapters). ``seed`` seeds both
    the window order and the adapters' initialisation."""
    perp = {k: v for k, v in asdict(variant).items() if k not in ("adapter", "weights", "seed")}
    if variant.adapter is None:
        perp = {k: v for k, v in perp.items() if k not in ("rank", "alpha", "lm_head_lora")}
    return MappingProxyType({**asdict(TrainOptions()), **train, **perp})


@dataclass(frozen=True, eq=False)
class RetrainStep:
    """Whole-model PERP (``perp-bias-norm``, ``perp-masklora``, ``perp-scalelora``): after the
    final prune the exported model is loaded in one process, retrained on the calibration
    windows with the masks held fixed, merged and exported again (recovery.md §3.3-3.5)."""

    name: str
    label: str
    variant: str  # a PERP_VARIANTS name
    defaults: Mapping[str, Any]
    stage: str = STAGE_MODEL
    phase: str = "retrain"

    def perp_options(self, options: Mapping[str, Any]) -> PerpOptions:
        """The variant's :class:`PerpOptions` with ``options`` applied."""
        resolved = {**self.defaults, **options}
        return PerpOptions(**{**asdict(PERP_VARIANTS.get(self.variant)), **_pick(PerpOptions, resolved)})

    def train_options(self, options: Mapping[str, Any]) -> TrainOptions:
        """The :class:`TrainOptions` (``options`` over the defaults)."""
        return TrainOptions(**_pick(TrainOptions, {**self.defaults, **options}))

    def validate(self, options: Mapping[str, Any], cfg: Any) -> list[str]:
        def build(opts: Mapping[str, Any]) -> None:
            self.perp_options(opts)
            self.train_options(opts)

        return _option_errors(self.name, options, self.defaults, build)


_TRAIN_DEFAULTS = {"full": {"lr": 2e-5}}
"""Per-variant training defaults: updating every kept weight needs a full fine-tuning learning
rate, not the adapters' 5e-4."""

RECONSTRUCT = ReconstructStep()
RECOVERY_STEPS.add(RECONSTRUCT.name, RECONSTRUCT, "perp_reconstruct")
for _variant, _label in (("bias-norm", "PERP retraining (biases + norms)"),
                         ("masklora", "PERP retraining (MaskLoRA)"),
                         ("scalelora", "PERP retraining (ScaleLoRA)"),
                         ("full", "Full fine-tuning of the block weights, re-masked every step "
                                  "(opt-in, recovery.md §4.2 option 2)")):
    _step = RetrainStep(name=f"perp-{_variant}", label=_label, variant=_variant,
                        defaults=_retrain_defaults(PERP_VARIANTS.get(_variant),
                                                   **_TRAIN_DEFAULTS.get(_variant, {})))
    RECOVERY_STEPS.add(_step.name, _step, f"perp_{_variant.replace('-', '_')}")


def variant_train_defaults(variant: str) -> dict[str, Any]:
    """Training defaults of PERP variant ``variant`` (any alias): :class:`TrainOptions`' with the
    variant's overrides (``full``: lr 2e-5); shared by the pipeline and ``launch/recover.py``."""
    canonical = PERP_VARIANTS.canonical(variant)
    return {**asdict(TrainOptions()), **_TRAIN_DEFAULTS.get(canonical, {})}


def phase_of(name: str) -> str:
    """The chain phase of a registered step (:data:`PHASES`)."""
    return "refine" if name in REFINERS else RECOVERY_STEPS.get(name).phase  # type: ignore[attr-defined]


def chain_errors(steps: Iterable[str]) -> list[str]:
    """Order rules of a chain of known step names: refiners, then ``perp-reconstruct``, then
    one whole-model PERP variant; at most one step per phase."""
    steps = [s for s in steps if s in RECOVERY_STEPS]
    phases = [phase_of(s) for s in steps]
    errors = []
    for phase, what in (("refine", "refine the masks inside the final prune"),
                        ("reconstruct", "reconstruct blocks inside the final prune"),
                        ("retrain", "retrain the whole model after the prune")):
        chosen = [s for s, p in zip(steps, phases, strict=True) if p == phase]
        if len(set(chosen)) > 1:
            errors.append(f"recover: {' and '.join(chosen)} both {what}; chain at most one of them")
    for i in range(1, len(steps)):
        if PHASES.index(phases[i]) < PHASES.index(phases[i - 1]):
            errors.append(f"recover: {steps[i]!r} ({phases[i]}) cannot follow {steps[i - 1]!r} "
                          f"({phases[i - 1]}); the order is refiner (dsnot, r2dsnot), then "
                          "perp-reconstruct, then one whole-model PERP variant "
                          "(e.g. r2dsnot,perp-reconstruct,perp-masklora)")
    return errors


def prune_steps(steps: Iterable[str]) -> list[str]:
    """The steps that run inside the final prune (refiners and the reconstruction)."""
    return [s for s in steps if RECOVERY_STEPS.get(s).stage == STAGE_PRUNE]


def model_step(steps: Iterable[str]) -> RetrainStep | None:
    """The chain's whole-model PERP step, if any."""
    found = [RECOVERY_STEPS.get(s) for s in steps if RECOVERY_STEPS.get(s).stage == STAGE_MODEL]
    return found[-1] if found else None  # type: ignore[return-value]


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
    "PHASES",
    "R2DSNOT",
    "RECONSTRUCT",
    "RECOVERY_STEPS",
    "REFINERS",
    "STAGE_MODEL",
    "STAGE_PRUNE",
    "MaskRefiner",
    "ReconstructStep",
    "RecoveryStep",
    "RetrainStep",
    "chain_errors",
    "model_step",
    "phase_of",
    "prune_steps",
    "refiner_needs",
    "register_refiner",
    "resolved_options",
    "variant_train_defaults",
]
