"""``RayExecutor``: one Ray actor per worker, gang-scheduled in a placement group (engine.md §3.3).

The actors are the plain :class:`~neuroal.engine.worker.Worker`, wrapped here with ``ray.remote``
(never decorated), so tests run the very same class in-process. Each actor builds itself from its
:class:`~neuroal.engine.worker.WorkerSpec` and reads only its own slice of the checkpoint: no
weight ever travels through the object store. A pass over the model (final prune, search
candidate, dense reference, dense statistics, evaluation chunk) is one call per actor over its
whole slice (a *stage*), so a stream crosses between actors K-1 times per pass; it crosses by
Ray Direct Transport (one gloo or NCCL transfer, :class:`DirectTransport`) or through the
object store (:class:`ObjectStoreTransport`), as ``engine.ray.transport`` says
(docs/transport.md). Calls on one actor run in submission order, so chaining refs pipelines
independent work (engine.md §4): actor 0 evaluates candidate c while actor 1 evaluates
candidate c-1. Results are gathered per candidate, in the original order, from the same worker
calls as :class:`~neuroal.engine.executor.LocalExecutor` makes, so they are bit-identical to it
(engine.md §3.5). ``import ray`` happens only in this module, lazily.

Fault tolerance: when an actor dies (killed process, OOM, lost node), also while it loads its
slice, the failing call raises a Ray actor error; the executor finds the dead actors by pinging
every one, starts a fresh actor from the same :class:`~neuroal.engine.worker.WorkerSpec` in the
same placement-group bundle (it reloads its slice from the checkpoint), restores its pruned
blocks if the final prune has run (from the resume state, or by pruning them again: results are
deterministic), and retries only the unfinished work. Each actor is restarted at most
``max_restarts`` times; then the run stops with an error naming the actor and its blocks, and
the resume state is kept (engine.md §8). An exception raised by the worker's own constructor (a
missing shard, a bad path) is deterministic and stops the run at once, without restarts. Under
a direct transport Ray kills both ends of a failed transfer, so the live peer of a dead actor
may be restarted with it; the collective group is rebuilt over the new actors.

Data mode (``engine.parallel=data``, :mod:`neuroal.engine.data_parallel`): every actor runs its
:class:`~neuroal.engine.data_parallel.DataPrune` program in one call, all at once, over a
torch.distributed group formed inside the actors for that call (the dist executor's
:class:`~neuroal.engine.collectives.DistComm`); an actor lost in that call stops the run with
the ``--resume`` hint instead of a restart, since every actor takes part in every block.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from neuroal.allocation.plan import SparsityPlan
from neuroal.config.schema import DistConfig, RayConfig
from neuroal.engine.collectives import DistComm, group_backend
from neuroal.engine.core import (
    cat_pairs,
    chunks,
    log_block,
    merge_blocks,
    paired_chunks,
    reference_needs,
    slice_specs,
)
from neuroal.engine.data_parallel import DataPrune, Layout, Stopped, resolve_parallel
from neuroal.engine.determinism import apply_determinism, determinism_env
from neuroal.engine.executor import BusyMeter, prefix_blocks, split_blocks
from neuroal.engine.worker import Worker
from neuroal.models.moe import has_experts
from neuroal.outputs.checkpoint import block_state_path
from neuroal.runtime.jobs import BlockAlignment, BlockReport, CandidateJob, PruneJob, WorkerSpec
from neuroal.runtime.logging import buffer_warnings, configure, get_logger, progress, replay
from neuroal.runtime.progress import SETTINGS, configure_progress

log = get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")

PLACEMENT_TIMEOUT_S = RayConfig().placement_timeout
DEVICE_KINDS = ("cpu", "cuda")


def import_ray() -> Any:
    """``import ray`` with an install hint."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is installed where this runs
        raise RuntimeError("engine.executor=ray needs Ray: pip install 'ray>=2.40,<3'") from exc
    return ray


def _actor_errors() -> tuple[type[BaseException], ...]:
    """Errors meaning an actor died or is unreachable (``ActorDiedError``,
    ``ActorUnavailableError``, the same wrapped as a failed argument of a later call, or Ray's
    out-of-memory kill); other errors are bugs or bad inputs and are never retried."""
    ray = import_ray()
    return (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError)


