"""Failures inside the torch.distributed transfers of a data-parallel prune
(neuroal.engine.collectives.DistComm): a receive buffer that does not fit on one rank never
leaves the other rank blocked in send/recv. Two gloo ranks, each case fails on rank 1: the
point-to-point route returns the error on rank 1 and completes on rank 0; the collective
transfers raise on both ranks at once (rank 1 its own error, rank 0 ``Stopped``), well before
the group's timeout, and the ranks stay in step for the next case."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import spawn_two_ranks

from neuroal.engine.collectives import DistComm
from neuroal.engine.data_parallel import Stopped

TIMEOUT_S = 30
"""The group's collective timeout: a rank left waiting would fail after it, not at once."""
OOM = "out of memory (test)"


@contextmanager
def no_float_buffers(active: bool) -> Iterator[None]:
    """While ``active``, ``torch.empty`` of a floating dtype raises (a buffer that does not
    fit); integer headers and flags still allocate."""
    real = torch.empty

    def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("dtype", torch.get_default_dtype()).is_floating_point:
            raise RuntimeError(OOM)
        return real(*args, **kwargs)

    torch.empty = empty if active else real  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty = real  # type: ignore[assignment]


def _sums(rank: int) -> dict[str, Any]:
    return {"a": ({"hessian": torch.full((4, 4), float(rank + 1))}, 2)}


def _route(comm: DistComm, fail: bool) -> None:
    """Rank 1 solves ``a``: without a failure it folds rank 0's received sums (fresh) and its
    own (not fresh); when its buffer fails it returns the error and rank 0 returns None."""
    taken: list[tuple[float, bool]] = []

    def take(_name: str, part: Any, fresh: bool) -> None:
        taken.append((float(part[0]["hessian"][0, 0]), fresh))

    error = comm.route(_sums(comm.rank), 2, {"a": 1}, ["a"], take)
    assert error is None
    assert taken == ([(1.0, True), (2.0, False)] if comm.rank == 1 else [])
    taken.clear()
    with no_float_buffers(fail):
        error = comm.route(_sums(comm.rank), 2, {"a": 1}, ["a"], take)
    if comm.rank == 1:
        assert isinstance(error, RuntimeError) and OOM in str(error)
        assert taken == [(2.0, False)]  # its own part; the received one was declined
    else:
        assert error is None


def _expect_stop(comm: DistComm, fail: bool, call: Callable[[], Any]) -> None:
    """``call()`` raises on both ranks: rank 1 (whose buffers fail) its own error, rank 0
    :class:`Stopped`."""
    with no_float_buffers(fail):
        if comm.rank == 1:
            with pytest.raises(RuntimeError, match="out of memory"):
                call()
        else:
            with pytest.raises(Stopped):
                call()


def _scatter(comm: DistComm, fail: bool) -> None:
    rows = [[0, 2], [1]]
    stream = torch.arange(24, dtype=torch.float32).reshape(3, 2, 4) if comm.rank == 0 else None
    like = (4, torch.float32, torch.device("cpu"))
    share = comm.scatter_rows(stream, rows, like)
    assert share[:, 0, 0].tolist() == ([0.0, 16.0] if comm.rank == 0 else [8.0])
    _expect_stop(comm, fail, lambda: comm.scatter_rows(stream, rows, like))


def _gather(comm: DistComm, fail: bool) -> None:
    rows = [[0, 2], [1]]
    share = torch.full((len(rows[comm.rank]), 2, 4), float(comm.rank))
    out = comm.gather_rows(share, rows, 1, torch.device("cpu"))
    assert (out is None) == (comm.rank == 0)
    assert out is None or out[:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    _expect_stop(comm, fail, lambda: comm.gather_rows(share, rows, 1, torch.device("cpu")))


def _share(comm: DistComm, fail: bool) -> None:
    own = {"w": torch.full((3, 3), 7.0), "b": torch.ones(3)}
    template = {n: torch.zeros_like(t) for n, t in own.items()}
    shared = comm.share_tensors(own if comm.rank == 0 else template, 0, torch.device("cpu"))
    assert float(shared["w"][0, 0]) == 7.0
    _expect_stop(comm, fail, lambda: comm.share_tensors(own if comm.rank == 0 else template,
                                                        0, torch.device("cpu")))


CASES = (_route, _scatter, _gather, _share)


def _rank(rank: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        comm = DistComm(rank, 2, torch.device("cpu"))
        for case in CASES:
            t0 = time.monotonic()
            case(comm, fail=rank == 1)
            assert comm.agree(True), f"{case.__name__}: the ranks fell out of step"
            seconds = time.monotonic() - t0
            assert seconds < TIMEOUT_S / 3, f"{case.__name__}: {seconds:.1f} s (a rank waited)"
    finally:
        dist.destroy_process_group()


def test_a_buffer_that_does_not_fit_stops_both_ranks_at_once() -> None:
    spawn_two_ranks(_rank, timeout=4 * TIMEOUT_S)
