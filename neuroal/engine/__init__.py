"""Workers and executors (engine.md §2-§3).

Executors register by name in :data:`EXECUTORS`; each entry is a factory called as
``factory(cfg, source=..., num_blocks=..., devices=..., dtype=...)`` returning an object that
satisfies :class:`neuroal.engine.executor.Executor`. Factories import their backend (Ray,
torch.distributed) lazily, so ``import neuroal`` never needs them.
"""

from __future__ import annotations

from typing import Any

from neuroal.registry import Registry

EXECUTORS: Registry[Any] = Registry("executor")


def _local(cfg: Any, *, source: Any, num_blocks: int, devices: list[str], dtype: str) -> Any:
    """All workers in this process (tests, laptops, one GPU)."""
    from neuroal.engine.executor import LocalExecutor

    eng = cfg.engine
    return LocalExecutor(source, num_blocks, eng.workers, devices, dtype, eng.micro_batch,
                         eng.offload_activations, cfg.model.trust_remote_code)


EXECUTORS.add("local", _local)
