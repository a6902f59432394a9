"""OWL: Outlier-Weighted Layerwise sparsity (Yin et al., ICML 2024, arXiv 2310.05175).

Blocks with many activation outliers are pruned less (allocation.md §3). Pass 1 is one dense
pass over the calibration windows; for block ``l`` the layerwise outlier distribution is

    D_l = 100 * count(A_l > M * mean(A_l)) / numel(A_l),   A_l = pooled |W| * sqrt(s_j)

over the block's linears (Wanda scores), and the code's min-max mapping gives

    d_l = (D_l - min D) / (max D - min D) * 2 * lam,   s_l = S - (d_l - mean_l d),

shared by every linear of the block (OWL issue #9). The mean is unweighted over blocks, exact
for equal-sized blocks; ``renormalise: true`` applies the additive correction of §1.4.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

import neuroal
from neuroal.allocation.base import PlanRequest, Rule, choice, option_errors
from neuroal.allocation.plan import ModelShape, SparsityPlan
from neuroal.allocation.renorm import additive_correction, check_feasible, clip_ratios, weighted_mean
from neuroal.criteria.base import STAT_SQ_NORM, LayerStats
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)



def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def feasibility_errors(cfg: Any) -> list[str]:
    """The target must lie inside ``allocation.clip`` for any clipped plan to reach it.

    Only checked for well-formed unstructured configs (other problems are reported elsewhere).
    """
    clip, target = tuple(cfg.allocation.clip), cfg.sparsity
    if cfg.pattern != "unstructured" or not _number(target) or len(clip) != 2:
        return []
    if not all(_number(v) for v in clip) or clip[0] <= target <= clip[1]:
        return []
    return [f"sparsity={target} lies outside allocation.clip={list(clip)}: no clipped plan can "
            "reach it; widen allocation.clip or change the sparsity"]


# --------------------------------------------------------------------------- LOD (pure)


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda scores ``|W_ij| * sqrt(s_j)`` in fp32: ``(rows, cols), (cols,) -> (rows, cols)``."""
    return weight.detach().float().abs() * sq_norm.to(weight.device).float().sqrt().unsqueeze(0)


Pairs = list[tuple[torch.Tensor, torch.Tensor]]  # (weight (rows, cols), sq_norm (cols,))


def _pooled_lod(pairs: Pairs, m: float) -> float:
    """One threshold from the mean over all matrices pooled (the reference's rule).

    Two passes (sum, then count) recompute the scores one matrix at a time instead of holding
    the pooled block, which is several GB in fp32 for a 70B model.
    """
    numel = sum(w.numel() for w, _ in pairs)
    mean = math.fsum(float(wanda_scores(w, s).sum(dtype=torch.float64)) for w, s in pairs) / numel
    outliers = sum(int((wanda_scores(w, s) > m * mean).sum()) for w, s in pairs)
    return 100.0 * outliers / numel


def _per_matrix_lod(pairs: Pairs, m: float) -> float:
    """Unweighted mean of each matrix's own LOD (optional variant)."""
    return sum(_pooled_lod([pair], m) for pair in pairs) / len(pairs)


POOLS: dict[str, Callable[[Pairs, float], float]] = {
    "block": _pooled_lod,
    "per_matrix_mean": _per_matrix_lod,
}


def outlier_ratio(weights: Mapping[str, torch.Tensor], stats: Mapping[str, LayerStats], m: float,
                  pool: str = "block") -> float:
    """Layerwise outlier distribution ``D_l`` of one block, as a percentage (OWL #3).

    Args:
        weights: ``name -> (rows, cols)`` dense weights of the block's prunable linears.
        stats: ``name -> LayerStats`` with ``sq_norm`` ``(cols,)``, ``s_j = (1/N) sum x_j^2``.
        m: Outlier multiplier M: a score is an outlier above ``M * mean``.
        pool: ``block`` (one threshold over the pooled matrices) or ``per_matrix_mean``.

    Returns:
        ``100 * count(A > M * mean(A)) / numel(A)`` with ``A`` the Wanda scores.
    """
    missing = [name for name in weights if stats[name].sq_norm is None]
    if missing:
        raise ValueError(f"outlier_ratio needs the sq_norm statistic; missing for {missing}")
    return POOLS[pool]([(w, stats[name].sq_norm) for name, w in weights.items()], m)


