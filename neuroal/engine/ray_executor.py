"""The Ray executor's stable import path: its names live in :mod:`neuroal.engine.ray` (one module
per concern: options, actor, transport, faults, data, executor) and are re-exported here, so
``from neuroal.engine.ray_executor import RayExecutor, RayOptions, init_ray`` keeps working.

Patch a name where it is looked up (its module under :mod:`neuroal.engine.ray`), not here.
"""

from __future__ import annotations

from neuroal.engine.ray.actor import (
    ActorState,
    Embed,
    Kept,
    _run_stage,
    _setup,
    _take,
)
from neuroal.engine.ray.data import data_channel
from neuroal.engine.ray.executor import RayExecutor
from neuroal.engine.ray.options import (
    DEVICE_KINDS,
    PLACEMENT_TIMEOUT_S,
    RayOptions,
    actor_device,
    actor_env,
    device_kind,
    import_ray,
    init_ray,
    repo_root,
)
from neuroal.engine.ray.transport import (
    AUTO_ORDER,
    TRANSPORTS,
    DirectTransport,
    ObjectStoreTransport,
    resolve_transport,
)

__all__ = [
    "AUTO_ORDER", "DEVICE_KINDS", "PLACEMENT_TIMEOUT_S", "TRANSPORTS", "ActorState",
    "DirectTransport", "Embed", "Kept", "ObjectStoreTransport", "RayExecutor", "RayOptions",
    "_run_stage", "_setup", "_take", "actor_device", "actor_env", "data_channel", "device_kind",
    "import_ray", "init_ray", "repo_root", "resolve_transport",
]