def _describe(exc: BaseException) -> str:
    """``Type: first line`` of an actor error (a failed argument: of the error it carries)."""
    root = getattr(exc, "cause", None) or exc
    lines = str(root).strip().splitlines()
    return f"{type(root).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def repo_root() -> str:
    """The directory holding the ``neuroal`` package of this checkout (put on actors' path)."""
    return str(Path(__file__).resolve().parents[2])


def init_ray(address: str | None = None, num_cpus: float = 1.0) -> bool:
    """Connect this process to Ray; True when this call started the connection.

    An already initialised Ray (a test fixture, a job driver) is reused. ``address`` or
    ``$RAY_ADDRESS`` (set by ``ray job submit``) joins a cluster; otherwise a light local
    instance starts with at least ``num_cpus`` logical CPUs, no dashboard and no log forwarding.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or "auto")
        return True
    cpus = max(os.cpu_count() or 1, int(-(-num_cpus // 1)))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return True


def actor_env(cuda: bool, deterministic: bool, threads: int | None) -> dict[str, str]:
    """``runtime_env.env_vars`` of every actor: this checkout importable, and the settings of
    :func:`~neuroal.engine.determinism.determinism_env` (deterministic cuBLAS, the thread count
    of CPU actors), the same the driver applies to itself."""
    path = os.pathsep.join(p for p in (repo_root(), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **determinism_env(deterministic, threads)}


def actor_device(kind: str) -> str:
    """The device name a worker uses inside its actor: ``cuda:0`` for a CUDA run because Ray
    sets ``CUDA_VISIBLE_DEVICES`` of each actor to the one GPU of its bundle, so every actor
    sees its own GPU as index 0 (the driver's device indices mean nothing there); ``cpu``."""
    return f"{kind}:0" if kind == "cuda" else kind


@dataclass(frozen=True)
class RayOptions:
    """The Ray executor's own options (the ``engine.ray`` section and ``engine.deterministic``).

    ``placement``: placement-group strategy (``PACK``, ``SPREAD``, ``STRICT_PACK``,
    ``STRICT_SPREAD``); ``cpus``: CPUs reserved per actor; ``address``: Ray address (``auto``,
    ``ray://host:10001``; None: ``$RAY_ADDRESS`` or a local instance); ``inflight``: candidates
    / perplexity chunks in flight (0: one per worker); ``max_restarts``: restarts allowed per
    actor after it died, then the run stops; ``deterministic``: deterministic kernels inside the
    actors (engine.md §3.5); ``placement_timeout``: seconds to wait for the placement group
    (at start, and after a lost node) and for a restarted actor to reload its slice;
    ``transport``: how streams cross between actors (``auto``, ``object-store``, ``gloo``,
    ``nccl``; :func:`resolve_transport`); ``group_timeout``: seconds a collective of the
    data-parallel prune may wait (``engine.dist.timeout``: a solve on another actor, a block
    onloaded from disk).
    """

    placement: str = "PACK"
    cpus: float = 1.0
    address: str | None = None
    inflight: int = 0
    max_restarts: int = 3
    deterministic: bool = True
    placement_timeout: float = PLACEMENT_TIMEOUT_S
    transport: str = "auto"
    group_timeout: float = DistConfig().timeout

    @classmethod
    def from_config(cls, ray: RayConfig, deterministic: bool = True,
                    group_timeout: float = DistConfig().timeout) -> RayOptions:
        """From the validated ``engine.ray`` section (and ``engine.dist.timeout``)."""
        return cls(placement=ray.placement, cpus=ray.cpus, address=ray.address,
                   inflight=ray.inflight, max_restarts=ray.max_restarts,
                   deterministic=deterministic, placement_timeout=ray.placement_timeout,
                   transport=ray.transport, group_timeout=group_timeout)


def device_kind(devices: Sequence[str]) -> str:
    """The one device type of all workers (``cpu`` or ``cuda``).

    Raises:
        ValueError: Mixed or unsupported device types.
    """
    kinds = sorted({torch.device(d).type for d in devices})
    if len(kinds) != 1 or kinds[0] not in DEVICE_KINDS:
        raise ValueError(f"engine.executor=ray: devices {list(devices)} must all be of one type, "
                         f"one of {', '.join(DEVICE_KINDS)} (each actor gets its own GPU as "
                         "cuda:0)")
    return kinds[0]


# --------------------------------------------------------------------------- run on an actor
# Module-level functions executed inside an actor through ``actor.__ray_call__`` (first argument:
# the actor's Worker instance), so the Worker class needs no Ray-specific methods.


def _setup(worker: Worker, deterministic: bool, threads: int | None,
           log_level: str = "INFO", interval: float = 30.0) -> None:
    """Deterministic kernels inside the actor, like ``seed_everything`` on the driver; the
    actor's ``neuroal`` records go to its stderr, which Ray forwards to the driver in jobs and on
    clusters (progress as log lines every ``interval`` seconds, never bars).

    CPU results depend on the intra-op thread count (LAPACK/BLAS split their work by threads:
    SparseGPT's Cholesky differs in the last bits between 1 and 2 threads), so CPU actors use the
    driver's count and match :class:`LocalExecutor` bit for bit.
    """
    apply_determinism(deterministic, threads)

    configure(log_level)
    configure_progress(interval, "log")
    buffer_warnings()  # drained by the driver (_warnings), so warnings reach the run's log


def _warnings(worker: Worker) -> list[tuple[int, str, str]]:
    """The actor's warning records since the last call (:func:`~neuroal.runtime.logging.buffer_warnings`)."""
    return buffer_warnings().drain()


def _busy(worker: Worker) -> float:
    return worker.busy_seconds


def _ping(worker: Worker) -> int:
    """Liveness check (queued behind the actor's earlier calls)."""
    return worker.spec.rank


def _info(worker: Worker) -> dict[str, Any]:
    """The worker's facts plus where Ray placed it."""
    import ray

    ctx = ray.get_runtime_context()
    return {**worker.info(), "node": ctx.get_node_id(),
            "gpu_ids": ctx.get_accelerator_ids().get("GPU", [])}


def _prefixes(worker: Worker, num_blocks: int) -> list[str]:
    return [worker.adapter.block_prefix(i) for i in range(num_blocks)]


# --------------------------------------------------------------------------- transport


@dataclass(frozen=True)
class Embed:
    """Stage input: token ids ``(N, T)`` the first actor embeds (the pass starts there)."""

    ids: torch.Tensor


@dataclass(frozen=True)
class Kept:
    """Stage input: a stream kept inside the actor by an earlier call (the search windows)."""

    key: str


@dataclass
class ActorState:
    """What an actor keeps between the executor's calls, beside its Worker: ``kept`` streams and
    statistics (the embedded search windows, the dense reference) and the ``outbox`` of stage
    results waiting for :func:`_take`, keyed by the driver's token."""

    kept: dict[str, Any]
    outbox: dict[int, Any]


class ObjectStoreTransport:
    """The fallback (engine.md §3.3, transport v1): the stream a stage returns is stored in the
    object store where its producer runs, and Ray resolves the ObjectRef on the consumer's node
    (device -> host -> store -> host -> device; lossless, byte-exact)."""

    name = "object-store"
    device: str | None = None  # streams on any device

    def available(self) -> bool:
        return True

    def options(self) -> dict[str, Any]:
        """Options of a call whose return value is a stream for the next actor."""
        return {}

    def connect(self, actors: Sequence[Any]) -> Any:
        """Set up the actors' channel (none needed); a handle for :meth:`disconnect`."""
        return None

    def disconnect(self, handle: Any) -> None:
        """Tear down what :meth:`connect` made, so :meth:`connect` can run again."""

    def release(self, handle: Any) -> None:
        """Forget what :meth:`connect` made on the driver (the actors are being killed)."""


class DirectTransport:
    """Ray Direct Transport: a stage's returned stream stays on its actor's device and crosses
    to the next actor as one point-to-point transfer in a Ray collective group (``gloo``
    between CPU actors, ``nccl`` between CUDA actors), never through the object store or the
    driver. The call is marked with Ray's ``tensor_transport`` option at submission (the
    call-time form of ``@ray.method(tensor_transport=...)``), so the Worker stays plain."""

    def __init__(self, name: str, device: str) -> None:
        self.name = name
        self.device = device  # the one device type of the streams this backend moves

    def available(self) -> bool:
        """Whether Ray's collective backend can start (nccl needs cupy, gloo torch's gloo)."""
        import_ray()
        from ray.util import collective

        return bool(collective.is_backend_available(self.name))

    def options(self) -> dict[str, Any]:
        return {"tensor_transport": self.name}

    def connect(self, actors: Sequence[Any]) -> Any:
        """A fresh collective group over ``actors`` (rank = slice index)."""
        from ray.experimental.collective import create_collective_group

        return create_collective_group(list(actors), backend=self.name)

    def disconnect(self, handle: Any) -> None:
        """Tear the group down on the driver and in the live actors (after a restart): Ray's
        gloo group sits on each actor's default torch.distributed group, which must go too, or
        a new group over a restarted actor never meets."""
        if handle is None:
            return
        self.release(handle)
        ray = import_ray()
        for actor in handle.actors:
            try:
                ray.get(actor.__ray_call__.remote(_drop_process_group), timeout=DROP_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError) as exc:  # dead: it holds nothing
                log.debug("collective group %s: %s", handle.name, _describe(exc))

    def release(self, handle: Any) -> None:
        """Forget the group on the driver and in the live actors (dead ones are skipped)."""
        if handle is None:
            return
        from ray.experimental.collective import destroy_collective_group

        try:
            destroy_collective_group(handle)
        except (import_ray().exceptions.RayError, ValueError) as exc:
            # an actor died (it holds nothing more), or Ray already dropped the group after a
            # failed transfer
            log.debug("collective group %s: %s", handle.name, _describe(exc))


def _drop_process_group(_worker: Worker) -> None:
    """Inside an actor: leave torch.distributed (Ray's gloo groups live on its default group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


TRANSPORTS: dict[str, ObjectStoreTransport | DirectTransport] = {
    "object-store": ObjectStoreTransport(), "gloo": DirectTransport("gloo", "cpu"),
    "nccl": DirectTransport("nccl", "cuda")}
DROP_TIMEOUT_S = 60.0  # leaving a collective group inside a live actor
AUTO_ORDER = ("nccl", "gloo", "object-store")  # engine.ray.transport=auto: first that fits
FIXES = {"nccl": "pip install cupy-cuda12x (Ray's NCCL backend) on every node",
         "gloo": "use a torch build with gloo (torch.distributed.is_gloo_available())"}


def resolve_transport(name: str, stream_device: str) -> ObjectStoreTransport | DirectTransport:
    """The transport ``engine.ray.transport=name`` runs for streams on ``stream_device``
    (``cpu``, also CUDA runs with ``engine.offload_activations``; or ``cuda``); ``auto``: nccl
    for CUDA streams, gloo for CPU streams, each only where available, else the object store.

    Raises:
        ValueError: An unknown name, or a transport that cannot move these streams here
            (checked before any actor loads its slice).
    """
    if name == "auto":
        return next(t for t in (TRANSPORTS[n] for n in AUTO_ORDER)
                    if t.device in (None, stream_device) and t.available())
    if name not in TRANSPORTS:
        raise ValueError(f"engine.ray.transport={name!r}: expected auto or one of "
                         f"{', '.join(TRANSPORTS)}")
    transport = TRANSPORTS[name]
    if transport.device not in (None, stream_device):
        raise ValueError(f"engine.ray.transport={name}: moves {transport.device} tensors, but the "
                         f"activation streams live on {stream_device}; use "
                         f"engine.ray.transport=auto (or "
                         f"{'nccl' if stream_device == 'cuda' else 'gloo'}, or object-store)")
    if not transport.available():
        raise ValueError(f"engine.ray.transport={name}: Ray's {name} collective backend is not "
                         f"available in this environment; {FIXES.get(name, '')}, or use "
                         "engine.ray.transport=auto or object-store")
    return transport


# --------------------------------------------------------------------------- stages
# A stage is one actor's part of a pass: its whole slice in one call. Its input is the previous
# actor's returned stream (resolved by Ray), an :class:`Embed` (first actor) or a :class:`Kept`
# stream; it returns the outgoing stream when it hands on (``hand_on``: the transport's call),
# else its result. Results of handing-on stages wait in the actor's outbox for :func:`_take`.


def _actor_state(worker: Worker) -> ActorState:
    state = worker.__dict__.get("_ray_actor_state")
    if state is None:
        state = worker.__dict__["_ray_actor_state"] = ActorState({}, {})
    return state


def _incoming(worker: Worker, source: Any) -> Any:
    """The stage's input stream ``(N, T, h)`` (None: a candidate stopped upstream)."""
    if isinstance(source, Embed):
        return worker.embed(source.ids)
    if isinstance(source, Kept):
        return _actor_state(worker).kept[source.key]
    return source


def _op_prune(worker: Worker, stream: Any, entries: Mapping[int, Any], job: PruneJob,
              indices: list[int]) -> tuple[Any, Any]:
    return worker.prune_slice(stream, entries, job, indices)


def _op_candidate(worker: Worker, stream: Any, ratios: Mapping[int, Any], job: CandidateJob,
                  bound: tuple[float, bool, float] | None) -> tuple[Any, Any]:
    return worker.eval_candidate(stream, ratios, job, _actor_state(worker).kept.get("reference"),
                                 bound)


def _op_reference(worker: Worker, stream: Any, needs: frozenset[str],
                  reference_stream: str) -> tuple[Any, Any]:
    """The dense reference stays in the actor for its candidate stages."""
    stream, _actor_state(worker).kept["reference"] = worker.dense_reference(
        stream, needs, reference_stream)
    return stream, None


def _op_metrics(worker: Worker, stream: Any, fn: Callable[..., Any],
                needs: frozenset[str]) -> tuple[Any, Any]:
    return worker.dense_block_metrics(stream, fn, needs)


def _op_forward(worker: Worker, stream: Any, head: str | None, *args: Any) -> tuple[Any, Any]:
    """Forward through the slice; the last actor then runs ``Worker.<head>(stream, *args)``
    (``window_nll``, ``token_logprobs``, ``last_logits``, ``logits``)."""
    stream = worker.forward(stream)
    return stream, (getattr(worker, head)(stream, *args) if head is not None else None)


STAGE_OPS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "prune": _op_prune, "candidate": _op_candidate, "reference": _op_reference,
    "metrics": _op_metrics, "forward": _op_forward}


