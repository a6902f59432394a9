"""Preflight on a Ray cluster: probe tasks in the bundles the workers will use (the Ray side of
:mod:`neuroal.engine.preflight`).

A placement group of the executor's shape (one bundle per worker, same resources and strategy)
is reserved for a few seconds; one small task per bundle reports its
:class:`~neuroal.engine.preflight.NodeFacts` and writes its probe file, then one task per bundle
reads every probe back; the group is removed before the executor reserves its own. Nothing is
loaded. ``import ray`` happens lazily, through :func:`~neuroal.engine.ray.options.import_ray`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroal.engine.preflight import NodeFacts, gather_facts, probe_name, see_probes
from neuroal.engine.ray.options import actor_device, actor_env, import_ray
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

Remap = Callable[[Path], Path]
"""Where a node sees a driver path (tests give each simulated node its own folder)."""


@dataclass(frozen=True)
class ProbeRequest:
    """What the probe tasks need: ``workers`` bundles of ``cpus`` CPUs (+ one GPU each for
    ``device_type`` cuda) placed with ``placement`` within ``timeout`` seconds; ``tmp``: the
    output's temporary folder (None: no output); ``nonce``: this run's probe content."""

    workers: int
    device_type: str
    cpus: float
    placement: str
    timeout: float
    tmp: str | None
    nonce: str


def _facts_task(rank: int, device: str, tmp: str | None, nonce: str,
                remap: Remap | None) -> NodeFacts:
    """First round, inside bundle ``rank``: facts and this worker's probe."""
    ray = import_ray()
    node = ray.get_runtime_context().get_node_id()
    root = None if tmp is None else (remap(Path(tmp)) if remap else Path(tmp))
    return gather_facts(rank, device, root, nonce, node)


def _see_task(facts: NodeFacts, tmp: str | None, names: list[str], nonce: str,
              remap: Remap | None) -> NodeFacts:
    """Second round, inside the same bundle: which probes this node can read."""
    root = None if tmp is None else (remap(Path(tmp)) if remap else Path(tmp))
    return see_probes(facts, root, names, nonce)


def _get(ray: Any, refs: list[Any], timeout: float) -> list[Any]:
    """``ray.get`` with a timeout that says what was waited for."""
    try:
        return list(ray.get(refs, timeout=timeout))
    except ray.exceptions.GetTimeoutError as exc:
        raise RuntimeError(f"the preflight probes did not finish within "
                           f"engine.ray.placement_timeout={timeout:g} s (a node stopped "
                           "answering, or a worker cannot start); check `ray status`") from exc


def reserve(workers: int, bundle: dict[str, float], placement: str, timeout: float) -> Any:
    """A placement group of ``workers`` copies of ``bundle``, ready within ``timeout`` s.

    Raises:
        RuntimeError: Not placed in time (the cluster lacks the resources).
    """
    ray = import_ray()
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([dict(bundle) for _ in range(workers)], strategy=placement)
    if not group.wait(timeout):
        remove_placement_group(group)
        raise RuntimeError(
            f"Ray could not place {workers} workers of {bundle} with strategy {placement} "
            f"within engine.ray.placement_timeout={timeout:g} s; the cluster has "
            f"{ray.available_resources()} available. Add nodes, use fewer workers or a "
            "smaller engine.ray.cpus, or raise engine.ray.placement_timeout")
    return group


def probe_cluster(request: ProbeRequest, remap: Remap | None = None) -> list[NodeFacts]:
    """Every worker's facts (rank order) after both probe rounds; the driver writes its own
    probe before and reads the workers' after (:mod:`neuroal.engine.cluster`).

    Raises:
        RuntimeError: The group was not placed, or a probe task did not finish, within
            ``request.timeout`` seconds.
    """
    ray = import_ray()
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    gpus = 1 if request.device_type == "cuda" else 0
    bundle = {"CPU": request.cpus, **({"GPU": gpus} if gpus else {})}
    group = reserve(request.workers, bundle, request.placement, request.timeout)
    try:
        def options(k: int) -> dict[str, Any]:
            return {"num_cpus": request.cpus, "num_gpus": gpus,
                    "runtime_env": {"env_vars": actor_env(gpus > 0, False, None)},
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=k)}

        first, second = ray.remote(_facts_task), ray.remote(_see_task)
        device = actor_device(request.device_type)
        facts = _get(ray, [first.options(**options(k)).remote(
            k, device, request.tmp, request.nonce, remap) for k in range(request.workers)],
            request.timeout)
        names = [probe_name(-1), *(probe_name(k) for k in range(request.workers))]
        return list(_get(ray, [second.options(**options(k)).remote(
            f, request.tmp, names, request.nonce, remap) for k, f in enumerate(facts)],
            request.timeout))
    finally:
        remove_placement_group(group)
