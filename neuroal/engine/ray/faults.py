"""Fault tolerance of the Ray executor (engine.md §8): restart dead actors, give them their
state back, retry only the unfinished work.

When an actor dies (killed process, OOM, lost node), also while it loads its slice, the failing
call raises a Ray actor error; the executor finds the dead actors by pinging every one, starts a
fresh actor from the same :class:`~neuroal.runtime.jobs.WorkerSpec` in the same placement-group
bundle (it reloads its slice from the checkpoint), restores its pruned blocks if the final prune
has run (from the resume state, or by pruning them again: results are deterministic), and
retries only the unfinished work. Each actor is restarted at most ``max_restarts`` times; then
the run stops with an error naming the actor and its blocks, and the resume state is kept. An
exception raised by the worker's own constructor (a missing shard, a bad path) is deterministic
and stops the run at once, without restarts. Under a direct transport Ray kills both ends of a
failed transfer, so the live peer of a dead actor may be restarted with it; the collective group
is rebuilt over the new actors.

:class:`FaultTolerance` is mixed into :class:`~neuroal.engine.ray.executor.RayExecutor`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import torch

from neuroal.allocation.plan import SparsityPlan
from neuroal.engine.ray.actor import _ping, _setup
from neuroal.engine.ray.options import RayOptions, _actor_errors, _describe, import_ray
from neuroal.outputs.checkpoint import block_state_path
from neuroal.runtime.jobs import PruneJob, WorkerSpec
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")


class FaultTolerance:
    """Restarts of dead actors (a mixin of :class:`~neuroal.engine.ray.executor.RayExecutor`,
    whose attributes and methods it uses: the actors and their specs, the placement group,
    ``_channel``, ``_get``, ``_new_actor``, ``_connect``, ``_owned``, ``_prune_pass`` and
    ``shutdown``)."""

    workers: list[Any]
    specs: list[WorkerSpec]
    options: RayOptions
    max_restarts: int
    restarts: list[int]
    state_dir: str | None
    _group: Any
    _channel: Any
    _num_blocks: int
    _failed: str
    _busy_offset: list[float]
    _last_busy: list[float]
    _setup_args: tuple[Any, ...]
    _pruned: tuple[SparsityPlan, PruneJob, torch.Tensor] | None

    def fault_hook(self, operation: str, unit: int) -> None:
        """Test seam, a no-op: called on the coordinator right after the work of ``unit`` of
        ``operation`` (``load`` rank, ``prune`` block, search ``candidate``, ``perplexity``
        or ``zero-shot`` chunk; in data mode the ``statistics`` pass and the search's
        ``reference``, unit 0) has been submitted. Tests replace it to kill an actor at a
        chosen point."""

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
