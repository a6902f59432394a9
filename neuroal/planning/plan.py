"""The memory plan: every worker's predicted peak for one model and request, and the searches
over it: the final prune's mode (:func:`choose_parallel`) and onload mode (:func:`choose_onload`)
that fit, the fewest workers (:func:`min_workers`) and the largest known model that fits
(:func:`largest_fit`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from neuroal.engine.data_parallel import PARALLEL_CHOICES, resolve_parallel
from neuroal.engine.executor import split_blocks
from neuroal.models.known import KNOWN
from neuroal.planning.data_mode import data_prune_phase
from neuroal.planning.layout import ModelLayout, layout_of
from neuroal.planning.memory import (
    COMPONENTS,
    DTYPE_BYTES,
    GB,
    ONLOAD_MODES,
    MemoryRequest,
    WorkerMemory,
    worker_phases,
)
from neuroal.planning.recovery import recovery_phases, retrain_memory


@dataclass(frozen=True)
class MemoryPlan:
    """Per-worker predictions for one model and request."""

    model: str
    params: int
    num_blocks: int
    request: MemoryRequest
    workers: tuple[WorkerMemory, ...]
    retrain: WorkerMemory | None = None  # whole-model PERP: one process after the prune

    @property
    def peak_worker(self) -> WorkerMemory:
        return max(self.workers, key=lambda w: w.total)

    @property
    def peak(self) -> int:
        """The largest per-worker total, in bytes."""
        return self.peak_worker.total

    @property
    def host_peak(self) -> int:
        """The largest per-worker host figure (onloaded blocks + offloaded streams)."""
        return max(w.host for w in self.workers)

    @property
    def host_total(self) -> int:
        """Host bytes of every worker together (all workers on one node)."""
        return sum(w.host for w in self.workers)

    @property
    def one_process(self) -> int:
        """Bytes when every worker lives in one process (the local executor on one device):
        all weights, the largest working set of any worker (they run one after another; the
        stream is handed over, not copied) and one runtime overhead. Pipeline mode's figure: in
        data mode the in-process workers run at once (their working sets add up) and a guest
        block on the owner's device is the owner's tensors, not a copy."""
        working = max(w.activations + w.statistics + w.transients + w.masked_block
                      for w in self.workers)
        return sum(w.weights for w in self.workers) + working + self.workers[0].overhead

    def over(self, limit: int | Sequence[int], retrain_limit: int | None = None) -> list[WorkerMemory]:
        """Workers whose total exceeds ``limit`` (one value, or one per worker), then the
        ``retrain`` row if it exceeds ``retrain_limit`` (default: the first worker's limit)."""
        limits = per_worker_limits(limit, len(self.workers))
        out = [w for w, cap in zip(self.workers, limits, strict=True) if w.total > cap]
        cap = limits[0] if retrain_limit is None else retrain_limit
        if self.retrain is not None and self.retrain.total > cap:
            out.append(self.retrain)
        return out

    def fits(self, limit: int | Sequence[int], retrain_limit: int | None = None) -> bool:
        return not self.over(limit, retrain_limit)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: request, totals and every worker's components in bytes."""
        return {
            "model": self.model, "params": self.params, "num_blocks": self.num_blocks,
            "request": {f.name: getattr(self.request, f.name) for f in fields(self.request)},
            "peak_bytes": self.peak, "host_peak_bytes": self.host_peak,
            "host_total_bytes": self.host_total,
            "workers": [{**{f.name: getattr(w, f.name) for f in fields(w)}, "total": w.total,
                         "host": w.host} for w in self.workers],
            "retrain": None if self.retrain is None else {
                **{f.name: getattr(self.retrain, f.name) for f in fields(self.retrain)},
                "total": self.retrain.total},
        }

    def table(self) -> str:
        """The per-worker table, components in GB."""
        head = ["worker", "blocks", *[c.replace("_", " ") for c in COMPONENTS], "total", "phase"]
        shown = [*self.workers, *([self.retrain] if self.retrain is not None else [])]
        rows = [[str(w.rank) if w.phase != "retrain" else "all", f"{w.start}-{w.stop - 1}",
                 *[f"{getattr(w, c) / GB:.2f}" for c in COMPONENTS], f"{w.total / GB:.2f}", w.phase]
                for w in shown]
        if any(w.host_activations for w in shown):
            head.append("host act.")
            for row, w in zip(rows, shown, strict=True):
                row.append(f"{w.host_activations / GB:.2f}")
        if any(w.host_weights for w in shown):
            head.append("host weights")
            for row, w in zip(rows, shown, strict=True):
                row.append(f"{w.host_weights / GB:.2f}")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(r, widths, strict=True))
                         for r in [head, *rows])


def per_worker_limits(limit: int | Sequence[int], workers: int) -> list[int]:
    """One byte limit per worker from one value (every worker alike) or one per worker.

    Raises:
        ValueError: A sequence whose length is not ``workers``.
    """
    if isinstance(limit, int):
        return [limit] * workers
    limits = list(limit)
    if len(limits) != workers:
        raise ValueError(f"got {len(limits)} memory limits for {workers} workers")
    return limits