def _run_stage(worker: Worker, source: Any, hand_on: bool, token: int | None, op: str,
           *args: Any) -> Any:
    """Run stage ``op`` on the actor's slice (see the section comment)."""
    try:
        stream, result = STAGE_OPS[op](worker, _incoming(worker, source), *args)
    except Exception as exc:
        if token is not None:
            _actor_state(worker).outbox[token] = exc  # re-raised by _take
        raise
    if not hand_on:
        return result
    if token is not None:
        _actor_state(worker).outbox[token] = result
    return stream


def _take(worker: Worker, token: int) -> Any:
    """The result of the actor's stage ``token`` (its error, if it failed).

    Raises:
        RuntimeError: The stage never ran (its input failed upstream; that error comes first).
    """
    outbox = _actor_state(worker).outbox
    if token not in outbox:
        raise RuntimeError(f"worker {worker.spec.rank}: stage {token} did not run (its input "
                           "failed upstream)")
    result = outbox.pop(token)
    if isinstance(result, Exception):
        raise result
    return result


def _keep_embedded(worker: Worker, key: str, ids: torch.Tensor) -> None:
    """Embed ``ids`` once and keep the stream for every stage that starts from it."""
    _actor_state(worker).kept[key] = worker.embed(ids)


def _forget(worker: Worker) -> None:
    """Drop the kept streams, statistics and untaken results."""
    worker.__dict__.pop("_ray_actor_state", None)


