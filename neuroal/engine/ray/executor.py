"""``RayExecutor``: one Ray actor per worker, gang-scheduled in a placement group (engine.md §3.3).

The actors are the plain :class:`~neuroal.engine.worker.Worker`, wrapped here with ``ray.remote``
(never decorated), so tests run the very same class in-process. Each actor builds itself from its
:class:`~neuroal.runtime.jobs.WorkerSpec` and reads only its own slice of the checkpoint: no
weight ever travels through the object store. A pass over the model (final prune, search
candidate, dense reference, dense statistics, evaluation chunk) is one call per actor over its
whole slice (a *stage*, :mod:`neuroal.engine.ray.actor`), so a stream crosses between actors K-1
times per pass; it crosses by Ray Direct Transport or through the object store, as
``engine.ray.transport`` says (:mod:`neuroal.engine.ray.transport`, docs/transport.md). Calls on
one actor run in submission order, so chaining refs pipelines independent work (engine.md §4):
actor 0 evaluates candidate c while actor 1 evaluates candidate c-1. Results are gathered per
candidate, in the original order, from the same worker calls as
:class:`~neuroal.engine.executor.LocalExecutor` makes, so they are bit-identical to it
(engine.md §3.5). ``import ray`` happens lazily (:func:`~neuroal.engine.ray.options.import_ray`).

Restarts after an actor death live in :mod:`neuroal.engine.ray.faults`; data mode
(``engine.parallel=data``: the final prune, the dense statistics pass and the search's dense
reference, each one call per actor over a torch.distributed group) in
:mod:`neuroal.engine.ray.data`; both are mixed in here.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import torch

from neuroal.allocation.plan import SparsityPlan
from neuroal.engine.core import (
    cat_pairs,
    chunks,
    log_block,
    merge_blocks,
    paired_chunks,
    reference_needs,
    slice_specs,
)
from neuroal.engine.executor import BusyMeter, prefix_blocks, split_blocks
from neuroal.engine.ray.actor import (
    Embed,
    Kept,
    _busy,
    _forget,
    _info,
    _keep_embedded,
    _prefixes,
    _run_stage,
    _setup,
    _take,
    _warnings,
)
from neuroal.engine.ray.data import DataParallel
from neuroal.engine.ray.faults import FaultTolerance
from neuroal.engine.ray.options import (
    RayOptions,
    actor_device,
    actor_env,
    device_kind,
    import_ray,
    init_ray,
)
from neuroal.engine.ray.transport import DirectTransport, ObjectStoreTransport, resolve_transport
from neuroal.engine.worker import Worker
from neuroal.runtime.jobs import BlockAlignment, BlockReport, CandidateJob, PruneJob, WorkerSpec
from neuroal.runtime.logging import get_logger, progress, replay
from neuroal.runtime.progress import SETTINGS

log = get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_OPTIONS = RayOptions()  # frozen: one shared default


class RayExecutor(FaultTolerance, DataParallel):
    """One Ray actor per worker slice, all built from one worker template.

    Args:
        template: What every worker shares (model source, block count, dtype, micro-batch,
            onloading; :class:`~neuroal.engine.worker.WorkerSpec` with an empty slice); its
            ``device`` is the one inside each actor (:func:`actor_device`).
        workers: Number of actors (slices).
        options: Ray options (:class:`RayOptions`).
        transport: How streams cross between actors (default: ``options.transport``
            resolved by :func:`resolve_transport`, before any actor starts).
        state_dir: The run's resume state, named in the error when restarts run out (also
            taken from ``PruneJob.state_dir``).
        parallel: ``engine.parallel`` of the final prune (``auto``, ``pipeline``, ``data``:
            one long call per actor over a torch.distributed group); after a prune,
            :attr:`parallel` holds the mode that ran.
    """

    def __init__(self, template: WorkerSpec, workers: int, options: RayOptions = DEFAULT_OPTIONS,
                 transport: ObjectStoreTransport | DirectTransport | None = None,
                 state_dir: str | None = None, parallel: str = "auto") -> None:
        self._requested = parallel
        self.parallel = parallel
        num_blocks = template.num_blocks
        kind = device_kind([template.device])
        template = replace(template, device=actor_device(kind))
        self.transport = transport or resolve_transport(
            options.transport, "cpu" if template.offload_activations else kind)
        self.specs = slice_specs(template, split_blocks(num_blocks, workers))
        self._num_blocks = num_blocks
        self._owner = [k for k, s in enumerate(self.specs) for _ in range(s.start, s.stop)]
        self.options = options
        self.max_restarts = options.max_restarts
        self.state_dir = state_dir
        self.restarts = [0] * workers  # per rank
        self._busy_offset = [0.0] * workers  # busy seconds of the rank's dead predecessors
        self._last_busy = [0.0] * workers
        self._pruned: tuple[SparsityPlan, PruneJob, torch.Tensor] | None = None  # final prune done
        self._failed = "running"  # the unit of work of the last failed ray.get
        self._channel: Any = None  # the transport's handle (a collective group)
        self._tokens = itertools.count()  # keys of stage results in the actors' outboxes
        self.inflight = options.inflight or workers
        self.workers: list[Any] = []
        self._group: Any = None
        self._owns_ray = init_ray(options.address, workers * options.cpus)
        gpus = 1 if kind == "cuda" else 0
        try:
            self._group = self._reserve(workers, options.cpus, gpus, options.placement)
            self.workers = self._start(options.cpus, gpus, options.deterministic)
            self._connect()
            self._prefixes: list[str] = self._get(
                self.workers[0].__ray_call__.remote(_prefixes, num_blocks), "reading block names")
        except BaseException:
            self.shutdown()  # nothing half-started outlives a failed construction
            raise
        self.meter = BusyMeter(self._read_busy)
        for s in self.specs:
            log.info("ray worker %d owns blocks [%d, %d) on %s", s.rank, s.start, s.stop, s.device)
        log.info("streams cross between Ray workers by %s", self.transport.name)

    @property
    def transport_name(self) -> str:
        """The transport that runs (``engine.transport`` in the report)."""
        return self.transport.name

    def _connect(self) -> None:
        """(Re)build the transport's channel over the current actors."""
        self.transport.disconnect(self._channel)
        self._channel = None
        self._channel = self.transport.connect(self.workers)

    # ------------------------------------------------------------------ lifecycle

    def _reserve(self, workers: int, cpus: float, gpus: int, placement: str) -> Any:
        """A placement group of ``workers`` bundles (gang scheduling: all or nothing)."""
        ray = import_ray()
        from ray.util.placement_group import placement_group, remove_placement_group

        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        total = ray.cluster_resources()
        short = {k: v * workers for k, v in bundle.items() if total.get(k, 0) < v * workers}
        timeout = self.options.placement_timeout
        if short:
            log.warning("%d Ray workers need %s but the cluster has %s in total; waiting up to "
                        "%.0f s for more nodes", workers, short,
                        {k: total.get(k, 0) for k in short}, timeout)
        group = placement_group([dict(bundle) for _ in range(workers)], strategy=placement)
        ready, _ = ray.wait([group.ready()], timeout=timeout)
        if not ready:
            remove_placement_group(group)
            raise RuntimeError(
                f"Ray could not place {workers} workers of {bundle} with strategy {placement} "
                f"within engine.ray.placement_timeout={timeout:g} s; the cluster has "
                f"{ray.available_resources()} available. Use fewer workers, a smaller "
                "engine.ray.cpus, or engine.ray.placement=PACK, or raise "
                "engine.ray.placement_timeout; an earlier run's saved state continues with "
                "--resume")
        return group

    def _start(self, cpus: float, gpus: int, deterministic: bool) -> list[Any]:
        """One actor per spec, pinned to its bundle; returns once every slice is loaded."""
        threads = None if gpus else torch.get_num_threads()
        self._actor_class = import_ray().remote(enable_tensor_transport=True)(Worker)
        self._actor_options = {"num_cpus": cpus, "num_gpus": gpus, "runtime_env": {
            "env_vars": actor_env(gpus > 0, deterministic, threads)}}

        level = logging.getLevelName(logging.getLogger("neuroal").getEffectiveLevel())
        self._setup_args = (deterministic, threads, level, SETTINGS.interval)
        self.workers = [self._new_actor(s) for s in self.specs]  # shutdown() releases them
        for spec in self.specs:
            self.fault_hook("load", spec.rank)
        # An actor killed while loading (OOM, lost node) is restarted like one killed later;
        # an exception raised by the loading code itself is not retried (see _recover).
        self._retrying(lambda: self._get(
            [a.__ray_call__.remote(_setup, *self._setup_args) for a in self.workers],
            "loading the worker slices"))
        self._relay_warnings()
        return self.workers

    def _new_actor(self, spec: WorkerSpec) -> Any:
        """An actor for ``spec`` in bundle ``spec.rank`` (it loads its slice on construction)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return self._actor_class.options(
            **self._actor_options, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self._group, placement_group_bundle_index=spec.rank)).remote(spec)

    def shutdown(self) -> None:
        """Kill the actors, release the placement group, disconnect if this executor connected."""
        ray = import_ray()
        if not ray.is_initialized():
            return
        from ray.util.placement_group import remove_placement_group

        self._relay_warnings()
        self.transport.release(self._channel)
        self._channel = None
        for a in self.workers:
            ray.kill(a)
        self.workers = []
        if self._group is not None:
            remove_placement_group(self._group)
            self._group = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def _get(self, refs: Any, what: str, timeout: float | None = None) -> Any:
        """``ray.get`` whose errors say which unit of work failed (engine.md §3.3); past
        ``timeout`` seconds the run stops with the ``--resume`` hint."""
        ray = import_ray()
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError as exc:
            self._failed = what
            message = (f"the Ray executor waited engine.ray.placement_timeout={timeout:g} s "
                       f"while {what} (a lost node without spare capacity, or a stuck worker); "
                       f"giving up. {self._resume_hint()}")
            self.shutdown()
            raise RuntimeError(message) from exc
        except ray.exceptions.RayError as exc:
            self._failed = what
            if hasattr(exc, "add_note"):
                exc.add_note(f"neuroal: the Ray executor failed while {what}")
            raise

    def _pipelined(self, items: Sequence[int], submit: Callable[[int], T],
                   gather: Callable[[int, T], R], desc: str) -> list[R]:
        """Submit ``items`` with at most ``self.inflight`` unfinished; gather in order."""
        window: deque[tuple[int, T]] = deque()
        count = len(items)
        ticks = progress(range(count), desc, total=count)
        out: list[R] = []
        for i in range(count + 1):
            while window and (len(window) >= self.inflight or i == count):
                j, pending = window.popleft()
                out.append(gather(j, pending))
                next(ticks, None)
            if i < count:
                window.append((items[i], submit(items[i])))
        return out

    def _relay_warnings(self) -> None:
        """Log the actors' warning records here (driver's terminal and the run's log file);
        called where no work is in flight (after loading, after the final prune, when reading
        worker info, before shutdown), so the call never waits behind queued work."""
        if not self.workers:
            return
        ray = import_ray()
        refs = [a.__ray_call__.remote(_warnings) for a in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
        for k, ref in enumerate(refs):
            try:
                if ref in ready:
                    replay(ray.get(ref), f"ray worker {k}")
            except ray.exceptions.RayError:  # dead or unreachable: its records are lost
                continue

    def _read_busy(self) -> list[float]:
        """Every rank's cumulative busy seconds, its dead predecessors' included."""
        raw = self._retrying(lambda: self._get([a.__ray_call__.remote(_busy) for a in self.workers],
                                               "reading busy times"))
        self._last_busy = [o + r for o, r in zip(self._busy_offset, raw, strict=True)]
        return list(self._last_busy)

    # ------------------------------------------------------------------ protocol

    def num_blocks(self) -> int:
        return self._num_blocks

    def _owned(self, rank: int) -> range:
        return range(self.specs[rank].start, self.specs[rank].stop)

    def _stage(self, rank: int, source: Any, hand_on: bool, op: str, *args: Any,
               with_result: bool = True) -> tuple[Any, Any]:
        """Submit stage ``op`` of actor ``rank``: ``(ref of what it returns, ref of its
        result)``. Handing on, the call returns the stream through the transport and its result
        (``with_result``) comes from one small :func:`_take` call queued behind it; at the end
        of a pass the call returns the result itself."""
        actor = self.workers[rank]
        if not hand_on:
            ref = actor.__ray_call__.remote(_run_stage, source, False, None, op, *args)
            return ref, ref
        token = next(self._tokens) if with_result else None
        ref = actor.__ray_call__.options(**self.transport.options()).remote(
            _run_stage, source, True, token, op, *args)
        return ref, (actor.__ray_call__.remote(_take, token) if with_result else None)

    def _forward_pass(self, ids: torch.Tensor, head: str, *args: Any) -> Any:
        """Ref of ``Worker.<head>(final stream, *args)`` on the last actor after one pass of
        ``ids`` ``(B, T)`` through every slice (dense or pruned): one call per actor."""
        source: Any = Embed(ids)
        last = len(self.workers) - 1
        for k in range(last + 1):
            source, _ = self._stage(k, source, k < last, "forward", head if k == last else None,
                                    *(args if k == last else ()), with_result=False)
        return source

    def run_final_prune(self, plan: SparsityPlan, job: PruneJob,
                        ids: torch.Tensor) -> list[BlockReport]:
        """One stream through every block in order (a barrier per block, engine.md §11), one
        call per actor over its whole slice (:meth:`Worker.prune_slice`, which writes each
        block's resume state inside the actor): the stream crosses K-1 times.

        After an actor death the pass restarts from block 0: blocks finished on surviving
        actors only run forward, the restarted actor's blocks are replayed from the resume
        state (``job.state_dir``) or, without one, pruned again from its reloaded dense slice.
        """
        if job.state_dir is not None:
            self.state_dir = job.state_dir
        self._pruned = None
        self.parallel = self._prune_mode()
        if self.parallel == "data":
            return self._data_final_prune(plan, job, ids)
        reports: dict[int, BlockReport] = {}

        def forget(dead: list[int]) -> None:
            lost = [b for k in dead for b in self._owned(k) if reports.pop(b, None) is not None]
            how = (f"replayed from the saved state in {job.state_dir}" if job.state_dir is not None
                   else "pruned again from the reloaded dense weights (no resume state: the run "
                   "has no output directory; same result, slower)")
            log.warning("final prune resumes after the restart: finished blocks %s of surviving "
                        "workers only run forward, finished blocks %s of the restarted worker(s) "
                        "are %s, the remaining blocks are pruned", sorted(reports), lost, how)

        with self.meter("prune"):
            self._retrying(lambda: self._prune_pass(
                plan, job, ids, set(range(self._num_blocks)) - set(reports), reports), forget)
            # from here a restarted actor gets its pruned blocks back (also one found dead
            # while the meter reads the busy times, after its last stage returned)
            self._pruned = (plan, job, ids)
        self._relay_warnings()
        return [reports[b] for b in range(self._num_blocks)]

    def _prune_pass(self, plan: SparsityPlan, job: PruneJob, ids: torch.Tensor, redo: set[int],
                    reports: dict[int, BlockReport]) -> None:
        """Stream ``ids`` through blocks ``0..max(redo)``, one stage per actor: blocks in
        ``redo`` are pruned (replayed when saved), the others (already pruned on a live actor)
        run forward only; each actor's reports go into ``reports`` as soon as they arrive."""
        if not redo:
            return
        stop = max(redo) + 1
        ranks = sorted({self._owner[b] for b in range(stop)})
        source: Any = Embed(ids)  # actor 0 embeds
        results = []
        for k in ranks:
            indices = [b for b in self._owned(k) if b < stop]
            entries = {b: plan.block(b) for b in indices if b in redo}
            source, result = self._stage(k, source, k != ranks[-1], "prune", entries, job,
                                         indices)
            results.append(result)
            for b in sorted(entries):
                self.fault_hook("prune", b)
        del source
        ticks = progress(range(len(redo)), "pruning blocks", total=len(redo))
        for k, result in zip(ranks, results, strict=True):
            for report in self._get(result, f"pruning blocks {list(self._owned(k))}"):
                reports[report.index] = report
                log_block(report, self._num_blocks)
                next(ticks, None)

    def evaluate_candidates(self, ids: torch.Tensor,
                            candidates: Sequence[Sequence[Mapping[str, Any]]],
                            job: CandidateJob, reference_stream: str = "local",
                            on_result: Callable[[int, list[BlockAlignment]], None] | None = None,
                            bound: Callable[[int], tuple[float, bool] | None] | None = None,
                            ) -> list[list[BlockAlignment]]:
        """Alignment terms of each candidate, candidates pipelined through the actors.

        Actor 0 embeds the search windows ``ids`` ``(n_s, T)`` once and keeps them; each
        candidate is one call per actor over its slice, its stream handed on by the transport;
        up to ``inflight`` candidates are in flight. Per candidate the parts are gathered in
        the original order and keyed by block, as in the local executor. After an actor death
        only the candidates not yet gathered (and reported through ``on_result``) are
        submitted again. In data mode the dense reference is one data-parallel pass
        (:meth:`_data_reference`; a lost actor there stops the run); the candidates pipeline
        in either mode.
        """
        results: dict[int, list[BlockAlignment]] = {}
        last = len(self.workers) - 1
        data = self._data_pass(int(ids.shape[0]))

        def attempt() -> None:
            for actor in self.workers:
                actor.__ray_call__.remote(_forget)
            self._get(self.workers[0].__ray_call__.remote(_keep_embedded, "search", ids),
                      "embedding the search windows")
            if data:
                self._data_reference(ids, reference_needs(job.criterion, job.alignment_stat),
                                     reference_stream)
            else:
                self._dense_reference(job, reference_stream)

            def submit(c: int) -> list[Any]:
                source: Any = Kept("search")
                parts = []
                # the bound known at submit time; each actor checks its own slice's partial sum
                # (carried 0.0: a lower bound of the candidate's, so still exact)
                best = bound(c) if bound is not None else None
                for k in range(last + 1):
                    own = {b: candidates[c][b] for b in self._owned(k)}
                    source, part = self._stage(k, source, k < last, "candidate", own, job,
                                               None if best is None else (best[0], best[1], 0.0))
                    parts.append(part)
                self.fault_hook("candidate", c)
                return parts

            def gather(c: int, parts: list[Any]) -> None:
                per_block: dict[int, BlockAlignment] = {}
                for part in self._get(parts, f"evaluating candidate {c + 1}/{len(candidates)}"):
                    per_block.update(part)
                results[c] = prefix_blocks(per_block, self._num_blocks)
                if on_result is not None:
                    on_result(c, results[c])

            todo = [c for c in range(len(candidates)) if c not in results]
            self._pipelined(todo, submit, gather, "candidates")
            self._get([a.__ray_call__.remote(_forget) for a in self.workers],
                      "releasing the search windows")

        def resubmit(_dead: list[int]) -> None:
            log.warning("search resumes after the restart: %d of %d candidate(s) already "
                        "gathered, the other %d are submitted again", len(results),
                        len(candidates), len(candidates) - len(results))

        with self.meter("search"):
            self._retrying(attempt, resubmit)
        return [results[c] for c in range(len(candidates))]

    def _dense_reference(self, job: CandidateJob, reference_stream: str) -> None:
        """Each actor's candidate-independent dense statistics, kept inside it: block 0's on
        actor 0 (``local``), or every block's from one dense pass (``global``)."""
        needs = reference_needs(job.criterion, job.alignment_stat)
        count = 1 if reference_stream == "local" else len(self.workers)
        source: Any = Kept("search")
        for k in range(count):
            source, _ = self._stage(k, source, k < count - 1, "reference", needs,
                                    reference_stream, with_result=False)

    def dense_block_metrics(self, ids: torch.Tensor, fn: Callable[..., Any],
                            needs: frozenset[str]) -> list[Any]:
        """``fn(weights, stats)`` per block over one dense pass of ``ids`` ``(N, T)``, one call
        per actor: data-parallel in data mode (:meth:`_data_metrics`; a lost actor stops the
        run), else pipelined through the slices (a lost actor is restarted)."""
        if self._data_pass(int(ids.shape[0])):
            return merge_blocks(self._data_metrics(ids, fn, needs), self._num_blocks)

        def attempt() -> list[Any]:
            source: Any = Embed(ids)
            parts = []
            last = len(self.workers) - 1
            for k in range(last + 1):
                source, part = self._stage(k, source, k < last, "metrics", fn, needs)
                parts.append(part)
            return self._get(parts, "the dense statistics pass")

        return merge_blocks(self._retrying(attempt), self._num_blocks)

    def weight_metrics(self, fn: Callable[[torch.Tensor], Any]) -> list[dict[str, Any]]:
        """``fn(weight)`` per linear, every actor in parallel on its own blocks."""
        return merge_blocks(self._retrying(lambda: self._get(
            [a.weight_metrics.remote(fn) for a in self.workers], "computing weight metrics")),
            self._num_blocks)

    def window_nll(self, windows: torch.Tensor) -> torch.Tensor:
        """Per-window mean NLL ``(k,)`` float64; micro-batch chunks pipeline freely, in either
        mode (:meth:`_data_pass` says why)."""
        parts = chunks(windows, self.specs[0].micro_batch)
        return torch.cat(self._chunked(
            len(parts), lambda i: self._forward_pass(parts[i], "window_nll", parts[i]),
            "perplexity", "computing perplexity chunk"))

    def token_logprobs(self, inputs: torch.Tensor,
                       targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position log-probability of ``targets`` after ``inputs`` (both ``(B, T)``) and
        its argmax flag (``Worker.token_logprobs`` on the last actor); chunks pipeline."""
        parts = paired_chunks(inputs, targets, self.specs[0].micro_batch)
        return cat_pairs(self._chunked(
            len(parts), lambda i: self._forward_pass(parts[i][0], "token_logprobs", parts[i][1]),
            "zero-shot", "scoring zero-shot chunk"))

    def _chunked(self, count: int, submit_one: Callable[[int], Any], unit: str,
                 what: str) -> list[Any]:
        """Results of ``count`` micro-batch chunks, up to ``inflight`` in flight, in order;
        after an actor death only the chunks not yet gathered are submitted again."""
        done: dict[int, Any] = {}

        def submit(i: int) -> Any:
            ref = submit_one(i)
            self.fault_hook(unit, i)
            return ref

        def gather(i: int, ref: Any) -> None:
            done[i] = self._get(ref, f"{what} {i}")

        with self.meter("eval"):
            self._retrying(lambda: self._pipelined(
                [i for i in range(count) if i not in done], submit, gather, unit))
        return [done[i] for i in range(count)]

    def last_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, vocab)`` for ids ``(B, t)`` (data-free calibration)."""
        return self._retrying(lambda: self._get(self._forward_pass(ids, "last_logits"),
                                                "sampling"))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full logits ``(B, T, vocab)`` of the current (dense or pruned) model."""
        return self._retrying(lambda: self._get(self._forward_pass(ids, "logits"),
                                                "computing logits"))

    def masks(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for part in self._retrying(lambda: self._get([a.masks.remote() for a in self.workers],
                                                     "reading masks")):
            out.update(part)
        return out

    def write_shards(self, directory: str, dtype: str, max_bytes: int) -> list[dict[str, Any]]:
        """Every actor writes its own files into ``directory`` (shared storage on a cluster);
        after a restart every actor writes again (same names, same bytes)."""
        parts = self._retrying(lambda: self._get(
            [a.write_shards.remote(directory, dtype, max_bytes) for a in self.workers],
            "writing shards"))
        return [f for part in parts for f in part]

    def block_prefix(self, index: int) -> str:
        return self._prefixes[index]

    def worker_info(self) -> list[dict[str, Any]]:
        """Per actor: rank, blocks, device, busy seconds (dead predecessors included), Ray
        node id, GPU ids and how often it was restarted."""
        infos = self._retrying(lambda: self._get([a.__ray_call__.remote(_info)
                                                  for a in self.workers], "reading workers"))
        for k, info in enumerate(infos):
            info["busy_seconds"] += self._busy_offset[k]
            info["restarts"] = self.restarts[k]
        self._relay_warnings()
        return infos

    def utilisation(self) -> dict[str, dict[str, Any]]:
        """Per phase (``search``, ``prune``, ``eval``): wall, busy per actor, utilisation."""
        return self.meter.report()
