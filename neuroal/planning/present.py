"""What ``neuroal plan`` prints: the memory summary (:func:`summarize`, :func:`format_summary`)
and the predicted wall time per phase (:func:`format_prediction`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from neuroal.planning.checks import data_refusal, statistics_refusal
from neuroal.planning.layout import ModelLayout, layout_of
from neuroal.planning.memory import GB, MemoryRequest
from neuroal.planning.plan import (
    choose_onload,
    choose_parallel,
    data_possible,
    largest_fit,
    min_workers,
    plan_fits,
)
from neuroal.planning.walltime import PHASES, Throughput, TimeRequest


def runnable_modes(request: MemoryRequest) -> list[str]:
    """The final prune's modes ``request`` can run in, memory apart: pipeline, and data mode
    where the engine allows it (or where it was asked for)."""
    data = data_possible(request) or request.parallel == "data"
    return ["pipeline", "data"] if data else ["pipeline"]


def fitting_modes(layout: ModelLayout, request: MemoryRequest, limit: int,
                  host_limit: int | None = None) -> tuple[list[str], str | None]:
    """The runnable modes (:func:`runnable_modes`) whose every worker fits, and data mode's
    refusal when memory alone rules it out (None otherwise)."""
    modes = ["pipeline"] if plan_fits(choose_onload(
        layout, replace(request, parallel="pipeline"), limit, host_limit), limit, host_limit) else []
    refusal = None
    if "data" in runnable_modes(request):
        refusal = data_refusal(layout.name, layout, request, limit, host_limit)
        modes += ["data"] if refusal is None else []
    return modes, refusal


def summarize(model: str | ModelLayout | Any, request: MemoryRequest, limit: int,
              host_limit: int | None = None) -> dict[str, Any]:
    """The plan (``onload: auto``: of the chosen mode; ``parallel: auto``: data mode where it
    fits, :func:`~neuroal.planning.plan.choose_parallel`), the verdict, the modes of the final
    prune that fit (``parallel_fits``) and why data mode does not (``data_refusal``), the host
    memory the run needs, the largest known model that fits and the fewest workers."""
    layout = layout_of(model)
    plan = choose_parallel(layout, request, limit, host_limit)
    largest = largest_fit(request, limit)
    fits = plan_fits(plan, limit, host_limit)
    modes, refusal = fitting_modes(layout, request, limit, host_limit)
    return {
        "plan": plan.to_dict(),
        "limit_bytes": limit,
        "host_limit_bytes": host_limit,
        "onload": plan.request.onload,
        "parallel": plan.request.parallel,
        "parallel_runnable": runnable_modes(request),
        "parallel_fits": modes,
        "data_refusal": refusal if request.parallel != "pipeline" else None,
        "fits": fits,
        "min_workers": min_workers(layout, request, limit, host_limit),
        "statistics_refusal": statistics_refusal(plan, limit),
        "largest_fit": None if largest is None else {"model": largest.model,
                                                      "params": largest.params,
                                                      "peak_bytes": largest.peak},
        "table": plan.table(),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable lines for :func:`summarize`'s result."""
    plan, limit = summary["plan"], summary["limit_bytes"]
    req = plan["request"]
    peak = plan["peak_bytes"]
    lines = [f"{plan['model']}: {plan['params'] / 1e9:.2f} B parameters, {plan['num_blocks']} "
             f"blocks | {MemoryRequest(**req).describe()} | device {req['device_type']}",
             "", summary["table"], ""]
    verdict = "fits" if summary["fits"] else "does NOT fit"
    lines.append(f"verdict: {verdict}: peak {peak / GB:.2f} GB per worker vs {limit / GB:.2f} GB "
                 f"({(limit - peak) / GB:+.2f} GB to spare) with engine.onload={req['onload']}"
                 f", engine.parallel={req.get('parallel', 'pipeline')}")
    if summary.get("data_refusal"):
        label = "why" if req.get("parallel") == "data" else "data mode ruled out by memory"
        lines.append(f"{label}: {summary['data_refusal']}")
    host_peak, host_total = plan.get("host_peak_bytes", 0), plan.get("host_total_bytes", 0)
    if host_total:
        host_limit = summary.get("host_limit_bytes")
        lines.append(f"host memory needed: {host_peak / GB:.2f} GB per worker, "
                     f"{host_total / GB:.2f} GB for all {req['workers']} worker(s) on one node "
                     "(onloaded blocks and offloaded streams, beyond the runtime)"
                     + (f"; host limit {host_limit / GB:.1f} GB" if host_limit else ""))
    if plan.get("retrain"):
        need = plan["retrain"]["total"]
        lines.append(f"whole-model PERP (one process, after the prune): {need / GB:.2f} GB vs "
                     f"{limit / GB:.2f} GB ({(limit - need) / GB:+.2f} GB to spare)")
    largest = summary["largest_fit"]
    lines.append(f"largest known model that fits on {req['workers']} x {limit / GB:.0f} GB: "
                 + (f"{largest['model']} ({largest['params'] / 1e9:.2f} B, peak "
                    f"{largest['peak_bytes'] / GB:.1f} GB)" if largest else "none"))
    if summary.get("statistics_refusal"):
        lines.append(f"why: {summary['statistics_refusal']}")
    fewest = summary["min_workers"]
    lines.append(f"fewest workers for {plan['model']} on {limit / GB:.0f} GB devices: "
                 + (str(fewest) if fewest else "none (even one block per worker is too large)"))
    return "\n".join(lines)


def format_seconds(seconds: float) -> str:
    """``42 s``, ``12.5 min``, ``3.2 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_prediction(prediction: Mapping[str, float], req: TimeRequest, tp: Throughput) -> str:
    """Lines for ``neuroal plan``: one per phase, then the total."""
    head = (f"predicted wall time on {req.workers} x {tp.name} ({tp.description}), "
            f"engine.parallel={req.mode}, executor {req.executor}, transport {req.transport}:")
    lines = [head] + [f"  {p:<11}{format_seconds(prediction[p]):>10}" for p in PHASES]
    lines.append(f"  {'total':<11}{format_seconds(prediction['total']):>10}")
    return "\n".join(lines)