# --------------------------------------------------------------------------- data mode
# engine.parallel=data (neuroal.engine.data_parallel): every actor runs its DataPrune program in
# one long call, all at once; the data moves through a torch.distributed group formed inside the
# actors for that call only (DistComm, the dist executor's collectives), rendezvous through a TCP
# store that actor 0 opens on its node's IP and a port the OS picks.

_STORE = "_ray_data_store"  # actor 0's TCP store, kept from _open_store to _data_prune


def _has_experts(worker: Worker) -> bool:
    """Whether any block holds a mixture of experts (data mode refuses them)."""
    return any(has_experts(b) for b in worker.adapter.blocks)


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


def _data_prune(worker: Worker, address: tuple[str, int], rank: int, world: int,
                channel: tuple[str, str | None], timeouts: tuple[float, float],
                common: tuple[Any, ...]) -> list[BlockReport] | None:
    """Inside an actor: join the group, run this worker's :class:`DataPrune` program, leave the
    group (also after a failure). Returns the reports of the blocks this actor owns, None when
    another actor's failure stopped it (that actor raises its own error)."""
    ids, entries, job, slices = common
    backend, via = channel
    try:
        _join_group(worker, address, rank, world, backend, *timeouts)
        layout = Layout(tuple(map(tuple, slices)), int(ids.shape[0]), worker.spec.micro_batch)
        comm = DistComm(rank, world, torch.device(via) if via else worker.device)
        try:
            return DataPrune(worker, comm, layout).run(ids, entries, job)
        except Stopped:
            return None
    finally:
        worker.__dict__.pop(_STORE, None)
        _drop_process_group(worker)


