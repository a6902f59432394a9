"""torch.distributed executor: one rank per block slice on one node (engine.md §3.4).

Launch with ``torchrun --nproc_per_node K launch/prune.py ... engine.executor=dist
engine.workers=K`` or ``accelerate launch --num_processes K launch/prune.py ...`` (same
arguments). Rank r holds the one :class:`~neuroal.engine.worker.Worker` of slice r
(:func:`~neuroal.engine.executor.split_blocks`) on ``cuda:<LOCAL_RANK>`` (NCCL) or the CPU
(gloo); it loads only its own blocks.

Rank 0 is the coordinator: it runs the pipeline (data, search, evaluation, report) and every
executor call becomes a *command*: a name and small picklable arguments broadcast to all ranks,
plus per-rank arguments (plan entries, candidate ratios) scattered to their owners. Each rank
then runs its part with the same Worker methods, on the same micro-batches, as
:class:`~neuroal.engine.executor.LocalExecutor`; activation streams ``(N, T, h)`` go rank r ->
r+1 with point-to-point ``send``/``recv`` as raw bytes (lossless, engine.md §3.5 rule 4), so
results are bit-identical to the local executor. A six-integer header (status, shape, dtype,
and the bits of a float64: a search candidate's alignment sum so far, for exact early stopping,
issue 16 item 13) precedes each stream: a rank that fails forwards a failure header instead of
a stream, so no rank is left waiting, and the error is raised on rank 0 after the closing
``gather_object``; a rank that stops a candidate forwards the same header, and later ranks skip.

Ranks > 0 run :func:`serve` until rank 0 sends ``exit`` (or ``abort`` when the coordinator
fails); :func:`coordinator` is the matching context on rank 0. Both start from the same argv,
so they validate the same config and reject a rank count different from ``engine.workers``.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from neuroal.allocation.neuroal_math import total_alignment
from neuroal.allocation.plan import SparsityPlan
from neuroal.config.schema import DistConfig, PruneConfig
from neuroal.engine.collectives import DistComm
from neuroal.engine.core import (
    cat_pairs,
    chunks,
    log_block,
    merge_blocks,
    paired_chunks,
    reference_needs,
    worker_template,
)
from neuroal.engine.data_parallel import DataPrune, Layout, Stopped, prune_mode
from neuroal.engine.data_passes import pass_mode, run_pass
from neuroal.engine.determinism import CUBLAS_WORKSPACE
from neuroal.engine.executor import BusyMeter, prefix_blocks, split_blocks
from neuroal.engine.preflight import NodeFacts, gather_facts, probe_root, read_probes
from neuroal.engine.worker import Worker
from neuroal.models.loading import ModelSource
from neuroal.runtime.errors import ConfigError
from neuroal.runtime.jobs import BlockAlignment, BlockReport, CandidateJob, PruneJob, WorkerSpec
from neuroal.runtime.logging import configure, get_logger, progress
from neuroal.runtime.process import seed_everything

log = get_logger(__name__)

# Ranks > 0 wait in a broadcast while rank 0 works alone (data loading, search bookkeeping,
# export of config and tokenizer); the default 30 min collective timeout is too short at 70B.
# The default of ``engine.dist.timeout`` (seconds).
TIMEOUT = datetime.timedelta(seconds=DistConfig().timeout)
# Point-to-point stream transfers get the short ``engine.dist.collective_timeout`` (their own
# process group), so a hung GPU or a dead neighbour is reported within it.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=DistConfig().collective_timeout)
_STREAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_EXIT, _ABORT = "exit", "abort"


class RankError(RuntimeError):
    """A rank other than 0 failed; the message carries its traceback."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in a torchrun / accelerate launch."""

    rank: int
    world: int
    local_rank: int
    device: str
    timeout: datetime.timedelta = TIMEOUT  # engine.dist.timeout: commands (broadcast, gather)
    collective_timeout: datetime.timedelta = COLLECTIVE_TIMEOUT  # streams (send / recv)

    @property
    def backend(self) -> str:
        """gloo on CPU; on GPUs NCCL for the streams and gloo for the pickled commands, so a
        rank waiting for rank 0 blocks on a socket rather than spinning on its GPU."""
        return "cpu:gloo,cuda:nccl" if torch.device(self.device).type == "cuda" else "gloo"

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1


