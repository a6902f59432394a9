"""Joining a torchrun / accelerate launch: which rank this process is, its device, the
timeouts, and the process groups (engine.md §3.4).

Every rank starts from the same argv, so every rank validates the same config here and rejects
a rank count different from ``engine.workers`` with the same error, before any process group or
weight exists. The executor itself is :mod:`neuroal.engine.dist`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from neuroal.config.schema import DistConfig, PruneConfig
from neuroal.engine.determinism import CUBLAS_WORKSPACE
from neuroal.runtime.errors import ConfigError

# Ranks > 0 wait in a broadcast while rank 0 works alone (data loading, search bookkeeping,
# export of config and tokenizer); the default 30 min collective timeout is too short at 70B.
# The default of ``engine.dist.timeout`` (seconds).
TIMEOUT = datetime.timedelta(seconds=DistConfig().timeout)
# Point-to-point stream transfers get the short ``engine.dist.collective_timeout`` (their own
# process group), so a hung GPU or a dead neighbour is reported within it.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=DistConfig().collective_timeout)


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
def process_group(info: RankInfo) -> Iterator[Any]:
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