# --------------------------------------------------------------------------- executor


class RayExecutor:
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

    def __init__(self, template: WorkerSpec, workers: int, options: RayOptions = RayOptions(),
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

    # ------------------------------------------------------------------ fault tolerance

    def fault_hook(self, operation: str, unit: int) -> None:
        """Test seam, a no-op: called on the coordinator right after the work of ``unit`` of
        ``operation`` (``load`` rank, ``prune`` block, search ``candidate``, ``perplexity``
        or ``zero-shot`` chunk) has been submitted. Tests replace it to kill an actor at a chosen point."""

    def _retrying(self, attempt: Callable[[], T],
                  on_restart: Callable[[list[int]], None] | None = None) -> T:
        """``attempt()``; after an actor death, restart the dead actors and call it again.

        ``attempt`` must submit its work afresh (the actor handles change) and skip what it has
        already gathered; ``on_restart(ranks)`` lets it forget work held by the dead actors.
        """
        errors = _actor_errors()
        while True:
            try:
                return attempt()
            except errors as exc:
                dead = self._recover(exc)
            except import_ray().exceptions.RayTaskError as exc:
                # a direct transfer with an actor that died fails inside the live one
                if self._channel is None or not self._dead_ranks():
                    raise
                dead = self._recover(exc)
            if on_restart is not None:
                on_restart(dead)

    def _recover(self, exc: BaseException) -> list[int]:
        """Restart every dead actor and restore its state; the restarted ranks.

        Raises:
            RuntimeError: An actor died more than ``max_restarts`` times.
            BaseException: ``exc`` itself when no actor is dead (nothing to repair).
        """
        errors = _actor_errors()
        restarted: set[int] = set()
        while True:
            if getattr(exc, "actor_init_failed", False):
                raise exc  # the worker's constructor raised: the same error on every restart
            dead = self._dead_ranks()
            if not dead and not restarted:
                raise exc
            try:
                for k in dead:
                    restarted.add(k)
                    self._respawn(k, exc)
                if dead:
                    # checked again: Ray kills both ends of a failed direct transfer, the
                    # live one possibly while the dead one was reloading
                    continue
                self._connect()  # the channel spans the new actors
                self._restore(sorted(restarted))
                return sorted(restarted)
            except errors as again:  # died again while reloading or restoring
                exc = again

    def _dead_ranks(self) -> list[int]:
        """Ranks whose actor no longer answers (a ping waits behind earlier calls)."""
        ray = import_ray()
        errors = _actor_errors()
        refs = [a.__ray_call__.remote(_ping) for a in self.workers]
        dead = []
        for k, ref in enumerate(refs):
            try:
                ray.get(ref)
            except errors:
                dead.append(k)
        return dead

    def _respawn(self, rank: int, exc: BaseException) -> None:
        """A fresh actor for ``rank`` in its bundle, its slice loaded (or the final error)."""
        ray = import_ray()
        spec = self.specs[rank]
        cause = _describe(exc)
        if self.restarts[rank] >= self.max_restarts:
            message = (f"Ray worker {rank} (blocks [{spec.start}, {spec.stop}) of "
                       f"{self._num_blocks}) died while {self._failed} ({cause}) after "
                       f"{self.restarts[rank]} restart(s) (engine.ray.max_restarts="
                       f"{self.max_restarts}); giving up. {self._resume_hint()}")
            self.shutdown()
            raise RuntimeError(message) from exc
        self.restarts[rank] += 1
        log.warning("ray worker %d (blocks [%d, %d)) died while %s (%s); restarting it in its "
                    "placement-group bundle, restart %d of at most %d", rank, spec.start,
                    spec.stop, self._failed, cause, self.restarts[rank], self.max_restarts)
        ray.kill(self.workers[rank])
        self._busy_offset[rank] = self._last_busy[rank]
        timeout = self.options.placement_timeout
        if self._group is not None and not self._group.wait(timeout):
            self._failed = f"re-placing worker {rank} (its node is gone)"
            message = (f"Ray could not re-place worker {rank} (blocks [{spec.start}, "
                       f"{spec.stop})) within engine.ray.placement_timeout={timeout:g} s: its "
                       "node is gone and the cluster has no spare "
                       f"{self.options.cpus:g} CPU(s){' + 1 GPU' if 'cuda' in spec.device else ''}"
                       f". {self._resume_hint()}")
            self.shutdown()
            raise RuntimeError(message) from exc
        self.workers[rank] = self._new_actor(spec)
        self._get(self.workers[rank].__ray_call__.remote(_setup, *self._setup_args),
                  f"reloading the slice of worker {rank}", timeout)

    def _resume_hint(self) -> str:
        """Where the resume state is and how to continue from it."""
        if self.state_dir:
            return (f"The resume state is kept at {self.state_dir}: rerun with --resume to "
                    "continue from the last checkpoint.")
        return ("If this run has an output directory, its resume state is kept under "
                "<output>.neuroal-tmp/state: rerun with --resume to continue from the last "
                "checkpoint.")

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

    def _restore(self, ranks: list[int]) -> None:
        """Give restarted actors their pruned blocks back when the final prune has run: from the
        resume state if every block was saved, else by pruning them again on the calibration
        stream (bit-identical: the same inputs through the same deterministic steps)."""
        if self._pruned is None:
            return
        plan, job, ids = self._pruned
        blocks = [b for k in ranks for b in self._owned(k)]
        if job.state_dir is not None and all(block_state_path(job.state_dir, b).exists()
                                             for b in blocks):
            self._get([self.workers[k].restore_blocks.remote(job.state_dir) for k in ranks],
                      "restoring pruned blocks from the saved state")
            log.warning("restored pruned blocks %s of restarted worker(s) %s from %s", blocks,
                        ranks, job.state_dir)
            return
        log.warning("no saved state of blocks %s (no output directory, or the state was already "
                    "removed): pruning them again on the calibration data for restarted "
                    "worker(s) %s (deterministic, same result)", blocks, ranks)
        self._prune_pass(plan, replace(job, state_dir=None), ids, set(blocks), {})

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
        self.parallel = self._prune_mode(job)
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

    def _prune_mode(self, job: PruneJob) -> str:
        """:func:`~neuroal.engine.data_parallel.resolve_parallel` with the facts of the model
        (read on actor 0) and of the prune job, as the other executors decide it."""
        experts = self._retrying(lambda: self._get(
            self.workers[0].__ray_call__.remote(_has_experts), "reading the model's blocks"))
        return resolve_parallel(self._requested, len(self.workers),
                                reconstruct=job.reconstruct is not None, experts=experts)

    def _data_final_prune(self, plan: SparsityPlan, job: PruneJob,
                          ids: torch.Tensor) -> list[BlockReport]:
        """Data-parallel final prune (:mod:`neuroal.engine.data_parallel`): every actor runs
        its :class:`DataPrune` program in one call, all at once, over a torch.distributed group
        that lives for that call only (the transport's channel is taken down first, since Ray's
        gloo group sits on the same default group, and rebuilt after). Each block's owner
        writes its resume state inside its actor, as in pipeline mode.

        An actor lost mid-prune stops the run (:meth:`_settle`): the others cannot go on
        without it; ``--resume`` continues from the saved blocks.
        """
        ray = import_ray()
        world = len(self.workers)
        common = ray.put((ids, [plan.block(b) for b in range(self._num_blocks)], job,
                          [(s.start, s.stop) for s in self.specs]))
        timeouts = (self.options.placement_timeout, self.options.group_timeout)
        with self.meter("prune"):
            channel = data_channel(self._retrying(lambda: self._get(
                [a.__ray_call__.remote(_device_key) for a in self.workers],
                "reading the workers' devices")))
            if channel[1] == "cpu":
                log.warning("Ray workers share a GPU: the data-parallel prune moves its tensors "
                            "through host memory over gloo (NCCL needs one GPU per worker)")
            self.transport.disconnect(self._channel)
            self._channel = None
            address = self.workers[0].__ray_call__.remote(_open_store,
                                                          self.options.placement_timeout)
            refs = [a.__ray_call__.remote(_data_prune, address, k, world, channel, timeouts,
                                          common)
                    for k, a in enumerate(self.workers)]
            for b in range(self._num_blocks):
                self.fault_hook("prune", b)
            try:
                parts = self._settle(refs, "pruning blocks data-parallel")
            except Exception:
                self._reopen()
                raise
            self._pruned = (plan, job, ids)  # a later restart restores the pruned blocks
            self._retrying(self._connect)
        reports = sorted((r for part in parts for r in part or ()), key=lambda r: r.index)
        for report in reports:
            log_block(report, self._num_blocks)
        self._relay_warnings()
        return reports

    def _reopen(self) -> None:
        """After a failed data-parallel call whose actors are kept: the transport's channel
        back, so the executor stays usable (a failure here is logged, not raised over the
        call's own error)."""
        if not self.workers:
            return
        try:
            self._connect()
        except Exception as exc:  # the call's error is the one to report
            log.warning("could not reopen the %s channel after the failed prune: %s",
                        self.transport.name, _describe(exc))

    def _settle(self, refs: list[Any], what: str) -> list[Any]:
        """Every actor's result of one collective call (``refs[k]`` on actor k), watched as
        they finish, so that a lost actor is reported at once rather than after its peers'
        collective timeout.

        Raises:
            RuntimeError: An actor died: the run stops (every actor is released) with the
                ``--resume`` hint.
            Exception: An actor's own error, the first in rank order (its peers stopped at the
                same phase boundary; peers still stuck after ``engine.ray.placement_timeout``
                are released).
        """
        ray = import_ray()
        outcome: dict[int, Any] = {}
        pending, wait = list(refs), None
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=wait)
            if not done:
                break
            k = refs.index(done[0])
            try:
                outcome[k] = ray.get(done[0])
            except _actor_errors() as exc:
                self._lost(k, what, exc)
            except ray.exceptions.RayError as exc:
                outcome[k], wait = exc, self.options.placement_timeout
        failed = [outcome[k] for k in sorted(outcome) if isinstance(outcome[k], BaseException)]
        if failed:
            self._failed = what
            if pending:
                self.shutdown()
            raise failed[0]
        return [outcome[k] for k in range(len(refs))]

    def _lost(self, rank: int, what: str, exc: BaseException) -> None:
        """Stop the run after actor ``rank`` died in a data-parallel call.

        Raises:
            RuntimeError: Always, naming the actor and the ``--resume`` hint.
        """
        spec = self.specs[rank]
        self._failed = what
        message = (f"Ray worker {rank} (blocks [{spec.start}, {spec.stop}) of "
                   f"{self._num_blocks}) died while {what} ({_describe(exc)}). With "
                   "engine.parallel=data every worker takes part in every block, so the prune "
                   "cannot go on without it and no worker is restarted mid-prune "
                   f"(engine.parallel=pipeline restarts them). {self._resume_hint()}")
        self.shutdown()
        raise RuntimeError(message) from exc

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
        submitted again.
        """
        results: dict[int, list[BlockAlignment]] = {}
        last = len(self.workers) - 1

        def attempt() -> None:
            for actor in self.workers:
                actor.__ray_call__.remote(_forget)
            self._get(self.workers[0].__ray_call__.remote(_keep_embedded, "search", ids),
                      "embedding the search windows")
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
        per actor."""
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
        """Per-window mean NLL ``(k,)`` float64; micro-batch chunks pipeline freely."""
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
