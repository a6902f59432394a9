"""Sequential onloading: where a worker's decoder blocks live between uses.

A worker may own more blocks than fit on its device. With ``engine.onload`` set to

* ``device``: every owned block stays on the device (the classic layout; no copies);
* ``host``: the blocks' weights stay in host memory, each block's tensors carved from one
  arena (:mod:`neuroal.engine.arena`; pinned in place when the device is CUDA), and one
  block at a time is copied to the device for statistics, masking, the NeuroAL candidate
  forwards and the pruned forward; a block that was modified (pruned, reconstructed, restored)
  is copied back into its host tensors when it leaves the device;
* ``disk``: the blocks stay in the checkpoint (safetensors shards or GGUF, read lazily per
  block); a modified block is written to a spill file of the worker's own (deleted by
  :meth:`BlockStore.close`) and read from there afterwards. Spill files go under the run's
  temporary folder (``<output>.neuroal-tmp/onload``, on the output's filesystem, which the
  preflight sizes; the system temp folder when the run has no output); the first spill checks
  that the whole slice fits there and refuses with the figures otherwise.

While block ``i`` is on the device the next owned block (cyclically: a pass over the slice is
followed by the next pass's first block) is fetched ahead: on CUDA on a separate stream from
pinned memory, elsewhere in a background thread, so reading the next block overlaps the work
on the current one. At most two blocks are on the device at once.

Every copy is lossless (same dtype, same bytes), and the computation on the device is the same
as with ``device``, so results are bit-identical (tests compare them). On the CPU the "device"
copy is a fresh clone of the host tensors, so the write-back logic is exercised there too.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neuroal.engine.arena import HostArena

ONLOAD_MODES = ("device", "host", "disk")
SPILL_MARGIN = 64 << 20  # bytes kept free beyond the spill files (headers, other writers)


class SpillSpaceError(ValueError):
    """Too little free disk space for onloading's spill files; the message gives the figures."""
ONLOAD_CHOICES = ("auto", *ONLOAD_MODES)  # engine.onload: auto = chosen by the planner


def resolved_onload(value: str | None) -> str:
    """The onload mode a worker runs with: ``auto`` (not resolved by the planner, e.g. no
    memory budget known) and None mean ``device``."""
    return "device" if value in (None, "auto") else str(value)


@dataclass
class _Staged:
    """A block fetched ahead: its version when fetched, the future of its device tensors and
    (CUDA) the event its copy recorded on the side stream."""

    version: int
    future: Future[tuple[dict[str, torch.Tensor], Any]]


