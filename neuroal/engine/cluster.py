"""The driver's side of preflight (:mod:`neuroal.engine.preflight`): resolve the device where
the workers run, collect every worker's facts through its executor's channel, refuse a run
that cannot succeed with one :class:`~neuroal.runtime.errors.PreflightError` listing every problem.

* Ray, connected to a cluster (``engine.ray.address``, ``$RAY_ADDRESS``, or a Ray already
  initialised with several nodes): the device comes from the cluster's GPUs, never from the
  driver's (a head node often has none); probe tasks run in a placement group of the
  executor's shape
  (:mod:`neuroal.engine.ray_preflight`). A local Ray instance runs on this machine, whose
  devices and disks the driver already sees: only the driver's checks run.
* torch.distributed: rank 0 sends the ``probe`` and ``probe_read`` commands to every rank
  (:mod:`neuroal.engine.dist`); each rank reports for its own ``cuda:<LOCAL_RANK>``.
* Every executor: the driver's own disk at the output, and a relative output under
  ``ray job submit`` (:func:`~neuroal.engine.preflight.relative_output_errors`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from neuroal.config.schema import PruneConfig
from neuroal.engine.dist import RankStage, command
from neuroal.engine.preflight import (
    NodeFacts,
    check_facts,
    cluster_device_type,
    gather_facts,
    gb,
    probe_name,
    relative_output_errors,
    remove_probes,
    see_probes,
)
from neuroal.engine.ray.options import import_ray, init_ray
from neuroal.engine.ray_preflight import ProbeRequest, Remap, probe_cluster
from neuroal.runtime.errors import PreflightError
from neuroal.runtime.logging import get_logger
from neuroal.runtime.process import pick_device

log = get_logger(__name__)


def on_ray_cluster(cfg: PruneConfig) -> bool:
    """True when the Ray executor runs on a cluster rather than a local instance it starts."""
    if cfg.engine.executor != "ray":
        return False
    if cfg.engine.ray.address or os.environ.get("RAY_ADDRESS"):
        return True
    ray = import_ray()  # initialised by the caller: a cluster when it spans several nodes
    return bool(ray.is_initialized()) and sum(bool(n.get("Alive")) for n in ray.nodes()) > 1


def resolve_device(cfg: PruneConfig) -> torch.device:
    """The device the workers run on, resolved where they run: on a Ray cluster from its GPU
    count (connecting to it), else in this process (:func:`~neuroal.runtime.process.pick_device`).

    Raises:
        PreflightError: ``cuda`` requested on a cluster without GPUs.
    """
    name = cfg.engine.devices[0] if cfg.engine.devices else cfg.engine.device
    if not on_ray_cluster(cfg):
        return pick_device(name)
    init_ray(cfg.engine.ray.address, cfg.engine.workers * cfg.engine.ray.cpus)
    gpus = float(import_ray().cluster_resources().get("GPU", 0))
    kind, errors = cluster_device_type(name, gpus)
    if errors:
        raise PreflightError(errors)
    if name == "auto":
        log.info("engine.device=auto: the Ray cluster has %g GPU(s), so the workers run on %s",
                 gpus, kind)
    return torch.device(kind)


def run_preflight(cfg: PruneConfig, device_type: str, tmp: Path | None, needed: int = 0,
                  detail: str = "", session: RankStage | None = None,
                  remap: Remap | None = None) -> list[NodeFacts]:
    """Collect every worker's facts, check them, clean the probes up; the workers' facts.

    Args:
        cfg: The validated config (executor, workers, Ray options, output).
        device_type: The workers' device type (:func:`resolve_device`).
        tmp: The output's temporary folder (it exists: the output lock is held), or None.
        needed: Bytes the run writes there (resume state + export); 0: not checked.
        detail: What ``needed`` is made of, for the message.
        session: The open dist session on rank 0, or None.
        remap: Ray only: where each node sees ``tmp`` (tests simulate node-local disks).

    Raises:
        PreflightError: Every problem found (device, shared filesystem, disk).
    """
    nonce = uuid.uuid4().hex
    driver = gather_facts(-1, "cpu", tmp, nonce)
    try:
        facts = _worker_facts(cfg, device_type, tmp, nonce, session, remap)
        names = [probe_name(-1), *(probe_name(f.rank) for f in facts)]
        driver = see_probes(driver, tmp, names, nonce)
    finally:
        remove_probes(tmp)
    errors = check_facts([driver, *facts], device_type, tmp, needed, detail)
    if errors:
        raise PreflightError(errors)
    _log_summary(facts, driver, needed)
    return facts


def _worker_facts(cfg: PruneConfig, device_type: str, tmp: Path | None, nonce: str,
                  session: RankStage | None, remap: Remap | None) -> list[NodeFacts]:
    """Both probe rounds on the workers of ``cfg``'s executor ([] when they are this process)."""
    where = None if tmp is None else str(tmp)
    if session is not None:
        first = command(session, "probe", (where, nonce))
        names = [probe_name(-1), *(probe_name(f.rank) for f in first)]
        seen = command(session, "probe_read", (where, nonce, names))
        return [replace(f, seen=tuple(s)) for f, s in zip(first, seen, strict=True)]
    if on_ray_cluster(cfg):
        ray = cfg.engine.ray
        request = ProbeRequest(cfg.engine.workers, device_type, ray.cpus, ray.placement,
                               ray.placement_timeout, where, nonce)
        return probe_cluster(request, remap)
    return []


def _log_summary(facts: Sequence[NodeFacts], driver: NodeFacts, needed: int) -> None:
    """One line per distinct node, and the disk figure."""
    nodes: dict[str, list[NodeFacts]] = {}
    for f in facts:
        nodes.setdefault(f.node, []).append(f)
    for node_facts in nodes.values():
        f = node_facts[0]
        free = [g.device_free for g in node_facts if g.device_free is not None]
        log.info("preflight: host %s, workers %s on %s%s, host memory %s available",
                 f.host, [g.rank for g in node_facts], f.device,
                 f", {gb(min(free))} free per device" if free else "",
                 gb(f.host_available) if f.host_available is not None else "unknown")
    if driver.disk_free is not None:
        log.info("preflight: %s free at the output%s", gb(driver.disk_free),
                 f", about {gb(needed)} needed" if needed else "")


def output_errors(output: str | Path | None) -> list[str]:
    """The driver's checks of the output path itself (before it is made absolute)."""
    return relative_output_errors(output, os.environ)
