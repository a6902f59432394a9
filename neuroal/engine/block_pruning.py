"""Pruning the linears of one block, as functions the Worker calls (criteria.md §1.3).

The worker owns the blocks and the activation stream; here are the steps that only need a
block's linears, their statistics and the plan: masks from a criterion, the refiners after it,
the magnitude fallback for MoE experts without routed tokens, the temporary masked copies a
search candidate runs with, and which statistics each job needs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from neuroal.criteria import CRITERIA
from neuroal.criteria.base import STAT_SQ_NORM, LayerTarget
from neuroal.recovery import REFINERS
from neuroal.runtime.jobs import CandidateJob, LayerReport, PruneJob
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)


def stat_needs(criterion: str, alignment_stat: str = STAT_SQ_NORM) -> frozenset[str]:
    """Statistics a candidate's dense pass collects: ``sq_norm``, the alignment statistic and
    the criterion's needs (every executor builds its shared dense reference with the same)."""
    return frozenset({STAT_SQ_NORM, alignment_stat}) | CRITERIA.get(criterion).needs


def candidate_needs(job: CandidateJob) -> frozenset[str]:
    """:func:`stat_needs` of a candidate job."""
    return stat_needs(job.criterion, job.alignment_stat)


def mean_ratio(ratio: Any) -> float:
    """A plan entry's mean ratio (a float, or per-row ratios ``(rows,)``): the layer target."""
    if isinstance(ratio, torch.Tensor):
        return float(ratio.double().mean())
    if isinstance(ratio, (list, tuple)):
        return float(torch.as_tensor(ratio, dtype=torch.float64).mean())
    return float(ratio)


def stats_only(_weights: Mapping[str, torch.Tensor], stats: dict[str, Any]) -> dict[str, Any]:
    """A ``dense_block_metrics`` function keeping the statistics themselves (picklable)."""
    return stats


def expert_fallback(criterion: Any, stats: Any, target: LayerTarget, label: str,
                    quiet: bool = False) -> tuple[Any, LayerTarget, dict[str, Any]] | None:
    """Magnitude in place of a data-driven criterion for a matrix that saw no calibration token
    (an MoE expert the router never chose; neuroal.capture.moe), in the comparison group the
    criterion would use; None when the criterion applies. Logged unless ``quiet``."""
    if not criterion.needs or getattr(stats, "tokens", None) != 0:
        return None
    magnitude = CRITERIA.get("magnitude")
    group = target.group or criterion.default_group
    fallback = replace(target, group=group if group in magnitude.groups else None)
    if not quiet:
        log.warning("%s: no calibration token was routed to this expert; pruned by magnitude "
                    "instead of %s", label, criterion.name)
    return magnitude, fallback, {"fallback": "magnitude", "fallback_reason": "no routed token"}


def prune_linears(index: int, linears: Mapping[str, torch.nn.Linear], stats: Mapping[str, Any],
                  entries: Mapping[str, Any], job: PruneJob, order: list[str],
                  attention: frozenset[str], seqlen: int | None) -> list[LayerReport]:
    """Masks for block ``index``'s ``linears`` (in execution ``order``) from their plan
    ``entries`` and ``stats``, refined by the job's refiners (``attention``: the names the
    attention-only refiners apply to; ``seqlen``: calibration tokens per sequence); each
    weight is zeroed in place (SparseGPT: updated first). Returns one report per linear."""
    criterion = CRITERIA.get(job.criterion)
    options = {**criterion.defaults, **job.options}
    reports = []
    for name in order:
        linear, ratio = linears[name], entries[name]
        target = LayerTarget(ratio=ratio, nm=job.nm, group=job.group, exact_count=job.exact_count)
        fallback = expert_fallback(criterion, stats[name], target, f"block {index} {name}")
        try:
            if fallback is None:
                result = criterion.prune(linear.weight.data, stats[name], target, options)
                mask, weight, refined = refine(linear.weight.data, result, stats[name], job,
                                               name in attention, seqlen)
            else:  # an MoE expert no calibration token was routed to: magnitude, no refiner
                result = fallback[0].prune(linear.weight.data, stats[name], fallback[1], {})
                result.info.update(fallback[2])
                mask, weight, refined = result.mask, result.weight, {}
        except ValueError as exc:
            raise ValueError(f"block {index} {name}: {exc}") from exc
        _log_facts(index, name, result.info, refined)
        if weight is not None:
            linear.weight.data.copy_(weight.to(linear.weight.dtype))
        linear.weight.data.masked_fill_(mask.to(linear.weight.device), 0.0)
        info = {**result.info, "recovery": refined} if refined else result.info
        if hasattr(stats[name], "tokens"):  # MoE expert: calibration tokens routed to it
            info = {**info, "routed_tokens": stats[name].tokens}
        reports.append(LayerReport(name, mean_ratio(ratio), int(mask.sum()),
                                   int((linear.weight.data == 0).sum()),
                                   linear.weight.numel(), info))
    return reports


