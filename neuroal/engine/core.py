"""What every executor shares: worker specs, result merges, the block log line,
perplexity chunks and the statistics of the search's dense reference. Per-worker operations
shared by the executors (the dense reference, forwards over owned blocks, block restore, worker
facts) are :class:`~neuroal.engine.worker.Worker` methods.

Executors only move data and calls between processes (in-process, Ray actors, torch.distributed
ranks); the computations are :class:`~neuroal.engine.worker.Worker` methods and the small pure
helpers here, so the three cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import torch

from neuroal.criteria.base import STAT_SQ_NORM
from neuroal.engine.block_pruning import stat_needs
from neuroal.engine.onload import resolved_onload
from neuroal.models.loading import ModelSource
from neuroal.outputs.safety import spill_folder
from neuroal.runtime.jobs import BlockReport, WorkerSpec
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")


def worker_template(cfg: Any, source: ModelSource, num_blocks: int, device: str,
                    dtype: str) -> WorkerSpec:
    """What every worker of a run shares, read from the validated config (``engine.*``,
    ``model.trust_remote_code``), its slice left empty; each executor fills in the slices."""
    eng = cfg.engine
    return WorkerSpec(source, 0, 0, num_blocks, device, dtype, eng.micro_batch,
                      eng.offload_activations, cfg.model.trust_remote_code,
                      onload=resolved_onload(eng.onload), prefetch=eng.prefetch,
                      targets=tuple(cfg.targets), ignore=tuple(cfg.ignore),
                      spill_dir=spill_dir(cfg))


def spill_dir(cfg: Any) -> str | None:
    """Onloading's spill folder: ``<output.dir>.neuroal-tmp/onload``, None without an output
    (the system temp folder then)."""
    out = getattr(cfg.output, "dir", None)
    return str(spill_folder(out)) if out else None


def slice_specs(template: WorkerSpec, slices: Sequence[tuple[int, int]],
                devices: Sequence[str] | None = None) -> list[WorkerSpec]:
    """One :class:`WorkerSpec` per slice ``[a, b)``, rank = slice index, everything else from
    ``template``; ``devices``: one per slice (default: the template's for all)."""
    devs = list(devices) if devices else [template.device] * len(slices)
    return [replace(template, start=a, stop=b, rank=r, device=devs[r])
            for r, (a, b) in enumerate(slices)]


def worker_specs(source: ModelSource, slices: Sequence[tuple[int, int]], num_blocks: int,
                 devices: Sequence[str], dtype: str, micro_batch: int,
                 offload_activations: bool = False, trust_remote_code: bool = False, *,
                 onload: str = "device", prefetch: bool = True,
                 selection: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
                 spill_dir: str | None = None) -> list[WorkerSpec]:
    """One :class:`WorkerSpec` per slice; ``devices``: one for all or one per slice;
    ``selection``: the ``(targets, ignore)`` patterns of the linears to prune."""
    template = WorkerSpec(source, 0, 0, num_blocks, devices[0], dtype, micro_batch,
                          offload_activations, trust_remote_code, onload=onload,
                          prefetch=prefetch, targets=tuple(selection[0]),
                          ignore=tuple(selection[1]), spill_dir=spill_dir)
    return slice_specs(template, slices, list(devices) * len(slices) if len(devices) == 1
                       else devices)


def merge_blocks(parts: Iterable[Mapping[int, T]], num_blocks: int) -> list[T]:
    """Per-worker ``{block: value}`` parts -> one value per block, in block order.

    Raises:
        KeyError: A block is missing from every part (an executor bug).
    """
    merged: dict[int, T] = {}
    for part in parts:
        merged.update(part)
    return [merged[b] for b in range(num_blocks)]


def merge_parts(parts: Iterable[Mapping[int, T]]) -> dict[int, T]:
    """Per-worker ``{block: value}`` parts -> one dict (the blocks some worker computed)."""
    merged: dict[int, T] = {}
    for part in parts:
        merged.update(part)
    return merged


def log_block(report: BlockReport, num_blocks: int) -> None:
    """The one summary line per pruned block (style.md rule 9)."""
    log.info("block %d/%d  target %.3f  achieved %.3f  %.1f s", report.index + 1, num_blocks,
             report.target, report.achieved, report.seconds)


def chunks(windows: torch.Tensor, micro_batch: int) -> list[torch.Tensor]:
    """Perplexity windows ``(k, T)`` in micro-batch chunks (the order of every executor)."""
    return [windows[i : i + micro_batch] for i in range(0, windows.shape[0], micro_batch)]


def paired_chunks(inputs: torch.Tensor, targets: torch.Tensor,
                  micro_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero-shot ``(inputs, targets)`` ``(B, T)`` in the same micro-batch chunks as
    :func:`chunks`."""
    return list(zip(chunks(inputs, micro_batch), chunks(targets, micro_batch), strict=True))


def cat_pairs(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """Per-chunk ``(log-probabilities, argmax flags)`` joined along the batch."""
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def reference_needs(criterion: str, alignment_stat: str = STAT_SQ_NORM) -> frozenset[str]:
    """Statistics of the dense reference of a search: input norms, the alignment statistic
    (``sq_norm``, or SparseGPT's window-weighted one) plus the criterion's."""
    return stat_needs(criterion, alignment_stat)
