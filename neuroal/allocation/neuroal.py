"""NeuroAL: block- and row-wise sparsity by zeroth-order search on neuron alignment.

Cunegatti et al., "Zeroth-order adaptive neuron alignment based pruning without re-training",
arXiv 2411.07066 (TMLR 2025). Faithful mode follows shared/specs/neuroal.md Part A: a block step
over a linear depth ramp of half-width lambda, then (except for SparseGPT) a row step shifting
row ratios by the consumer layer's alignment delta; the first minimum of the summed alignment
distance wins. The search loop runs on the coordinator (``neuroal.allocation.search``); candidates are
evaluated by the executor (``evaluate_candidates``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from neuroal.allocation.base import PlanRequest, Rule, option_errors
from neuroal.allocation.neuroal_math import (
    ROW_GRID,
    block_grid,
    block_ramp,
    check_row_map,
    first_minimum,
    row_plan,
    total_alignment,
)
from neuroal.allocation.plan import SparsityPlan
from neuroal.allocation.registry import ALLOCATIONS
from neuroal.allocation.search import Candidate, CandidateProgress, Outcome, PhaseResult, run_phase
from neuroal.config.inputs import is_int, is_number
from neuroal.criteria.base import STAT_SQ_NORM, STAT_SQ_NORM_WINDOWED
from neuroal.runtime.errors import StateIntegrityError
from neuroal.runtime.jobs import BlockAlignment, CandidateJob
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

STEPS = ("block", "row", "both")
NO_ROW_STEP = frozenset({"sparsegpt"})  # per-128-column-block masks: per-row ratios do not apply
WINDOWED_ALIGNMENT = {"sparsegpt": STAT_SQ_NORM_WINDOWED}
"""Criteria whose reference search measures input norms with another statistic: the SparseGPT
wrapper's running norm weights search window k by 2/(N k) (its running-mean update scales the
new window by 2/k before dividing by k again). neuroal.md §A4 states the uniform mean for every
criterion and §A11 does not mention the difference: the spec is incomplete there, the reference
code is followed. ``window_weights: uniform`` uses the plain mean (``sq_norm``) instead."""


def _grid(value: Any) -> bool:
    return value == "auto" or (isinstance(value, list) and all(
        is_number(v) and 0 <= v < 0.5 for v in value) and len(value) > 0)


RULES: dict[str, Rule] = {
    "steps": (lambda v: v in STEPS, f"one of {', '.join(STEPS)}"),
    "search_samples": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "block_grid": (_grid, "'auto' or a non-empty list of half-widths in [0, 0.5)"),
    "row_grid": (_grid, "'auto' or a non-empty list of widths in [0, 0.5)"),
    "include_uniform": (lambda v: isinstance(v, bool), "true or false"),
    "reference_stream": (lambda v: v in ("local", "global"), "'local' (faithful) or 'global'"),
    "base": (lambda v: v in ("uniform", "owl", "alpha"), "'uniform' (faithful), 'owl' or 'alpha'"),
    "base_options": (lambda v: isinstance(v, dict), "a mapping of the base policy's options"),
    "grid_refine": (lambda v: is_int(v) and 0 <= v <= 5, "an integer in [0, 5]"),
    "window_weights": (lambda v: v in ("reference", "uniform"),
                       "'reference' (faithful: SparseGPT's search weights window k by 1/k) or "
                       "'uniform'"),
    "early_stop": (lambda v: isinstance(v, bool), "true or false"),
}


class NeuroALPolicy:
    """The ``neuroal`` allocation policy (faithful mode; neuroal.md §A9)."""

    name = "neuroal"
    needs = "search"
    nm_compatible = False
    defaults: Mapping[str, Any] = {"steps": "both", "search_samples": 8, "block_grid": "auto",
                                   "row_grid": "auto", "include_uniform": False,
                                   "reference_stream": "local", "base": "uniform",
                                   "base_options": {}, "grid_refine": 0,
                                   "window_weights": "reference",
                                   "early_stop": False}

    def validate(self, cfg: Any) -> list[str]:
        errors = option_errors(self.name, cfg.allocation.options, RULES)
        steps = cfg.allocation.options.get("steps", "both")
        if cfg.criterion.name in NO_ROW_STEP and steps == "row":
            errors.append("allocation.steps='row' with criterion 'sparsegpt': SparseGPT chooses "
                          "masks per 128-column block, so per-row ratios do not apply; use "
                          "steps=block or both")
        return errors

    def candidate_count(self, options: Mapping[str, Any], criterion: str, target: float) -> int:
        """Candidates the search evaluates (an upper bound: early stopping may cut some short),
        for the time planner: the block grid, then the row grid unless the criterion has no
        row step, each refined ``grid_refine`` times by up to 2 more points."""
        opts = {**self.defaults, **options}
        uniform = bool(opts["include_uniform"])
        if opts["steps"] == "row":
            blocks = 1
        elif opts["block_grid"] == "auto":
            blocks = len(block_grid(target, uniform))
        else:
            blocks = len(opts["block_grid"]) + int(uniform and 0.0 not in opts["block_grid"])
        rows = 0
        if opts["steps"] != "block" and criterion not in NO_ROW_STEP:
            rows = len(ROW_GRID) if opts["row_grid"] == "auto" else len(opts["row_grid"])
        return blocks + rows + 2 * int(opts["grid_refine"]) * (1 + int(rows > 0))

    def plan(self, request: PlanRequest) -> SparsityPlan:
        opts = {**self.defaults, **request.options}
        ids = request.calibration[: opts["search_samples"]]
        group = None if request.criterion in NO_ROW_STEP else "row"
        stat = (WINDOWED_ALIGNMENT.get(request.criterion, STAT_SQ_NORM)
                if opts["window_weights"] == "reference" else STAT_SQ_NORM)
        job = CandidateJob(request.criterion, dict(request.criterion_options), group,
                           request.exact_count, stat)

        fresh = candidate_evaluator(request.executor, ids, job, opts["reference_stream"],
                                    request.shape.num_blocks)
        evaluate = fresh if request.state is None else Checkpointed(request.state, fresh)

        if opts["steps"] in ("row", "both") and request.criterion not in NO_ROW_STEP:
            check_row_map(request.shape)  # before the search: no failure after the block step
        block = self._block_step(request, opts, evaluate)
        ratios, phases = block.best.ratios, [block]
        if opts["steps"] in ("row", "both") and request.criterion not in NO_ROW_STEP:
            row = self._row_step(request, opts, block, evaluate)
            ratios, phases = row.best.ratios, phases + [row]
        return self._finish(request, opts, ratios, phases, group)

    def _block_step(self, request: PlanRequest, opts: Mapping[str, Any],
                    evaluate: Any) -> PhaseResult:
        """λ over the ramp grid (``steps: row`` evaluates the uniform schedule only)."""
        if opts["steps"] == "row":
            grid: tuple[float, ...] = (0.0,)
        elif opts["block_grid"] == "auto":
            grid = block_grid(request.target, bool(opts["include_uniform"]))
        else:
            grid = tuple(float(v) for v in opts["block_grid"])
            if opts["include_uniform"] and 0.0 not in grid:
                grid = (0.0, *grid)
        base = _base_ratios(request, opts)

        def make(lam: float) -> Candidate:
            return Candidate("block", lam, _shifted(request, base, lam))

        return refine(run_phase("block", [make(lam) for lam in grid], evaluate,
                                bool(opts["early_stop"])), make,
                      int(opts["grid_refine"]), evaluate)

    def _row_step(self, request: PlanRequest, opts: Mapping[str, Any], block: PhaseResult,
                  evaluate: Any) -> PhaseResult:
        """μ over the row grid, rows driven by the block winner's δ vectors (§A7)."""
        grid = ROW_GRID if opts["row_grid"] == "auto" else tuple(float(v) for v in opts["row_grid"])
        deltas = [blk.delta for blk in block.best_outcome.detail]
        base = block.best.ratios
        def make(mu: float) -> Candidate:
            return Candidate("row", mu, row_plan(base, deltas, request.shape.consumers,
                                                 request.shape, mu, request.clip,
                                                 request.shape.uniform_rows,
                                                 request.shape.row_tiles))

        return refine(run_phase("row", [make(mu) for mu in grid], evaluate,
                                bool(opts["early_stop"])), make,
                      int(opts["grid_refine"]), evaluate)

    def _finish(self, request: PlanRequest, opts: Mapping[str, Any], ratios: list[dict[str, Any]],
                phases: list[PhaseResult], group: str | None) -> SparsityPlan:
        plan = SparsityPlan(target=request.target, pattern=request.pattern, ratios=ratios,
                            policy={"name": self.name, **{k: _plain(v) for k, v in opts.items()},
                                    "lambda_block": phases[0].best.value,
                                    "lambda_row": phases[1].best.value if len(phases) > 1 else None,
                                    **({"mask_group": group} if group else {})},
                            trail={"candidates": [e for p in phases for e in p.trail],
                                   "search_samples": min(opts["search_samples"],
                                                         int(request.calibration.shape[0])),
                                   "alignment": {p.phase: _block_alignment(p) for p in phases}})
        glob = plan.planned_global(request.shape)
        if abs(glob - request.target) > 1e-6:
            plan.warnings.append(f"clipping moved the planned global sparsity to {glob:.6f} "
                                 f"(target {request.target:.6f}); faithful NeuroAL does not "
                                 "renormalise")
        log.info("NeuroAL: lambda_block=%s lambda_row=%s", plan.policy["lambda_block"],
                 plan.policy["lambda_row"])
        return plan


