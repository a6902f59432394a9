"""What runs inside a Ray actor: module-level functions called through ``actor.__ray_call__``
(first argument: the actor's :class:`~neuroal.engine.worker.Worker` instance), so the Worker
class needs no Ray-specific methods and stays the one worker of every backend.

Ray pickles these functions by reference (this module's dotted name), and every actor imports
this checkout (:func:`~neuroal.engine.ray.options.actor_env` puts it on the actor's path).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from neuroal.engine.determinism import apply_determinism
from neuroal.engine.worker import Worker
from neuroal.runtime.jobs import CandidateJob, PruneJob
from neuroal.runtime.logging import buffer_warnings, configure
from neuroal.runtime.progress import configure_progress

# --------------------------------------------------------------------------- set-up and facts

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


def _drop_process_group(_worker: Worker) -> None:
    """Inside an actor: leave torch.distributed (Ray's gloo groups live on its default group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- stages
# A stage is one actor's part of a pass: its whole slice in one call. Its input is the previous
# actor's returned stream (resolved by Ray), an :class:`Embed` (first actor) or a :class:`Kept`
# stream; it returns the outgoing stream when it hands on (``hand_on``: the transport's call),
# else its result. Results of handing-on stages wait in the actor's outbox for :func:`_take`.


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
