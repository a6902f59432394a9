"""Host arenas of sequential onloading (neuroal.engine.arena): one buffer per block, tensors as
aligned views, sized as the planner counts them. Pinning needs CUDA (launch/gpu_check.py); the
carving runs here on an unpinned buffer, and ``onload: host`` on the CPU uses the same arenas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroal.engine.arena import (
    ALIGN,
    PAGE,
    HostArena,
    arena_bound,
    arena_bytes,
    arena_offsets,
    carve,
)
from neuroal.engine.onload import BlockStore


def block_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"q.weight": torch.randn(24, 16, generator=gen).to(torch.bfloat16),
            "norm.weight": torch.randn(7, generator=gen),  # odd bytes: the next view realigns
            "down.weight": torch.randn(16, 40, generator=gen).to(torch.bfloat16),
            "bias": torch.randn(3, generator=gen).double(),
            "t": torch.randn(5, 6, generator=gen)[:, ::2]}  # non-contiguous source


def test_offsets_are_aligned_and_the_size_is_whole_pages() -> None:
    offsets, total = arena_offsets([10, 0, ALIGN, ALIGN + 1, 3])
    assert offsets == [0, ALIGN, ALIGN, 2 * ALIGN, 4 * ALIGN]
    assert total == PAGE and arena_bytes([PAGE]) == PAGE and arena_bytes([PAGE + 1]) == 2 * PAGE
    # a 70B block: 9 tensors, 1632 MiB of bf16 weights -> one page of padding, not 2 GiB
    sizes = [2 * n for n in (8192 * 8192, 1024 * 8192, 1024 * 8192, 8192 * 8192,
                             28672 * 8192, 28672 * 8192, 8192 * 28672, 8192, 8192)]
    assert arena_bytes(sizes) - sum(sizes) < PAGE
    assert arena_bytes(sizes) <= arena_bound(sum(sizes), len(sizes)) < sum(sizes) + 10 * ALIGN + PAGE


def test_carved_views_hold_the_values_and_share_one_buffer() -> None:
    tensors = block_tensors()
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    buffer = torch.zeros(arena_bytes(sizes), dtype=torch.uint8)
    views = carve(buffer, tensors)
    offsets, _ = arena_offsets(sizes)
    for (name, view), offset in zip(views.items(), offsets, strict=True):
        source = tensors[name]
        assert view.dtype == source.dtype and view.shape == source.shape and view.is_contiguous()
        assert torch.equal(view, source)
        assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert view.data_ptr() - buffer.data_ptr() == offset and offset % ALIGN == 0
    views["q.weight"].fill_(3)  # writes land in the buffer, not in a copy
    assert bool((buffer[: 24 * 16 * 2].view(torch.bfloat16) == 3).all())
    assert torch.equal(views["norm.weight"], tensors["norm.weight"])  # neighbours untouched


def test_carve_rejects_a_small_or_typed_buffer() -> None:
    tensors = block_tensors()
    with pytest.raises(ValueError, match="at least"):
        carve(torch.zeros(100, dtype=torch.uint8), tensors)
    with pytest.raises(ValueError, match="uint8"):
        carve(torch.zeros(PAGE, dtype=torch.float32), tensors)


def test_unpinned_arena_is_sized_as_the_planner_bound() -> None:
    tensors = block_tensors()
    arena = HostArena(tensors, pin=False)
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    assert arena.nbytes == arena_bytes(sizes) == arena.buffer.numel()
    assert arena.nbytes <= arena_bound(sum(sizes), len(sizes))
    assert not arena.pinned and all(torch.equal(arena.views[n], t) for n, t in tensors.items())
    arena.release()  # nothing registered: a no-op


def test_host_onloading_keeps_each_block_in_one_arena() -> None:
    torch.manual_seed(0)
    blocks = {i: nn.Sequential(nn.Linear(8, 12), nn.LayerNorm(12)) for i in range(3)}
    saved = {i: {n: p.detach().clone() for n, p in b.named_parameters()} for i, b in blocks.items()}
    store = BlockStore(blocks, torch.device("cpu"), "host", lambda i: saved[i], prefetch=False)
    for index, tensors in store.host.items():
        storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
        assert len(storages) == 1  # one buffer per block
        assert all(torch.equal(tensors[n], saved[index][n]) for n in saved[index])
    sizes = [[t.numel() * t.element_size() for t in saved[i].values()] for i in saved]
    assert store.host_bytes() == sum(arena_bytes(s) for s in sizes)
    with store.resident(1, write=True) as block:  # a modified block is written back in place
        block[0].weight.data.mul_(0)
    assert bool((store.host[1]["0.weight"] == 0).all())
    assert len({t.untyped_storage().data_ptr() for t in store.host[1].values()}) == 1
    store.close()
