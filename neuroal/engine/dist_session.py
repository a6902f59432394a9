"""The session of a ``dist`` launch: rank 0 sends commands, the other ranks serve them
(engine.md §3.4).

Rank 0 is the coordinator: it runs the pipeline (data, search, evaluation, report) inside
:func:`coordinator`, and every executor call becomes a :func:`command`: a name and small
picklable arguments broadcast to all ranks, plus per-rank arguments (plan entries, candidate
ratios) scattered to their owners, then each rank's part gathered back. Ranks > 0 run
:func:`serve` until rank 0 sends ``exit`` (or ``abort`` when the coordinator fails). Both start
from the same argv, so they validate the same config (:func:`~neuroal.engine.dist_launch.rank_info`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

from neuroal.config.schema import PruneConfig
from neuroal.engine.dist_launch import process_group, rank_info
from neuroal.engine.dist_stage import RankStage
from neuroal.runtime.logging import configure, get_logger
from neuroal.runtime.process import seed_everything

log = get_logger(__name__)

_EXIT, _ABORT = "exit", "abort"


def _broadcast(name: str, common: Any) -> tuple[str, Any]:
    message = [name, common]
    dist.broadcast_object_list(message, src=0)
    return message[0], message[1]


def _scatter(per_rank: Sequence[Any] | None, world: int, rank: int) -> Any:
    out: list[Any] = [None]
    inputs = (list(per_rank) if per_rank is not None else [None] * world) if rank == 0 else None
    dist.scatter_object_list(out, inputs, src=0)
    return out[0]



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
    with process_group(info) as streams:
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
    with process_group(info) as streams:
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
