"""Full fine-tuning with fixed masks: zero the masked gradients before each optimiser step and
the masked weights after it (recovery.md §4.2, option 2; opt-in ``perp-full``).

Adapters on a frozen base (PERP) keep zeros by construction; training the pruned weights
themselves does not, so every step must be followed by re-masking. The mask of a weight is
``W == 0`` when training starts (the project's convention: nothing extra is stored with the
model). It is kept **bit-packed** (one bit per weight: 107 MB per Llama-2-70B block instead of
0.86 GB as bool) and, under DeepSpeed ZeRO-3, only for the rank's own flat fragment of each
parameter, read from ``param.ds_tensor``, so it is sliced exactly like ZeRO's partition. Zeroing
the gradient before the step keeps the clipping norm and Adam's moments clean (a zero gradient
on a zero moment leaves it zero); zeroing the weight after the step removes what decoupled
weight decay or numerical noise could leave.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from neuroal.recovery.perp import block_weights
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

_BITS = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor (any shape) -> uint8 ``(ceil(n / 8),)``, bit i of byte j = element 8 j + i."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a flat bool tensor."""
    bits = (packed.unsqueeze(1) >> _BITS.to(packed.device)) & 1
    return bits.reshape(-1)[:n].bool()


def _is_zero3(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


@dataclass
class _Kept:
    param: nn.Parameter
    packed: torch.Tensor  # uint8 bits of the local fragment's zeros (whole tensor without ZeRO-3)
    numel: int
    zero3: bool


class MaskKeeper:
    """The zeros of every trainable prunable weight, held fixed through optimiser steps.

    Build it after the parameters reached their final placement (after ``accelerator.prepare``
    under ZeRO-3). Call :meth:`zero_grads` between the backward pass (after unscaling) and the
    step, and :meth:`reapply` right after the step.
    """

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self.kept: dict[str, _Kept] = {}
        zeros = 0
        for name, p in params.items():
            zero3 = _is_zero3(p)
            flat = (p.ds_tensor if zero3 else p).detach().reshape(-1) == 0
            zeros += int(flat.sum())
            self.kept[name] = _Kept(p, pack_bits(flat), flat.numel(), zero3)
        if self.kept:
            log.info("re-masking %d trainable weight tensors (%d zeros held, %.1f MB of packed "
                     "masks)", len(self.kept), zeros, self.packed_bytes() / 1e6)

    def __bool__(self) -> bool:
        """Whether any weight is held (False for adapters on a frozen base)."""
        return bool(self.kept)

    @classmethod
    def for_model(cls, model: nn.Module) -> MaskKeeper:
        """A keeper for the trainable prunable block weights of ``model``; empty (its calls are
        no-ops) when PERP trains none of them, as with adapters on a frozen base."""
        return cls({n: w for n, w in block_weights(model).items() if w.requires_grad})

    def packed_bytes(self) -> int:
        return sum(k.packed.numel() for k in self.kept.values())

    def _mask(self, kept: _Kept, device: torch.device) -> torch.Tensor:
        return unpack_bits(kept.packed, kept.numel).to(device)

    def zero_grads(self) -> None:
        """Zero the gradient at every masked position (before clipping and the step)."""
        for kept in self.kept.values():
            p = kept.param
            if kept.zero3:
                from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

                grad = safe_get_local_grad(p)
                if grad is not None:
                    grad = grad.reshape(-1).masked_fill(self._mask(kept, grad.device), 0)
                    safe_set_local_grad(p, grad)
            elif p.grad is not None:
                p.grad.view(-1).masked_fill_(self._mask(kept, p.grad.device), 0)

    @torch.no_grad()
    def reapply(self) -> None:
        """Zero every masked weight again (after the step): the fp32 master fragment and the
        16-bit partition under ZeRO-3, the parameter itself otherwise."""
        for kept in self.kept.values():
            p = kept.param
            if kept.zero3:
                from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

                master = safe_get_local_fp32_param(p)
                mask = self._mask(kept, master.device)
                safe_set_local_fp32_param(p, master.reshape(-1).masked_fill(mask, 0))
                p.ds_tensor.data.view(-1).masked_fill_(mask.to(p.ds_tensor.device), 0)
            else:
                p.data.view(-1).masked_fill_(self._mask(kept, p.device), 0)