# --------------------------------------------------------------------------- launch detection


def launch_env() -> tuple[int, int, int] | None:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` as set by torchrun / accelerate, or None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def rank_info(cfg: PruneConfig) -> RankInfo | None:
    """This process's rank, validated against the config; None for a single-process run.

    A launch with ``WORLD_SIZE > 1`` needs ``engine.executor: dist`` and ``engine.workers``
    equal to the number of ranks; ``engine.executor: dist`` needs such a launch.

    Raises:
        ConfigError: The launch and the config disagree (every rank raises the same errors).
    """
    env = launch_env()
    wanted = cfg.engine.executor == "dist"
    if not wanted and (env is None or env[1] <= 1):
        return None
    if env is None:
        raise ConfigError([
            "engine.executor='dist' needs processes started by torchrun or accelerate launch "
            "(RANK and WORLD_SIZE are unset); run `torchrun --nproc_per_node K launch/prune.py "
            "... engine.executor=dist engine.workers=K`, or use engine.executor=local"])
    rank, world, local_rank = env
    errors = []
    if not wanted:
        errors.append(f"launched as {world} ranks (WORLD_SIZE={world}) but "
                      f"engine.executor={cfg.engine.executor!r}; pass engine.executor=dist, or "
                      "start a single process (python launch/prune.py ...)")
    if cfg.engine.workers != world:
        errors.append(f"engine.workers={cfg.engine.workers} but launched with WORLD_SIZE={world} "
                      f"ranks (one block slice per rank); pass --workers {world} "
                      f"(engine.workers={world}) or launch {cfg.engine.workers} processes")
    device, device_errors = rank_device(cfg, rank, local_rank)
    errors += device_errors
    if errors:
        raise ConfigError(errors)
    return RankInfo(rank, world, local_rank, device,
                    datetime.timedelta(seconds=cfg.engine.dist.timeout),
                    datetime.timedelta(seconds=cfg.engine.dist.collective_timeout))


def rank_device(cfg: PruneConfig, rank: int, local_rank: int) -> tuple[str, list[str]]:
    """The device of ``rank``: ``engine.devices[LOCAL_RANK]`` when one is given per worker (a
    node's devices, indexed by the rank within the node: on 4-GPU nodes ranks 4-7 use the
    first four entries), else ``cuda:<LOCAL_RANK>`` for a CUDA run (an index in
    ``engine.device`` is ignored) and ``cpu`` otherwise; plus any errors."""
    eng = cfg.engine
    names = list(eng.devices) or [eng.device]
    try:
        kinds = {("cuda" if torch.cuda.is_available() else "cpu") if n == "auto" else
                 torch.device(n).type for n in names}
    except RuntimeError as exc:
        return "cpu", [f"engine.device(s)={names}: {exc}; expected cpu, cuda, cuda:N or auto"]
    if len(kinds) > 1:
        return "cpu", [f"engine.devices={list(eng.devices)} mixes device types {sorted(kinds)}; "
                       "every rank must use the same type (engine.md §3.5)"]
    (kind,) = kinds
    if kind == "cuda" and torch.cuda.device_count() <= local_rank:
        return "cpu", [f"rank {rank} (LOCAL_RANK={local_rank}) needs a CUDA device but "
                       f"{torch.cuda.device_count()} are visible; launch at most that many "
                       "processes per node, or use --device cpu"]
    if len(names) > 1 and local_rank >= len(names):
        return "cpu", [f"rank {rank} has LOCAL_RANK={local_rank} but engine.devices lists "
                       f"{len(names)} devices; list one device per process of a node"]
    if len(names) > 1:
        return names[local_rank], []
    return (f"cuda:{local_rank}" if kind == "cuda" else kind), []


