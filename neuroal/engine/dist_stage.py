"""One rank's part of every command of the ``dist`` executor (engine.md §3.4).

:class:`RankStage` holds the rank's :class:`~neuroal.engine.worker.Worker` and runs each command
with the same Worker methods, on the same micro-batches, as
:class:`~neuroal.engine.executor.LocalExecutor`. Activation streams ``(N, T, h)`` go rank r ->
r+1 with point-to-point ``send``/``recv`` as raw bytes (lossless, engine.md §3.5 rule 4), so
results are bit-identical to the local executor. A six-integer header (status, shape, dtype,
and the bits of a float64: a search candidate's alignment sum so far, for exact early stopping,
issue 16 item 13) precedes each stream: a rank that fails forwards a failure header instead of
a stream, so no rank is left waiting, and the error is raised on rank 0 after the closing
``gather_object``; a rank that stops a candidate forwards the same header, and later ranks skip.

The commands are found by name in :data:`_OPS`; who sends them (rank 0) and who waits for them
(the other ranks) is :mod:`neuroal.engine.dist_session`.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from neuroal.allocation.neuroal_math import total_alignment
from neuroal.engine.collectives import DistComm
from neuroal.engine.core import cat_pairs, chunks, paired_chunks, reference_needs
from neuroal.engine.data_parallel import DataPrune, Layout, Stopped
from neuroal.engine.data_passes import run_pass
from neuroal.engine.dist_launch import RankInfo
from neuroal.engine.executor import split_blocks
from neuroal.engine.preflight import NodeFacts, gather_facts, probe_root, read_probes
from neuroal.engine.worker import Worker
from neuroal.runtime.jobs import BlockAlignment, BlockReport, CandidateJob, PruneJob, WorkerSpec
from neuroal.runtime.logging import progress

_STREAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class RankError(RuntimeError):
    """A rank other than 0 failed; the message carries its traceback."""


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
        self._stopped = False
        """Another rank's failure stopped this rank's data-parallel pass in this command: the
        rest of the command is skipped (:meth:`_try`), and rank 0 raises that rank's error."""
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
        self.busy, self._error, self._trace, self._stopped = True, None, "", False
        part = _OPS[name](self, common, own)
        return self._gather(part)

    def _try(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, or None after a failure (recorded once, with its traceback) or a
        stop."""
        if self._error is not None or self._stopped:
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
        """Header ``[ok, N, T, h, dtype, carried]``, then the stream's raw bytes (no cast) once
        the next rank has its buffer (:meth:`_recv`): what may fail (the copy to the channel's
        device, the receiver's allocation) is done before the bytes move, so neither side is
        left blocked in a transfer the other gave up."""
        dst = self.info.rank + 1
        if stream is not None and (stream.dim() != 3 or stream.dtype not in _STREAM_DTYPES):
            if self._error is None:
                self._error = RuntimeError(f"rank {self.info.rank}: cannot ship a stream of "
                                           f"shape {tuple(stream.shape)} and {stream.dtype}")
            stream = None
        payload = None if stream is None else \
            self._try(lambda: stream.to(self.comm).contiguous().view(torch.uint8))
        if payload is None:
            dist.send(torch.zeros(6, dtype=torch.int64, device=self.comm), dst=dst,
                      group=self.streams)
            return
        assert stream is not None
        bits = torch.tensor([self.carried], dtype=torch.float64).view(torch.int64).item()
        header = [1, *stream.shape, _STREAM_DTYPES.index(stream.dtype), bits]
        dist.send(torch.tensor(header, dtype=torch.int64, device=self.comm), dst=dst,
                  group=self.streams)
        ready = torch.empty(1, dtype=torch.int64, device=self.comm)
        dist.recv(ready, src=dst, group=self.streams)
        if int(ready.item()):  # else the next rank failed to allocate: it keeps its own error
            dist.send(payload, dst=dst, group=self.streams)

    def _recv(self) -> torch.Tensor | None:
        """The previous rank's stream (:meth:`_send`), None after a failure on either side."""
        src = self.info.rank - 1
        header = torch.empty(6, dtype=torch.int64, device=self.comm)
        dist.recv(header, src=src, group=self.streams)
        ok, n, t, h, code, bits = header.tolist()
        if not ok:
            return None
        self.carried = torch.tensor([bits], dtype=torch.int64).view(torch.float64).item()
        dtype = _STREAM_DTYPES[code]
        raw = self._try(lambda: torch.empty((n, t, h * dtype.itemsize), dtype=torch.uint8,
                                            device=self.comm))
        dist.send(torch.tensor([0 if raw is None else 1], dtype=torch.int64, device=self.comm),
                  dst=src, group=self.streams)
        if raw is None:
            return None
        dist.recv(raw, src=src, group=self.streams)
        return self._try(lambda: raw.view(dtype).to(self.home))

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
                self._stopped = True
                return None

        return self._try(body)

    def candidates(self, common: tuple[torch.Tensor, CandidateJob, str, Sequence[Any] | None,
                                       bool, bool, bool],
                   own: Sequence[Mapping[int, Mapping[str, Any]]]) -> list[dict[int, BlockAlignment]]:
        """Alignment terms of each candidate over the owned blocks (neuroal.md §A5).

        ``common = (ids, job, reference_stream, bounds, reuse, keep, data)``: ``bounds[c]`` is
        None or candidate c's ``(best, inclusive)``, checked by :meth:`Worker.eval_candidate`
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
        self._search = (embedded, reference) if keep and not self._stopped else None
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
                self._stopped = True
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
