"""The checks of a run before any weight is loaded, on the model's meta skeleton and the
devices' free memory and disk.

What lives here: N:M divisibility and worker count (:func:`check_shape`), the layer selection
and the target of the pruned linears (:func:`check_selection`, :func:`plan_target`), window
lengths against the model's positions (:func:`check_positions`), PERP against
mixture-of-experts models (:func:`check_experts`), the memory plan (:func:`memory_choice`,
which also resolves ``engine.onload: auto`` and says whether data mode fits;
:func:`check_memory` for the onload mode alone) and the bytes the run still writes
(:func:`disk_needs`). Each refusal names the value, what was expected and how to fix it.

What it may import: every floor below the pipeline (planning is the highest). The run's config
arrives as an argument (its type only under ``TYPE_CHECKING``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from neuroal.allocation import ModelShape
from neuroal.config.inputs import position_errors
from neuroal.engine.onload import resolved_onload
from neuroal.engine.preflight import disk_needed, folder_bytes
from neuroal.models.adapter import ModelAdapter
from neuroal.models.loading import ModelSource
from neuroal.models.moe import has_experts
from neuroal.models.selection import LayerSelection
from neuroal.outputs.checkpoint import state_bytes
from neuroal.outputs.export import OutputDir, export_dtype
from neuroal.planning.checks import check_fits
from neuroal.planning.layout import ModelLayout
from neuroal.planning.memory import parse_bytes
from neuroal.planning.plan import MemoryPlan, choose_onload, data_possible
from neuroal.recovery import REFINERS
from neuroal.recovery.perp import numel, total_parameters
from neuroal.runtime.errors import ConfigError
from neuroal.runtime.logging import get_logger
from neuroal.runtime.process import host_available

if TYPE_CHECKING:
    from neuroal.config.build import PruneConfig

log = get_logger(__name__)


def check_shape(cfg: PruneConfig, shape: ModelShape) -> None:
    """N:M divisibility and worker count against the model (before loading weights)."""
    errors = []
    nm = cfg.nm
    if nm is not None:
        for b, blk in enumerate(shape.blocks):
            for name, (_rows, cols) in blk.items():
                if cols % nm.m:
                    errors.append(f"pattern {cfg.pattern}: block {b} {name} has {cols} input "
                                  f"columns, not divisible by M={nm.m}; choose an M dividing "
                                  "every layer's input size")
                    break
            if errors:
                break
    if cfg.engine.workers > shape.num_blocks:
        errors.append(f"engine.workers={cfg.engine.workers} exceeds the model's "
                      f"{shape.num_blocks} blocks")
    if errors:
        raise ConfigError(errors)


def selection_of(cfg: PruneConfig) -> LayerSelection:
    """The layer selection of ``cfg`` (``targets`` / ``ignore``)."""
    return LayerSelection(tuple(cfg.targets), tuple(cfg.ignore))


def check_selection(cfg: PruneConfig, adapter: ModelAdapter, shape: ModelShape) -> dict[str, Any]:
    """The selection must leave something to prune, and ``sparsity_scope: model`` a reachable
    target; patterns that match nothing are warned about (a typo keeps a layer pruned).
    Returns the selection's record for ``report.json``."""
    record = adapter.selection_report()
    if adapter.selection.everything:
        return record
    for pattern in record["unused_patterns"]:
        log.warning("layer selection: pattern %r matches no prunable linear of this model",
                    pattern)
    if shape.total_numel() == 0:
        raise ConfigError([f"targets={list(cfg.targets)} / ignore={list(cfg.ignore)} leave no "
                           "linear to prune; loosen the patterns"])
    target = plan_target(cfg, shape, record)
    if not 0.0 < target < max(cfg.allocation.clip):
        raise ConfigError([f"sparsity_scope=model: a model-wide {cfg.target_sparsity:g} with "
                           f"{record['ignored_numel']:,} weights kept dense needs "
                           f"{target:.3f} on the pruned linears, above allocation.clip's "
                           f"maximum {max(cfg.allocation.clip):g}; lower the sparsity, ignore "
                           "fewer linears or use sparsity_scope=targeted"])
    log.info("layer selection: %d linears stay dense (%s of the block weights); pruned at %.4f",
             len(record["ignored"]), f"{record['ignored_numel'] / adapter.all_linears_numel():.1%}",
             target)
    return record


def plan_target(cfg: PruneConfig, shape: ModelShape, selection: dict[str, Any] | None) -> float:
    """The target the allocation plans for the pruned linears: the global target, or under
    ``sparsity_scope: model`` the one that makes the mean over every block linear (the
    ignored ones dense) equal to it."""
    ignored = (selection or {}).get("ignored_numel", 0)
    if cfg.sparsity_scope != "model" or not ignored:
        return cfg.target_sparsity
    targeted = shape.total_numel()
    return cfg.target_sparsity * (targeted + ignored) / targeted


def check_positions(cfg: PruneConfig, config: Any) -> None:
    """Calibration and evaluation windows must fit the model's ``max_position_embeddings``."""
    seqlens = {"calib.seqlen": cfg.calib.seqlen}
    if cfg.eval.datasets and cfg.eval.seqlen:
        seqlens["eval.seqlen"] = cfg.eval.seqlen  # unset: evaluation uses calib.seqlen
    errors = position_errors(config, seqlens, cfg.model.name)
    if errors:
        raise ConfigError(errors)


