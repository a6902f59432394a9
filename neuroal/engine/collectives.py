"""torch.distributed data movement of a data-parallel prune (one rank per worker).

:class:`DistComm` implements :class:`neuroal.engine.data_parallel.Comm` with collectives of
the default process group: gloo on CPU, NCCL for CUDA tensors (the dist executor's
``cpu:gloo,cuda:nccl`` group; phase agreements, headers and pickled objects use gloo).
Tensors travel as raw bytes (lossless, engine.md §3.5 rule 4), and every rank issues the same
sequence of calls in the same order, so the point-to-point transfers cannot deadlock.

No rank leaves a transfer half-way: what may fail (a receive buffer that does not fit, a copy
to the channel's device) is done before the bytes move, and the two sides of a point-to-point
transfer tell each other whether they are ready (:meth:`DistComm._offer`,
:meth:`DistComm._accept`), so a failure never leaves a peer blocked in ``send`` or ``recv``
until ``engine.dist.timeout``. The collective methods end with an agreement and raise on every
rank at once (the failing rank its own error, the others
:class:`~neuroal.engine.data_parallel.Stopped`); :meth:`DistComm.route` finishes the step's
exchange and returns the error, which the caller agrees on at the next phase boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from neuroal.criteria.base import INPUT_STATS, STAT_OUT_SQ_NORM
from neuroal.engine.data_parallel import Stopped, Sums, holds_all, put_rows

_STATS = (*INPUT_STATS, STAT_OUT_SQ_NORM)
"""Statistic names by header code (the sums a collector computes)."""
T = TypeVar("T")

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
        error: BaseException | None = None
        if self.rank == 0:
            assert stream is not None

            def select(r: int) -> torch.Tensor:
                index = torch.tensor(list(rows[r]), dtype=torch.long, device=stream.device)
                return stream.index_select(0, index)

            for r in range(1, self.world):
                if rows[r]:
                    error = self._offer(r, lambda r=r: select(r).to(self.device), error)
            share = self._local(lambda: select(0).to(like[2]))
        else:
            def allocate(count: int) -> torch.Tensor:
                return torch.empty(count, int(seqlen.item()), like[0], dtype=like[1],
                                   device=self.device)

            mine = len(rows[self.rank])
            received, error = self._accept(0, lambda: allocate(mine)) if mine else \
                (allocate(0), None)
            share = None if received is None else \
                self._local(lambda: received.to(like[2]), error)  # None: rank 0 declined
        return self._settled(share, error)

    def gather_rows(self, share: torch.Tensor, rows: Sequence[Sequence[int]], dst: int,
                    device: torch.device) -> torch.Tensor | None:
        """Every other rank with rows sends its share to ``dst`` (``T`` and ``h`` are its own
        share's), which receives them in rank order and puts them in row order."""
        error: BaseException | None = None
        if self.rank != dst:
            if rows[self.rank]:
                error = self._offer(dst, lambda: share.to(self.device).contiguous())
            self._settled(None, error)
            return None
        if holds_all(rows, self.rank):
            return self._settled(self._local(lambda: share.to(device)), None)
        out = self._local(lambda: torch.empty((sum(map(len, rows)), *share.shape[1:]),
                                              dtype=share.dtype, device=device))
        error = None if isinstance(out, torch.Tensor) else out
        for r in range(self.world):
            part: torch.Tensor | None = share
            if r != self.rank and rows[r]:  # one received share at a time
                part, error = self._accept(r, lambda r=r: torch.empty(
                    (len(rows[r]), *share.shape[1:]), dtype=share.dtype, device=self.device),
                    error)
            if error is None and part is not None and rows[r]:
                error = self._local(lambda p=part, r=r: put_rows(out, p, rows[r]))
            del part
        return self._settled(out, error)

    def share_tensors(self, tensors: Mapping[str, torch.Tensor], src: int,
                      device: torch.device) -> dict[str, torch.Tensor]:
        """Every buffer is allocated (and agreed on) before the first broadcast."""
        buffers: dict[str, torch.Tensor] = {}
        try:
            for name, tensor in tensors.items():
                buffers[name] = tensor.to(self.device).contiguous() if self.rank == src else \
                    torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
            error = None
        except Exception as exc:  # agreed on below: nobody starts broadcasting
            buffers, error = {}, exc
        self._settled(None, error)
        for buffer in buffers.values():
            dist.broadcast(_bytes(buffer), src=src)
        if self.rank == src:
            return self._settled(dict(tensors), None)
        out = self._local(lambda: {n: b.to(device) for n, b in buffers.items()})
        return self._settled(out, out if isinstance(out, BaseException) else None)

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        buffer = tensor if tensor.is_contiguous() and tensor.device == self.device else \
            tensor.to(self.device).contiguous()
        dist.broadcast(_bytes(buffer), src=src)
        if buffer is not tensor:
            tensor.copy_(buffer)

    def route(self, mine: Mapping[str, Sums] | None, active: int, solver: Mapping[str, int],
              order: Sequence[str], take: Callable[[str, Sums, bool], None],
              ) -> BaseException | None:
        """For each linear (in ``order``) and each active rank (in rank order), that rank sends
        its micro-batch sums to the linear's solver (a header: sequences, then per tensor its
        statistic, rank and shape; the solver's verdict; and the raw fp32 bytes), which hands
        them to ``take`` as they arrive, as fresh buffers: one received micro-batch's sums at a
        time. After a failure the remaining transfers are declined on both sides; the first
        error is returned once this rank's part of the exchange is done."""
        error: BaseException | None = None
        for name in order:
            dst = solver[name]
            for src in range(active):
                if src == dst == self.rank:
                    assert mine is not None
                    take(name, mine[name], False)
                elif src == self.rank:
                    assert mine is not None
                    error = self._send_sums(mine[name], dst, error)
                elif dst == self.rank:
                    part, error = self._recv_sums(src, error)
                    if part is not None:
                        take(name, part, True)
                    del part
        return error

    def _send_sums(self, sums: Sums, dst: int, error: BaseException | None,
                   ) -> BaseException | None:
        """The header, then the bytes once the solver is ready (:meth:`_offer`)."""
        values, batch = sums
        header = [batch, len(values)]
        for key in sorted(values):
            shape = list(values[key].shape)
            header += [_STATS.index(key), len(shape), *shape, *[0] * (_DIMS - len(shape))]
        payload: list[torch.Tensor] = []
        if error is None:
            try:
                payload = [values[key].to(self.device).contiguous() for key in sorted(values)]
            except Exception as exc:  # declined below: the solver receives nothing
                error = exc
        dist.send(torch.tensor([0 if error else len(header)], dtype=torch.int64), dst=dst)
        if error is not None:
            return error
        dist.send(torch.tensor(header, dtype=torch.int64), dst=dst)
        if self._verdict_from(dst):
            for tensor in payload:
                dist.send(_bytes(tensor), dst=dst)
        return error

    def _recv_sums(self, src: int, error: BaseException | None,
                   ) -> tuple[Sums | None, BaseException | None]:
        """The header, the buffers (allocated before the verdict), the bytes; None when either
        side declined."""
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=src)
        if int(size.item()) == 0:  # the sender failed: it keeps its own error
            return None, error
        header = torch.empty(int(size.item()), dtype=torch.int64)
        dist.recv(header, src=src)
        batch, count, *rest = header.tolist()
        values: dict[str, torch.Tensor] = {}
        if error is None:
            try:
                for i in range(count):
                    code, ndim, *dims = rest[i * (2 + _DIMS):(i + 1) * (2 + _DIMS)]
                    values[_STATS[code]] = torch.empty(dims[:ndim], dtype=torch.float32,
                                                       device=self.device)
            except Exception as exc:  # declined: the sender sends no bytes
                values, error = {}, exc
        self._verdict_to(src, error is None)
        if error is not None:
            return None, error
        for key in sorted(values):
            dist.recv(_bytes(values[key]), src=src)
        return (values, batch), None

    # ------------------------------------------------------------------ failure handling

    def _offer(self, dst: int, prepare: Callable[[], torch.Tensor],
               error: BaseException | None = None) -> BaseException | None:
        """Sender's side of one point-to-point transfer: ``prepare()`` the tensor (skipped
        after an ``error``), say whether it is ready, send it if ``dst`` is ready too. Returns
        this side's error."""
        tensor = None
        if error is None:
            try:
                tensor = prepare()
            except Exception as exc:  # declined below
                error = exc
        self._verdict_to(dst, error is None)
        if self._verdict_from(dst) and tensor is not None:
            dist.send(_bytes(tensor), dst=dst)
        return error

    def _accept(self, src: int, allocate: Callable[[], torch.Tensor],
                error: BaseException | None = None,
                ) -> tuple[torch.Tensor | None, BaseException | None]:
        """Receiver's side of :meth:`_offer`: ``allocate()`` the buffer once the sender is
        ready (skipped after an ``error``), answer both sides' verdict, receive. Returns the
        filled buffer (None when declined) and this side's error."""
        ready = self._verdict_from(src)
        buffer = None
        if ready and error is None:
            try:
                buffer = allocate()
            except Exception as exc:  # declined below
                error = exc
        go = ready and buffer is not None
        self._verdict_to(src, go)
        if not go:
            return None, error
        assert buffer is not None
        dist.recv(_bytes(buffer), src=src)
        return buffer, error

    @staticmethod
    def _verdict_to(peer: int, ok: bool) -> None:
        dist.send(torch.tensor([1 if ok else 0], dtype=torch.int64), dst=peer)

    @staticmethod
    def _verdict_from(peer: int) -> bool:
        flag = torch.empty(1, dtype=torch.int64)
        dist.recv(flag, src=peer)
        return bool(flag.item())

    @staticmethod
    def _local(fn: Callable[[], T], error: BaseException | None = None) -> T | BaseException:
        """``fn()`` (skipped after an ``error``, returned instead), or the exception it raised,
        to be agreed on by :meth:`_settled` (this rank's peers are not waiting on it)."""
        if error is not None:
            return error
        try:
            return fn()
        except Exception as exc:
            return exc

    def _settled(self, value: T, error: BaseException | None) -> T:
        """The end of a transfer every rank takes part in: every rank agrees; on a failure
        anywhere every rank raises here (the failing rank its own error, the others
        :class:`~neuroal.engine.data_parallel.Stopped`)."""
        if isinstance(value, BaseException) and error is None:
            error = value
        if not self.agree(error is None):
            raise error if error is not None else Stopped()
        return value
