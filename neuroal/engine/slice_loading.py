"""Loading one worker's slice of the model (engine.md §2.1): the skeleton on ``meta`` from the
config, then only the owned tensors; with sequential onloading (``engine.onload``) the blocks
stay at home in a :class:`~neuroal.engine.onload.BlockStore` and only the non-block modules
(embedding, final norm, head) go to the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from neuroal.engine.onload import ONLOAD_MODES, BlockStore
from neuroal.models.adapter import ModelAdapter
from neuroal.models.loading import (
    Checkpoint,
    build_skeleton,
    load_model_config,
    materialise,
    open_checkpoint,
)
from neuroal.models.selection import LayerSelection
from neuroal.runtime.jobs import WorkerSpec


@dataclass
class LoadedSlice:
    """A worker's model: the adapter (skeleton with the owned modules filled), the open
    checkpoint, the names of the parameters loaded, and the block store (None unless the
    slice is onloaded)."""

    adapter: ModelAdapter
    checkpoint: Checkpoint
    loaded: list[str]
    store: BlockStore | None


def load_slice(spec: WorkerSpec, dtype: torch.dtype, device: torch.device) -> LoadedSlice:
    """Build the skeleton and load the modules of blocks ``[spec.start, spec.stop)`` (plus the
    embedding on the first worker, final norm and head on the last) in ``dtype``: on
    ``device``, or at home with onloading.

    Raises:
        ValueError: ``spec.onload`` is not an onloading mode.
    """
    first, last = spec.start == 0, spec.stop == spec.num_blocks
    config = load_model_config(spec.source, spec.trust_remote_code)
    adapter = ModelAdapter(build_skeleton(config, dtype), LayerSelection(spec.targets, spec.ignore))
    modules = adapter.owned_module_names(spec.start, spec.stop, first, last)
    needed = [k for n, _ in adapter.named_owned_parameters(modules)
              for k in adapter.checkpoint_keys(n)]
    checkpoint = open_checkpoint(spec.source, config, needed, adapter.model)
    if spec.onload == "device":
        return LoadedSlice(adapter, checkpoint,
                           materialise(adapter, modules, checkpoint, dtype, device), None)
    return _onloaded(spec, adapter, checkpoint, modules, dtype, device)


def _onloaded(spec: WorkerSpec, adapter: ModelAdapter, checkpoint: Checkpoint, modules: list[str],
              dtype: torch.dtype, device: torch.device) -> LoadedSlice:
    """Sequential onloading: the non-block modules on the device, the blocks at home
    (host memory, or left in the checkpoint for ``disk``) in a :class:`BlockStore`."""
    if spec.onload not in ONLOAD_MODES:
        raise ValueError(f"engine.onload={spec.onload!r}: expected one of "
                         f"{', '.join(ONLOAD_MODES)}")
    blocks = range(spec.start, spec.stop)
    block_modules = [adapter.block_prefix(i)[:-1] for i in blocks]
    others = [m for m in modules if m not in set(block_modules)]
    loaded = materialise(adapter, others, checkpoint, dtype, device)
    loaded += [n for n, _ in adapter.named_owned_parameters(block_modules)]
    store = BlockStore({i: adapter.blocks[i] for i in blocks}, device, spec.onload,
                       partial(read_block, adapter, checkpoint, dtype), spec.prefetch,
                       spec.spill_dir)
    return LoadedSlice(adapter, checkpoint, loaded, store)


def read_block(adapter: ModelAdapter, checkpoint: Checkpoint, dtype: torch.dtype,
               index: int) -> dict[str, torch.Tensor]:
    """Block ``index``'s parameters from the checkpoint, in ``dtype``, on the CPU."""
    prefix = adapter.block_prefix(index)
    keys = {n: adapter.checkpoint_key(prefix + n)
            for n, _ in adapter.blocks[index].named_parameters()}
    tensors = checkpoint.load(sorted(set(keys.values())), dtype, "cpu")
    return {n: tensors[k] for n, k in keys.items()}
