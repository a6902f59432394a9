"""A run's memory checked before anything is loaded: the request of a validated config
(:func:`request_from_config`), the verdict (:func:`check_fits`) and refusals that name the
worst worker's peak, its components, the limit and what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from neuroal.allocation import ALLOCATIONS
from neuroal.criteria import CRITERIA
from neuroal.criteria.base import STAT_HESSIAN
from neuroal.planning.layout import ModelLayout
from neuroal.planning.memory import COMPONENTS, DTYPE_BYTES, GB, MemoryRequest, WorkerMemory
from neuroal.planning.plan import (
    MemoryPlan,
    choose_onload,
    choose_parallel,
    min_workers,
    per_worker_limits,
    plan_fits,
)
from neuroal.recovery import RECOVERY_STEPS


class MemoryBudgetError(ValueError):
    """The predicted peak of some worker exceeds its memory; raised before loading weights."""


def request_from_config(cfg: Any, dtype: str, device_type: str) -> MemoryRequest:
    """The :class:`MemoryRequest` of a validated ``PruneConfig`` and its resolved dtype."""
    defaults = ALLOCATIONS.get(cfg.allocation.name).defaults
    options = {**defaults, **cfg.allocation.options}
    evaluates = bool(cfg.eval.datasets)
    return MemoryRequest(
        workers=cfg.engine.workers, dtype=dtype, nsamples=cfg.calib.nsamples,
        seqlen=cfg.calib.seqlen, micro_batch=cfg.engine.micro_batch,
        criterion=cfg.criterion.name, allocation=cfg.allocation.name,
        search_samples=int(options.get("search_samples", 8)),
        reference_stream=str(options.get("reference_stream", "local")),
        offload_activations=cfg.engine.offload_activations, device_type=device_type,
        eval_seqlen=(cfg.eval.seqlen or cfg.calib.seqlen) if evaluates else None,
        recover=tuple(RECOVERY_STEPS.canonical(s) for s in cfg.recover.steps),
        recover_options={(RECOVERY_STEPS.canonical(k) if k in RECOVERY_STEPS else k): dict(v)
                         for k, v in cfg.recover.options.items()},
        onload=str(getattr(cfg.engine, "onload", "device")),
        prefetch=bool(getattr(cfg.engine, "prefetch", True)),
        parallel=str(getattr(cfg.engine, "parallel", "pipeline")),
        eval_windows=cfg.eval.max_windows if evaluates else None)


def check_fits(cfg: Any, model_config: Any, device_memory_bytes: int | Sequence[int], *,
               dtype: str | None = None, device_type: str = "cuda",
               layout: ModelLayout | None = None, retrain_limit: int | None = None,
               host_limit: int | None = None) -> MemoryPlan:
    """Refuse a run whose predicted per-worker peak exceeds the memory of its device.

    Args:
        cfg: The validated ``PruneConfig``.
        model_config: The model's ``PretrainedConfig`` (no weights needed).
        device_memory_bytes: Bytes available to each worker (one value, or one per worker).
        dtype: Run dtype name (default: ``cfg.model.dtype``, ``auto`` read as bfloat16).
        device_type: ``cuda`` or ``cpu`` (selects the runtime overhead).
        layout: A layout already built from ``model_config`` (saves a second skeleton).
        retrain_limit: Bytes for whole-model PERP, which runs in one process after the workers
            are released (default: the first worker's limit).
        host_limit: Host bytes all workers of this node may use (onloaded blocks, offloaded
            streams); None: not checked.

    Returns:
        The plan, when every worker fits; under ``engine.onload: auto`` its request carries
        the chosen mode, under ``engine.parallel: auto`` the final prune's mode (data mode
        when it can run and fits, :func:`~neuroal.planning.plan.choose_parallel`).

    Raises:
        MemoryBudgetError: Naming the request, the worst worker's predicted peak and its
            components, the limit and the smallest worker count that would fit; for
            ``engine.parallel: data``, data mode's worst worker and its fixes
            (:func:`data_refusal`).
    """
    run_dtype = dtype or (cfg.model.dtype if cfg.model.dtype != "auto" else "bfloat16")
    request = request_from_config(cfg, run_dtype, device_type)
    layout = layout or ModelLayout.from_config(model_config, cfg.model.name)
    if request.parallel == "data":
        refusal = data_refusal(cfg.model.name, layout, request, device_memory_bytes, host_limit)
        if refusal is not None:
            raise MemoryBudgetError(refusal)
    plan = choose_parallel(layout, request, device_memory_bytes, host_limit)
    over = plan.over(device_memory_bytes, retrain_limit)
    if not over and host_limit is not None and plan.host_total > host_limit:
        raise MemoryBudgetError(
            f"model {cfg.model.name!r} fits the device with engine.onload="
            f"{plan.request.onload} but needs {plan.host_total / GB:.1f} GB of host memory for "
            f"the onloaded blocks and offloaded streams; {host_limit / GB:.1f} GB are available. "
            "Use engine.onload=disk (blocks read from the checkpoint), more nodes, or "
            "engine.offload_activations=false. Nothing was loaded.")
    if not over:
        return plan
    limit = min(per_worker_limits(device_memory_bytes, len(plan.workers)))
    if over[-1] is plan.retrain:
        cap = limit if retrain_limit is None else retrain_limit
        raise MemoryBudgetError(_retrain_refusal(cfg.model.name, plan.retrain, cap))
    worst = max(over, key=lambda w: w.total)
    raise MemoryBudgetError(_refusal(cfg.model.name, plan, worst, limit,
                                     min_workers(layout, request, limit)))


def data_refusal(model: str, layout: ModelLayout, request: MemoryRequest,
                 limit: int | Sequence[int], host_limit: int | None = None) -> str | None:
    """Why ``engine.parallel=data`` cannot run ``request`` in ``limit`` bytes per worker (None:
    it fits): data mode's worst worker against the limit (in the onload mode that comes
    closest under ``engine.onload: auto``), and what would fit instead: pipeline mode, more
    workers, a smaller micro-batch, onloading."""
    data = replace(request, parallel="data")
    plan = choose_onload(layout, data, limit, host_limit)
    if plan_fits(plan, limit, host_limit):
        return None
    limits = per_worker_limits(limit, len(plan.workers))
    worst, cap = max(zip(plan.workers, limits, strict=True), key=lambda p: p[0].total - p[1])
    pipeline = choose_onload(layout, replace(request, parallel="pipeline"), limit, host_limit)
    fixes = ["engine.parallel=pipeline (" + (
        f"fits: peak {pipeline.peak / GB:.1f} GB per worker)" if plan_fits(
            pipeline, limit, host_limit) else "does not fit either)")]
    more = min_workers(layout, data, min(limits), host_limit)
    if more is not None and more != request.workers:
        fixes.append(f"another worker count (engine.workers={more} is the smallest that fits "
                     "in data mode)")
    if request.micro_batch > 1:
        fixes.append(f"a smaller engine.micro_batch (now {request.micro_batch})")
    if request.onload == "device":
        fixes.append("engine.onload=host or disk (blocks off the device)")
    if worst.total <= cap:  # the device fits, the host does not
        need = (f"all workers need {plan.host_total / GB:.1f} GB of host memory (onloaded "
                f"blocks, offloaded streams), the host limit is {(host_limit or 0) / GB:.1f} GB")
    else:
        need = (f"worker {worst.rank} needs {worst.total / GB:.1f} GB ({worst.describe()}), "
                f"the limit is {cap / GB:.1f} GB per worker")
    return (f"model {model!r} does not fit with engine.parallel=data ({data.describe()}): "
            f"{need}. In data mode every worker also hosts a guest block and the statistics "
            "of the linears it solves. Use " + "; or ".join(fixes) + ". Nothing was loaded.")


def _retrain_refusal(model: str, row: WorkerMemory, limit: int) -> str:
    parts = ", ".join(f"{name.replace('_', ' ')} {getattr(row, name) / GB:.1f} GB"
                      for name in COMPONENTS)
    return (f"model {model!r} does not fit for whole-model PERP retraining, which holds the whole "
            f"model in one process after the prune: predicted peak {row.total / GB:.1f} GB "
            f"({parts}), limit {limit / GB:.1f} GB. Enable gradient checkpointing "
            "(recover.<step>.gradient_checkpointing=true), lower recover.<step>.batch_size or "
            "calib.seqlen, or drop the step from recover.steps (perp-reconstruct works block by "
            "block). Nothing was loaded.")


def _refusal(model: str, plan: MemoryPlan, worst: WorkerMemory, limit: int,
             fewest: int | None) -> str:
    request = plan.request
    if fewest is not None:
        fix = (f"the smallest worker count that fits is {fewest} (engine.workers={fewest}, one "
               f"device of {limit / GB:.1f} GB each)")
    else:
        fix = statistics_refusal(plan, limit) or (
            f"no worker count fits (even one block per worker exceeds {limit / GB:.1f} GB); "
            f"{_other_fixes(request)}")
    return (f"model {model!r} does not fit: {request.describe()} need a predicted peak of "
            f"{worst.total / GB:.1f} GB on {worst.describe()}; the limit is {limit / GB:.1f} GB "
            f"per worker. {fix[0].upper()}{fix[1:]}. Nothing was loaded.")


def statistics_refusal(plan: MemoryPlan, limit: int) -> str | None:
    """What to change when one block's calibration statistics alone exceed a worker's memory
    (SparseGPT's fp32 Hessians, one ``cols x cols`` per prunable linear and every expert's
    matrix: about 111 GB per DeepSeek-V3 MoE block); None when they fit.

    Workers, onloading, offloading and the micro-batch do not shrink this term, and neuroal does
    not collect experts' statistics in groups over several passes, so the run is refused."""
    worst = max(plan.workers, key=lambda w: w.statistics)
    if worst.statistics + worst.overhead <= limit:
        return None
    light = [n for n in CRITERIA.names() if STAT_HESSIAN not in CRITERIA.get(n).needs]
    return (f"the calibration statistics of one block alone (worker {worst.rank}, blocks "
            f"{worst.start}-{worst.stop - 1}) need {worst.statistics / GB:.1f} GB with criterion "
            f"{plan.request.criterion} (fp32, every prunable linear and expert matrix of the "
            f"block), more than the {limit / GB:.1f} GB of a worker; no worker count, onloading, "
            "activation offloading or micro-batch lowers them, and neuroal does not collect "
            "experts' statistics in groups. Use a criterion with vector statistics or none "
            f"({', '.join(light)}), or devices well above "
            f"{(worst.statistics + worst.overhead) / GB:.0f} GB (the statistics alone)")


def _other_fixes(request: MemoryRequest) -> str:
    """The settings that lower the peak other than the worker count."""
    fixes = ["shrink engine.micro_batch, calib.nsamples or calib.seqlen"]
    if DTYPE_BYTES[request.dtype] > 2:
        fixes.append("use model.dtype=bfloat16")
    if not request.offload_activations and request.device_type != "cpu":
        fixes.append("set engine.offload_activations=true")
    if request.onload in ("device", "auto"):
        fixes.append("set engine.onload=host or disk (weights off the device)")
    return ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1]
