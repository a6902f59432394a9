"""What a finished block leaves for resume and how it is written back (engine.md §8).

The files themselves (names, digests, atomic writes) are :mod:`neuroal.outputs.checkpoint`'s;
here is what a resume must restore of a block (masks only, or weights) and how a saved state
goes back into a block. The Worker decides when (after each pruned block; on a replay; on a
restarted actor).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from neuroal.criteria import CRITERIA
from neuroal.models.adapter import ModelAdapter
from neuroal.outputs.checkpoint import KIND_MASKS, KIND_WEIGHTS, positive_zeros
from neuroal.recovery import REFINERS
from neuroal.runtime.jobs import PruneJob


def state_kind(job: PruneJob) -> str:
    """``masks`` when the criterion and every refiner only choose masks (their
    ``changes_values`` is false) and no reconstruction runs, else ``weights``; a plug-in
    that declares nothing counts as changing values."""
    changes = getattr(CRITERIA.get(job.criterion), "changes_values", True) or any(
        getattr(REFINERS.get(name), "changes_values", True) for name, _ in job.refine)
    return KIND_WEIGHTS if changes or job.reconstruct is not None else KIND_MASKS


def block_state(adapter: ModelAdapter, index: int, job: PruneJob,
                kind: str = KIND_WEIGHTS) -> dict[str, torch.Tensor]:
    """What resume must restore of block ``index``: each linear's weight under the linear's
    name; after a reconstruction also every other block parameter (norms, biases) under its
    own name. CPU tensors are handed over as they are (the writer reads them before the block
    is touched again); device tensors are copied to the host here, ``masks`` as their
    :func:`~neuroal.outputs.checkpoint.positive_zeros` (1 byte per weight)."""
    block = adapter.blocks[index]
    linears = adapter.prunable_linears(block)
    state = {n: m.weight.data for n, m in linears.items()}
    if job.reconstruct is not None:
        weights = {f"{n}.weight" for n in linears}
        state.update({n: p.data for n, p in block.named_parameters() if n not in weights})
    if kind == KIND_MASKS:
        return {n: t if t.device.type == "cpu" else positive_zeros(t).cpu()
                for n, t in state.items()}
    return {n: t if t.device.type == "cpu" else t.cpu() for n, t in state.items()}


def write_block_state(block: torch.nn.Module, linears: Mapping[str, torch.nn.Linear],
                      weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a saved state (:func:`block_state`'s names) into ``block`` (on its device):
    stored weights are copied, bool masks (a ``masks`` state) zero the dense weights.

    Returns:
        The restored weight of every stored linear, ``name -> (rows, cols)``.
    """
    restored = {}
    for name, weight in weights.items():
        target = linears[name].weight if name in linears else block.get_parameter(name)
        if weight.dtype == torch.bool:
            target.data.masked_fill_(weight.to(target.device), 0.0)
        else:
            target.data.copy_(weight.to(target.device))
        if name in linears:  # stays valid after an onloaded block leaves the device
            restored[name] = target.data
    return restored
