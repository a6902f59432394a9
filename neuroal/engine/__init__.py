"""Workers and executors (engine.md §2-§3).

Executors register by name in :data:`EXECUTORS`; each entry is a factory called as
``factory(cfg, source=..., num_blocks=..., devices=..., dtype=...)`` returning an object that
satisfies :class:`neuroal.engine.executor.Executor`. Factories import their backend (Ray,
torch.distributed) lazily, so ``import neuroal`` never needs them.
"""

from __future__ import annotations

from typing import Any

from neuroal.engine.onload import resolved_onload
from neuroal.registry import Registry

EXECUTORS: Registry[Any] = Registry("executor")


def _local(cfg: Any, *, source: Any, num_blocks: int, devices: list[str], dtype: str) -> Any:
    """All workers in this process (tests, laptops, one GPU)."""
    from neuroal.engine.executor import LocalExecutor

    eng = cfg.engine
    return LocalExecutor(source, num_blocks, eng.workers, devices, dtype, eng.micro_batch,
                         eng.offload_activations, cfg.model.trust_remote_code,
                         onload=resolved_onload(eng.onload), prefetch=eng.prefetch)


EXECUTORS.add("local", _local)


def _ray(cfg: Any, *, source: Any, num_blocks: int, devices: list[str], dtype: str) -> Any:
    """One Ray actor per worker in a placement group (engine.md §3.3); imports Ray lazily."""
    from neuroal.engine.ray_executor import RayExecutor

    eng = cfg.engine
    return RayExecutor(source, num_blocks, eng.workers, devices, dtype, eng.micro_batch,
                       eng.offload_activations, cfg.model.trust_remote_code,
                       placement=eng.ray_placement, cpus_per_worker=eng.ray_cpus,
                       address=eng.ray_address, inflight=eng.inflight,
                       deterministic=eng.deterministic, max_restarts=eng.max_restarts,
                       onload=resolved_onload(eng.onload), prefetch=eng.prefetch)


EXECUTORS.add("ray", _ray)


def _dist(cfg: Any, *, source: Any, num_blocks: int, devices: list[str], dtype: str) -> Any:
    """Rank 0 of a torchrun / accelerate launch, one rank per slice (engine.md §3.4); every
    rank picks its own device (``cuda:<LOCAL_RANK>`` or ``cpu``), so ``devices`` is unused."""
    from neuroal.engine.dist import DistExecutor

    return DistExecutor.from_config(cfg, source, num_blocks, dtype)


EXECUTORS.add("dist", _dist)
