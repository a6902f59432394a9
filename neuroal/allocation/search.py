"""The search coordinator: candidates in, scores out, first minimum wins (engine.md §4).

The loop lives on the driver, never in the workers. ``evaluate`` takes a list of independent
candidates and returns one result per candidate, so an executor may keep several in flight
(the Ray executor pipelines them through its actors); tests plug in a stub objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from neuroal.runtime.logging import get_logger
from neuroal.runtime.progress import Progress

log = get_logger(__name__)


@dataclass
class Candidate:
    """One point of a search phase: its grid value and the plan ratios it stands for."""

    phase: str
    value: float
    ratios: list[dict[str, Any]]
    grid_index: int = -1
    bound: BestSoFar | None = field(default=None, repr=False, compare=False)


@dataclass
class Outcome:
    """The score of a candidate and whatever the objective returned beside it."""

    score: float
    detail: Any = None
    stopped_at_block: int | None = None
    """Set when the candidate was stopped early: the last block evaluated; ``score`` is then
    ``inf`` for ranking and ``lower_bound`` the partial sum reached."""
    lower_bound: float | None = None


class BestSoFar:
    """The best complete score of a phase so far, with its grid index (exact early stopping).
    ``for_index(i)`` is the bound a candidate at grid index ``i`` must
    cross to be stopped: a tie loses only against an earlier grid index (first minimum, §A8)."""

    def __init__(self) -> None:
        self.score: float | None = None
        self.index = -1

    def report(self, index: int, score: float) -> None:
        if self.score is None or score < self.score or (score == self.score and index < self.index):
            self.score, self.index = score, index

    def for_index(self, index: int) -> tuple[float, bool] | None:
        return None if self.score is None else (self.score, self.index < index)


def middle_out(n: int) -> list[int]:
    """Evaluation order for a grid of ``n``: the middle first, then alternately outwards, so a
    good bound is known early on a unimodal score curve."""
    mid = (n - 1) // 2
    order = [mid]
    for step in range(1, n):
        for j in (mid - step, mid + step):
            if 0 <= j < n and len(order) < n:
                order.append(j)
    return order


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
        **kwargs: Passed to :class:`neuroal.runtime.progress.Progress` (tests: ``mode``, ``clock``).
    """

    def __init__(self, candidates: Sequence[Candidate], **kwargs: Any) -> None:
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
              evaluate: Callable[[list[Candidate]], list[Outcome]],
              early_stop: bool = False) -> PhaseResult:
    """Evaluate every candidate and select the first minimum (neuroal.md §A8).

    With ``early_stop`` candidates are evaluated middle-out (:func:`middle_out`) and each
    carries a shared :class:`BestSoFar` (``Candidate.bound``) that the evaluator may use to
    stop a candidate that can no longer win; the winner and its full score are unchanged
    (first minimum in grid order), the trail records ``stopped_at_block`` and ``lower_bound``.

    Raises:
        ValueError: No candidates, or ``evaluate`` returned the wrong number of outcomes.
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError(f"search phase {phase!r} has no candidates")
    order = middle_out(len(candidates)) if early_stop else list(range(len(candidates)))
    if early_stop:
        best = BestSoFar()
        for i, c in enumerate(candidates):
            c.grid_index, c.bound = i, best
    got = evaluate([candidates[i] for i in order])
    if len(got) != len(candidates):
        raise ValueError(f"phase {phase!r}: {len(got)} outcomes for {len(candidates)} "
                         "candidates")
    outcomes: list[Outcome] = [Outcome(0.0)] * len(candidates)
    for i, o in zip(order, got, strict=True):
        outcomes[i] = o
    winner = first_minimum([o.score for o in outcomes])
    trail = []
    for i, (c, o) in enumerate(zip(candidates, outcomes, strict=True)):
        entry = {"phase": phase, "value": c.value, "score": o.score, "chosen": i == winner}
        if o.stopped_at_block is not None:
            entry.update(score=None, stopped_at_block=o.stopped_at_block,
                         lower_bound=o.lower_bound)
        trail.append(entry)
    for entry in trail:
        if entry.get("stopped_at_block") is not None:
            log.info("%s %.3f: stopped at block %d, score >= %.6g", phase, entry["value"],
                     entry["stopped_at_block"], entry["lower_bound"])
        else:
            log.info("%s %.3f: score %.6g%s", phase, entry["value"], entry["score"],
                     "  <- chosen" if entry["chosen"] else "")
    return PhaseResult(phase, winner, candidates, outcomes, trail)


def first_minimum(scores: Sequence[float]) -> int:
    """Index of the winning candidate: the first minimum in grid order (spec §A8).

    Scores are compared as float64; among equal scores the earlier candidate (smaller lambda or
    mu) wins.

    Raises:
        ValueError: ``scores`` is empty or holds a NaN.
    """
    values = [float(s) for s in scores]
    if not values:
        raise ValueError("first_minimum needs at least one candidate score, got none")
    bad = [i for i, v in enumerate(values) if v != v]
    if bad:
        raise ValueError(f"candidate scores at indices {bad} are NaN; every score must be a number")
    best = 0
    for i, value in enumerate(values):
        if value < values[best]:
            best = i
    return best
