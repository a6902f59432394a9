"""torch.distributed data movement of a data-parallel prune (one rank per worker).

:class:`DistComm` implements :class:`neuroal.engine.data_parallel.Comm` with collectives of
the default process group: gloo on CPU, NCCL for CUDA tensors (the dist executor's
``cpu:gloo,cuda:nccl`` group; phase agreements, headers and pickled objects use gloo).
Tensors travel as raw bytes (lossless, engine.md §3.5 rule 4), and every rank issues the same
sequence of calls in the same order, so the point-to-point transfers cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from neuroal.criteria.base import INPUT_STATS, STAT_OUT_SQ_NORM
from neuroal.engine.data_parallel import Sums, holds_all, put_rows

_STATS = (*INPUT_STATS, STAT_OUT_SQ_NORM)
"""Statistic names by header code (the sums a collector computes)."""
_DIMS = 2
"""Most dimensions of one sum: ``(cols,)``, ``(cols, cols)`` or per sequence ``(B, cols)``."""


def group_backend(device: torch.device | str) -> str:
    """The process-group backend of workers on ``device``'s type: gloo on CPU; on GPUs NCCL
    for the tensors and gloo for agreements and pickled objects."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view (no copy, no cast)."""
    return tensor.reshape(-1).view(torch.uint8)


class DistComm:
    """This rank's side of a data-parallel prune over torch.distributed.

    Args:
        rank: This process's rank.
        world: Number of ranks.
        device: Where this rank's tensors travel from (its worker's device).
    """

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank = rank
        self.world = world
        self.device = device

    def agree(self, ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def gather_all(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def scatter_rows(self, stream: torch.Tensor | None, rows: Sequence[Sequence[int]],
                     like: tuple[int, torch.dtype, torch.device]) -> torch.Tensor:
        """Rank 0 sends each rank its rows; ``T`` is broadcast first (the only unknown)."""
        seqlen = torch.tensor([0 if stream is None else stream.shape[1]], dtype=torch.int64)
        dist.broadcast(seqlen, src=0)
        if self.rank == 0:
            assert stream is not None
            for r in range(1, self.world):
                if rows[r]:
                    index = torch.tensor(list(rows[r]), dtype=torch.long, device=stream.device)
                    dist.send(_bytes(stream.index_select(0, index).to(self.device)), dst=r)
            index = torch.tensor(list(rows[0]), dtype=torch.long, device=stream.device)
            return stream.index_select(0, index).to(like[2])
        share = torch.empty(len(rows[self.rank]), int(seqlen.item()), like[0], dtype=like[1],
                            device=self.device)
        if rows[self.rank]:
            dist.recv(_bytes(share), src=0)
        return share.to(like[2])

    def gather_rows(self, share: torch.Tensor, rows: Sequence[Sequence[int]], dst: int,
                    device: torch.device) -> torch.Tensor | None:
        """Every other rank with rows sends its share to ``dst`` (``T`` and ``h`` are its own
        share's), which receives them in rank order and puts them in row order."""
        if self.rank != dst:
            if rows[self.rank]:
                dist.send(_bytes(share.to(self.device).contiguous()), dst=dst)
            return None
        if holds_all(rows, self.rank):
            return share.to(device)
        out = torch.empty((sum(map(len, rows)), *share.shape[1:]), dtype=share.dtype,
                          device=device)
        for r in range(self.world):
            part = share
            if r != self.rank and rows[r]:  # one received share at a time
                part = torch.empty((len(rows[r]), *share.shape[1:]), dtype=share.dtype,
                                   device=self.device)
                dist.recv(_bytes(part), src=r)
            put_rows(out, part, rows[r])
        return out

    def share_tensors(self, tensors: Mapping[str, torch.Tensor], src: int,
                      device: torch.device) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in tensors.items():
            if self.rank == src:
                buffer = tensor.to(self.device).contiguous()
            else:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
            dist.broadcast(_bytes(buffer), src=src)
            out[name] = tensor if self.rank == src else buffer.to(device)
        return out

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        buffer = tensor if tensor.is_contiguous() and tensor.device == self.device else \
            tensor.to(self.device).contiguous()
        dist.broadcast(_bytes(buffer), src=src)
        if buffer is not tensor:
            tensor.copy_(buffer)

    def route(self, mine: Mapping[str, Sums] | None, active: int, solver: Mapping[str, int],
              order: Sequence[str], take: Callable[[str, Sums], None]) -> None:
        """For each linear (in ``order``) and each active rank (in rank order), that rank sends
        its micro-batch sums to the linear's solver (a header: sequences, then per tensor its
        statistic, rank and shape; and the raw fp32 bytes), which hands them to ``take`` as they
        arrive: one received micro-batch's sums at a time."""
        for name in order:
            dst = solver[name]
            for src in range(active):
                if src == dst == self.rank:
                    assert mine is not None
                    take(name, mine[name])
                elif src == self.rank:
                    assert mine is not None
                    self._send_sums(mine[name], dst)
                elif dst == self.rank:
                    take(name, self._recv_sums(src))

    def _send_sums(self, sums: Sums, dst: int) -> None:
        values, batch = sums
        header = [batch, len(values)]
        for key in sorted(values):
            shape = list(values[key].shape)
            header += [_STATS.index(key), len(shape), *shape, *[0] * (_DIMS - len(shape))]
        dist.send(torch.tensor([len(header)], dtype=torch.int64), dst=dst)
        dist.send(torch.tensor(header, dtype=torch.int64), dst=dst)
        for key in sorted(values):
            dist.send(_bytes(values[key].to(self.device).contiguous()), dst=dst)

    def _recv_sums(self, src: int) -> Sums:
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=src)
        header = torch.empty(int(size.item()), dtype=torch.int64)
        dist.recv(header, src=src)
        batch, count, *rest = header.tolist()
        values = {}
        for i in range(count):
            code, ndim, *dims = rest[i * (2 + _DIMS):(i + 1) * (2 + _DIMS)]
            buffer = torch.empty(dims[:ndim], dtype=torch.float32, device=self.device)
            dist.recv(_bytes(buffer), src=src)
            values[_STATS[code]] = buffer
        return values, batch
