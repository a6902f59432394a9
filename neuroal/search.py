"""The search coordinator: candidates in, scores out, first minimum wins (engine.md §4).

The loop lives on the driver, never in the workers. ``evaluate`` takes a list of independent
candidates and returns one result per candidate, so an executor may keep several in flight
(the Ray executor pipelines them through its actors); tests plug in a stub objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from neuroal.logging import get_logger

log = get_logger(__name__)


@dataclass
class Candidate:
    """One point of a search phase: its grid value and the plan ratios it stands for."""

    phase: str
    value: float
    ratios: list[dict[str, Any]]


@dataclass
class Outcome:
    """The score of a candidate and whatever the objective returned beside it."""

    score: float
    detail: Any = None


@dataclass
class PhaseResult:
    """Winner and trail of one phase."""

    phase: str
    winner: int
    candidates: list[Candidate]
    outcomes: list[Outcome]
    trail: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best(self) -> Candidate:
        return self.candidates[self.winner]

    @property
    def best_outcome(self) -> Outcome:
        return self.outcomes[self.winner]


SYMBOLS = {"block": "λ", "row": "μ"}
"""How each phase's grid value is written in progress lines (neuroal.md: λ block, μ row)."""


class CandidateProgress:
    """Progress of a batch of candidates as they finish, each with its score (the partial
    results of the search): a bar with the latest score on a terminal, otherwise one log line
    per finished candidate with rate and ETA.

    Args:
        candidates: The candidates submitted together (one phase).
        **kwargs: Passed to :class:`neuroal.progress.Progress` (tests: ``mode``, ``clock``).
    """

    def __init__(self, candidates: Sequence[Candidate], **kwargs: Any) -> None:
        from neuroal.progress import Progress

        self.candidates = list(candidates)
        phase = self.candidates[0].phase if self.candidates else "search"
        kwargs.setdefault("interval", 0.0)
        self.bar = Progress(len(self.candidates), f"search, {phase} step", unit="candidate",
                            **kwargs)

    def done(self, index: int, score: float) -> None:
        """Candidate ``index`` (in submission order) finished with ``score``."""
        c = self.candidates[index]
        self.bar.update(status=f"{SYMBOLS.get(c.phase, c.phase)}={c.value:.3f} score {score:.6g}")

    def close(self) -> None:
        self.bar.close()


def run_phase(phase: str, candidates: Sequence[Candidate],
              evaluate: Callable[[list[Candidate]], list[Outcome]]) -> PhaseResult:
    """Evaluate every candidate and select the first minimum (neuroal.md §A8).

    Raises:
        ValueError: No candidates, or ``evaluate`` returned the wrong number of outcomes.
    """
    from neuroal.allocation.neuroal_math import first_minimum

    candidates = list(candidates)
    if not candidates:
        raise ValueError(f"search phase {phase!r} has no candidates")
    outcomes = evaluate(candidates)
    if len(outcomes) != len(candidates):
        raise ValueError(f"phase {phase!r}: {len(outcomes)} outcomes for {len(candidates)} "
                         "candidates")
    winner = first_minimum([o.score for o in outcomes])
    trail = [{"phase": phase, "value": c.value, "score": o.score, "chosen": i == winner}
             for i, (c, o) in enumerate(zip(candidates, outcomes, strict=True))]
    for entry in trail:
        log.info("%s %.3f: score %.6g%s", phase, entry["value"], entry["score"],
                 "  <- chosen" if entry["chosen"] else "")
    return PhaseResult(phase, winner, candidates, outcomes, trail)
