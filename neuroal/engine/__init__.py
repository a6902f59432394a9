"""Workers and executors (engine.md §2-§3).

Executors register by name in :data:`EXECUTORS`; each entry is a factory called as
``factory(cfg, source=..., num_blocks=..., devices=..., dtype=..., session=...)`` returning an
object that satisfies :class:`neuroal.engine.executor.Executor`; ``session`` is the open
distributed session of the ``dist`` executor (:func:`neuroal.engine.dist.coordinator`), or None.
Ray itself is imported only when a Ray executor starts (:func:`~neuroal.engine.ray.options.
import_ray`), so neither ``import neuroal`` nor this package needs it.
"""

from __future__ import annotations

from typing import Any

from neuroal.engine.core import spill_dir, worker_template
from neuroal.engine.dist import DistExecutor
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.onload import resolved_onload
from neuroal.engine.ray.executor import RayExecutor
from neuroal.engine.ray.options import RayOptions, device_kind
from neuroal.runtime.registry import Registry

EXECUTORS: Registry[Any] = Registry("executor")


def _local(cfg: Any, *, source: Any, num_blocks: int, devices: list[str], dtype: str,
           session: Any = None) -> Any:
    """All workers in this process (tests, laptops, one GPU)."""
    eng = cfg.engine
    return LocalExecutor(source, num_blocks, eng.workers, devices, dtype, eng.micro_batch,
                         eng.offload_activations, cfg.model.trust_remote_code,
                         onload=resolved_onload(eng.onload), prefetch=eng.prefetch,
                         selection=(tuple(cfg.targets), tuple(cfg.ignore)),
                         parallel=eng.parallel, spill_dir=spill_dir(cfg))


EXECUTORS.add("local", _local)


def _ray(cfg: Any, *, source: Any, num_blocks: int, devices: list[str], dtype: str,
         session: Any = None) -> Any:
    """One Ray actor per worker in a placement group (engine.md §3.3); imports Ray lazily."""
    template = worker_template(cfg, source, num_blocks, device_kind(devices), dtype)
    return RayExecutor(template, cfg.engine.workers,
                       RayOptions.from_config(cfg.engine.ray, cfg.engine.deterministic,
                                              cfg.engine.dist.timeout),
                       parallel=cfg.engine.parallel)


EXECUTORS.add("ray", _ray)


def _dist(cfg: Any, *, source: Any, num_blocks: int, devices: list[str], dtype: str,
          session: Any = None) -> Any:
    """Rank 0 of a torchrun / accelerate launch, one rank per slice (engine.md §3.4), built
    from ``session``, the stage yielded by :func:`neuroal.engine.dist.coordinator`; every rank
    picks its own device (``cuda:<LOCAL_RANK>`` or ``cpu``), so ``devices`` is unused."""
    return DistExecutor.from_config(cfg, source, num_blocks, dtype, session)


EXECUTORS.add("dist", _dist)