class Checkpointed:
    """``evaluate`` with resume (engine.md §8): every candidate is stored under the run state as
    soon as the executor reports it finished (``on_result``); candidates already stored (same
    phase, ordinal and grid value) are loaded instead of evaluated. Ordinals count candidates per
    phase in the order the coordinator submits them, deterministic for a given configuration.

    Early stopping: a stopped candidate is stored with its evaluated blocks,
    its lower bound and ``stopped_at_block``, and loaded as stopped; a loaded complete candidate
    reports its score to the phase's bound before the rest are evaluated, so that a resumed
    search stops the same candidates at the same blocks as an uninterrupted one."""

    def __init__(self, state: Any, evaluate: Any) -> None:
        self.state, self.evaluate = state, evaluate
        self.ordinal: dict[str, int] = {}

    def __call__(self, cands: list[Candidate]) -> list[Outcome]:
        keys = []
        for c in cands:
            keys.append((c.phase, self.ordinal.get(c.phase, 0), c.value))
            self.ordinal[c.phase] = keys[-1][1] + 1
        stored = [self.state.load_candidate(*k) for k in keys]
        for key, payload in zip(keys, stored, strict=True):
            if payload is not None and payload["score"] != total_alignment(
                    [d["na"] for d in payload["detail"]]):
                raise StateIntegrityError(
                    f"resume state file {str(self.state.candidate_path(*key[:2]))!r}: stored "
                    f"score {payload['score']!r} is not the sum of its alignment terms; "
                    "refusing to use it: drop --resume and pass --overwrite to start afresh")
        for c, payload in zip(cands, stored, strict=True):
            if payload is not None and payload.get("stopped_at_block") is None and \
                    c.bound is not None:
                c.bound.report(c.grid_index, payload["score"])
        todo = [c for c, s in zip(cands, stored, strict=True) if s is None]
        if len(todo) < len(cands):
            log.info("resume: %d of %d candidates loaded from %s", len(cands) - len(todo),
                     len(cands), self.state.root)
        todo_keys = [k for k, s in zip(keys, stored, strict=True) if s is None]

        def save(i: int, result: list[Any], stopped: int | None = None) -> None:
            self.state.save_candidate(*todo_keys[i], total_alignment([b.na for b in result]),
                                      [{"na": b.na, "delta": b.delta} for b in result], stopped)

        new = iter(self.evaluate(todo, save) if todo else [])
        out = []
        for payload in stored:
            if payload is None:
                outcome = next(new)
            else:
                detail = [BlockAlignment(d["na"], d["delta"]) for d in payload["detail"]]
                stop = payload.get("stopped_at_block")
                outcome = Outcome(payload["score"], detail) if stop is None else \
                    Outcome(float("inf"), detail, stopped_at_block=stop,
                            lower_bound=payload["score"])
            out.append(outcome)
        return out


