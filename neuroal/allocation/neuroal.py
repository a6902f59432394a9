"""NeuroAL: block- and row-wise sparsity by zeroth-order search on neuron alignment.

Cunegatti et al., "Zeroth-order adaptive neuron alignment based pruning without re-training",
arXiv 2411.07066 (TMLR 2025). Faithful mode follows shared/specs/neuroal.md Part A: a block step
over a linear depth ramp of half-width lambda, then (except for SparseGPT) a row step shifting
row ratios by the consumer layer's alignment delta; the first minimum of the summed alignment
distance wins. The search loop runs on the coordinator (``neuroal.search``); candidates are
evaluated by the executor (``evaluate_candidates``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from neuroal.allocation.base import PlanRequest
from neuroal.allocation.neuroal_math import (
    ROW_GRID,
    block_grid,
    block_ramp,
    row_plan,
    total_alignment,
)
from neuroal.allocation.plan import ModelShape, SparsityPlan
from neuroal.logging import get_logger
from neuroal.search import Candidate, Outcome, PhaseResult, run_phase

log = get_logger(__name__)

STEPS = ("block", "row", "both")
NO_ROW_STEP = frozenset({"sparsegpt"})  # per-128-column-block masks: per-row ratios do not apply


def _grid(value: Any) -> bool:
    return value == "auto" or (isinstance(value, list) and all(
        isinstance(v, (int, float)) and 0 <= v < 0.5 for v in value) and len(value) > 0)


RULES: dict[str, tuple[Any, str]] = {
    "steps": (lambda v: v in STEPS, f"one of {', '.join(STEPS)}"),
    "search_samples": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "block_grid": (_grid, "'auto' or a non-empty list of half-widths in [0, 0.5)"),
    "row_grid": (_grid, "'auto' or a non-empty list of widths in [0, 0.5)"),
    "include_uniform": (lambda v: isinstance(v, bool), "true or false"),
}


class NeuroALPolicy:
    """The ``neuroal`` allocation policy (faithful mode; neuroal.md §A9)."""

    name = "neuroal"
    needs = "search"
    nm_compatible = False
    defaults: Mapping[str, Any] = {"steps": "both", "search_samples": 8, "block_grid": "auto",
                                   "row_grid": "auto", "include_uniform": False}

    def validate(self, cfg: Any) -> list[str]:
        errors = []
        for key, value in cfg.allocation.options.items():
            if key not in RULES:
                errors.append(f"allocation.{key} is not an option of 'neuroal'; valid options: "
                              f"{', '.join(sorted(RULES))}")
            elif not RULES[key][0](value):
                errors.append(f"allocation.{key}={value!r}: expected {RULES[key][1]}")
        steps = cfg.allocation.options.get("steps", "both")
        if cfg.criterion.name in NO_ROW_STEP and steps == "row":
            errors.append("allocation.steps='row' with criterion 'sparsegpt': SparseGPT chooses "
                          "masks per 128-column block, so per-row ratios do not apply; use "
                          "steps=block or both")
        return errors

    def plan(self, request: PlanRequest) -> SparsityPlan:
        from neuroal.engine.worker import CandidateJob  # lazy: the engine imports allocation

        opts = {**self.defaults, **request.options}
        ids = request.calibration[: opts["search_samples"]]
        group = None if request.criterion in NO_ROW_STEP else "row"
        job = CandidateJob(request.criterion, dict(request.criterion_options), group)

        def evaluate(cands: list[Candidate]) -> list[Outcome]:
            results = request.executor.evaluate_candidates(ids, [c.ratios for c in cands], job)
            return [Outcome(total_alignment([blk.na for blk in res]), res) for res in results]

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
        cands = [Candidate("block", lam, _per_linear(request.shape, block_ramp(
            request.shape.num_blocks, request.target, lam, request.clip))) for lam in grid]
        return run_phase("block", cands, evaluate)

    def _row_step(self, request: PlanRequest, opts: Mapping[str, Any], block: PhaseResult,
                  evaluate: Any) -> PhaseResult:
        """μ over the row grid, rows driven by the block winner's δ vectors (§A7)."""
        grid = ROW_GRID if opts["row_grid"] == "auto" else tuple(float(v) for v in opts["row_grid"])
        deltas = [blk.delta for blk in block.best_outcome.detail]
        base = block.best.ratios
        cands = [Candidate("row", mu, row_plan(base, deltas, request.shape.consumers,
                                               request.shape, mu, request.clip,
                                               request.shape.uniform_rows)) for mu in grid]
        return run_phase("row", cands, evaluate)

    def _finish(self, request: PlanRequest, opts: Mapping[str, Any], ratios: list[dict[str, Any]],
                phases: list[PhaseResult], group: str | None) -> SparsityPlan:
        plan = SparsityPlan(target=request.target, pattern=request.pattern, ratios=ratios,
                            policy={"name": self.name, **{k: _plain(v) for k, v in opts.items()},
                                    "lambda_block": phases[0].best.value,
                                    "lambda_row": phases[1].best.value if len(phases) > 1 else None,
                                    **({"mask_group": group} if group else {})},
                            trail={"candidates": [e for p in phases for e in p.trail],
                                   "search_samples": min(opts["search_samples"],
                                                         int(request.calibration.shape[0]))})
        glob = plan.planned_global(request.shape)
        if abs(glob - request.target) > 1e-6:
            plan.warnings.append(f"clipping moved the planned global sparsity to {glob:.6f} "
                                 f"(target {request.target:.6f}); faithful NeuroAL does not "
                                 "renormalise")
        log.info("NeuroAL: lambda_block=%s lambda_row=%s", plan.policy["lambda_block"],
                 plan.policy["lambda_row"])
        return plan


def _per_linear(shape: ModelShape, block_ratios: list[float]) -> list[dict[str, Any]]:
    """Every linear of block b gets the block's ratio."""
    return [{name: float(block_ratios[b]) for name in blk} for b, blk in enumerate(shape.blocks)]


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else value
