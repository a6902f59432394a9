"""One host arena per onloaded block: the block's tensors as views carved from one buffer.

Sequential onloading (``engine.onload: host``, :mod:`neuroal.engine.onload`) keeps every owned
block in host memory, pinned when the device is CUDA so that the copies to the device are
asynchronous. Pinning tensor by tensor goes through torch's caching host allocator, which
rounds every allocation up to a power of two: a Llama-2-70B MLP matrix of 448 MiB takes
512 MiB, a block 1824 MiB instead of 1632 (about 153 GB instead of 137 GB for the model).
Instead each block gets one plain host buffer, its tensors are views at aligned offsets
(:data:`ALIGN` bytes), and on CUDA the whole buffer is page-locked in place with
``cudaHostRegister`` (no rounding beyond the page). Should registration fail, the buffer is
re-allocated through torch's pinned allocator (rounded to a power of two, logged).

The planner counts an arena as allocated: :func:`arena_bound` of the block's bytes and tensor
count (pure integer arithmetic, no torch).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

ALIGN = 512  # bytes: every view starts at a multiple (any dtype's alignment, DMA friendly)
PAGE = 4096  # bytes: the registered range is whole pages


def _up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def arena_offsets(sizes: Iterable[int]) -> tuple[list[int], int]:
    """Byte offsets of consecutive tensors of ``sizes`` bytes, each aligned to :data:`ALIGN`,
    and the arena's size (whole pages)."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += _up(size, ALIGN)
    return offsets, _up(max(end, 1), PAGE)


def arena_bytes(sizes: Iterable[int]) -> int:
    """The size of the arena holding tensors of ``sizes`` bytes."""
    return arena_offsets(sizes)[1]


def arena_bound(nbytes: int, tensors: int) -> int:
    """An upper bound of :func:`arena_bytes` from the total bytes and the tensor count alone
    (what the planner knows): every tensor padded by less than :data:`ALIGN`, then a page."""
    return _up(nbytes + tensors * (ALIGN - 1), PAGE) if tensors else _up(max(nbytes, 1), PAGE)


def carve(buffer: Any, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Copies of ``tensors`` written into views of ``buffer`` (1-D ``uint8``, at least
    :func:`arena_bytes` long): ``name -> view`` of the same shape and dtype, contiguous.

    Raises:
        ValueError: ``buffer`` is too small or not ``uint8``.
    """
    import torch

    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    offsets, total = arena_offsets(sizes)
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < total:
        raise ValueError(f"arena buffer of {buffer.numel()} {buffer.dtype} elements; expected "
                         f"a 1-D uint8 buffer of at least {total} bytes")
    views = {}
    for (name, tensor), offset, size in zip(tensors.items(), offsets, sizes, strict=True):
        view = buffer[offset:offset + size].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        views[name] = view
    return views


class HostArena:
    """One block's host copies: ``views`` (``name -> tensor``) carved from one buffer, pinned
    in place with ``cudaHostRegister`` when ``pin`` (unregistered by :meth:`release`).

    Args:
        tensors: ``name -> tensor`` (any device; copied).
        pin: Page-lock the buffer for asynchronous copies to a CUDA device.
    """

    def __init__(self, tensors: Mapping[str, Any], pin: bool = False) -> None:
        import torch

        size = arena_bytes(t.numel() * t.element_size() for t in tensors.values())
        self.nbytes = size
        self.pinned = False
        buffer = self._aligned(size) if pin else torch.empty(size, dtype=torch.uint8)
        if pin:
            self.pinned = _register(buffer)
            if not self.pinned:
                buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
                self.nbytes = 1 << (size - 1).bit_length()  # the pinned allocator's rounding
                self.pinned = True
        self.buffer = buffer
        self.views = carve(buffer, tensors)
        self._finalizer = None
        if pin and self.nbytes == size:  # registered in place: unregister when the arena goes
            self._finalizer = weakref.finalize(self, _unregister, buffer.data_ptr())
            self._finalizer.atexit = False  # the process exit releases it with the context

    @staticmethod
    def _aligned(size: int) -> Any:
        """A ``size``-byte view of a plain buffer starting on a page boundary."""
        import torch

        raw = torch.empty(size + PAGE, dtype=torch.uint8)
        skip = -raw.data_ptr() % PAGE
        return raw[skip:skip + size]

    def release(self) -> None:
        """Unregister the pinned range (the views stay valid, as pageable memory)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None


def _register(buffer: Any) -> bool:
    """Page-lock ``buffer`` in place; False (logged) when CUDA refuses."""
    import torch

    try:
        cudart = torch.cuda.cudart()
        torch.cuda.check_error(cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0))
    except (RuntimeError, AttributeError) as exc:  # CudaError is a RuntimeError
        log.warning("cudaHostRegister of a %.2f GB onload arena failed (%s); using torch's "
                    "pinned allocator (rounded to a power of two)", buffer.numel() / 1e9, exc)
        return False
    return True


def _unregister(pointer: int) -> None:
    import torch

    try:
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(pointer))
    except (RuntimeError, AttributeError) as exc:
        log.warning("cudaHostUnregister of an onload arena failed: %s", exc)
