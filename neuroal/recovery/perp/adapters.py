"""PERP's adapter modules, which replace a frozen linear during training (recovery.md §3.4).

Zimmer et al., "PERP", arXiv 2312.15230, §3.4. Each module takes over a pruned linear's frozen
``weight`` and ``bias`` and adds a few trainable tensors; :meth:`AdaptedLinear.merge` puts the
plain linear back with the merged weight (formulas in :mod:`neuroal.recovery.perp.formulas`):

* :class:`MaskLoRALinear` (``mask_lora``): ``x (W + s M*(B A))^T``; pruned entries stay zero,
  so training and inference see the same weight.
* :class:`ScaleLoRALinear` (``scale_lora``): ``x (W * u v^T)^T``. The authors' rank-r ``B A``
  initialised to all ones stays rank one under Adam (§3.4), so it is implemented as the two
  vectors ``u`` (rows) and ``v`` (cols) initialised to one, trained with the lr factor
  ``sqrt(r)`` (:mod:`neuroal.recovery.perp.optim`).
* :class:`LoRALinear`: standard dense LoRA, for the unpruned head only.

The adapters register by name in :data:`ADAPTERS`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from neuroal.recovery.perp.formulas import lora_merged, mask_lora_delta, mask_lora_merged, scale_merged
from neuroal.recovery.perp.optim import LR_SCALE
from neuroal.runtime.registry import Registry


class AdaptedLinear(nn.Module):
    """Base of the adapter modules: takes over a linear's frozen ``weight`` and ``bias``.

    The parameters are registered on the adapter itself (same tensor objects as the replaced
    linear), so state-dict names of ``weight``/``bias`` do not change and ZeRO-3 gathers them
    with the adapter's own tensors when the adapter runs. :meth:`merge` writes the merged
    weight into the original linear and returns it.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        object.__setattr__(self, "_linear", linear)  # not a submodule: no duplicate parameters

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """The replaced linear holding the merged weight (same dtype) and the current bias."""
        linear: nn.Linear = self._linear
        merged = self.merged_weight()
        self.weight.data = merged
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    @staticmethod
    def count(rows: int, cols: int, rank: int) -> int:
        """Trainable parameters the adapter adds to a ``rows x cols`` linear."""
        raise NotImplementedError


def lora_init(rank: int, cols: int, device: torch.device,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """LoRA's ``A`` ``(rank, cols)``: Kaiming-uniform (a = sqrt(5)) drawn on the generator's
    device, then moved to ``device``, so a CPU generator gives the same A on every device (a
    CUDA tensor cannot draw from a CPU generator); ``meta`` stays uninitialised."""
    if device.type == "meta":
        return torch.empty(rank, cols, device=device)
    draw = generator.device if generator is not None else device
    a = torch.empty(rank, cols, device=draw)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a.to(device)


class LoRALinear(AdaptedLinear):
    """Standard LoRA ``x W^T + s x A^T B^T`` (A Kaiming-uniform a=sqrt(5), B = 0); for the head."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(linear)
        self.scale = alpha / rank
        device = linear.weight.device
        self.lora_a = nn.Parameter(lora_init(rank, self.in_features, device, generator))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight.to(x.dtype), self._bias(x))
        return base + F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return lora_merged(self.weight, self.lora_a, self.lora_b, self.scale)

    @staticmethod
    def count(rows: int, cols: int, rank: int) -> int:
        return rank * (rows + cols)


class MaskLoRALinear(LoRALinear):
    """MaskLoRA: ``x (W + s M*(B A))^T`` with ``M = 1[W != 0]`` (recovery.md §3.4).

    Args:
        linear: The pruned linear (frozen).
        rank: ``r``.
        alpha: ``alpha``; the update is scaled by ``alpha / r``.
        generator: RNG of A's initialisation.
        pruned: ``(rows, cols)`` bool, True where pruned. Default: recomputed as ``W == 0`` at
            every forward (nothing stored, as in the reference).
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float,
                 generator: torch.Generator | None = None, pruned: torch.Tensor | None = None) -> None:
        super().__init__(linear, rank, alpha, generator)
        if pruned is not None and tuple(pruned.shape) != tuple(linear.weight.shape):
            raise ValueError(f"mask of shape {tuple(pruned.shape)} for a weight of shape "
                             f"{tuple(linear.weight.shape)}")
        self.pruned = None if pruned is None else pruned.to(device=linear.weight.device, dtype=torch.bool)

    def keep(self) -> torch.Tensor:
        """``M``: True where the weight is kept."""
        return self.weight != 0 if self.pruned is None else ~self.pruned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() + mask_lora_delta(self.keep(), self.lora_a, self.lora_b, self.scale)
        return F.linear(x, weight.to(x.dtype), self._bias(x))

    def merged_weight(self) -> torch.Tensor:
        return mask_lora_merged(self.weight, self.keep(), self.lora_a, self.lora_b, self.scale)


class ScaleLoRALinear(AdaptedLinear):
    """ScaleLoRA as its rank-one equivalent: ``x (W * u v^T)^T`` with ``u = v = 1`` at init.

    Computed as ``((x * v) W^T) * u`` (no dense rows x cols product). ``rank`` is the authors'
    ``r``: it sets the vectors' lr factor ``sqrt(r)`` (:data:`LR_SCALE`), which makes AdamW
    train them exactly as it trains the rank-r ``B A`` initialised to ones.
    """

    def __init__(self, linear: nn.Linear, rank: int = 1, alpha: float = 1.0,
                 generator: torch.Generator | None = None, pruned: torch.Tensor | None = None) -> None:
        super().__init__(linear)
        device = linear.weight.device
        self.row_scale = nn.Parameter(torch.ones(self.out_features, device=device))
        self.col_scale = nn.Parameter(torch.ones(self.in_features, device=device))
        for p in (self.row_scale, self.col_scale):
            setattr(p, LR_SCALE, math.sqrt(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x * self.col_scale.to(x.dtype), self.weight.to(x.dtype)) * self.row_scale.to(x.dtype)
        bias = self._bias(x)
        return y if bias is None else y + bias

    def merged_weight(self) -> torch.Tensor:
        return scale_merged(self.weight, self.row_scale, self.col_scale)

    @staticmethod
    def count(rows: int, cols: int, rank: int) -> int:
        return rows + cols


ADAPTERS: Registry[type[AdaptedLinear]] = Registry("PERP adapter")
ADAPTERS.add("mask_lora", MaskLoRALinear, "masklora")
ADAPTERS.add("scale_lora", ScaleLoRALinear, "scalelora")