def _put(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Point parameter ``name`` of ``module`` at ``value`` (same shape, any device)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    param = owner._parameters[attr]
    try:
        param.data = value
    except RuntimeError:  # meta <-> real tensors cannot share a Parameter: replace it
        owner._parameters[attr] = nn.Parameter(value, requires_grad=param.requires_grad)


class BlockStore:
    """Keeps a worker's blocks at home (host or disk) and brings them to the device on demand.

    Args:
        blocks: ``index -> block module`` of the owned blocks, in order.
        device: The worker's compute device.
        mode: ``host`` or ``disk`` (``device`` needs no store).
        read: ``index -> {local parameter name: CPU tensor}`` from the checkpoint, in the run
            dtype; ``host`` reads every block once at construction, one block at a time (host
            peak: the slice plus one block), ``disk`` reads a block whenever it is needed.
        prefetch: Fetch the next block while the current one is in use.
        spill_root: Folder for ``disk``'s spill files (a fresh subfolder per store); None:
            the system temp folder.
    """

    def __init__(self, blocks: Mapping[int, nn.Module], device: torch.device, mode: str,
                 read: Callable[[int], dict[str, torch.Tensor]], prefetch: bool = True,
                 spill_root: str | Path | None = None) -> None:
        if mode not in ("host", "disk"):
            raise ValueError(f"engine.onload={mode!r}: a BlockStore serves host or disk")
        self.blocks = dict(blocks)
        self.order = list(self.blocks)
        self.device = device
        self.mode = mode
        self.read = read
        self.prefetch = prefetch and len(self.order) > 1
        self.cuda = device.type == "cuda"
        self.host: dict[int, dict[str, torch.Tensor]] = {}
        self.arenas: dict[int, HostArena] = {}  # host mode: each block's one buffer
        self.version = dict.fromkeys(self.order, 0)
        self.depth: dict[int, int] = {}  # resident blocks -> nesting depth
        self.dirty: set[int] = set()
        self.spill_root = Path(spill_root) if spill_root is not None else None
        self.spill_dir: Path | None = None
        self.spilled: set[int] = set()
        self.staged: dict[int, _Staged] = {}
        self.fetches = 0  # blocks copied to the device (tests, benchmarks)
        self.prefetch_hits = 0
        self.max_resident = 0  # most blocks on the device at once, staged ones included
        self.wait_seconds = 0.0  # time spent waiting for a fetch (benchmarks: overlap)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="neuroal-prefetch") \
            if self.prefetch else None
        self._side = torch.cuda.Stream(device) if self.cuda and self.prefetch else None
        for index, block in self.blocks.items():
            for buffer_name, buf in block.named_buffers():
                if buf.device.type != "meta":
                    block.get_buffer(buffer_name).data = buf.to(device)
            if mode == "host":
                assert read is not None
                self.arenas[index] = HostArena(read(index), pin=self.cuda)
                self.host[index] = self.arenas[index].views
                for name, tensor in self.host[index].items():
                    _put(block, name, tensor)
            else:
                self._evict_to_meta(index)

    # ------------------------------------------------------------------ home copies

    def host_bytes(self) -> int:
        """Host bytes of the blocks kept at home (``host``: the arenas as allocated)."""
        return sum(arena.nbytes for arena in self.arenas.values())

    def _evict_to_meta(self, index: int) -> None:
        block = self.blocks[index]
        for name, p in list(block.named_parameters()):
            _put(block, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def _spill_path(self, index: int) -> Path:
        if self.spill_dir is None:
            if self.spill_root is not None:
                self.spill_root.mkdir(parents=True, exist_ok=True)
            self.spill_dir = Path(tempfile.mkdtemp(prefix="neuroal-onload-",
                                                   dir=self.spill_root))
        return self.spill_dir / f"block_{index:05d}.safetensors"

    def _block_bytes(self, index: int) -> int:
        return sum(p.numel() * p.element_size() for p in self.blocks[index].parameters())

    def _check_spill_space(self, index: int) -> None:
        """Before a spill: room for this block, and at the first spill for every block of the
        slice not spilled yet (each is written once when the final prune modifies it).

        Raises:
            SpillSpaceError: Naming the folder, the bytes needed and the bytes free.
        """
        folder = self._spill_path(index).parent
        pending = [i for i in self.order if i not in self.spilled] if not self.spilled \
            else [index]
        need = sum(self._block_bytes(i) for i in pending) + SPILL_MARGIN
        free = shutil.disk_usage(folder).free
        if free < need:
            raise SpillSpaceError(
                f"engine.onload=disk: spilling {len(pending)} modified block(s) to {str(folder)!r} "
                f"needs {need / 1e9:.2f} GB, only {free / 1e9:.2f} GB free there; free space on "
                "that filesystem (the output's), or use engine.onload=host")

    def host_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s current weights on the host (resident blocks: their device
        copies), without bringing it to the device: export and inspection."""
        if index in self.depth:
            return {n: p.data for n, p in self.blocks[index].named_parameters()}
        if self.mode == "host":
            return self.host[index]
        if index in self.spilled:
            return load_file(str(self._spill_path(index)))
        return self.read(index)

    # ------------------------------------------------------------------ fetch

    def _fetch(self, index: int, ahead: bool = False) -> tuple[dict[str, torch.Tensor], Any]:
        """Device copies of block ``index``'s weights; fetched ``ahead`` on CUDA: on the side
        stream, with the event of the copy (None when the copy was synchronous)."""
        source = self.host_tensors(index)
        copy = self.mode == "host"  # host tensors stay home; tensors read from disk are fresh
        if ahead and self._side is not None:
            with torch.cuda.stream(self._side):
                out = {n: t.to(self.device, non_blocking=True, copy=copy)
                       for n, t in source.items()}
                event = torch.cuda.Event()
                event.record(self._side)
            return out, event
        return {n: t.to(self.device, copy=copy) for n, t in source.items()}, None

    def _take(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s device tensors: the staged fetch if still current, else a fresh one."""
        t0 = time.perf_counter()
        staged = self.staged.pop(index, None)
        if staged is not None:
            tensors, event = staged.future.result()
            if staged.version == self.version[index]:
                if event is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(event)
                    for t in tensors.values():
                        t.record_stream(stream)  # allocated on the side stream, used here
                self.prefetch_hits += 1
                self.wait_seconds += time.perf_counter() - t0
                return tensors
        tensors, _ = self._fetch(index)
        self.wait_seconds += time.perf_counter() - t0
        return tensors

    def _next(self, index: int) -> int:
        pos = self.order.index(index)
        return self.order[(pos + 1) % len(self.order)]

    def _stage(self, index: int) -> None:
        if self._pool is None or index in self.depth or index in self.staged:
            return
        self.staged[index] = _Staged(self.version[index], self._pool.submit(self._fetch, index, True))

    # ------------------------------------------------------------------ residency

    @contextmanager
    def resident(self, index: int, write: bool = False) -> Iterator[nn.Module]:
        """Block ``index`` on the device for the body (re-entrant); with ``write`` its weights
        are saved home when it leaves (the body modifies them)."""
        block = self.blocks[index]
        if index in self.depth:
            self.depth[index] += 1
            if write:
                self.dirty.add(index)
            try:
                yield block
            finally:
                self.depth[index] -= 1
            return
        for name, tensor in self._take(index).items():
            _put(block, name, tensor)
        self.fetches += 1
        self.depth[index] = 1
        if write:
            self.dirty.add(index)
        if self.prefetch:
            self._stage(self._next(index))
        self.max_resident = max(self.max_resident, len(self.depth) + len(self.staged))
        try:
            yield block
        finally:
            self.depth[index] -= 1
            if self.depth[index] == 0:
                del self.depth[index]
                self._leave(index)

    def _leave(self, index: int) -> None:
        """Save a modified block home, then point its parameters back home."""
        block = self.blocks[index]
        if index in self.dirty:
            self.dirty.discard(index)
            self.version[index] += 1
            self.staged.pop(index, None)
            if self.mode == "host":
                for name, p in block.named_parameters():
                    self.host[index][name].copy_(p.data)
            else:
                self._check_spill_space(index)
                values = {n: p.data.to("cpu").contiguous() for n, p in block.named_parameters()}
                save_file(values, str(self._spill_path(index)))
                self.spilled.add(index)
        if self.mode == "host":
            for name, tensor in self.host[index].items():
                _put(block, name, tensor)
        else:
            self._evict_to_meta(index)

    def stats(self) -> dict[str, Any]:
        """Counters for reports and benchmarks."""
        return {"mode": self.mode, "prefetch": self.prefetch, "fetches": self.fetches,
                "prefetch_hits": self.prefetch_hits, "max_resident": self.max_resident,
                "wait_seconds": self.wait_seconds}

    def close(self) -> None:
        """Stop the prefetch thread and delete the spill files this store wrote."""
        for staged in self.staged.values():
            staged.future.cancel()
        self.staged.clear()
        for arena in self.arenas.values():
            arena.release()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None
            self.spilled.clear()

    def __del__(self) -> None:  # best effort: spill files never outlive the worker
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