def plan_memory(model: str | ModelLayout | Any, request: MemoryRequest) -> MemoryPlan:
    """Predict every worker's peak bytes for ``request`` (no weights are read).

    Args:
        model: A known alias (``llama-2-70b``), a model path or hub id, a ``PretrainedConfig``
            or a :class:`ModelLayout`.
        request: Workers, dtype, calibration size, micro-batch, criterion, allocation and the
            final prune's mode (``parallel``: data mode's prune phase replaces pipeline
            mode's, :mod:`neuroal.planning.data_mode`).

    Returns:
        One :class:`WorkerMemory` per worker, in slice order.

    Raises:
        ValueError: Unknown dtype, onload or parallel mode, or more workers than blocks.
    """
    if request.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {request.dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
    if request.onload == "auto":  # no budget to choose by: the workers keep their blocks
        request = replace(request, onload="device")
    if request.onload not in ONLOAD_MODES:
        raise ValueError(f"onload {request.onload!r}: expected one of auto, "
                         f"{', '.join(ONLOAD_MODES)}")
    if request.parallel not in PARALLEL_CHOICES:
        raise ValueError(f"parallel {request.parallel!r}: expected one of "
                         f"{', '.join(PARALLEL_CHOICES)}")
    layout = layout_of(model)
    if request.parallel == "auto":  # no budget to choose by: data mode wherever it can run
        request = replace(request, parallel="data" if data_possible(request)
                          else "pipeline")
    slices = split_blocks(layout.num_blocks, request.workers)

    def phases(rank: int, start: int, stop: int) -> dict[str, WorkerMemory]:
        out = {**worker_phases(layout, request, rank, start, stop),
               **recovery_phases(layout, request, rank, start, stop)}
        if request.parallel == "data":
            out["prune"] = data_prune_phase(layout, request, slices, rank)
        return out

    workers = tuple(max(phases(r, a, b).values(), key=lambda w: w.total)
                    for r, (a, b) in enumerate(slices))
    return MemoryPlan(layout.name, layout.params, layout.num_blocks, request, workers,
                      retrain_memory(layout, request))


def data_possible(request: MemoryRequest) -> bool:
    """Whether ``engine.parallel=auto`` may pick data mode at all, memory apart: several
    workers (the engine's own rule, :func:`~neuroal.engine.data_parallel.resolve_parallel`:
    neither the model nor the recovery steps rule it out, so only the request is asked)."""
    return resolve_parallel("auto", request.workers) == "data"


def choose_parallel(model: str | ModelLayout | Any, request: MemoryRequest,
                    limit: int | Sequence[int], host_limit: int | None = None) -> MemoryPlan:
    """The plan of ``request.parallel``, or under ``auto`` data mode's when it can run
    (:func:`data_possible`) and fits (in the onload mode :func:`choose_onload` picks for it),
    else pipeline mode's: the rule ``engine.parallel=auto`` follows at run time."""
    layout = layout_of(model)
    if request.parallel != "auto":
        return choose_onload(layout, request, limit, host_limit)
    if data_possible(request):
        plan = choose_onload(layout, replace(request, parallel="data"), limit, host_limit)
        if plan_fits(plan, limit, host_limit):
            return plan
    return choose_onload(layout, replace(request, parallel="pipeline"), limit, host_limit)


def choose_onload(model: str | ModelLayout | Any, request: MemoryRequest,
                  limit: int | Sequence[int], host_limit: int | None = None) -> MemoryPlan:
    """The plan of ``request.onload``, or under ``auto`` of the first of ``device``, ``host``,
    ``disk`` whose every worker fits ``limit`` on the device and, when given, whose workers
    together fit ``host_limit`` on the host. When none fits: the ``disk`` plan (the smallest
    device peak), so the refusal names the best that could be done."""
    layout = layout_of(model)
    if request.onload != "auto":
        return plan_memory(layout, request)
    plan = None
    for mode in ONLOAD_MODES:
        plan = plan_memory(layout, replace(request, onload=mode))
        if plan_fits(plan, limit, host_limit):
            return plan
    assert plan is not None
    return plan


def plan_fits(plan: MemoryPlan, limit: int | Sequence[int], host_limit: int | None) -> bool:
    """Device and host fit; on a CPU "device" the host copies share the same memory."""
    if plan.request.device_type == "cpu":
        limits = per_worker_limits(limit, len(plan.workers))
        return all(w.total + w.host <= cap for w, cap in zip(plan.workers, limits, strict=True))
    return plan.fits(limit) and (host_limit is None or plan.host_total <= host_limit)


def min_workers(model: str | ModelLayout | Any, request: MemoryRequest, limit: int,
                host_limit: int | None = None) -> int | None:
    """The smallest worker count whose every worker fits in ``limit`` bytes (``None``: none);
    under ``engine.parallel=auto`` counted in pipeline mode, which auto falls back to."""
    layout = layout_of(model)
    if request.parallel == "auto":
        request = replace(request, parallel="pipeline")
    for workers in range(1, layout.num_blocks + 1):
        plan = choose_parallel(layout, replace(request, workers=workers), limit, host_limit)
        if plan_fits(plan, limit, host_limit):
            return workers
    return None


def largest_fit(request: MemoryRequest, limit: int,
                candidates: Iterable[str] | None = None) -> MemoryPlan | None:
    """The known model with the most parameters that fits ``request.workers`` x ``limit``.

    Args:
        request: The run settings (its ``workers`` is the device count).
        limit: Bytes per worker.
        candidates: Aliases to consider (default: every known model).
    """
    names = list(candidates) if candidates is not None else list(
        {hub: alias for alias, (hub, _) in reversed(list(KNOWN.items()))}.values())
    best: MemoryPlan | None = None
    for alias in names:
        layout = layout_of(alias)
        if layout.num_blocks < request.workers:
            continue
        plan = choose_parallel(layout, request, limit)
        if plan.fits(limit) and (best is None or plan.params > best.params):
            best = plan
    return best
