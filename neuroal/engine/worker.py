"""The one worker class: owns decoder blocks ``[start, stop)`` on one device (engine.md §2).

Plain Python, no Ray or torch.distributed imports: the local executor calls it in-process, the
Ray executor wraps it with ``ray.remote`` at the coordinator, a torch.distributed rank holds one.
Every stream is a tensor of shape ``(N, T, h)`` processed in micro-batches of a fixed size taken
from the resolved config, so GEMM shapes (and float results) do not depend on the layout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from neuroal.allocation.neuroal_math import alignment, crosses, total_alignment
from neuroal.capture.collector import StatsCollector
from neuroal.criteria import CRITERIA
from neuroal.engine import head
from neuroal.engine.block_pruning import (
    candidate_needs,
    expert_fallback,
    masked_weights,
    mean_ratio,
    prune_linears,
    stat_needs,
    stats_only,
)
from neuroal.engine.block_resume import block_state, state_kind, write_block_state
from neuroal.engine.onload import BlockStore
from neuroal.engine.slice_loading import load_slice
from neuroal.models.adapter import BlockCall
from neuroal.models.conversion import to_checkpoint_layout
from neuroal.models.loading import DTYPE_NAMES
from neuroal.models.moe import ExpertLinear, swapped_weights
from neuroal.outputs.checkpoint import (
    KIND_WEIGHTS,
    StateWriter,
    block_state_path,
    check_replayed,
    load_block_state,
)
from neuroal.recovery import refiner_needs
from neuroal.recovery.perp import ReconstructOptions, reconstruct_block
from neuroal.runtime.jobs import (
    BlockAlignment,
    BlockReport,
    CandidateJob,
    LayerReport,
    PruneJob,
    WorkerSpec,
)
from neuroal.runtime.logging import get_logger, progress
from neuroal.runtime.process import peak_memory_bytes

# Re-exported (their stable import path): the jobs and reports the executors send, and the
# helpers that moved to neuroal.engine.block_pruning.
__all__ = ["BlockAlignment", "BlockReport", "CandidateJob", "LayerReport", "PruneJob", "Worker",
           "WorkerSpec", "candidate_needs", "expert_fallback", "mean_ratio", "peak_memory_bytes",
           "stat_needs", "stats_only"]

log = get_logger(__name__)


class Worker:
    """Owns blocks ``[spec.start, spec.stop)``; the first also embeds, the last computes logits."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        self.dtype = DTYPE_NAMES[spec.dtype]
        self.first = spec.start == 0
        self.last = spec.stop == spec.num_blocks
        self.head_lent = False
        """True while the last worker's final modules and head are lent to this worker (a
        data-parallel pass, :mod:`neuroal.engine.data_passes`)."""
        owned = load_slice(spec, self.dtype, self.device)
        self.adapter, self.checkpoint, self.loaded = owned.adapter, owned.checkpoint, owned.loaded
        self.store: BlockStore | None = owned.store  # blocks at home, with onloading
        self._calls: dict[tuple[int, int, str | None], BlockCall] = {}
        self.busy_seconds = 0.0
        self.state_writer = StateWriter()  # resume state, written off the critical path

    @contextmanager
    def resident(self, index: int, write: bool = False) -> Iterator[torch.nn.Module]:
        """Block ``index`` on the worker's device for the body (re-entrant). With sequential
        onloading the block is fetched (and the next one prefetched); ``write``: the body
        modifies its weights, which go back home afterwards."""
        if self.store is None or index not in self.store.blocks:  # data mode: guest blocks
            yield self.adapter.blocks[index]
        else:
            with self.store.resident(index, write) as block:
                yield block

    def close(self) -> None:
        """Finish writing the resume state, release onloading resources (prefetch thread,
        spill files)."""
        try:
            self.state_writer.flush()
        finally:
            if self.store is not None:
                self.store.close()

    # ------------------------------------------------------------------ streams

    @property
    def blocks(self) -> range:
        return range(self.spec.start, self.spec.stop)

    def _home(self) -> torch.device:
        return torch.device("cpu") if self.spec.offload_activations else self.device

    def _batches(self, n: int) -> list[slice]:
        mb = self.spec.micro_batch
        return [slice(i, min(i + mb, n)) for i in range(0, n, mb)]

    def _call(self, batch: int, seqlen: int, index: int = 0) -> BlockCall:
        """Block-call arguments of block ``index`` for a micro-batch shape, rebuilt locally
        (never shipped); blocks of another attention type (sliding/full) get their own."""
        kind = self.adapter.layer_type(index)
        key = (batch, seqlen, kind)
        if key not in self._calls:
            dummy = torch.zeros(batch, seqlen, self.adapter.hidden_size, dtype=self.dtype,
                                device=self.device)
            _, call = self.adapter.capture_block0(inputs_embeds=dummy, layer_type=kind)
            self._calls[key] = call
        return self._calls[key]

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(N, T)`` -> hidden states entering block 0, ``(N, T, h)``."""
        if not self.first:
            raise RuntimeError(f"worker {self.spec.rank} does not own the embedding")
        out = []
        for sl in self._batches(ids.shape[0]):
            hidden, _ = self.adapter.capture_block0(input_ids=ids[sl].to(self.device))
            out.append(hidden.to(self._home()))
        return torch.cat(out)

    def _forward_block(self, index: int, stream: torch.Tensor,
                       collector: StatsCollector | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """Run every micro-batch of ``stream`` through block ``index``; new ``(N, T, h)``
        (written into ``out`` when given)."""
        out = torch.empty_like(stream) if out is None else out
        with self.resident(index) as block:
            for sl in self._batches(stream.shape[0]):
                x = stream[sl].to(self.device)
                if collector is not None:
                    collector.begin_batch(x.shape[0])
                y = self.adapter.call_block(block, x, self._call(x.shape[0], x.shape[1], index))
                out[sl] = y.to(out.device)
                if collector is not None:
                    collector.end_batch()
        return out

    @torch.no_grad()
    def forward(self, stream: torch.Tensor) -> torch.Tensor:
        """Plain forward of the stream through every owned block (evaluation)."""
        return self.forward_blocks(stream, list(self.blocks))

    @torch.no_grad()
    def forward_blocks(self, stream: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """Forward ``stream`` through owned blocks ``indices`` as they are now (dense, or
        already pruned: the same micro-batches through the same weights as the final prune, so
        the output is bit-identical to the stream it handed on)."""
        t0 = time.perf_counter()
        for index in indices:
            stream = self._forward_block(index, stream)
        self.busy_seconds += time.perf_counter() - t0
        return stream

    # ------------------------------------------------------------------ pruning

    @torch.no_grad()
    def prune_one(self, index: int, stream: torch.Tensor, entries: Mapping[str, Any],
                  job: PruneJob) -> tuple[torch.Tensor, BlockReport]:
        """Sequential prune of one owned block (criteria.md §1.3): dense forward with hooks
        (statistics), masks from the plan entries, in-place zeroing (SparseGPT: updated
        weights), forward of the pruned block producing the next inputs; logs one line.

        With ``job.reconstruct`` the dense forward also keeps the block's outputs, the targets
        of the PERP reconstruction that runs after the masks (recovery.md §3.6); the forward of
        the reconstructed block then produces the next inputs (sparse propagation). With
        sequential onloading the block stays on the device for all of it, then goes home."""
        with self.resident(index, write=True):
            return self._prune_resident(index, stream, entries, job)

    @torch.no_grad()
    def prune_slice(self, stream: torch.Tensor, entries: Mapping[int, Mapping[str, Any]],
                    job: PruneJob, indices: Sequence[int] | None = None,
                    ) -> tuple[torch.Tensor, list[BlockReport]]:
        """The final prune's pass over owned blocks ``indices`` (default: all), in order, as one
        call: a block with plan ``entries`` is pruned (:meth:`prune_one`, replayed when its
        state is saved), a block without runs forward as it is (already pruned: a pass
        restarted after a lost worker). Returns the outgoing ``(N, T, h)`` stream and the
        reports of the pruned blocks."""
        reports = []
        for index in self.blocks if indices is None else indices:
            if index in entries:
                stream, report = self.prune_one(index, stream, entries[index], job)
                reports.append(report)
            else:
                stream = self.forward_blocks(stream, [index])
        return stream, reports

    def _prune_resident(self, index: int, stream: torch.Tensor, entries: Mapping[str, Any],
                        job: PruneJob) -> tuple[torch.Tensor, BlockReport]:
        t0 = time.perf_counter()
        if job.state_dir is not None and (saved := load_block_state(job.state_dir, index)):
            return self._replay(index, stream, *saved, entries=entries,
                                path=block_state_path(job.state_dir, index))
        targets = torch.empty_like(stream) if job.reconstruct is not None else None
        stats, order = self.collect_stats(index, stream, job, outputs=targets)
        layers = self.prune_block(index, stats, entries, job, order, seqlen=stream.shape[1])
        del stats  # the Hessians go before the pruned forward allocates the next stream
        info: dict[str, Any] = {}
        if targets is not None:
            info["perp-reconstruct"] = self.reconstruct(index, stream, targets, job, layers)
            del targets
        stream = self._forward_block(index, stream)
        report = BlockReport(index, layers, time.perf_counter() - t0, info)
        self.keep_state(index, job, report)
        self.busy_seconds += report.seconds
        log.info("block %d/%d  target %.3f  achieved %.3f  %.1f s", index + 1,
                 self.spec.num_blocks, report.target, report.achieved, report.seconds)
        return stream, report

    state_kind = staticmethod(state_kind)  # masks or weights: what resume keeps of a block

    def keep_state(self, index: int, job: PruneJob, report: BlockReport) -> None:
        """Resume state of pruned block ``index`` under ``job.state_dir`` (none without one):
        its masks or weights (:meth:`state_kind`) and ``report``, written in the background
        and flushed after the slice's last block."""
        if job.state_dir is None:
            return
        kind = self.state_kind(job)
        self.state_writer.submit(job.state_dir, index, self._block_state(index, job, kind),
                                 report.to_dict(), kind)
        if index == self.spec.stop - 1:
            self.state_writer.flush()

    def _block_state(self, index: int, job: PruneJob,
                     kind: str = KIND_WEIGHTS) -> dict[str, torch.Tensor]:
        """What resume must restore of block ``index``
        (:func:`~neuroal.engine.block_resume.block_state`)."""
        return block_state(self.adapter, index, job, kind)

    def _replay(self, index: int, stream: torch.Tensor, weights: Mapping[str, torch.Tensor],
                report: Mapping[str, Any], entries: Mapping[str, Any] | None = None,
                path: str | Path = "block state") -> tuple[torch.Tensor, BlockReport]:
        """Resume (engine.md §8): load a finished block's pruned weights and run it on the
        stream; the same micro-batches through the same weights give bit-identical outputs.
        The stored weights are checked first against their report and the plan ``entries``."""
        linears = self.adapter.prunable_linears(self.adapter.blocks[index])
        targets = None if entries is None else {n: mean_ratio(entries[n]) for n in linears
                                                if n in entries}
        restored = self.load_block_state(index, weights)
        check_replayed(path, restored, report,
                       {n: m.weight.shape[1] for n, m in linears.items()}, targets)
        stream = self._forward_block(index, stream)
        log.info("block %d/%d  resumed from the saved state", index + 1, self.spec.num_blocks)
        return stream, BlockReport.from_dict(report)

    def load_block_state(self, index: int,
                         weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write a saved block state (:meth:`_block_state`'s names: linears by linear name,
        after ``perp-reconstruct`` also norms and biases by parameter name) into block
        ``index``: stored weights are copied, bool masks (a ``masks`` state) zero the block's
        dense weights. Resume replays and restarted Ray actors both restore through here.

        Returns:
            The restored weight of every stored linear, ``name -> (rows, cols)``, for
            :func:`~neuroal.outputs.checkpoint.check_replayed`.
        """
        with self.resident(index, write=True) as block:
            return write_block_state(block, self.adapter.prunable_linears(block), weights)

    def restore_blocks(self, state_dir: str) -> list[int]:
        """Load the saved state of every owned block (no stream needed): a restarted worker
        gets its part of the pruned model back, norms and biases included after
        ``perp-reconstruct`` (the same :meth:`load_block_state` as a resume replay).

        Raises:
            RuntimeError: A block of the slice has no saved state.
        """
        for index in self.blocks:
            saved = load_block_state(state_dir, index)
            if saved is None:
                raise RuntimeError(f"worker {self.spec.rank}: no saved state of block {index} in "
                                   f"{state_dir}")
            linears = self.adapter.prunable_linears(self.adapter.blocks[index])
            restored = self.load_block_state(index, saved[0])
            check_replayed(block_state_path(state_dir, index), restored, saved[1],
                           {n: m.weight.shape[1] for n, m in linears.items()})
        return list(self.blocks)

    def collect_stats(self, index: int, stream: torch.Tensor, job: PruneJob,
                      outputs: torch.Tensor | None = None) -> tuple[dict[str, Any], list[str]]:
        """Dense forward of block ``index`` with hooks; returns stats and execution order.

        ``outputs``, an ``(N, T, h)`` buffer like ``stream``, receives the dense block's outputs
        of the same forward (the reconstruction targets); the forward then runs even when the
        criterion needs no statistic.
        """
        linears = self.adapter.prunable_linears(self.adapter.blocks[index])
        needs = CRITERIA.get(job.criterion).needs | refiner_needs(job.refine)
        collector = StatsCollector(linears, needs)
        if needs and outputs is None:  # outputs dropped per micro-batch: no second stream
            self._stats_pass(index, stream, collector)
        elif needs:
            with collector.attached():
                self._forward_block(index, stream, collector, out=outputs)
        elif outputs is not None:
            self._forward_block(index, stream, out=outputs)
        return collector.stats(), collector.order or list(linears)

    def reconstruct(self, index: int, stream: torch.Tensor, targets: torch.Tensor, job: PruneJob,
                    layers: list[LayerReport]) -> dict[str, Any]:
        """PERP reconstruction of pruned block ``index`` (recovery.md §3.6): MaskLoRA on its
        linears plus its biases and norms fitted to ``targets`` (the dense block on ``stream``),
        with masks = the zero pattern after pruning; merged in place (zeros kept exactly).
        Updates the layer reports' zero counts; returns the block's facts."""
        block = self.adapter.blocks[index]
        linears = self.adapter.prunable_linears(block)
        if any(isinstance(m, ExpertLinear) for m in linears.values()):
            raise ValueError(f"block {index}: perp-reconstruct does not support mixture-of-experts "
                             "blocks (fused expert parameters); remove perp-reconstruct from "
                             "recover.steps for this model")
        masks = {n: m.weight.data == 0 for n, m in linears.items()}
        options = ReconstructOptions(**dict(job.reconstruct or {}))
        options = replace(options, seed=options.seed + index)  # fresh adapter init per block

        def call(x: torch.Tensor) -> torch.Tensor:
            return self.adapter.call_block(block, x, self._call(x.shape[0], x.shape[1], index))

        info = reconstruct_block(block, call, stream, targets, masks, linears, options)
        for layer in layers:
            layer.zeros = int((linears[layer.name].weight.data == 0).sum())
        log.info("block %d/%d  reconstruction: MSE %.4g -> %.4g, %d trainable, %.1f s", index + 1,
                 self.spec.num_blocks, info.mse_before, info.mse_after, info.trainable, info.seconds)
        return {**info.to_dict(), "tokens": options.steps * options.batch_size * stream.shape[1]}

    def prune_block(self, index: int, stats: Mapping[str, Any], entries: Mapping[str, Any],
                    job: PruneJob, order: list[str], seqlen: int | None = None) -> list[LayerReport]:
        """Masks for every linear of block ``index`` from its plan entries, refined by the
        job's refiners (``seqlen``: calibration tokens per sequence); zero in place
        (:func:`~neuroal.engine.block_pruning.prune_linears`)."""
        block = self.adapter.blocks[index]
        attention = self.adapter.attention_linears(block) if job.refine else frozenset()
        return prune_linears(index, self.adapter.prunable_linears(block), stats, entries, job,
                             order, attention, seqlen)

    # ------------------------------------------------------------------ search candidates

    @torch.no_grad()
    def eval_candidate(self, stream: torch.Tensor, ratios: Mapping[int, Mapping[str, Any]],
                       job: CandidateJob, reference: Mapping[int, Mapping[str, Any]] | None = None,
                       bound: tuple[float, bool, float] | None = None,
                       ) -> tuple[torch.Tensor | None, dict[int, BlockAlignment]]:
        """Evaluate one NeuroAL candidate over the owned blocks (neuroal.md §A5).

        Per block: dense forward on ``stream`` collecting input norms ``a_d``; masks from the
        candidate ratios scored with those statistics; the masked block (weights swapped in
        temporarily, dense weights untouched afterwards) run on the same inputs collecting
        ``a_s``; its outputs become the next block's inputs (sparse-prefix propagation).
        ``reference[b]`` supplies block b's dense statistics instead of the dense forward:
        block 0 always sees identical inputs (shared across candidates, §B5), and under the
        global variant (§B4) every block uses the dense model's statistics.

        ``bound = (best, inclusive, carried)`` stops the candidate early (exact search, issue
        16 item 13): NA is a sum of non-negative terms summed in block order, so once
        ``carried`` (the candidate's partial sum before this slice, 0.0 when unknown) plus this
        slice's terms exceeds ``best`` (or equals it, when ``inclusive``) the candidate cannot
        win. The stream returned is then None, and a None stream in skips the slice.
        """
        if stream is None:
            return None, {}

        criterion = CRITERIA.get(job.criterion)
        options = {**criterion.defaults, **job.options}
        needs = candidate_needs(job)
        stat = job.alignment_stat
        out: dict[int, BlockAlignment] = {}
        t0 = time.perf_counter()
        for index in self.blocks:
            with self.resident(index):
                linears = self.adapter.prunable_linears(self.adapter.blocks[index])
                if reference is not None and index in reference:
                    dense_stats = reference[index]
                else:
                    dense_stats = self.block_stats(index, stream, needs)
                masked = self._masked_weights(linears, dense_stats, ratios[index], job, criterion,
                                              options)
                sparse = StatsCollector(linears, frozenset({stat}))
                with swapped_weights(linears, masked), sparse.attached():
                    stream = self._forward_block(index, stream, sparse)
                del masked
                a_d = {n: getattr(st, stat).sqrt() for n, st in dense_stats.items()}
                a_s = {n: getattr(st, stat).sqrt() for n, st in sparse.stats().items()}
                out[index] = BlockAlignment(na={n: alignment(a_d[n], a_s[n]) for n in linears},
                                            delta={n: (a_d[n] - a_s[n]).cpu() for n in linears})
            if bound is not None:
                partial = total_alignment([blk.na for blk in out.values()], bound[2])
                if crosses(partial, bound[0], bound[1]):
                    self.busy_seconds += time.perf_counter() - t0
                    return None, out
        self.busy_seconds += time.perf_counter() - t0
        return stream, out

    @torch.no_grad()
    def dense_reference(self, stream: torch.Tensor, needs: frozenset[str],
                        reference_stream: str) -> tuple[torch.Tensor, dict[int, Any]]:
        """Candidate-independent dense statistics of the owned blocks (neuroal.md §B4, §B5):
        ``local``: block 0's, on the first worker only (its inputs are the same for every
        candidate; the stream is returned unchanged); ``global``: every owned block's from
        one dense pass, whose outputs are returned for the next worker."""
        if reference_stream == "local":
            return stream, ({0: self.block_stats(0, stream, needs)} if self.first else {})
        return self.dense_block_metrics(stream, stats_only, needs)

    @torch.no_grad()
    def block_stats(self, index: int, stream: torch.Tensor, needs: frozenset[str]) -> dict[str, Any]:
        """Dense statistics of block ``index``'s linears on ``stream`` (outputs discarded)."""
        linears = self.adapter.prunable_linears(self.adapter.blocks[index])
        collector = StatsCollector(linears, needs)
        self._stats_pass(index, stream, collector)
        return collector.stats()

    def _stats_pass(self, index: int, stream: torch.Tensor, collector: StatsCollector) -> None:
        """Every micro-batch of ``stream`` through block ``index`` with ``collector``'s hooks;
        each micro-batch's output is dropped at once (no ``(N, T, h)`` output stream)."""
        with self.resident(index) as block, collector.attached():
            for sl in self._batches(stream.shape[0]):
                x = stream[sl].to(self.device)
                collector.begin_batch(x.shape[0])
                self.adapter.call_block(block, x, self._call(x.shape[0], x.shape[1], index))
                collector.end_batch()

    _masked_weights = staticmethod(masked_weights)  # a candidate's temporary pruned copies

    # ------------------------------------------------------------------ policy metrics

    @torch.no_grad()
    def dense_block_metrics(self, stream: torch.Tensor, fn: Callable[..., Any],
                            needs: frozenset[str]) -> tuple[torch.Tensor, dict[int, Any]]:
        """One dense pass over the owned blocks, collecting statistics with hooks.

        For every block, ``fn(weights, stats)`` receives ``name -> (rows, cols) weight`` and
        ``name -> LayerStats`` and returns any picklable value (e.g. OWL's outlier ratio). The
        dense outputs of each block feed the next (allocation.md §3.1: pass 1 is dense).
        """
        values = {}
        for index in progress(self.blocks, "dense statistics", unit="block"):
            t0 = time.perf_counter()
            linears = self.adapter.prunable_linears(self.adapter.blocks[index])
            collector = StatsCollector(linears, needs)
            with self.resident(index):
                with collector.attached():
                    stream = self._forward_block(index, stream, collector)
                values[index] = fn({n: m.weight.data for n, m in linears.items()},
                                   collector.stats())
            self.busy_seconds += time.perf_counter() - t0
        return stream, values

    @torch.no_grad()
    def weight_metrics(self, fn: Callable[[torch.Tensor], Any]) -> dict[int, dict[str, Any]]:
        """``fn(weight)`` for every prunable linear of every owned block (data-free metrics)."""
        out = {}
        for index in self.blocks:
            with self.resident(index) as block:
                out[index] = {n: fn(m.weight.data)
                              for n, m in self.adapter.prunable_linears(block).items()}
        return out

    # ------------------------------------------------------------------ head

    def _require_head(self) -> None:
        if not (self.last or self.head_lent):
            raise RuntimeError(f"worker {self.spec.rank} does not own the head")

    def window_nll(self, stream: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy per window, fp32 logits: ``(B, T, h) -> (B,)`` float64."""
        self._require_head()
        return head.window_nll(self.adapter, self.device, stream, ids)

    def token_logprobs(self, stream: torch.Tensor,
                       targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of ``targets[b, t]`` after position ``t``, and whether it is the
        argmax (zero-shot scoring, ``neuroal.evaluation.zeroshot``): ``(B, T, h), (B, T) -> (B, T)``
        float64 and ``(B, T)`` bool, fp32 log-softmax, one sequence at a time (as
        :meth:`window_nll`), so only ``(T, vocab)`` logits exist at once."""
        self._require_head()
        return head.token_logprobs(self.adapter, self.device, stream, targets)

    def logits(self, stream: torch.Tensor) -> torch.Tensor:
        """Full logits ``(B, T, h) -> (B, T, vocab)`` fp32 on the CPU (tests, inspection)."""
        self._require_head()
        return head.all_logits(self.adapter, self.device, stream)

    def last_logits(self, stream: torch.Tensor) -> torch.Tensor:
        """Logits of the last position: ``(B, T, h) -> (B, vocab)`` fp32."""
        self._require_head()
        return head.last_logits(self.adapter, self.device, stream)

    # ------------------------------------------------------------------ inspection and export

    def info(self, peak: int | None = None) -> dict[str, Any]:
        """Rank, owned blocks, device, busy seconds, the peak memory of this process (``peak``:
        one measured elsewhere, e.g. the driver's for in-process workers) and, with
        onloading, the block store's counters."""
        facts: dict[str, Any] = {"rank": self.spec.rank, "blocks": [self.spec.start, self.spec.stop],
                                 "device": self.spec.device, "busy_seconds": self.busy_seconds,
                                 "peak_memory_bytes": peak_memory_bytes() if peak is None else peak}
        if self.store is not None:
            facts["onload"] = self.store.stats()
        return facts

    def masks(self) -> dict[str, torch.Tensor]:
        """``full linear name -> (rows, cols) bool`` where the weight is exactly zero."""
        out = {}
        for index in self.blocks:
            prefix = self.adapter.block_prefix(index)
            with self.resident(index) as block:  # expert matrices are views: read them in place
                for name, lin in self.adapter.prunable_linears(block).items():
                    out[prefix + name] = (lin.weight.data == 0).cpu()
        return out

    def _block_weights(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s current parameters by local name, wherever they live (with
        onloading: the host copies, or read from the spill file / checkpoint)."""
        if self.store is not None:
            return self.store.host_tensors(index)
        return {n: p.data for n, p in self.adapter.blocks[index].named_parameters()}

    def state_items(self) -> dict[str, torch.Tensor]:
        """Owned tensors under their HF state-dict names (tied head left out)."""
        loaded = set(self.loaded)
        buffers = dict(self.adapter.model.named_buffers())  # persistent ones read from the source
        out = {n: p.data for n, p in [*self.adapter.model.named_parameters(), *buffers.items()]
               if n in loaded and not self.adapter.export_skip(n)}
        if self.store is not None:  # blocks at home: their host (or spilled) tensors
            for index in self.blocks:
                prefix = self.adapter.block_prefix(index)
                out.update({prefix + n: t for n, t in self._block_weights(index).items()
                            if prefix + n in out})
        return out

    def write_shards(self, directory: str, dtype: str, max_bytes: int) -> list[dict[str, Any]]:
        """Write owned tensors as ``worker<rank>-<j>.safetensors`` files of at most ``max_bytes``.

        Returns one entry per file: ``{"file", "names", "bytes"}``.
        """
        cast = DTYPE_NAMES.get(dtype, self.dtype)
        groups: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in to_checkpoint_layout(self.adapter.model, self.state_items()).items():
            t = tensor.to(device="cpu", dtype=cast).contiguous()
            nbytes = t.numel() * t.element_size()
            if groups[-1] and size + nbytes > max_bytes:
                groups.append({})
                size = 0
            groups[-1][name] = t
            size += nbytes
        files = []
        for j, group in enumerate(groups):
            fname = f"worker{self.spec.rank:03d}-{j:03d}.safetensors"
            save_file(group, str(Path(directory) / fname), metadata={"format": "pt"})
            files.append({"file": fname, "names": list(group),
                          "bytes": sum(t.numel() * t.element_size() for t in group.values())})
        return files