def _log_facts(index: int, name: str, info: Mapping[str, Any],
               refined: Mapping[str, Mapping[str, Any]]) -> None:
    """Warn about SparseGPT dampening retries; note refiners that stopped rows early."""
    if info.get("damp_retries") or info.get("cholesky_failure"):
        log.warning("block %d %s: SparseGPT dampening %s", index, name, info)
    for step, facts in refined.items():
        if facts.get("stopped_rows"):
            log.info("block %d %s: %s stopped %d row(s) that ran out of swap candidates",
                     index, name, step, facts["stopped_rows"])


def refine(dense: torch.Tensor, result: Any, stats: Any, job: PruneJob, is_attention: bool,
           seqlen: int | None) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """Apply the job's refiners to one linear (recovery.md §1-2).

    Returns the final mask, the weight to write before zeroing (None: keep the dense one)
    and per-refiner facts. After a weight update (SparseGPT) the refiner sees the updated
    weights where kept and the dense ones where pruned, so a regrown weight gets its dense
    value [reconstructed, recovery.md §1.5].
    """
    mask, weight = result.mask, result.weight
    if weight is not None and job.refine:
        weight = torch.where(mask.to(dense.device), dense, weight.to(dense.dtype))
    facts: dict[str, Any] = {}
    for name, options in job.refine:
        refiner = REFINERS.get(name)
        resolved = {**refiner.defaults, **options}
        if not refiner.applies_to(is_attention, resolved):
            continue
        t0 = time.perf_counter()
        mask, facts[name] = refiner.refine(dense if weight is None else weight, mask, stats,
                                           resolved, job.nm, seqlen,
                                           None if weight is None else dense)
        facts[name]["seconds"] = time.perf_counter() - t0
    return mask, weight, facts


def masked_weights(linears: Mapping[str, torch.nn.Linear], stats: Mapping[str, Any],
                   entries: Mapping[str, Any], job: CandidateJob, criterion: Any,
                   options: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Temporary pruned (SparseGPT: updated) copies of each linear's weight ``(rows, cols)``,
    for a search candidate; the linears keep their dense weights."""
    out = {}
    for name, linear in linears.items():
        ratio = entries[name]
        group = None if isinstance(ratio, torch.Tensor) else job.group
        target = LayerTarget(ratio=ratio, group=group if group in criterion.groups else None,
                             exact_count=job.exact_count)
        fallback = expert_fallback(criterion, stats[name], target, name, quiet=True)
        if fallback is None:
            result = criterion.prune(linear.weight.data, stats[name], target, options)
        else:
            result = fallback[0].prune(linear.weight.data, stats[name], fallback[1], {})
        weight = result.weight.to(linear.weight.dtype) if result.weight is not None \
            else linear.weight.data.clone()
        out[name] = weight.masked_fill_(result.mask.to(weight.device), 0.0)
    return out
