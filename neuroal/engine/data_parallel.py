"""Data-parallel final prune: data-parallel calibration, weight-parallel solving.

In pipeline mode worker k owns blocks ``[a_k, b_k)`` and the final prune runs them one after
the other: block b's statistics need block b's inputs, so K - 1 workers wait at every block
(engine.md §11). In data mode every worker works on every block:

1. the calibration set's micro-batches (``engine.micro_batch`` sequences each: the *shards*,
   fixed by the config, never by the worker count) are dealt round-robin: worker r holds the
   hidden states of micro-batches r, r + K, r + 2K, ... (:class:`Layout`);
2. for block b, the owner of b (the worker whose slice holds it; with sequential onloading the
   block comes from host or disk to the owner's device first) hands the block's tensors to every
   other worker, which runs it as a temporary *guest*;
3. in steps of K micro-batches, every worker runs the dense block on its micro-batch with
   hooks that keep the micro-batch's sums (Wanda norms, SparseGPT Hessians, RIA and refiner
   inputs: :func:`neuroal.capture.collector.batch_sums`) instead of folding them;
4. each linear has one *solver* (:func:`assign_solvers`, balanced by cost; with Hessians the
   linears fed the same input, q/k/v or gate/up, share one, so the input's sums travel to it
   once per micro-batch and are folded once, as the pipeline collector folds them once,
   :func:`solver_groups`); the sums of
   every step reach it and it folds them in micro-batch order with the collector's own
   running mean (:func:`neuroal.capture.collector.new_accumulator`), so its statistics are
   bit for bit those of pipeline mode, whatever the number of workers; a worker holds its
   own micro-batch's sums
   and folds each received one on arrival (:func:`fold_received`), so a solver holds one
   received micro-batch's sums at a time (for SparseGPT's widest linear at 70B, one 3.3 GB
   Hessian, not one per worker);
5. the solver selects the mask (SparseGPT: factorises and sweeps) and the pruned weight is
   broadcast from it to every worker;
6. every worker runs the pruned block on its micro-batches: the next block's inputs, computed
   on the same micro-batches as in pipeline mode.

With ``perp-reconstruct`` (recovery.md §3.6) the dense forward of step 3 also writes each
worker's dense outputs (the targets; without a statistic to record it is a forward of its
own). After step 5 the block's inputs and targets are gathered on its owner in row order
(:meth:`Comm.gather_rows`); the owner fits the block there as pipeline mode does
(:meth:`Worker.reconstruct`: same seed, same batches of the same stream), and the refitted
block (the merged linears, the norms and biases: every tensor) replaces every guest copy
(:func:`refresh_guests`) before step 6. The fit itself runs on one worker per block, the
others waiting for it; statistics, solves and forwards stay data-parallel. Memory: during the
fit the owner holds the whole stream and its targets, as in pipeline mode, plus its own share
of both (2/K of a stream; nothing more with one worker).

Masks and weights are therefore bit-identical for any worker count and equal to pipeline
mode's, reconstructed norms and biases included (tests compare them).

Mixture-of-experts blocks follow the same steps: an expert matrix's sums are those of the tokens
routed to it in the micro-batch (zero sums, still counting the micro-batch's sequences, when
none was: the pipeline collector folds exactly that), and each worker also counts the tokens
routed to every expert; the counts, summed over the workers once per block, make the solver's
statistics :class:`~neuroal.capture.moe.RoutedStats`, so an expert no token reached falls back
to magnitude as in pipeline mode.

The algorithm is written once, as one worker's program (:class:`DataPrune`); executors supply a
:class:`Comm` that only moves data: threads in one process (:class:`ThreadComm`, the local
executor) or torch.distributed ranks (:class:`neuroal.engine.collectives.DistComm`). A failure
in a compute phase is agreed on by all workers at the next phase boundary, so no worker is left
waiting in a collective.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from neuroal.capture.collector import StatsCollector, new_accumulator
from neuroal.capture.moe import add_tokens, routed_stats
from neuroal.criteria import CRITERIA
from neuroal.criteria.base import STAT_HESSIAN
from neuroal.engine.worker import Worker
from neuroal.outputs.checkpoint import block_state_path, load_block_state
from neuroal.recovery import refiner_needs
from neuroal.runtime.jobs import INPUT_STATS, BlockReport, LayerReport, PruneJob
from neuroal.runtime.logging import get_logger, progress

log = get_logger(__name__)

PARALLEL_CHOICES = ("auto", "pipeline", "data")
"""``engine.parallel``: ``auto`` is resolved by :func:`resolve_parallel` when the prune starts."""

Sums = tuple[dict[str, torch.Tensor], int]
"""One linear's sums over one micro-batch (:func:`neuroal.capture.collector.batch_sums`) and its number
of sequences."""


# --------------------------------------------------------------------------- pure rules


def assign_solvers(costs: Mapping[str, float], workers: int,
                   groups: Sequence[Sequence[str]] = ()) -> dict[str, int]:
    """Each linear's solver rank, so the per-linear solves are spread evenly: the costliest
    first, each to the least loaded worker (ties: the lower rank; equal costs keep their
    order). Linears fed the very same input (``groups``: q/k/v, gate/up,
    :meth:`~neuroal.models.adapter.ModelAdapter.input_groups`) go to one solver together, their
    costs summed, so their shared input's sums travel to it and are folded there once. The
    results do not depend on it: a solve is the same computation on any worker."""
    unit = {n: n for n in costs}
    for group in groups:
        members = [n for n in group if n in costs]
        for name in members:
            unit[name] = members[0]
    units: dict[str, list[str]] = {}
    for name in costs:
        units.setdefault(unit[name], []).append(name)
    cost = {lead: sum(costs[n] for n in names) for lead, names in units.items()}
    load = [0.0] * workers
    out: dict[str, int] = {}
    for lead in sorted(units, key=lambda n: -cost[n]):  # stable sort
        rank = min(range(workers), key=lambda r: (load[r], r))
        out.update(dict.fromkeys(units[lead], rank))
        load[rank] += cost[lead]
    return {n: out[n] for n in costs}


def solver_groups(groups: Sequence[Sequence[str]], needs: frozenset[str],
                  ) -> Sequence[Sequence[str]]:
    """The input groups :func:`assign_solvers` keeps on one solver: with Hessians (a ``cols x
    cols`` sum per micro-batch: 268 MB for an input of 8192 at 70B) the shared input's sums
    then travel and are folded once; vector statistics are too small to matter beside the
    balance of the mask selections, so every linear is placed on its own (the sums are still
    sent once where a group's linears happen to share a solver, :func:`fold_stats`)."""
    return groups if STAT_HESSIAN in needs else ()


def solve_cost(rows: int, cols: int, needs: frozenset[str]) -> float:
    """Relative cost of one linear's solve: scores and selection grow with ``rows * cols``;
    with a Hessian (SparseGPT) the factorisation with ``cols^3`` and the sweep with
    ``rows * cols^2``."""
    if STAT_HESSIAN in needs:
        return float(cols**3 + rows * cols * cols)
    return float(rows * cols)


def resolve_parallel(requested: str, workers: int, *, fits: bool = True) -> str:
    """The mode a final prune runs in: ``engine.parallel`` as given, or for ``auto`` data mode
    when several workers can share the work and a guest block fits beside each worker's own
    slice (``fits``: the memory planner's say), else pipeline. Every prune can run in data mode
    (mixture-of-experts blocks and ``perp-reconstruct`` included).

    Raises:
        ValueError: An unknown mode.
    """
    if requested not in PARALLEL_CHOICES:
        raise ValueError(f"engine.parallel={requested!r}: expected one of "
                         f"{', '.join(PARALLEL_CHOICES)}")
    if requested == "auto":
        return "data" if workers > 1 and fits else "pipeline"
    return requested


@dataclass(frozen=True)
class Layout:
    """Who holds what in a data-parallel prune (identical on every worker).

    Attributes:
        slices: Each rank's owned blocks ``[a, b)``.
        sequences: Calibration sequences ``N``.
        micro_batch: Sequences per micro-batch; micro-batch m is rows ``[m mb, (m+1) mb)``.
    """

    slices: tuple[tuple[int, int], ...]
    sequences: int
    micro_batch: int

    @property
    def workers(self) -> int:
        return len(self.slices)

    @property
    def batches(self) -> int:
        """Micro-batches ``M = ceil(N / mb)``."""
        return -(-self.sequences // self.micro_batch)

    @property
    def steps(self) -> int:
        """Rounds of K micro-batches (one per worker): ``ceil(M / K)``."""
        return -(-self.batches // self.workers)

    def active(self, step: int) -> int:
        """Workers with a micro-batch in ``step`` (ranks ``0 .. active-1``)."""
        return min(self.workers, self.batches - step * self.workers)

    def rows(self, rank: int) -> list[int]:
        """The sequences ``rank`` holds: its micro-batches ``rank, rank + K, ...`` in order."""
        mb, n = self.micro_batch, self.sequences
        return [i for m in range(rank, self.batches, self.workers)
                for i in range(m * mb, min((m + 1) * mb, n))]

    def active_steps(self, rank: int) -> int:
        """Steps in which ``rank`` has a micro-batch (its micro-batch count)."""
        return len(range(rank, self.batches, self.workers))

    def owner(self, block: int) -> int:
        """The rank whose slice holds ``block``."""
        return next(r for r, (a, b) in enumerate(self.slices) if a <= block < b)


# --------------------------------------------------------------------------- moving data


class Comm(Protocol):
    """What :class:`DataPrune` needs to move between the workers of one prune."""

    rank: int
    world: int

    def agree(self, ok: bool) -> bool:
        """True on every worker when ``ok`` on every worker (a phase boundary)."""
        ...

    def gather_all(self, value: Any) -> list[Any]:
        """Every worker's small picklable ``value``, in rank order."""
        ...

    def scatter_rows(self, stream: torch.Tensor | None, rows: Sequence[Sequence[int]],
                     like: tuple[int, torch.dtype, torch.device]) -> torch.Tensor:
        """Rank 0's ``(N, T, h)`` stream (None elsewhere) -> its rows ``rows[rank]`` on this
        worker, ``(len(rows[rank]), T, h)``; ``like = (h, dtype, home device)``."""
        ...

    def gather_rows(self, share: torch.Tensor, rows: Sequence[Sequence[int]], dst: int,
                    device: torch.device) -> torch.Tensor | None:
        """The inverse of :meth:`scatter_rows`: every worker's ``(len(rows[rank]), T, h)``
        share -> on ``dst`` the ``(N, T, h)`` stream in row order, on ``device``; None
        elsewhere."""
        ...

    def share_tensors(self, tensors: Mapping[str, torch.Tensor], src: int,
                      device: torch.device) -> dict[str, torch.Tensor]:
        """Rank ``src``'s tensors (elsewhere ``tensors`` are templates: shapes and dtypes,
        maybe on ``meta``) as this worker's tensors on ``device``; ``src`` keeps its own."""
        ...

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        """Overwrite ``tensor`` on every worker with rank ``src``'s (in place)."""
        ...

    def route(self, mine: Mapping[str, Sums] | None, active: int, solver: Mapping[str, int],
              order: Sequence[str], take: Callable[[str, Sums, bool], None],
              ) -> BaseException | None:
        """One step's micro-batch sums to each linear's solver: ``mine`` is this worker's
        (None when it has no micro-batch in the step; ranks ``0 .. active-1`` have one). For
        each linear this worker solves (in ``order``), ``take(name, sums, fresh)`` gets the
        sums of ranks ``0 .. active-1`` in rank order (micro-batch order) as they arrive, so a
        solver holds one received micro-batch's sums at a time, not the whole step's;
        ``fresh``: the tensors are this worker's own copies (received bytes), which the fold
        may divide in place. Returns this worker's error in the exchange (a buffer that did
        not fit), once its part is done: the caller agrees on it at the next phase boundary
        (no worker may leave the exchange early)."""
        ...


def put_rows(out: torch.Tensor, part: torch.Tensor, rows: Sequence[int]) -> None:
    """Write one worker's share ``part``, ``(len(rows), T, h)``, into rows ``rows`` of the
    ``(N, T, h)`` stream ``out``."""
    if rows:
        index = torch.tensor(list(rows), dtype=torch.long, device=out.device)
        out.index_copy_(0, index, part.to(out.device))


def holds_all(rows: Sequence[Sequence[int]], rank: int) -> bool:
    """Whether ``rank``'s share is the whole stream in row order (one worker): gathering it
    needs no copy."""
    return list(rows[rank]) == list(range(sum(map(len, rows))))


def stitch_rows(parts: Sequence[torch.Tensor], rows: Sequence[Sequence[int]],
                device: torch.device) -> torch.Tensor:
    """Every worker's share ``parts[r]``, ``(len(rows[r]), T, h)``, put back in row order:
    the ``(N, T, h)`` stream on ``device``."""
    whole = next((part for r, part in enumerate(parts) if holds_all(rows, r)), None)
    if whole is not None:
        return whole.to(device)
    first = parts[0]
    out = torch.empty((sum(map(len, rows)), *first.shape[1:]), dtype=first.dtype, device=device)
    for part, mine in zip(parts, rows, strict=True):
        put_rows(out, part, mine)
    return out


class ThreadHub:
    """All-gather of Python objects among ``world`` threads (by reference, no copy).

    Args:
        world: Number of threads.
    """

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[Any] = [None] * world
        self.barrier = threading.Barrier(world)

    def exchange(self, rank: int, value: Any) -> list[Any]:
        """Publish ``value``, wait for every thread, return all values (rank order)."""
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out


class ThreadComm:
    """One worker thread's side of an in-process exchange (the local executor).

    Args:
        hub: The exchange shared by the threads.
        rank: This thread's worker.
    """

    def __init__(self, hub: ThreadHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self.world = hub.world

    def _exchange(self, value: Any) -> list[Any]:
        return self.hub.exchange(self.rank, value)

    def agree(self, ok: bool) -> bool:
        return all(self._exchange(ok))

    def gather_all(self, value: Any) -> list[Any]:
        return self._exchange(value)

    def scatter_rows(self, stream: torch.Tensor | None, rows: Sequence[Sequence[int]],
                     like: tuple[int, torch.dtype, torch.device]) -> torch.Tensor:
        full = self._exchange(stream)[0]
        index = torch.tensor(list(rows[self.rank]), dtype=torch.long, device=full.device)
        return full.index_select(0, index).to(like[2])

    def gather_rows(self, share: torch.Tensor, rows: Sequence[Sequence[int]], dst: int,
                    device: torch.device) -> torch.Tensor | None:
        """``dst`` copies every share into place (the shares are only read: nobody writes its
        share before the next phase agreement, which ``dst`` reaches after copying)."""
        parts = self._exchange(share)
        return stitch_rows(parts, rows, device) if self.rank == dst else None

    def share_tensors(self, tensors: Mapping[str, torch.Tensor], src: int,
                      device: torch.device) -> dict[str, torch.Tensor]:
        """On the owner's device the guest uses the owner's tensors themselves (no copy: during
        a block each linear is written by its solver only, the forwards only read)."""
        shared = self._exchange(dict(tensors))[src]
        if self.rank == src:
            return dict(tensors)
        return {n: t.to(device) for n, t in shared.items()}

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        source = self._exchange(tensor)[src]
        if self.rank != src and source.data_ptr() != tensor.data_ptr():
            tensor.copy_(source)

    def route(self, mine: Mapping[str, Sums] | None, active: int, solver: Mapping[str, int],
              order: Sequence[str], take: Callable[[str, Sums, bool], None],
              ) -> BaseException | None:
        every = self._exchange(mine)  # by reference: nothing is copied (so nothing is fresh)
        for name in order:
            if solver[name] == self.rank:
                for r in range(active):
                    take(name, every[r][name], False)
        return None


# --------------------------------------------------------------------------- guest blocks


def _swap(block: nn.Module, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Point ``block``'s parameters or buffers ``name`` at ``tensors[name]``; returns the
    previous entries (to put them back)."""
    previous = {}
    for name, value in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = block.get_submodule(owner_name) if owner_name else block
        table = owner._parameters if attr in owner._parameters else owner._buffers
        previous[name] = table[attr]
        if table is owner._parameters and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        table[attr] = value
    return previous


def block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """A block's parameters and buffers by local name (what a guest copy needs)."""
    return {**{n: p.data for n, p in block.named_parameters()}, **dict(block.named_buffers())}


@contextmanager
def guest(block: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``block`` (a skeleton on ``meta`` in a worker that does not own it) filled with
    ``tensors`` for the body, emptied again afterwards."""
    previous = _swap(block, tensors)
    try:
        yield block
    finally:
        _swap(block, previous)


# --------------------------------------------------------------------------- shared steps


class Stopped(Exception):  # noqa: N818 - a signal, not an error
    """A worker failed: every worker stops at the same phase boundary."""


T = TypeVar("T")


class Phases:
    """Compute phases of one worker's data-parallel program, each followed by an agreement of
    every worker that all of them succeeded (so no worker is left waiting in a collective).

    Args:
        worker: This worker (its ``busy_seconds`` count the phases).
        comm: How data moves between the workers.
    """

    def __init__(self, worker: Worker, comm: Comm) -> None:
        self.w = worker
        self.comm = comm
        self.error: Exception | None = None

    def __call__(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (skipped after an earlier failure), then agree.

        Raises:
            Stopped: A worker (this one included: its error is kept) failed.
        """
        t0, result = time.perf_counter(), None
        if self.error is None:
            try:
                result = fn()
            except Exception as exc:  # recorded, agreed on, re-raised by run()
                self.error = exc
        self.w.busy_seconds += time.perf_counter() - t0
        if not self.comm.agree(self.error is None):
            raise Stopped
        return result  # type: ignore[return-value]

    def run(self, body: Callable[[], T]) -> T:
        """``body()`` without autograd (grad mode is per thread), this worker's own error
        re-raised in place of the agreed stop.

        Raises:
            Exception: This worker's own error; :class:`Stopped` when another one failed.
        """
        try:
            with torch.no_grad():
                return body()
        except (Stopped, threading.BrokenBarrierError):  # a stop, agreed or forced by a peer
            if self.error is not None:
                raise self.error from None
            raise


def scatter_embedded(phase: Phases, layout: Layout, ids: torch.Tensor) -> torch.Tensor:
    """Rank 0 embeds the ids ``(N, T)``; each worker gets the hidden states of its rows
    (:meth:`Layout.rows`), ``(len(rows), T, h)`` on its home device."""
    w = phase.w
    embedded = phase(lambda: w.embed(ids) if phase.comm.rank == 0 else None)
    rows = [layout.rows(r) for r in range(layout.workers)]
    return phase.comm.scatter_rows(embedded, rows, (w.adapter.hidden_size, w.dtype, w._home()))


def lend(phase: Phases, stack: ExitStack, module: nn.Module, owner: int,
         tensors: Callable[[], Mapping[str, torch.Tensor]]) -> None:
    """``module`` filled on every worker until ``stack`` closes: ``tensors()`` (run as a phase)
    are the owner's own tensors by name under ``module`` (elsewhere the skeleton's templates),
    shared by the owner and swapped in as guests on the other workers."""
    own = phase(tensors)
    shared = phase.comm.share_tensors(own, owner, phase.w.device)
    if phase.comm.rank != owner:
        stack.enter_context(guest(module, shared))


def refresh_guests(phase: Phases, block: nn.Module, owner: int) -> None:
    """After the owner changed its ``block`` beyond the prunable weights (``perp-reconstruct``
    trains norms and biases and merges its linears into new tensors): every guest copy takes
    the owner's tensors (parameters and buffers), one tensor at a time so a guest holds at
    most one extra tensor; on the owner's device under :class:`ThreadComm` the guests use the
    owner's tensors themselves."""
    comm = phase.comm
    for name, tensor in sorted(block_tensors(block).items()):  # the same order everywhere
        shared = comm.share_tensors({name: tensor}, owner, phase.w.device)
        if comm.rank != owner:
            _swap(block, shared)  # the stale copy goes; the guest context restores the template


def host_block(phase: Phases, stack: ExitStack, index: int, owner: int,
               write: bool = False) -> None:
    """Block ``index`` on this worker's device until ``stack`` closes: the owner's own
    (resident; with onloading read from host or disk, and written back when ``write``), a
    guest copy of its tensors elsewhere."""
    w = phase.w
    block = w.adapter.blocks[index]
    if phase.comm.rank == owner:
        lend(phase, stack, block, owner,
             lambda: block_tensors(stack.enter_context(w.resident(index, write=write))))
    else:
        lend(phase, stack, block, owner, lambda: block_tensors(block))  # templates


def fold_stats(phase: Phases, layout: Layout, index: int, share: torch.Tensor,
               linears: Mapping[str, Any], needs: frozenset[str], solver: Mapping[str, int],
               folds: Mapping[str, Any], out: torch.Tensor | None = None,
               ) -> tuple[list[str], dict[str, int]]:
    """Step by step: this worker's micro-batch of ``share`` through the dense block ``index``
    with recording hooks (its outputs written into ``out`` when given), every worker's sums
    to each linear's solver, folded there in micro-batch order into ``folds``. A shared
    input's sums (:func:`input_sharing`) travel once to a solver of its whole group and are
    folded there once (:func:`strip_shared`, :func:`join_shared`), as a pipeline collector
    folds them once.

    Returns the linears' execution order (rank 0's, which always has micro-batch 0) and the
    calibration tokens routed to each MoE expert matrix over every worker's micro-batches
    (empty for a dense block; :func:`~neuroal.capture.moe.routed_stats` turns a solver's
    statistics into the pipeline collector's)."""
    mb, order, comm = layout.micro_batch, list(linears), phase.comm
    tokens = StatsCollector(dict(linears), needs).routed_tokens()  # every expert matrix at 0
    follows: dict[str, str] = {}

    def step_sums(step: int) -> tuple[dict[str, Sums] | None, list[str]]:
        if step >= layout.active_steps(comm.rank):
            return None, []
        rows = slice(step * mb, (step + 1) * mb)
        collector = StatsCollector(dict(linears), needs)
        collector.record_only()
        with collector.attached():
            phase.w._forward_block(index, share[rows], collector,
                                   None if out is None else out[rows])
        add_tokens(tokens, collector.routed_tokens())
        return collector.recorded(), collector.order

    routed = order
    for step in range(layout.steps):
        sums, seen = phase(lambda s=step: step_sums(s))
        if step == 0:  # rank 0's order and sharing are everyone's (the same block code)
            first, follows = comm.gather_all(
                (seen, input_sharing(sums, seen) if sums is not None else {}))[0]
            order = first or order
            follows = {f: lead for f, lead in follows.items() if solver[f] == solver[lead]}
            routed = [n for n in order if n not in follows or needs - set(INPUT_STATS)]
        sent = phase(lambda s=sums, f=follows: None if s is None else strip_shared(s, f))
        del sums
        failed = comm.route(sent, layout.active(step), solver, routed,
                            lambda name, part, fresh: fold_received(phase, folds[name], part,
                                                                    fresh))
        del sent
        phase.error = phase.error or failed
        phase(lambda: None)  # agree: a transfer or a fold on receipt may have failed
    phase(lambda: join_shared(folds, follows))
    return order, routed_totals(comm, tokens)


def input_sharing(sums: Mapping[str, Sums | None], order: Sequence[str]) -> dict[str, str]:
    """Linears that received the very same input tensor as an earlier one (q/k/v, gate/up, an
    expert's gate/up) in one micro-batch's recorded sums
    (:meth:`~neuroal.capture.collector.StatsCollector.recorded`, whose followers hold their
    leader's input-sum tensors themselves): follower -> leader (the first in ``order``)."""
    first: dict[tuple[int, ...], str] = {}
    follows: dict[str, str] = {}
    for name in order:
        part = sums.get(name)
        key = () if part is None else \
            tuple(id(v) for k, v in sorted(part[0].items()) if k in INPUT_STATS)
        if key and key in first:
            follows[name] = first[key]
        elif key:
            first[key] = name
    return follows


def strip_shared(sums: Mapping[str, Sums], follows: Mapping[str, str]) -> dict[str, Sums]:
    """One micro-batch's sums as they are routed: a follower's input sums (``follows``: those
    solved with their leader) are left out, since its leader's carry them; a follower with no
    other statistic is left out altogether.

    Raises:
        RuntimeError: A follower's input is not its leader's in this micro-batch (the block
            calls its linears differently from one micro-batch to the next).
    """
    out: dict[str, Sums] = {}
    for name, part in sums.items():
        lead = follows.get(name)
        if lead is not None and part is not None:
            values, leader = part[0], sums[lead]
            if leader is None or any(values.get(k) is not leader[0].get(k) for k in INPUT_STATS):
                raise RuntimeError(
                    f"statistics capture: linear {name!r} received the input of {lead!r} in "
                    "the first micro-batch and not in this one; the block's forward must call "
                    "its linears the same way for every micro-batch (report this model to "
                    "neuroal)")
            values = {k: v for k, v in values.items() if k not in INPUT_STATS}
            if not values:
                continue
            part = (values, part[1])
        if part is not None:
            out[name] = part
    return out


def join_shared(folds: Mapping[str, Any], follows: Mapping[str, str]) -> None:
    """A solver's followers (``follows``, folded without their input sums,
    :func:`strip_shared`) take their leader's input statistics, the same tensors, and its
    sequence count, as followers do in a pipeline collector."""
    for name, lead in follows.items():
        if name in folds and lead in folds:
            mine, theirs = folds[name], folds[lead]
            for key in INPUT_STATS:
                setattr(mine, key, getattr(theirs, key))
            mine.n = theirs.n


def routed_totals(comm: Comm, mine: dict[str, int]) -> dict[str, int]:
    """Every worker's routed-token counts summed (one small gather, only for MoE blocks: the
    expert matrices are the same on every worker, so all of them call it or none)."""
    if not mine:
        return mine
    total: dict[str, int] = {}
    for part in comm.gather_all(mine):
        add_tokens(total, part)
    return total


def fold_received(phase: Phases, fold: Any, part: Sums, fresh: bool = False) -> None:
    """Fold one received micro-batch's sums ``part`` into a solver's accumulator ``fold`` on
    this worker's device, as it arrives (:meth:`Comm.route`); ``fresh`` sums (this worker's
    own copies) are divided in place, so the fold makes no square of its own. Inside a route
    no worker may leave the exchange, so a failure is kept as the worker's error (the next
    phase boundary stops every worker) and later parts are skipped."""
    if phase.error is not None:
        return
    t0 = time.perf_counter()
    try:
        sums, batch = part
        moved = {k: v.to(phase.w.device) for k, v in sums.items()}
        fresh = fresh or all(m is not v for m, v in zip(moved.values(), sums.values(),
                                                        strict=True))
        fold.update(moved, batch, owned=fresh)
    except Exception as exc:  # agreed on at the next boundary, re-raised by Phases.run
        phase.error = exc
    phase.w.busy_seconds += time.perf_counter() - t0


# --------------------------------------------------------------------------- one worker's program


class DataPrune:
    """One worker's part of a data-parallel final prune (module docstring).

    Args:
        worker: This worker (its own slice; other blocks arrive as guests).
        comm: How data moves between the workers.
        layout: Slices and micro-batches of the prune.
    """

    def __init__(self, worker: Worker, comm: Comm, layout: Layout) -> None:
        self.w = worker
        self.comm = comm
        self.layout = layout
        self.phases = Phases(worker, comm)

    @property
    def error(self) -> Exception | None:
        """This worker's first error, if any."""
        return self.phases.error

    def _phase(self, fn: Any) -> Any:
        """A compute phase (:class:`Phases`)."""
        return self.phases(fn)

    def run(self, ids: torch.Tensor, entries: Sequence[Mapping[str, Any]],
            job: PruneJob) -> list[BlockReport]:
        """Prune every block of the model on the calibration ids ``(N, T)``; returns the
        reports of the blocks this worker owns.

        Raises:
            Exception: This worker's own error; :class:`Stopped` when another one failed.
        """
        return self.phases.run(lambda: self._run(ids, entries, job))

    def _run(self, ids: torch.Tensor, entries: Sequence[Mapping[str, Any]],
             job: PruneJob) -> list[BlockReport]:
        w, rank = self.w, self.comm.rank
        share = scatter_embedded(self.phases, self.layout, ids)
        reports = []
        blocks = range(w.spec.num_blocks)
        for b in progress(blocks, "pruning blocks", unit="block") if rank == 0 else blocks:
            share, report = self._block(b, share, entries[b], job, ids.shape[1])
            if report is not None:
                reports.append(report)
        return reports

    def _block(self, index: int, share: torch.Tensor, entries: Mapping[str, Any], job: PruneJob,
               seqlen: int) -> tuple[torch.Tensor, BlockReport | None]:
        """One block: host it, replay (resume) or prune it, run it on this worker's rows."""
        t0, owner = time.perf_counter(), self.layout.owner(index)
        mine = self.comm.rank == owner
        with ExitStack() as stack:
            host_block(self.phases, stack, index, owner, write=True)
            saved = self._phase(lambda: load_block_state(job.state_dir, index)
                                if job.state_dir else None)
            if not self.comm.agree(saved is not None):  # replayed everywhere or nowhere
                saved = None  # (a node that cannot see the owner's state: pruned again)
            if saved is not None:
                path = block_state_path(job.state_dir or "", index)
                share, report = self._phase(
                    lambda: self.w._replay(index, share, *saved, entries=entries, path=path))
                return share, report if mine else None
            layers, targets = self._prune(index, share, entries, job, seqlen)
            info = {} if targets is None else self._reconstruct(index, share, targets, job, layers)
            del targets  # the dense outputs go before the forward allocates the next share
            share = self._phase(lambda: self.w._forward_block(index, share))
            report = BlockReport(index, layers, time.perf_counter() - t0, info)
            if mine:
                self._phase(lambda: self._finish(index, report, job))
            else:
                self._phase(lambda: None)
        return share, report if mine else None

    def _prune(self, index: int, share: torch.Tensor, entries: Mapping[str, Any],
               job: PruneJob, seqlen: int) -> tuple[list[LayerReport], torch.Tensor | None]:
        """Statistics folded by the solvers, solved, weights broadcast; returns the block's
        layer reports in execution order (on every worker) and, with ``job.reconstruct``, this
        worker's dense outputs of the block (its share of the targets, written by the same
        dense forward; a forward of its own when the criterion needs no statistic)."""
        w = self.w
        linears = w.adapter.prunable_linears(w.adapter.blocks[index])
        needs = CRITERIA.get(job.criterion).needs | refiner_needs(job.refine)
        order = list(linears)
        solver = assign_solvers({n: solve_cost(*linears[n].weight.shape, needs) for n in order},
                                self.comm.world, solver_groups(w.adapter.input_groups(), needs))
        folds = {n: new_accumulator(needs) for n in order if solver[n] == self.comm.rank}
        tokens = StatsCollector(dict(linears), needs).routed_tokens()  # no statistic: all 0
        targets = None if job.reconstruct is None else self._phase(lambda: torch.empty_like(share))
        if needs:
            order, tokens = fold_stats(self.phases, self.layout, index, share, linears, needs,
                                       solver, folds, out=targets)
        elif targets is not None:
            self._phase(lambda: w._forward_block(index, share, out=targets))
        mine = [n for n in order if solver[n] == self.comm.rank]
        own = self._phase(lambda: w.prune_block(
            index, routed_stats({n: folds[n].stats() for n in mine}, tokens), entries, job, mine,
            seqlen=seqlen))
        for name in order:
            self.comm.broadcast_(linears[name].weight.data, solver[name])
        by_name = {r.name: r for part in self.comm.gather_all(own) for r in part}
        return [by_name[n] for n in order], targets

    def _reconstruct(self, index: int, share: torch.Tensor, targets: torch.Tensor,
                     job: PruneJob, layers: list[LayerReport]) -> dict[str, Any]:
        """``perp-reconstruct`` of pruned block ``index`` (recovery.md §3.6) on its owner: the
        stream and the dense outputs gathered there in row order, the fit of pipeline mode on
        them (same seed, same batches: bit-identical), the refitted block handed to the
        guests. Updates ``layers``' zero counts on the owner; returns the block's report
        ``info`` there (``{}`` elsewhere)."""
        owner, w = self.layout.owner(index), self.w
        rows = [self.layout.rows(r) for r in range(self.layout.workers)]
        stream = self.comm.gather_rows(share, rows, owner, w._home())
        dense = self.comm.gather_rows(targets, rows, owner, w._home())
        fit = self._phase(lambda x=stream, y=dense: None if x is None or y is None else
                          w.reconstruct(index, x, y, job, layers))
        del stream, dense  # the gathered streams go before the next share is allocated
        refresh_guests(self.phases, w.adapter.blocks[index], owner)
        return {} if fit is None else {"perp-reconstruct": fit}

    def _finish(self, index: int, report: BlockReport, job: PruneJob) -> None:
        """The owner's bookkeeping of a pruned block: resume state (as pipeline mode keeps it,
        :meth:`Worker.keep_state`) and the log line."""
        self.w.keep_state(index, job, report)
        log.info("block %d/%d  target %.3f  achieved %.3f  %.1f s  (data-parallel)", index + 1,
                 self.w.spec.num_blocks, report.target, report.achieved, report.seconds)


def run_in_threads(workers: Sequence[Worker],
                   program: Callable[[Worker, Comm], T]) -> list[T]:
    """``program(worker, comm)`` for every in-process worker, one thread each, joined by a
    :class:`ThreadComm` (torch releases the GIL in its kernels, so the workers compute at the
    same time); the results in rank order.

    Raises:
        Exception: The first worker's error (rank order; agreed stops come last).
    """
    hub = ThreadHub(len(workers))
    results: list[Any] = [None] * len(workers)

    def work(rank: int) -> None:
        try:
            results[rank] = program(workers[rank], ThreadComm(hub, rank))
        except BaseException as exc:  # raised below
            results[rank] = exc
            if not isinstance(exc, Stopped):  # an agreed stop leaves nobody waiting; anything
                hub.barrier.abort()           # else must release the peers at the barrier

    threads = [threading.Thread(target=work, args=(r,), name=f"neuroal-data-{r}")
               for r in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    signals = (Stopped, threading.BrokenBarrierError)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise next((e for e in errors if not isinstance(e, signals)), errors[0])
    return results


def prune_in_threads(workers: Sequence[Worker], entries: Sequence[Mapping[str, Any]],
                     job: PruneJob, ids: torch.Tensor) -> list[BlockReport]:
    """The local executor's data-parallel prune: one thread per in-process worker
    (:func:`run_in_threads`).

    Raises:
        Exception: The first worker's error (rank order).
    """
    layout = Layout(tuple((w.spec.start, w.spec.stop) for w in workers), int(ids.shape[0]),
                    workers[0].spec.micro_batch)
    results = run_in_threads(workers, lambda w, comm: DataPrune(w, comm, layout).run(
        ids, entries, job))
    return sorted((rep for part in results for rep in part), key=lambda r: r.index)