def check_experts(cfg: PruneConfig, adapter: ModelAdapter) -> None:
    """PERP (block reconstruction, whole-model retraining) wraps ``nn.Linear`` modules; MoE
    experts are views into fused 3-D parameters (neuroal.models.moe): refuse before loading."""
    perp = [step for step in cfg.recover.steps if step not in REFINERS]
    if perp and any(has_experts(block) for block in adapter.blocks):
        raise ConfigError([f"recover.steps {perp}: PERP does not support mixture-of-experts "
                           f"models (model_type {adapter.model_type!r}, fused expert "
                           "parameters); use the mask refiners "
                           f"({', '.join(REFINERS.names())}) or no recovery"])


class MemoryChoice(NamedTuple):
    """What the memory plan decided for the run (:func:`memory_choice`).

    Attributes:
        onload: The onload mode to run with (``engine.onload: auto``: the planner's choice).
        data_fits: Whether data mode's final prune fits the devices (``engine.parallel:
            auto`` picks data mode only then; True when no budget was known to check).
    """

    onload: str
    data_fits: bool = True


def check_memory(cfg: PruneConfig, config: Any, adapter: ModelAdapter, device: torch.device,
                 dtype: torch.dtype,
                 budgets: tuple[int | None, int | None] = (None, None)) -> str:
    """:func:`memory_choice`'s onload mode (for callers that run no final prune)."""
    return memory_choice(cfg, config, adapter, device, dtype, budgets).onload


def memory_choice(cfg: PruneConfig, config: Any, adapter: ModelAdapter, device: torch.device,
                  dtype: torch.dtype,
                  budgets: tuple[int | None, int | None] = (None, None)) -> MemoryChoice:
    """Refuse before loading when a worker's predicted peak exceeds its memory (engine.md §7),
    in the final prune's mode: ``engine.parallel: data`` that does not fit is refused
    (:func:`~neuroal.planning.checks.data_refusal`), ``auto`` learns whether data mode fits;
    returns the onload mode to run with and that verdict.

    Checked when ``engine.memory_limit`` is set (bytes per worker) or the device is CUDA: its
    free memory, shared equally by the workers the local executor places on it; under
    onloading on CUDA the node's available host memory bounds the blocks kept there.
    ``budgets``: the free device bytes and host bytes per worker the workers reported in
    preflight (:func:`~neuroal.engine.preflight.worker_budgets`; a Ray driver may have no GPU).
    """
    device_free, host_free = budgets
    shared = cfg.engine.workers if cfg.engine.executor == "local" and \
        len(cfg.engine.devices) <= 1 else 1
    if cfg.engine.memory_limit is not None:
        budget = parse_bytes(cfg.engine.memory_limit)
    elif device_free is not None:
        budget = device_free
    elif device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // shared
    else:
        return MemoryChoice(resolved_onload(cfg.engine.onload))
    # whole-model PERP runs alone after the workers are released: the shared device is its own
    layout = ModelLayout.from_adapter(adapter, cfg.model.name)
    plan = check_fits(cfg, config, budget, dtype=str(dtype).removeprefix("torch."),
                      device_type=device.type, layout=layout,
                      retrain_limit=budget * shared,
                      host_limit=(host_free if host_free is not None else host_available())
                      if device.type == "cuda" else None)
    log.info("memory plan: peak %.1f GB per worker (worker %d), limit %.1f GB, onload %s, "
             "%s mode%s", plan.peak / 1e9, plan.peak_worker.rank, budget / 1e9,
             plan.request.onload, plan.request.parallel,
             f", host {plan.host_total / 1e9:.1f} GB" if plan.host_total else "")
    data_fits = cfg.engine.parallel != "auto" or plan.request.parallel == "data"
    if not data_fits and data_possible(plan.request):
        log.info("engine.parallel=auto: the final prune runs in pipeline mode; data mode's "
                 "peak of %.1f GB per worker (a guest block, solver statistics) exceeds the "
                 "%.1f GB limit", data_peak(layout, plan, cfg.engine.onload, budget) / 1e9,
                 budget / 1e9)
    return MemoryChoice(plan.request.onload, data_fits)


def data_peak(layout: ModelLayout, plan: MemoryPlan, onload: str, budget: int) -> int:
    """Data mode's predicted peak per worker for ``plan``'s request with ``engine.onload``
    ``onload`` (``auto``: the mode chosen for data mode), for the message of a mode ruled
    out by memory."""
    request = replace(plan.request, parallel="data", onload=onload)
    return choose_onload(layout, request, budget).peak


def disk_needs(cfg: PruneConfig, adapter: ModelAdapter, config: Any, source: ModelSource,
               dtype: torch.dtype, output: OutputDir | None) -> tuple[int, str]:
    """Bytes the run still writes at the output (resume state + export) and their breakdown,
    from the meta skeleton's parameter counts (:func:`~neuroal.engine.preflight.disk_needed`)."""
    if output is None:
        return 0, ""
    total = total_parameters(adapter.model)
    blocks = sum(numel(p) for block in adapter.blocks for p in block.parameters())
    export = total * getattr(torch, export_dtype(cfg, source, config, dtype)).itemsize \
        if cfg.output.save_model else 0
    state = state_bytes(blocks, dtype.itemsize)
    existing = folder_bytes(output.state) if cfg.output.resume else 0
    return disk_needed(export, state, existing)