def owl_ratios(lods: Sequence[float], target: float, lam: float) -> list[float]:
    """OWL's min-max mapping from block LODs ``(L,)`` to block ratios ``(L,)`` (unclipped).

    ``d = (D - min D) / (max D - min D) * 2 lam``; ``s = S - (d - mean d)``: larger LOD, less
    sparsity; width ``2 lam``; unweighted mean ``S``. Equal LODs give the uniform plan.
    """
    lo, hi = min(lods), max(lods)
    span = hi - lo
    d = [(x - lo) / span * 2.0 * lam if span > 0 else 0.0 for x in lods]
    mean_d = math.fsum(d) / len(d)
    return [target - (x - mean_d) for x in d]


# --------------------------------------------------------------------------- policy


OWL_RULES: dict[str, Rule] = {
    "m": (lambda v: _number(v) and v > 0, "a positive number (OWL's Hyper_m; README uses 5)"),
    "lam": (lambda v: _number(v) and 0 <= v <= 0.5,
            "a number in [0, 0.5] (ratios span S +- lam; OWL's README uses 0.08)"),
    "pool": (choice(*POOLS), f"one of {', '.join(POOLS)}"),
    "renormalise": (lambda v: isinstance(v, bool), "true or false"),
}


def block_numels(shape: ModelShape) -> list[int]:
    """Parameters of every block's prunable linears ``(L,)``."""
    return [sum(r * c for r, c in blk.values()) for blk in shape.blocks]


def clip_or_renormalise(raw: list[float], numels: list[int], target: float,
                        clip: tuple[float, float], renormalise: bool) -> tuple[list[float], list[str]]:
    """Clip block ratios; shift them additively if asked; warn about clipping and misses."""
    clipped = [b for b, s in enumerate(raw) if not clip[0] <= s <= clip[1]]
    ratios = (additive_correction(raw, numels, target, clip) if renormalise
              else clip_ratios(raw, clip))
    warnings = []
    if clipped:
        warnings.append(f"owl: blocks {clipped} clipped into {list(clip)}")
    planned = weighted_mean(ratios, numels)
    if abs(planned - target) > 1e-6:
        warnings.append(f"owl: planned global sparsity {planned:.6f} misses the target {target} "
                        "(unweighted mean over blocks of different sizes, or clipping); set "
                        "allocation.renormalise=true to restore it")
    return [float(s) for s in ratios], warnings


class OWLPolicy:
    """OWL allocation (arXiv 2310.05175): block ratios from the layerwise outlier distribution."""

    name = "owl"
    needs = "stats"
    defaults: Mapping[str, Any] = {"m": 5.0, "lam": 0.08, "pool": "block", "renormalise": False}
    nm_compatible = False

    def validate(self, cfg: Any) -> list[str]:
        return option_errors(self.name, cfg.allocation.options, OWL_RULES) + feasibility_errors(cfg)

    def resolve(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``options``; raise ValueError listing bad options."""
        errors = option_errors(self.name, options, OWL_RULES)
        if errors:
            raise ValueError("; ".join(errors))
        return {**self.defaults, **options}

    def lods(self, request: PlanRequest, m: float, pool: str) -> list[float]:
        """Block LODs ``(L,)`` from one dense statistics pass of the executor."""
        if request.executor is None or request.calibration is None:
            raise RuntimeError("allocation 'owl' needs an executor and calibration windows "
                               "(one dense statistics pass); run it through neuroal.pipeline")
        fn = functools.partial(outlier_ratio, m=m, pool=pool)
        return [float(d) for d in request.executor.dense_block_metrics(
            request.calibration, fn, frozenset({STAT_SQ_NORM}))]

    def plan(self, request: PlanRequest) -> SparsityPlan:
        opts = self.resolve(request.options)
        check_feasible(request.target, request.clip)
        lods = self.lods(request, float(opts["m"]), opts["pool"])
        if max(lods) == min(lods):
            log.warning("owl: every block has the same LOD %.4f %%: the plan is uniform", lods[0])
        raw = owl_ratios(lods, request.target, float(opts["lam"]))
        numels = block_numels(request.shape)
        ratios, warnings = clip_or_renormalise(raw, numels, request.target, request.clip,
                                               bool(opts["renormalise"]))
        for w in warnings:
            log.warning(w)
        log.info("owl: LOD %.3f-%.3f %%, block ratios %.4f-%.4f", min(lods), max(lods),
                 min(ratios), max(ratios))
        return SparsityPlan(
            target=request.target, pattern=request.pattern,
            ratios=[{name: s for name in blk} for s, blk in zip(ratios, request.shape.blocks,
                                                                strict=True)],
            policy={"name": self.name, **opts, "version": neuroal.__version__},
            trail={"lod": lods, "unclipped": raw}, warnings=warnings)
