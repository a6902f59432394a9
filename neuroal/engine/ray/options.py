"""Ray itself for the Ray executor: the lazy ``import ray``, connecting to a cluster or starting a
local instance, and what every actor is started with (its environment, its device name, the
executor's :class:`RayOptions`).

``import ray`` happens only through :func:`import_ray` (or inside functions that run on an actor),
so importing the engine needs no Ray.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuroal.config.schema import DistConfig, RayConfig
from neuroal.engine.determinism import determinism_env

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
    return str(Path(__file__).resolve().parents[3])  # <root>/neuroal/engine/ray/options.py


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
    ``nccl``; :func:`~neuroal.engine.ray.transport.resolve_transport`); ``group_timeout``:
    seconds a collective of the data-parallel prune may wait (``engine.dist.timeout``: a solve on
    another actor, a block onloaded from disk).
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

