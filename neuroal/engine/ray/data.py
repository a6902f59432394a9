"""Data mode under the Ray executor (``engine.parallel=data``, :mod:`neuroal.engine.data_parallel`).

Every actor runs its part of a data-parallel program in one call, all at once, over a
torch.distributed group formed inside the actors for that call (the dist executor's
:class:`~neuroal.engine.collectives.DistComm`); an actor lost in that call stops the run with the
``--resume`` hint instead of a restart, since every actor takes part in every block. The
programs are the engine's own, written once against the ``Comm`` protocol:

* the final prune (:class:`~neuroal.engine.data_parallel.DataPrune`);
* the dense statistics pass (OWL's outlier ratios and any ``dense_block_metrics``) and the
  dense reference of a NeuroAL search (:func:`~neuroal.engine.data_passes.run_pass`); the
  reference stays inside each actor for its candidate stages, as in pipeline mode.

Perplexity and zero-shot scoring keep pipelining their micro-batch chunks through the actors
(:meth:`DataParallel._data_pass` explains why).

The functions run inside the actors (through ``actor.__ray_call__``, like
:mod:`neuroal.engine.ray.actor`); :class:`DataParallel` is the driver's side, mixed into
:class:`~neuroal.engine.ray.executor.RayExecutor`.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from neuroal.allocation.plan import SparsityPlan
from neuroal.engine.collectives import DistComm, group_backend
from neuroal.engine.core import log_block
from neuroal.engine.data_parallel import DataPrune, Layout, Stopped, resolve_parallel
from neuroal.engine.data_passes import pass_mode, run_pass
from neuroal.engine.ray.actor import _actor_state, _drop_process_group
from neuroal.engine.ray.options import RayOptions, _actor_errors, _describe, import_ray
from neuroal.engine.worker import Worker
from neuroal.runtime.jobs import BlockReport, PruneJob, WorkerSpec
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

_STORE = "_ray_data_store"
"""Where actor 0 keeps the group's rendezvous, a TCP store on its node's IP and a port the OS
picks, from :func:`_open_store` to :func:`_in_group`."""

Program = Callable[..., Any]
"""A data-parallel program run inside an actor: ``program(worker, comm, *args)``."""


def _pass_mode(worker: Worker, requested: str, workers: int, sequences: int | None,
               fits: bool) -> str:
    """Inside an actor: :func:`~neuroal.engine.data_passes.pass_mode` (which reads the worker's
    micro-batch), so the Ray executor decides a pass as the local and dist executors do."""
    return pass_mode(requested, worker, workers, sequences, fits)


def _device_key(worker: Worker) -> str | None:
    """Which physical GPU the actor computes on (node and device UUID), None on the CPU: two
    actors may share one GPU (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``), where NCCL
    cannot form a group."""
    import ray

    if worker.device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(worker.device)
    uuid = getattr(props, "uuid", None)
    if uuid is None:  # pragma: no cover - older torch: the visible devices name the GPU
        uuid = f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}:{worker.device.index or 0}"
    return f"{ray.get_runtime_context().get_node_id()}/{uuid}"


def data_channel(keys: Sequence[str | None]) -> tuple[str, str | None]:
    """``(process-group backend, device the collectives move tensors from)`` for actors on the
    devices ``keys`` (:func:`_device_key`): gloo on CPUs; gloo for small messages and NCCL for
    tensors on distinct GPUs (None: each actor's own device); gloo through host memory when
    two actors share a GPU (NCCL refuses two ranks on one device)."""
    if all(k is None for k in keys):
        return "gloo", None
    if len(set(keys)) < len(keys):
        return "gloo", "cpu"
    return group_backend("cuda"), None


def _open_store(worker: Worker, timeout: float) -> tuple[str, int]:
    """Inside actor 0: the rendezvous of the data-parallel group, a TCP store listening on a
    free port; returns ``(node IP, port)`` for every actor."""
    import ray

    host = ray.util.get_node_ip_address()
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    worker.__dict__[_STORE] = store
    return host, int(store.port)


def _join_group(worker: Worker, address: tuple[str, int], rank: int, world: int,
                backend: str, rendezvous_timeout: float, timeout: float) -> None:
    """Inside an actor: ``rank`` of a fresh default process group of ``world`` actors on
    ``backend`` (:func:`data_channel`), its collectives waiting at most ``timeout`` s.

    Raises:
        RuntimeError: The actor already has a group, or cannot reach the rendezvous.
    """
    if dist.is_initialized():
        raise RuntimeError(f"Ray worker {rank} already belongs to a torch.distributed group; "
                           "the data-parallel prune needs its own")
    host, port = address
    store = worker.__dict__.pop(_STORE, None)
    try:
        if store is None:
            store = dist.TCPStore(host, port, is_master=False,
                                  timeout=datetime.timedelta(seconds=rendezvous_timeout))
        dist.init_process_group(backend, store=store, rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:
        raise RuntimeError(
            f"Ray worker {rank} could not join the data-parallel group at {host}:{port} "
            f"({type(exc).__name__}: {exc}); every worker's node must reach that address (same "
            "network, that port range open between the nodes), or use "
            "engine.parallel=pipeline") from exc


def _in_group(worker: Worker, address: tuple[str, int], rank: int, world: int,
              channel: tuple[str, str | None], timeouts: tuple[float, float], program: Program,
              args: tuple[Any, ...]) -> Any:
    """Inside an actor: join the group, run ``program(worker, comm, *args)`` as this actor's
    part, leave the group (also after a failure). Returns the program's result, None when
    another actor's failure stopped it (that actor raises its own error)."""
    backend, via = channel
    try:
        _join_group(worker, address, rank, world, backend, *timeouts)
        comm = DistComm(rank, world, torch.device(via) if via else worker.device)
        try:
            return program(worker, comm, *args)
        except Stopped:
            return None
    finally:
        worker.__dict__.pop(_STORE, None)
        _drop_process_group(worker)


def _prune_program(worker: Worker, comm: DistComm, ids: torch.Tensor, entries: list[Any],
                   job: PruneJob, slices: Sequence[Sequence[int]]) -> list[BlockReport]:
    """This actor's :class:`DataPrune` program: the reports of the blocks it owns."""
    layout = Layout(tuple(map(tuple, slices)), int(ids.shape[0]), worker.spec.micro_batch)
    return DataPrune(worker, comm, layout).run(ids, entries, job)


def _pass_program(worker: Worker, comm: DistComm, name: str,
                  slices: Sequence[tuple[int, int]], *args: Any) -> Any:
    """This actor's part of the data-parallel pass ``name``
    (:func:`~neuroal.engine.data_passes.run_pass`)."""
    return run_pass(name, worker, comm, slices, *args)


def _reference_program(worker: Worker, comm: DistComm, slices: Sequence[tuple[int, int]],
                       *args: Any) -> None:
    """This actor's part of a NeuroAL search's dense reference, kept inside the actor for its
    candidate stages (where the pipelined reference stage keeps it)."""
    _actor_state(worker).kept["reference"] = run_pass("dense_reference", worker, comm, slices,
                                                      *args)


class DataParallel:
    """The Ray executor's data mode: the final prune, the dense statistics pass and the dense
    reference of a search (a mixin of :class:`~neuroal.engine.ray.executor.RayExecutor`, whose
    attributes and methods it uses: the actors, the transport's channel, ``_get``,
    ``_retrying``, ``_connect``, ``shutdown``, ``fault_hook`` and ``_resume_hint``)."""

    workers: list[Any]
    specs: list[WorkerSpec]
    options: RayOptions
    _requested: str
    _num_blocks: int
    _failed: str
    data_fits: bool = True  # the memory plan's verdict on data mode (set by the pipeline)

    def _prune_mode(self) -> str:
        """:func:`~neuroal.engine.data_parallel.resolve_parallel`, as the other executors decide
        it (neither the model nor the job rules data mode out)."""
        return resolve_parallel(self._requested, len(self.workers), fits=self.data_fits)

    def _data_pass(self, sequences: int) -> bool:
        """Whether a dense pass over ``sequences`` sequences (the dense statistics, a search's
        dense reference) runs data-parallel: :func:`~neuroal.engine.data_passes.pass_mode`,
        decided on actor 0 as the local and dist executors decide it.

        Perplexity and zero-shot scoring do not ask: under Ray they keep pipelining their
        micro-batch chunks through the actors in either mode. Up to ``inflight`` chunks are in
        flight, so every actor is already busy but for the pipeline's fill and drain, and each
        chunk's stream crosses K-1 times, where data mode would lend every block's weights (and
        the head) to K-1 actors per pass and take the transport's channel down for a group of
        its own. Above all, a pipelined chunk survives a lost actor (restarted, only the
        ungathered chunks submitted again), where data mode stops the run: evaluation comes
        last, after the whole prune, and should not be lost to one actor.
        """
        mode = self._retrying(lambda: self._get(
            self.workers[0].__ray_call__.remote(_pass_mode, self._requested,
                                                len(self.workers), sequences, self.data_fits),
            "deciding how a dense pass runs"))
        return mode == "data"

    def _data_final_prune(self, plan: SparsityPlan, job: PruneJob,
                          ids: torch.Tensor) -> list[BlockReport]:
        """Data-parallel final prune (:mod:`neuroal.engine.data_parallel`): every actor runs
        its :class:`DataPrune` program in one call (:meth:`_in_actors`). Each block's owner
        writes its resume state inside its actor, as in pipeline mode.

        An actor lost mid-prune stops the run (:meth:`_settle`): the others cannot go on
        without it; ``--resume`` continues from the saved blocks.
        """
        entries = [plan.block(b) for b in range(self._num_blocks)]

        def submitted() -> None:
            for b in range(self._num_blocks):
                self.fault_hook("prune", b)

        def settled() -> None:
            self._pruned = (plan, job, ids)  # a later restart restores the pruned blocks

        with self.meter("prune"):
            parts = self._in_actors(_prune_program, (ids, entries, job, self._slices()),
                                    "pruning blocks data-parallel", submitted, settled)
        reports = sorted((r for part in parts for r in part or ()), key=lambda r: r.index)
        for report in reports:
            log_block(report, self._num_blocks)
        self._relay_warnings()
        return reports

    def _data_metrics(self, ids: torch.Tensor, fn: Callable[..., Any],
                      needs: frozenset[str]) -> list[Any]:
        """``fn(weights, stats)`` of every block over one data-parallel dense pass of ``ids``
        ``(N, T)`` (the ``block_metrics`` pass); each actor's values of its own blocks."""
        return self._in_actors(_pass_program, ("block_metrics", self._slices(), ids, fn, needs),
                               "running the dense statistics pass data-parallel",
                               lambda: self.fault_hook("statistics", 0))

    def _data_reference(self, ids: torch.Tensor, needs: frozenset[str],
                        reference_stream: str) -> None:
        """A search's dense reference (block 0's, ``local``, or every block's, ``global``) from
        one data-parallel pass of the search windows ``ids`` ``(n_s, T)``, kept in the actors
        for their candidate stages."""
        self._in_actors(_reference_program, (self._slices(), ids, needs, reference_stream),
                        "computing the search's dense reference data-parallel",
                        lambda: self.fault_hook("reference", 0), kept=True)

    def _slices(self) -> list[tuple[int, int]]:
        return [(s.start, s.stop) for s in self.specs]

    def _in_actors(self, program: Program, args: tuple[Any, ...], what: str,
                   submitted: Callable[[], None], settled: Callable[[], None] | None = None,
                   kept: bool = False) -> list[Any]:
        """Every actor runs ``program(worker, comm, *args)`` (:func:`_in_group`) in one call,
        all at once, over a torch.distributed group that lives for that call only; each
        actor's result in rank order (None on an actor another's failure stopped).

        Actor 0 opens the group's rendezvous first (an actor that dies there is restarted like
        one that dies outside a data-parallel call: no collective has started). The
        transport's channel is then taken down, since Ray's gloo group sits on the same
        default group, and rebuilt after (``settled()`` runs just before, on success);
        ``submitted()`` runs once the calls are submitted (the fault hooks). An actor that
        dies while the channel is rebuilt is restarted there, unless the call ``kept`` its
        result inside the actors (the search's reference), which a restarted actor has lost:
        then the death is raised to the caller's retry, which runs the pass again.

        Raises:
            RuntimeError: An actor died (:meth:`_settle`).
            Exception: An actor's own error, the first in rank order.
        """
        ray = import_ray()
        world = len(self.workers)
        common = ray.put(args)
        timeouts = (self.options.placement_timeout, self.options.group_timeout)
        channel = data_channel(self._retrying(lambda: self._get(
            [a.__ray_call__.remote(_device_key) for a in self.workers],
            "reading the workers' devices")))
        if channel[1] == "cpu":
            log.warning("Ray workers share a GPU: data mode moves its tensors through host "
                        "memory over gloo (NCCL needs one GPU per worker)")
        address = self._retrying(lambda: self._get(  # before any collective: a restart is safe
            self.workers[0].__ray_call__.remote(_open_store, self.options.placement_timeout),
            "opening the data-parallel group's rendezvous"))
        self.transport.disconnect(self._channel)
        self._channel = None
        refs = [a.__ray_call__.remote(_in_group, address, k, world, channel, timeouts, program,
                                      common)
                for k, a in enumerate(self.workers)]
        submitted()
        try:
            parts = self._settle(refs, what)
        except Exception:
            self._reopen()
            raise
        if settled is not None:
            settled()
        if kept:
            self._connect()
        else:
            self._retrying(self._connect)
        return parts

    def _reopen(self) -> None:
        """After a failed data-parallel call whose actors are kept: the transport's channel
        back, so the executor can go on (a failure here is logged, not raised over the call's
        own error; the next call that needs the channel then restarts what died, or fails)."""
        if not self.workers:
            return
        try:
            self._connect()
        except Exception as exc:  # the call's error is the one to report
            log.warning("could not reopen the %s channel after the failed call: %s",
                        self.transport.name, _describe(exc))

    def _settle(self, refs: list[Any], what: str) -> list[Any]:
        """Every actor's result of one collective call (``refs[k]`` on actor k), watched as
        they finish, so that a lost actor is reported at once rather than after its peers'
        collective timeout.

        Raises:
            RuntimeError: An actor died: the run stops (every actor is released) with the
                ``--resume`` hint.
            Exception: An actor's own error, the first in rank order (its peers stopped at the
                same phase boundary; peers still busy ``engine.ray.placement_timeout`` seconds
                after the first error are taken for stuck and released).
        """
        ray = import_ray()
        outcome: dict[int, Any] = {}
        pending, deadline = list(refs), None
        while pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=wait)
            if not done:
                break
            k = refs.index(done[0])
            try:
                outcome[k] = ray.get(done[0])
            except _actor_errors() as exc:
                self._lost(k, what, exc)
            except ray.exceptions.RayError as exc:  # the peers get one limit in all
                outcome[k] = exc
                if deadline is None:
                    deadline = time.monotonic() + self.options.placement_timeout
        failed = [outcome[k] for k in sorted(outcome) if isinstance(outcome[k], BaseException)]
        if failed:
            self._failed = what
            if pending:
                self._abandon()
            raise failed[0]
        return [outcome[k] for k in range(len(refs))]

    def _lost(self, rank: int, what: str, exc: BaseException) -> None:
        """Stop the run after actor ``rank`` died in a data-parallel call (the prune or a
        pass).

        Raises:
            RuntimeError: Always, naming the actor and the ``--resume`` hint.
        """
        spec = self.specs[rank]
        self._failed = what
        message = (f"Ray worker {rank} (blocks [{spec.start}, {spec.stop}) of "
                   f"{self._num_blocks}) died while {what} ({_describe(exc)}). With "
                   "engine.parallel=data every worker takes part in every block, so the others "
                   "cannot go on without it and no worker is restarted in a data-parallel call "
                   f"(engine.parallel=pipeline restarts them). {self._resume_hint()}")
        self._abandon()
        raise RuntimeError(message) from exc

    def _abandon(self) -> None:
        """Kill every actor at once, then release the executor (:meth:`shutdown`): actors
        left waiting in a collective for a dead or failed peer would never answer a call, so
        relaying their warnings first would only wait out its timeout."""
        ray = import_ray()
        actors, self.workers = self.workers, []
        for actor in actors:
            ray.kill(actor)
        self.shutdown()