def candidate_evaluator(executor: Any, ids: torch.Tensor, job: Any, reference_stream: str,
                        num_blocks: int) -> Any:
    """``evaluate(cands, on_result=None) -> outcomes`` over the executor; ``on_result(i, result,
    stopped_at_block)`` as each candidate finishes (``stopped_at_block`` None unless stopped).
    Candidates carrying a :class:`~neuroal.allocation.search.BestSoFar` (``early_stop``) hand the executor
    a bound and report every complete score to it; stopped candidates are not reported, but go
    to ``on_result`` (the resume checkpoint) with the blocks evaluated."""
    def fresh(cands: list[Candidate], on_result: Any = None) -> list[Outcome]:
        shown = CandidateProgress(cands)

        def done(i: int, res: list[Any]) -> None:
            score = total_alignment([blk.na for blk in res])
            shown.done(i, score)  # a stopped candidate shows its partial sum (lower bound)
            if len(res) == num_blocks and cands[i].bound is not None:
                cands[i].bound.report(cands[i].grid_index, score)
            if on_result is not None:
                on_result(i, res, None if len(res) == num_blocks else len(res) - 1)

        def bound(i: int) -> tuple[float, bool] | None:
            b = cands[i].bound
            return None if b is None else b.for_index(cands[i].grid_index)

        kwargs: dict[str, Any] = {"on_result": done}
        if any(c.bound is not None for c in cands):
            kwargs["bound"] = bound
        try:
            results = executor.evaluate_candidates(ids, [c.ratios for c in cands], job,
                                                   reference_stream, **kwargs)
        finally:
            shown.close()
        return [_outcome(res, num_blocks) for res in results]

    return fresh


