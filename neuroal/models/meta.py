"""Meta skeletons without host allocations.

``accelerate.init_empty_weights`` moves each parameter to ``meta`` after its module created it,
so ``nn.Parameter(torch.empty(...))`` first reserves host memory: DeepSeek-V3's fused experts
ask for 30 GB per tensor, which fails on a small machine before anything is moved. Here
``torch.empty`` without an explicit device returns a ``meta`` tensor while the skeleton is
built. Buffers are computed with other factories (``arange``, ``ones``...) and stay real; a
model whose buffer was caught anyway is reported by :func:`meta_buffers` so that the caller can
rebuild it the plain way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class _EmptyOnMeta(TorchFunctionMode):
    """``torch.empty(...)`` with no device (or ``device=None``) allocates on ``meta``."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextmanager
def empty_on_meta() -> Iterator[None]:
    """While active, uninitialised tensors (``torch.empty`` without a device) are on ``meta``."""
    with _EmptyOnMeta():
        yield


def meta_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers of ``model`` that live on ``meta`` (they hold no values)."""
    return [name for name, buf in model.named_buffers() if buf.is_meta]
