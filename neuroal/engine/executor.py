"""The executor protocol and the in-process ``LocalExecutor`` (engine.md §3).

Everything above the executor (pipeline, policies, search) is written against
:class:`Executor`; the local executor chains its workers in one process, which is what tests,
laptops and single-GPU runs use. One worker and several workers give bit-identical masks because
every worker runs the same micro-batches through the same blocks in the same order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from neuroal.allocation.neuroal_math import total_alignment
from neuroal.allocation.plan import SparsityPlan
from neuroal.engine.core import (
    cat_pairs,
    chunks,
    merge_blocks,
    merge_parts,
    paired_chunks,
    reference_needs,
    worker_specs,
)
from neuroal.engine.data_parallel import prune_in_threads, resolve_parallel
from neuroal.engine.data_passes import pass_mode, passes_in_threads, weights_in_threads
from neuroal.engine.worker import Worker, peak_memory_bytes
from neuroal.models.loading import ModelSource
from neuroal.runtime.jobs import BlockAlignment, BlockReport, CandidateJob, PruneJob
from neuroal.runtime.logging import get_logger, progress

log = get_logger(__name__)


def split_blocks(num_blocks: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous slices ``[a, b)``: ``ceil(L / K)`` blocks each, the last one shorter.

    Raises:
        ValueError: More workers than blocks.
    """
    if workers > num_blocks:
        raise ValueError(f"engine.workers={workers} exceeds the model's {num_blocks} blocks; "
                         f"use at most {num_blocks} workers")
    size = -(-num_blocks // workers)
    bounds = [(a, min(a + size, num_blocks)) for a in range(0, num_blocks, size)]
    while len(bounds) < workers:  # e.g. L=4, K=3 -> sizes 2,2 -> split the largest again
        i = max(range(len(bounds)), key=lambda k: bounds[k][1] - bounds[k][0])
        a, b = bounds[i]
        mid = a + (b - a) // 2
        bounds[i : i + 1] = [(a, mid), (mid, b)]
    return bounds



@dataclass
class PhaseUse:
    """Wall seconds of a phase and every worker's busy seconds inside it."""

    wall: float = 0.0
    busy: list[float] = field(default_factory=list)

    @property
    def utilisation(self) -> float:
        """``sum(busy) / (workers * wall)``: 1.0 when every worker computed all the time."""
        if self.wall <= 0 or not self.busy:
            return 0.0
        return sum(self.busy) / (len(self.busy) * self.wall)


class BusyMeter:
    """Pipeline utilisation per phase (engine.md §4), for any executor.

    Args:
        read: Returns every worker's cumulative ``busy_seconds`` (in-process or remote).
    """

    def __init__(self, read: Callable[[], list[float]]) -> None:
        self._read = read
        self.phases: dict[str, PhaseUse] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Accumulate the wall time of the body and the workers' busy time during it."""
        before, t0 = self._read(), time.perf_counter()
        yield  # on an exception nothing is recorded
        wall = time.perf_counter() - t0
        after = self._read()
        use = self.phases.setdefault(phase, PhaseUse(busy=[0.0] * len(after)))
        use.wall += wall
        use.busy = [u + a - b for u, a, b in zip(use.busy, after, before, strict=True)]

    def report(self) -> dict[str, dict[str, Any]]:
        """``phase -> {wall, busy (per worker), utilisation}``."""
        return {name: {"wall": u.wall, "busy": list(u.busy), "utilisation": u.utilisation}
                for name, u in self.phases.items()}


OnResult = Callable[[int, list[BlockAlignment]], None]
"""Called with (candidate index, its per-block result) as soon as a candidate finishes (resume
checkpoints every finished candidate, engine.md §8)."""

Bound = Callable[[int], "tuple[float, bool] | None"]
"""Given a candidate index, the best complete score known so far and whether a tie already
loses (the best is earlier in grid order), or None: the candidate may stop as soon as its
partial sum crosses it (exact early stopping). A stopped candidate's result
holds only the blocks evaluated (fewer than ``num_blocks``)."""


def prefix_blocks(per_block: Mapping[int, BlockAlignment], num_blocks: int) -> list[BlockAlignment]:
    """The contiguous evaluated blocks ``0, 1, ...`` of one candidate (all of them unless it
    was stopped early)."""
    out = []
    for b in range(num_blocks):
        if b not in per_block:
            break
        out.append(per_block[b])
    return out


class Executor(Protocol):
    """What the pipeline needs from an executor."""

    data_fits: bool  # the memory plan's verdict on data mode, set before the final prune

    def num_blocks(self) -> int: ...

    def run_final_prune(self, plan: SparsityPlan, job: PruneJob,
                        ids: torch.Tensor) -> list[BlockReport]: ...

    def window_nll(self, windows: torch.Tensor) -> torch.Tensor: ...

    def token_logprobs(self, inputs: torch.Tensor,
                       targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def evaluate_candidates(self, ids: torch.Tensor,
                            candidates: Sequence[Sequence[Mapping[str, Any]]],
                            job: CandidateJob, reference_stream: str = "local",
                            on_result: OnResult | None = None, bound: Bound | None = None,
                            ) -> list[list[BlockAlignment]]: ...

    def dense_block_metrics(self, ids: torch.Tensor, fn: Callable[..., Any],
                            needs: frozenset[str]) -> list[Any]: ...

    def weight_metrics(self, fn: Callable[[torch.Tensor], Any]) -> list[dict[str, Any]]: ...

    def last_logits(self, ids: torch.Tensor) -> torch.Tensor: ...

    def logits(self, ids: torch.Tensor) -> torch.Tensor: ...

    def masks(self) -> dict[str, torch.Tensor]: ...

    def block_prefix(self, index: int) -> str: ...

    def worker_info(self) -> list[dict[str, Any]]: ...

    def utilisation(self) -> dict[str, dict[str, Any]]: ...

    def write_shards(self, directory: str, dtype: str, max_bytes: int) -> list[dict[str, Any]]: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """All workers in this process, called in sequence.

    Args:
        source: The resolved model.
        num_blocks: Decoder blocks of the model.
        workers: Number of workers (slices).
        devices: One device for all workers, or one per worker.
        dtype: Run dtype name (``float32``, ``bfloat16``, ``float16``).
        micro_batch: Sequences per forward call (identical on every worker).
        offload_activations: Keep streams in host memory.
        trust_remote_code: Passed to transformers.
        onload: Where blocks live between uses: ``device``, ``host`` or ``disk`` (sequential
            onloading, :mod:`neuroal.engine.onload`).
        prefetch: Fetch the next block while one is in use (onloading only).
        selection: ``(targets, ignore)`` patterns of the linears to prune (all by default).
        parallel: ``engine.parallel`` of the final prune (``auto``, ``pipeline``, ``data``:
            one thread per worker, :mod:`neuroal.engine.data_parallel`) and of the other passes
            (:mod:`neuroal.engine.data_passes`); after a prune, :attr:`parallel` holds the
            mode that ran.
        spill_dir: Onloading ``disk``'s spill folder (None: the system temp folder).
    """

    data_fits: bool = True  # the memory plan's verdict on data mode (engine.parallel=auto)

    def __init__(self, source: ModelSource, num_blocks: int, workers: int,
                 devices: Sequence[str], dtype: str, micro_batch: int,
                 offload_activations: bool = False, trust_remote_code: bool = False, *,
                 onload: str = "device", prefetch: bool = True,
                 selection: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
                 parallel: str = "auto", spill_dir: str | None = None) -> None:
        self._requested = parallel
        self.parallel = parallel
        self.specs = worker_specs(source, split_blocks(num_blocks, workers), num_blocks, devices,
                                  dtype, micro_batch, offload_activations, trust_remote_code,
                                  onload=onload, prefetch=prefetch, selection=selection,
                                  spill_dir=spill_dir)
        self.workers = [Worker(s) for s in progress(self.specs, "loading slices", unit="slice")]
        self._num_blocks = num_blocks
        self.meter = BusyMeter(lambda: [w.busy_seconds for w in self.workers])
        for w in self.workers:
            log.info("worker %d owns blocks [%d, %d) on %s", w.spec.rank, w.spec.start,
                     w.spec.stop, w.spec.device)

    def num_blocks(self) -> int:
        return self._num_blocks

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.workers[0].embed(ids)

    def _data_pass(self, sequences: int | None) -> bool:
        """Whether a pass over ``sequences`` sequences (None: a data-free pass) runs
        data-parallel (:func:`pass_mode`)."""
        return pass_mode(self._requested, self.workers[0], len(self.workers), sequences,
                         self.data_fits) == "data"

    def run_final_prune(self, plan: SparsityPlan, job: PruneJob,
                        ids: torch.Tensor) -> list[BlockReport]:
        """Embed the calibration windows ``(N, T)`` and prune every slice in order."""
        reports: list[BlockReport] = []
        self.parallel = resolve_parallel(self._requested, len(self.workers), fits=self.data_fits)
        if self.parallel == "data":
            with self.meter("prune"):
                return prune_in_threads(self.workers, [plan.block(b) for b in
                                                       range(self._num_blocks)], job, ids)
        with self.meter("prune"):
            stream = self._embed(ids)
            owner = [w for w in self.workers for _ in w.blocks]
            for b in progress(range(self._num_blocks), "pruning blocks", total=self._num_blocks,
                              unit="block"):
                if not owner[b].spec.offload_activations:
                    stream = stream.to(owner[b].device)
                stream, report = owner[b].prune_one(b, stream, plan.block(b), job)
                reports.append(report)
        return reports

    def evaluate_candidates(self, ids: torch.Tensor,
                            candidates: Sequence[Sequence[Mapping[str, Any]]],
                            job: CandidateJob, reference_stream: str = "local",
                            on_result: OnResult | None = None, bound: Bound | None = None,
                            ) -> list[list[BlockAlignment]]:
        """Alignment terms of each candidate plan (``candidates[c][b][name]`` = ratio).

        Candidates are independent: the local executor runs them one after another over the
        shared embeddings of the search windows ``ids`` ``(n_s, T)``; the result is keyed by
        candidate, then block. Dense statistics identical for every candidate are computed
        once: block 0's (``local``, exact) or every block's from the dense model (``global``).
        """
        results = []
        with self.meter("search"):
            embedded = self._embed(ids)
            if self._data_pass(int(ids.shape[0])):
                reference = merge_parts(passes_in_threads(
                    self.workers, "dense_reference", ids,
                    reference_needs(job.criterion, job.alignment_stat), reference_stream))
            else:
                reference = self.dense_reference(embedded, job, reference_stream)
            for ratios in candidates:  # progress with scores: neuroal.allocation.search.CandidateProgress
                stream: torch.Tensor | None = embedded
                per_block: dict[int, BlockAlignment] = {}
                best = bound(len(results)) if bound is not None else None
                for w in self.workers:
                    if stream is None:
                        break
                    carried = total_alignment([per_block[b].na for b in sorted(per_block)])
                    stream, part = w.eval_candidate(
                        stream, {b: ratios[b] for b in w.blocks}, job, reference,
                        None if best is None else (best[0], best[1], carried))
                    per_block.update(part)
                results.append(prefix_blocks(per_block, self._num_blocks))
                if on_result is not None:
                    on_result(len(results) - 1, results[-1])
        return results

    def dense_reference(self, embedded: torch.Tensor, job: CandidateJob,
                        reference_stream: str) -> dict[int, Any]:
        """Candidate-independent dense statistics, keyed by block (neuroal.md §B4, §B5)."""
        needs = reference_needs(job.criterion, job.alignment_stat)
        workers = self.workers[:1] if reference_stream == "local" else self.workers
        stream, reference = embedded, {}
        for w in workers:
            stream, part = w.dense_reference(stream, needs, reference_stream)
            reference.update(part)
        return reference

    def dense_block_metrics(self, ids: torch.Tensor, fn: Callable[..., Any],
                            needs: frozenset[str]) -> list[Any]:
        """``fn(weights, stats)`` per block over one dense pass of ``ids`` ``(N, T)``."""
        if self._data_pass(int(ids.shape[0])):
            return merge_blocks(passes_in_threads(self.workers, "block_metrics", ids, fn, needs),
                                self._num_blocks)
        stream, parts = self._embed(ids), []
        for w in self.workers:
            stream, part = w.dense_block_metrics(stream, fn, needs)
            parts.append(part)
        return merge_blocks(parts, self._num_blocks)

    def weight_metrics(self, fn: Callable[[torch.Tensor], Any]) -> list[dict[str, Any]]:
        """``fn(weight)`` per linear, each computed by the worker owning the block (in data
        mode every worker at once, one thread each)."""
        if len(self.workers) > 1 and self._data_pass(None):
            return merge_blocks(weights_in_threads(self.workers, fn), self._num_blocks)
        return merge_blocks((w.weight_metrics(fn) for w in self.workers), self._num_blocks)

    def _through(self, ids: torch.Tensor) -> torch.Tensor:
        stream = self._embed(ids)
        for w in self.workers:
            stream = w.forward(stream)
        return stream

    def window_nll(self, windows: torch.Tensor) -> torch.Tensor:
        """Per-window mean NLL ``(k,)`` float64, streamed micro-batch by micro-batch."""
        parts = chunks(windows, self.specs[0].micro_batch)
        with self.meter("eval"):
            if self._data_pass(int(windows.shape[0])):
                return passes_in_threads(self.workers, "window_nll", windows)[0]
            out = [self.workers[-1].window_nll(self._through(chunk), chunk)
                   for chunk in progress(parts, "perplexity", total=len(parts), unit="batch")]
        return torch.cat(out)

    def token_logprobs(self, inputs: torch.Tensor,
                       targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position log-probability of ``targets`` ``(B, T)`` after ``inputs`` ``(B, T)``
        and its argmax flag (:meth:`Worker.token_logprobs`), micro-batch by micro-batch."""
        with self.meter("eval"):
            if self._data_pass(int(inputs.shape[0])):
                return passes_in_threads(self.workers, "token_logprobs", inputs, targets)[0]
            parts = [self.workers[-1].token_logprobs(self._through(x), y)
                     for x, y in paired_chunks(inputs, targets, self.specs[0].micro_batch)]
        return cat_pairs(parts)

    def last_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, vocab)`` for ids ``(B, t)`` (data-free calibration)."""
        return self.workers[-1].last_logits(self._through(ids))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full logits ``(B, T, vocab)`` of the current (dense or pruned) model."""
        return self.workers[-1].logits(self._through(ids))

    def masks(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for w in self.workers:
            out.update(w.masks())
        return out

    def write_shards(self, directory: str, dtype: str, max_bytes: int) -> list[dict[str, Any]]:
        files: list[dict[str, Any]] = []
        for w in self.workers:
            files += w.write_shards(directory, dtype, max_bytes)
        return files

    def block_prefix(self, index: int) -> str:
        """State-dict prefix of block ``index`` (``model.layers.3.``)."""
        return self.workers[0].adapter.block_prefix(index)

    def worker_info(self) -> list[dict[str, Any]]:
        """One entry per worker: rank, owned blocks ``[a, b)``, device, busy seconds and the
        peak memory of its process (here the driver's, shared by all local workers)."""
        peak = peak_memory_bytes()
        return [w.info(peak) for w in self.workers]

    def utilisation(self) -> dict[str, dict[str, Any]]:
        """Per phase (``search``, ``prune``, ``eval``): wall, busy per worker, utilisation."""
        return self.meter.report()

    def shutdown(self) -> None:
        for w in self.workers:
            w.close()
        self.workers.clear()
