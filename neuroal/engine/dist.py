"""torch.distributed executor: one rank per block slice on one node (engine.md §3.4).

Launch with ``torchrun --nproc_per_node K launch/prune.py ... engine.executor=dist
engine.workers=K`` or ``accelerate launch --num_processes K launch/prune.py ...`` (same
arguments). Rank r holds the one :class:`~neuroal.engine.worker.Worker` of slice r
(:func:`~neuroal.engine.executor.split_blocks`) on ``cuda:<LOCAL_RANK>`` (NCCL) or the CPU
(gloo); it loads only its own blocks.

Rank 0 is the coordinator: it runs the pipeline (data, search, evaluation, report) and every
executor call becomes a *command* run by every rank. The parts, bottom up:

* :mod:`neuroal.engine.dist_launch`: which rank this process is, its device, the timeouts and
  the process groups (:func:`rank_info`, :class:`RankInfo`).
* :mod:`neuroal.engine.dist_stage`: one rank's part of every command (:class:`RankStage`): its
  Worker, the point-to-point activation streams rank r -> r+1, errors gathered to rank 0.
* :mod:`neuroal.engine.dist_session`: rank 0's :func:`coordinator` session and
  :func:`command`, the other ranks' :func:`serve` loop.
* this module: :class:`DistExecutor`, rank 0's executor (the executor protocol as commands);
  the names above are re-exported here, their stable import path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from neuroal.allocation.plan import SparsityPlan
from neuroal.config.schema import PruneConfig
from neuroal.engine.core import log_block, merge_blocks, worker_template
from neuroal.engine.data_parallel import resolve_parallel
from neuroal.engine.data_passes import pass_mode
from neuroal.engine.dist_launch import (
    COLLECTIVE_TIMEOUT,
    TIMEOUT,
    RankInfo,
    launch_env,
    process_group,
    rank_device,
    rank_info,
)
from neuroal.engine.dist_session import command, coordinator, serve, serve_loop
from neuroal.engine.dist_stage import RankError, RankStage
from neuroal.engine.executor import BusyMeter, prefix_blocks, split_blocks
from neuroal.models.loading import ModelSource
from neuroal.runtime.jobs import BlockAlignment, BlockReport, CandidateJob, PruneJob, WorkerSpec
from neuroal.runtime.logging import get_logger

__all__ = ["COLLECTIVE_TIMEOUT", "TIMEOUT", "DistExecutor", "RankError", "RankInfo", "RankStage",
           "command", "coordinator", "launch_env", "process_group", "rank_device", "rank_info",
           "serve", "serve_loop"]

log = get_logger(__name__)


class DistExecutor:
    """Rank 0's executor: every call is a command run by all ranks (module docstring).

    Args:
        stage: Rank 0's stage (yielded by :func:`coordinator`).
        template: What every rank's worker shares (model source, block count, dtype,
            micro-batch, onloading; a :class:`~neuroal.engine.worker.WorkerSpec` with an empty
            slice); each rank fills in its slice and its own device.
    """

    data_fits: bool = True  # the memory plan's verdict on data mode (engine.parallel=auto)

    def __init__(self, stage: RankStage, template: WorkerSpec, parallel: str = "auto") -> None:
        self.stage = stage
        self._requested = parallel
        self.parallel = parallel  # engine.parallel; after a prune, the mode that ran
        self.world = stage.info.world
        self.slices = split_blocks(template.num_blocks, self.world)
        self._num_blocks = template.num_blocks
        self._closed = False
        self.meter = BusyMeter(lambda: [i["busy_seconds"] for i in self.worker_info()])
        for entry in self._call("start", template, self.slices):
            log.info("rank %d owns blocks [%d, %d) on %s", entry["rank"], *entry["blocks"],
                     entry["device"])

    @classmethod
    def from_config(cls, cfg: PruneConfig, source: ModelSource, num_blocks: int, dtype: str,
                    session: RankStage | None) -> DistExecutor:
        """The executor of the open :func:`coordinator` session ``session``.

        Raises:
            RuntimeError: No session (not rank 0 of a torchrun / accelerate launch).
        """
        if session is None:
            raise RuntimeError(
                "engine.executor='dist' runs on rank 0 of `torchrun --nproc_per_node K "
                "launch/prune.py ...` (or accelerate launch); from Python, open "
                "`with neuroal.engine.dist.coordinator(cfg) as session:` and pass "
                "session=session to neuroal.prune / neuroal.pipeline.run, and call serve(cfg) "
                "on the other ranks")
        return cls(session, worker_template(cfg, source, num_blocks, session.info.device, dtype),
                   cfg.engine.parallel)

    def _call(self, name: str, common: Any = None, per_rank: Sequence[Any] | None = None) -> list[Any]:
        if self._closed:
            raise RuntimeError(f"{name}: the dist executor was shut down")
        return command(self.stage, name, common, per_rank)

    def _data_pass(self, sequences: int | None) -> bool:
        """Whether a pass over ``sequences`` sequences runs data-parallel (:func:`pass_mode`)."""
        return pass_mode(self._requested, self.stage.w, self.world, sequences,
                         self.data_fits) == "data"

    def _per_rank(self, values: Sequence[Any]) -> list[dict[int, Any]]:
        """``values[b]`` split into one ``{b: value}`` dict per rank."""
        return [{b: values[b] for b in range(a, z)} for a, z in self.slices]

    def num_blocks(self) -> int:
        return self._num_blocks

    def block_prefix(self, index: int) -> str:
        """State-dict prefix of block ``index`` (e.g. ``model.layers.3.``)."""
        return self.stage.w.adapter.block_prefix(index)

    def worker_info(self) -> list[dict[str, Any]]:
        """Per rank: ``{rank, blocks: [a, b], device, busy_seconds, peak_memory_bytes}``."""
        return self._call("info")

    def utilisation(self) -> dict[str, dict[str, Any]]:
        """Per phase (``search``, ``prune``, ``eval``): wall, busy per rank, utilisation."""
        return self.meter.report()

    def run_final_prune(self, plan: SparsityPlan, job: PruneJob,
                        ids: torch.Tensor) -> list[BlockReport]:
        """Prune every slice in order; ``ids`` ``(N, T)`` are the calibration windows."""
        self.parallel = resolve_parallel(self._requested, self.world, fits=self.data_fits)
        if self.parallel == "data":
            every = [plan.block(b) for b in range(self._num_blocks)]
            with self.meter("prune"):
                parts = self._call("data_prune", (job, ids, every, self.slices))
        else:
            with self.meter("prune"):
                parts = self._call("prune", (job, ids), self._per_rank(
                    [plan.block(b) for b in range(self._num_blocks)]))
        for report in (r for part in parts[1:] for r in part):  # rank 0 logged its own
            log_block(report, self._num_blocks)
        return [r for part in parts for r in part]

    def evaluate_candidates(self, ids: torch.Tensor,
                            candidates: Sequence[Sequence[Mapping[str, Any]]],
                            job: CandidateJob, reference_stream: str = "local",
                            on_result: Callable[[int, list[BlockAlignment]], None] | None = None,
                            bound: Callable[[int], tuple[float, bool] | None] | None = None,
                            ) -> list[list[BlockAlignment]]:
        """Alignment terms per candidate, then block; candidates pipeline across the ranks.

        Results reach rank 0 in one gather, so ``on_result`` (resume checkpoints) runs for
        every candidate after the whole batch. With ``bound`` (exact early stopping) each
        candidate is one command instead, so that its bound includes every earlier candidate's
        complete score, as in the local executor: the ranks stop a candidate at the same block
        and the trail is the local executor's; the candidates no longer pipeline across ranks.
        A stopped candidate's result holds only the blocks evaluated."""
        if bound is not None:
            return self._bounded_candidates(ids, candidates, job, reference_stream, on_result,
                                            bound)
        per_rank = [[{b: ratios[b] for b in range(a, z)} for ratios in candidates]
                    for a, z in self.slices]
        with self.meter("search"):
            parts = self._call("candidates", (ids, job, reference_stream, None, False, False,
                                              self._data_pass(int(ids.shape[0]))), per_rank)
        results = []
        for c in range(len(candidates)):
            results.append(merge_blocks((part[c] for part in parts), self._num_blocks))
            if on_result is not None:
                on_result(c, results[-1])
        return results

    def _bounded_candidates(self, ids: torch.Tensor,
                            candidates: Sequence[Sequence[Mapping[str, Any]]],
                            job: CandidateJob, reference_stream: str,
                            on_result: Callable[[int, list[BlockAlignment]], None] | None,
                            bound: Callable[[int], tuple[float, bool] | None],
                            ) -> list[list[BlockAlignment]]:
        """One command per candidate, the bound taken after the previous one's ``on_result``;
        the embedded windows and dense reference are computed once and kept on the ranks."""
        results, data = [], self._data_pass(int(ids.shape[0]))
        with self.meter("search"):
            for c, ratios in enumerate(candidates):
                per_rank = [[{b: ratios[b] for b in range(a, z)}] for a, z in self.slices]
                common = (ids, job, reference_stream, [bound(c)], c > 0, c < len(candidates) - 1,
                          data)
                parts = self._call("candidates", common, per_rank)
                results.append(prefix_blocks({b: v for part in parts for b, v in part[0].items()},
                                             self._num_blocks))
                if on_result is not None:
                    on_result(c, results[-1])
        return results

    def dense_block_metrics(self, ids: torch.Tensor, fn: Callable[..., Any],
                            needs: frozenset[str]) -> list[Any]:
        """``fn(weights, stats)`` per block over one dense pass (``fn`` must pickle)."""
        if self._data_pass(int(ids.shape[0])):
            return merge_blocks(self._call("data_pass", ("block_metrics", (ids, fn, needs))),
                                self._num_blocks)
        return merge_blocks(self._call("dense_metrics", (ids, fn, needs)), self._num_blocks)

    def weight_metrics(self, fn: Callable[[torch.Tensor], Any]) -> list[dict[str, Any]]:
        """``fn(weight)`` per linear on the owning rank (``fn`` must pickle)."""
        return merge_blocks(self._call("weight_metrics", fn), self._num_blocks)

    def window_nll(self, windows: torch.Tensor) -> torch.Tensor:
        """Per-window mean NLL ``(k,)`` float64 (computed by the last rank; in data mode by
        every rank on its windows, gathered on rank 0)."""
        with self.meter("eval"):
            if self._data_pass(int(windows.shape[0])):
                return self._call("data_pass", ("window_nll", (windows,)))[0]
            return self._call("window_nll", windows)[-1]

    def token_logprobs(self, inputs: torch.Tensor,
                       targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position target log-probabilities and argmax flags ``(B, T)`` (last rank; in
        data mode every rank, gathered on rank 0)."""
        with self.meter("eval"):
            if self._data_pass(int(inputs.shape[0])):
                return self._call("data_pass", ("token_logprobs", (inputs, targets)))[0]
            return self._call("token_logprobs", (inputs, targets))[-1]

    def last_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, vocab)`` for ids ``(B, t)``."""
        return self._call("last_logits", ids)[-1]

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full logits ``(B, T, vocab)`` fp32 of the current model."""
        return self._call("logits", ids)[-1]

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: m for part in self._call("masks") for name, m in part.items()}

    def write_shards(self, directory: str, dtype: str, max_bytes: int) -> list[dict[str, Any]]:
        """Every rank writes its own shards into ``directory`` (a filesystem all ranks share);
        the gather is the barrier after which rank 0 may rename them and write the index."""
        return [f for part in self._call("write_shards", (directory, dtype, max_bytes)) for f in part]

    def shutdown(self) -> None:
        """Release every rank's worker (the ranks keep serving until :func:`coordinator` ends)."""
        if not self._closed:
            self._call("release")
            self._closed = True