@contextmanager
def _process_group(info: RankInfo) -> Iterator[Any]:
    """Initialise the default process group from the launcher's environment (env://), with the
    long command timeout; yields the stream group (every rank, the short
    ``collective_timeout``) that point-to-point transfers use."""
    if torch.device(info.device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # deterministic cuBLAS
        torch.cuda.set_device(torch.device(info.device))
    dist.init_process_group(info.backend, rank=info.rank, world_size=info.world,
                            timeout=info.timeout)
    try:
        yield dist.new_group(backend=info.backend, timeout=info.collective_timeout)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- one rank's part


class RankStage:
    """This process's part of every command; holds its Worker between ``start`` and ``release``.

    Every command runs the same sequence of collectives and point-to-point calls on every rank,
    whatever fails: computations go through :meth:`_try`, which records the first error and
    skips later work, and :meth:`_relay` still forwards a (failure) header downstream.
    """

    def __init__(self, info: RankInfo) -> None:
        self.info = info
        self.worker: Worker | None = None
        self.micro_batch = 1
        self.home = torch.device(info.device)
        self.comm = torch.device(info.device)
        self.busy = False
        self.carried = 0.0
        """The float64 relayed with the stream (a search candidate's alignment sum so far)."""
        self._search: tuple[torch.Tensor | None, dict[int, Any]] | None = None
        """Embedded search windows and dense reference kept between the one-candidate
        commands of an early-stopped search (:meth:`candidates`)."""
        self._error: Exception | None = None
        self._trace = ""
        self.streams: Any = None
        """Process group of the stream transfers (short timeout); None: the default group."""

    @property
    def w(self) -> Worker:
        if self.worker is None:
            raise RuntimeError(f"rank {self.info.rank} holds no worker (executor shut down)")
        return self.worker

    def execute(self, name: str, common: Any, own: Any) -> list[Any] | None:
        """Run command ``name``; on rank 0 return every rank's part, in rank order.

        Raises:
            RuntimeError: Unknown command (a version mismatch between ranks).
            Exception: On rank 0, the first error of any rank (rank order), re-raised.
        """
        if name not in _OPS:
            raise RuntimeError(f"unknown distributed command {name!r}; known: {', '.join(_OPS)}")
        self.busy, self._error, self._trace = True, None, ""
        part = _OPS[name](self, common, own)
        return self._gather(part)

    def _try(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, or None after a failure (recorded once, with its traceback)."""
        if self._error is not None:
            return None
        try:
            return fn(*args)
        except Exception as exc:
            self._error, self._trace = exc, traceback.format_exc()
            return None

    def _gather(self, part: Any) -> list[Any] | None:
        payload = (_portable(self._error), self._trace, None if self._error else part)
        out: list[Any] | None = [None] * self.info.world if self.info.rank == 0 else None
        dist.gather_object(payload, out, dst=0)
        self.busy = False
        if out is None:
            return None
        if self._error is not None:
            raise self._error
        for rank, (exc, trace, _) in enumerate(out):
            if exc is not None:
                raise exc from RankError(f"rank {rank} failed:\n{trace}")
        return [p for _, _, p in out]

    # ------------------------------------------------------------------ streams

    def _relay(self, start: Callable[[], torch.Tensor],
               compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """One pass of a stream: start it (rank 0) or receive it, compute, hand it on, with
        :attr:`carried` (0.0 from rank 0; ``compute`` may update it)."""
        if self.info.rank == 0:
            self.carried = 0.0
            stream = self._try(start)
        else:
            stream = self._recv()
        if stream is not None:
            stream = self._try(compute, stream)
        if not self.info.last:
            self._send(stream)
        return stream

    def _send(self, stream: torch.Tensor | None) -> None:
        """Header ``[ok, N, T, h, dtype, carried]`` then the stream's raw bytes (no cast)."""
        dst = self.info.rank + 1
        if stream is None or stream.dim() != 3 or stream.dtype not in _STREAM_DTYPES:
            if stream is not None and self._error is None:
                self._error = RuntimeError(f"rank {self.info.rank}: cannot ship a stream of "
                                           f"shape {tuple(stream.shape)} and {stream.dtype}")
            dist.send(torch.zeros(6, dtype=torch.int64, device=self.comm), dst=dst,
                      group=self.streams)
            return
        bits = torch.tensor([self.carried], dtype=torch.float64).view(torch.int64).item()
        header = [1, *stream.shape, _STREAM_DTYPES.index(stream.dtype), bits]
        dist.send(torch.tensor(header, dtype=torch.int64, device=self.comm), dst=dst,
                  group=self.streams)
        dist.send(stream.to(self.comm).contiguous().view(torch.uint8), dst=dst,
                  group=self.streams)

    def _recv(self) -> torch.Tensor | None:
        src = self.info.rank - 1
        header = torch.empty(6, dtype=torch.int64, device=self.comm)
        dist.recv(header, src=src, group=self.streams)
        ok, n, t, h, code, bits = header.tolist()
        if not ok:
            return None
        self.carried = torch.tensor([bits], dtype=torch.int64).view(torch.float64).item()
        dtype = _STREAM_DTYPES[code]
        raw = torch.empty((n, t, h * dtype.itemsize), dtype=torch.uint8, device=self.comm)
        dist.recv(raw, src=src, group=self.streams)
        return raw.view(dtype).to(self.home)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Embed ``ids`` on rank 0 and run the stream through every slice (dense or pruned)."""
        return self._relay(lambda: self.w.embed(ids), lambda s: self.w.forward(s))

    # ------------------------------------------------------------------ commands

    def start(self, template: WorkerSpec, bounds: tuple[int, int]) -> dict[str, Any]:
        """Load this rank's slice ``[a, b)`` on its own device."""
        self.worker = None
        spec = replace(template, start=bounds[0], stop=bounds[1], rank=self.info.rank,
                       device=self.info.device)
        self.micro_batch = spec.micro_batch
        self.home = torch.device("cpu") if spec.offload_activations else torch.device(spec.device)
        self.worker = self._try(Worker, spec)
        return {"rank": self.info.rank, "blocks": list(bounds), "device": spec.device}

    def probe(self, common: tuple[str | None, str], _own: Any) -> NodeFacts:
        """Preflight, first round: this rank's facts; writes its probe (never raises)."""
        tmp, nonce = common
        return self._try(gather_facts, self.info.rank, self.info.device, tmp, nonce)

    def probe_read(self, common: tuple[str | None, str, list[str]], _own: Any) -> tuple[str, ...]:
        """Preflight, second round: the probe names this rank can read."""
        tmp, nonce, names = common
        return () if tmp is None else self._try(read_probes, probe_root(tmp), names, nonce)

    def release(self, _common: Any, _own: Any) -> None:
        if self.worker is not None:
            self.worker.close()
        self.worker, self._search = None, None

    def info(self, _common: Any, _own: Any) -> dict[str, Any] | None:
        return self._try(lambda: self.w.info())

    def prune(self, common: tuple[PruneJob, torch.Tensor],
              entries: Mapping[int, Mapping[str, Any]]) -> list[BlockReport]:
        """Sequential final prune of the owned blocks (criteria.md §1.3)."""
        job, ids = common
        reports: list[BlockReport] = []

        def compute(stream: torch.Tensor) -> torch.Tensor:
            for b in self.w.blocks:
                stream, report = self.w.prune_one(b, stream, entries[b], job)
                reports.append(report)
            return stream

        self._relay(lambda: self.w.embed(ids), compute)
        return reports

    def data_prune(self, common: tuple[PruneJob, torch.Tensor, list[Mapping[str, Any]],
                                       list[tuple[int, int]]], _own: Any) -> list[BlockReport] | None:
        """Data-parallel final prune (:mod:`neuroal.engine.data_parallel`): every rank works on
        every block; the reports of the blocks this rank owns. A rank stopped by another's
        failure returns None, so rank 0 raises the failing rank's error."""
        job, ids, entries, slices = common
        layout = Layout(tuple(map(tuple, slices)), int(ids.shape[0]), self.micro_batch)
        prune = DataPrune(self.w, DistComm(self.info.rank, self.info.world, self.comm), layout)

        def body() -> list[BlockReport] | None:
            try:
                return prune.run(ids, entries, job)
            except Stopped:
                return None

        return self._try(body)

    def candidates(self, common: tuple[torch.Tensor, CandidateJob, str, Sequence[Any] | None,
                                       bool, bool, bool],
                   own: Sequence[Mapping[int, Mapping[str, Any]]]) -> list[dict[int, BlockAlignment]]:
        """Alignment terms of each candidate over the owned blocks (neuroal.md §A5).

        ``common = (ids, job, reference_stream, bounds, reuse, keep, data)``: ``bounds[c]`` is None
        or candidate c's ``(best, inclusive)``, checked by :meth:`Worker.eval_candidate`
        against the alignment sum relayed with the stream (exact early stopping): a rank that
        stops relays no stream and the later ranks skip the candidate. ``reuse`` takes the
        embedded windows and dense reference kept by the previous command (``keep``); ``data``
        computes the dense reference data-parallel (:mod:`neuroal.engine.data_passes`).
        """
        ids, job, reference_stream, bounds, reuse, keep, data = common
        if reuse and self._search is not None:
            embedded, reference = self._search
        elif data:  # the pass first: every rank takes part in its collectives
            reference = self._data("dense_reference", ids,
                                   reference_needs(job.criterion, job.alignment_stat),
                                   reference_stream) or {}
            embedded = self._try(lambda: self.w.embed(ids)) if self.info.rank == 0 else None
        else:
            embedded = self._try(lambda: self.w.embed(ids)) if self.info.rank == 0 else None
            reference = self._reference(embedded, job, reference_stream)
        self._search = (embedded, reference) if keep else None
        results = []
        for c, ratios in enumerate(self._progress(own, "candidates") if len(own) > 1 else own):
            part: dict[int, BlockAlignment] = {}
            best = None if bounds is None else bounds[c]

            def step(stream: torch.Tensor, ratios: Any = ratios, best: Any = best,
                     part: dict[int, BlockAlignment] = part) -> torch.Tensor | None:
                stream, values = self.w.eval_candidate(
                    stream, ratios, job, reference, None if best is None else (*best, self.carried))
                part.update(values)
                self.carried = total_alignment([v.na for v in values.values()], self.carried)
                return stream

            self._relay(lambda: embedded, step)
            results.append(part)
        return results

    def _reference(self, embedded: torch.Tensor | None, job: CandidateJob,
                   reference_stream: str) -> dict[int, Any]:
        """Candidate-independent dense statistics of the owned blocks (neuroal.md §B4, §B5):
        block 0's on rank 0 (``local``), or every block's from one dense pass (``global``)."""
        needs = reference_needs(job.criterion, job.alignment_stat)
        reference: dict[int, Any] = {}
        if reference_stream == "local":
            if self.info.rank == 0:
                part = self._try(lambda: self.w.dense_reference(embedded, needs, "local"))
                reference.update(part[1] if part else {})
            return reference

        def dense(stream: torch.Tensor) -> torch.Tensor:
            stream, part = self.w.dense_reference(stream, needs, reference_stream)
            reference.update(part)
            return stream

        self._relay(lambda: embedded, dense)
        return reference

    def data_pass(self, common: tuple[str, tuple[Any, ...]], _own: Any) -> Any:
        """A data-parallel pass ``common = (name, args)`` over every rank
        (:mod:`neuroal.engine.data_passes`): this rank's part (head passes: the whole result
        on rank 0)."""
        name, args = common
        return self._data(name, *args)

    def _data(self, name: str, *args: Any) -> Any:
        """This rank's part of pass ``name``; None on a rank stopped by another's failure, so
        rank 0 raises the failing rank's error."""
        comm = DistComm(self.info.rank, self.info.world, self.comm)

        def body() -> Any:
            try:
                slices = split_blocks(self.w.spec.num_blocks, self.info.world)
                return run_pass(name, self.w, comm, slices, *args)
            except Stopped:
                return None

        return self._try(body)

    def dense_metrics(self, common: tuple[torch.Tensor, Callable[..., Any], frozenset[str]],
                      _own: Any) -> dict[int, Any]:
        ids, fn, needs = common
        values: dict[int, Any] = {}

        def compute(stream: torch.Tensor) -> torch.Tensor:
            stream, part = self.w.dense_block_metrics(stream, fn, needs)
            values.update(part)
            return stream

        self._relay(lambda: self.w.embed(ids), compute)
        return values

    def weight_metrics(self, fn: Callable[[torch.Tensor], Any], _own: Any) -> Any:
        return self._try(lambda: self.w.weight_metrics(fn))

    def window_nll(self, windows: torch.Tensor, _own: Any) -> torch.Tensor | None:
        """Per-window NLL, micro-batch by micro-batch as in the local executor (last rank)."""
        out = []
        for chunk in self._progress(chunks(windows, self.micro_batch), "perplexity"):
            stream = self._forward(chunk)
            if self.info.last and stream is not None:
                out.append(self._try(lambda s=stream, c=chunk: self.w.window_nll(s, c)))
        return torch.cat(out) if self.info.last and self._error is None else None

    def token_logprobs(self, common: tuple[torch.Tensor, torch.Tensor],
                       _own: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-position target log-probabilities and argmax flags (last rank), micro-batch by
        micro-batch as in the local executor."""
        inputs, targets = common
        parts = []
        for x, y in paired_chunks(inputs, targets, self.micro_batch):
            stream = self._forward(x)
            if self.info.last and stream is not None:
                parts.append(self._try(lambda s=stream, t=y: self.w.token_logprobs(s, t)))
        if not self.info.last or self._error is not None:
            return None
        return cat_pairs(parts)

    def last_logits(self, ids: torch.Tensor, _own: Any) -> torch.Tensor | None:
        stream = self._forward(ids)
        if self.info.last and stream is not None:
            return self._try(lambda: self.w.last_logits(stream))
        return None

    def logits(self, ids: torch.Tensor, _own: Any) -> torch.Tensor | None:
        stream = self._forward(ids)
        if self.info.last and stream is not None:
            return self._try(lambda: self.w.logits(stream))
        return None

    def masks(self, _common: Any, _own: Any) -> Any:
        return self._try(lambda: self.w.masks())

    def write_shards(self, common: tuple[str, str, int], _own: Any) -> Any:
        """This rank's own shard files in the (shared) staging directory."""
        return self._try(lambda: self.w.write_shards(*common))

    def _progress(self, items: Sequence[Any] | range, desc: str) -> Any:
        return progress(items, desc, total=len(items)) if self.info.rank == 0 else items


_OPS: dict[str, Callable[[RankStage, Any, Any], Any]] = {
    "start": RankStage.start, "release": RankStage.release, "info": RankStage.info,
    "prune": RankStage.prune, "data_prune": RankStage.data_prune,
    "data_pass": RankStage.data_pass,
    "candidates": RankStage.candidates,
    "dense_metrics": RankStage.dense_metrics, "weight_metrics": RankStage.weight_metrics,
    "window_nll": RankStage.window_nll, "last_logits": RankStage.last_logits,
    "token_logprobs": RankStage.token_logprobs,
    "logits": RankStage.logits, "masks": RankStage.masks, "write_shards": RankStage.write_shards,
    "probe": RankStage.probe, "probe_read": RankStage.probe_read,
}


def _portable(exc: Exception | None) -> Exception | None:
    """``exc`` if it survives pickling unchanged, else a :class:`RankError` with its text."""
    if exc is None:
        return None
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return exc
    except Exception:  # any pickling failure falls back to the text
        pass
    return RankError(f"{type(exc).__name__}: {exc}")


def _broadcast(name: str, common: Any) -> tuple[str, Any]:
    message = [name, common]
    dist.broadcast_object_list(message, src=0)
    return message[0], message[1]


def _scatter(per_rank: Sequence[Any] | None, world: int, rank: int) -> Any:
    out: list[Any] = [None]
    inputs = (list(per_rank) if per_rank is not None else [None] * world) if rank == 0 else None
    dist.scatter_object_list(out, inputs, src=0)
    return out[0]


# --------------------------------------------------------------------------- rank 0 and the rest

@contextmanager
def coordinator(cfg: PruneConfig) -> Iterator[RankStage | None]:
    """Rank 0's side of a launch: opens the process group and yields rank 0's
    :class:`RankStage` (the session the ``dist`` executor is built from: pass it on as
    ``session=``), or None for a single process; on exit ends :func:`serve` on the other ranks
    with ``exit``, or ``abort`` when the body raises."""
    info = rank_info(cfg)
    if info is None:
        yield None
        return
    if info.rank != 0:
        raise RuntimeError(f"coordinator() runs on rank 0; rank {info.rank} must call serve()")
    with _process_group(info) as streams:
        stage = RankStage(info)
        stage.streams = streams
        try:
            yield stage
        except BaseException:
            _finish(stage, _ABORT)
            raise
        else:
            _finish(stage, _EXIT)


def _finish(stage: RankStage, command: str) -> None:
    if stage.busy:  # interrupted inside a command: peers are mid-protocol; the launcher ends them
        log.warning("stopped inside a distributed command; the launcher will stop the other ranks")
        return
    try:
        _broadcast(command, None)
    except (RuntimeError, ValueError) as exc:
        log.warning("could not tell the other ranks to stop (%s)", exc)


def serve(cfg: PruneConfig) -> int:
    """Ranks > 0: run rank 0's commands on this rank's slice until ``exit`` or ``abort``.

    Returns:
        The process exit code (0; a coordinator failure is reported by rank 0).
    """
    info = rank_info(cfg)
    if info is None or info.rank == 0:
        raise RuntimeError("serve() runs on ranks > 0 of a torchrun / accelerate launch")
    level = logging.getLevelName(cfg.log_level.upper())
    configure("WARNING" if not isinstance(level, int) or level < logging.WARNING else cfg.log_level)
    seed_everything(cfg.seed, cfg.engine.deterministic, cfg.engine.threads)
    with _process_group(info) as streams:
        stage = RankStage(info)
        stage.streams = streams
        return serve_loop(stage)


def serve_loop(stage: RankStage) -> int:
    """Execute broadcast commands on ``stage`` (a rank > 0) until ``exit`` or ``abort``."""
    while True:
        name, common = _broadcast("", None)
        if name in (_EXIT, _ABORT):
            break
        stage.execute(name, common, _scatter(None, stage.info.world, stage.info.rank))
    if name == _ABORT:
        log.warning("rank %d: the coordinator (rank 0) failed; exiting", stage.info.rank)
    return 0


def command(stage: RankStage, name: str, common: Any = None,
            per_rank: Sequence[Any] | None = None) -> list[Any]:
    """Rank 0: broadcast command ``name``, scatter ``per_rank[r]`` to rank r, run this rank's
    part and return every rank's part (raising the first error of any rank)."""
    stage.busy = True
    _broadcast(name, common)
    own = _scatter(per_rank, stage.info.world, 0)
    parts = stage.execute(name, common, own)
    assert parts is not None  # rank 0 always receives the gathered parts
    return parts


class DistExecutor:
    """Rank 0's executor: every call is a command run by all ranks (module docstring).

    Args:
        stage: Rank 0's stage (yielded by :func:`coordinator`).
        template: What every rank's worker shares (model source, block count, dtype,
            micro-batch, onloading; a :class:`~neuroal.engine.worker.WorkerSpec` with an empty
            slice); each rank fills in its slice and its own device.
    """

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
        return pass_mode(self._requested, self.stage.w, self.world, sequences) == "data"

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
        self.parallel = prune_mode(self._requested, self.stage.w, self.world, job)
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