def _outcome(result: list[Any], num_blocks: int) -> Outcome:
    """The outcome of one candidate: its score, or (stopped early: fewer blocks than the model)
    an infinite score for ranking with the partial sum as ``lower_bound``."""
    score = total_alignment([blk.na for blk in result])
    if len(result) == num_blocks:
        return Outcome(score, result)
    return Outcome(float("inf"), result, stopped_at_block=len(result) - 1, lower_bound=score)


def _base_ratios(request: PlanRequest, opts: Mapping[str, Any]) -> list[dict[str, float]] | None:
    """The base plan's ratios (``base: owl|alpha``, §4 option); None for the faithful uniform."""
    if opts["base"] == "uniform":
        return None

    sub = replace(request, options=dict(opts["base_options"]))
    plan = ALLOCATIONS.get(opts["base"]).plan(sub)
    return [{n: float(r) for n, r in blk.items()} for blk in plan.ratios]


def _shifted(request: PlanRequest, base: list[dict[str, float]] | None,
             lam: float) -> list[dict[str, Any]]:
    """Block ratios: the ramp around the target (faithful), or the base plan plus the ramp's
    offsets, clipped into ``request.clip``."""
    shape, lo, hi = request.shape, request.clip[0], request.clip[1]
    if base is None:
        ramp = block_ramp(shape.num_blocks, request.target, lam, request.clip)
        return [{name: float(ramp[b]) for name in blk} for b, blk in enumerate(shape.blocks)]
    offsets = [r - request.target for r in
               block_ramp(shape.num_blocks, request.target, lam, (-1.0, 2.0))]
    return [{n: min(hi, max(lo, base[b][n] + offsets[b])) for n in blk}
            for b, blk in enumerate(shape.blocks)]


def refine(result: PhaseResult, make: Any, rounds: int, evaluate: Any) -> PhaseResult:
    """Adaptive grid (§4 option ``grid_refine``): evaluate the midpoints between the winner and
    its grid neighbours, ``rounds`` times. Candidates are then ranked by value, so among equal
    scores the smaller lambda or mu wins (the rule of §A8), whatever order they were evaluated
    in; the trail lists them by value."""
    candidates, outcomes = list(result.candidates), list(result.outcomes)
    for _ in range(rounds):
        candidates, outcomes = _by_value(candidates, outcomes)
        values = [c.value for c in candidates]
        i = first_minimum([o.score for o in outcomes])
        best = values[i]
        mids = [(values[j] + best) / 2 for j in (i - 1, i + 1) if 0 <= j < len(values)]
        new = [make(v) for v in mids if v not in values]
        if not new:
            break
        candidates += new
        outcomes += evaluate(new)
    if len(candidates) == len(result.candidates):
        return result
    candidates, outcomes = _by_value(candidates, outcomes)
    return run_phase(result.phase, candidates, lambda _c: outcomes)


def _by_value(candidates: list[Candidate], outcomes: list[Outcome]
              ) -> tuple[list[Candidate], list[Outcome]]:
    """Candidates and their outcomes sorted by grid value (stable)."""
    order = sorted(range(len(candidates)), key=lambda k: candidates[k].value)
    return [candidates[k] for k in order], [outcomes[k] for k in order]


def _block_alignment(phase: PhaseResult) -> list[float]:
    """Per block, the winner's NA summed over the block's linears (for the report's plot)."""
    detail = phase.best_outcome.detail or []
    return [total_alignment([blk.na]) for blk in detail]


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else value
