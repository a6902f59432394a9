"""Data-parallel passes: perplexity, zero-shot scores and dense statistics on every worker.

In pipeline mode a pass over the model (the dense and the pruned perplexity, lm-eval's
log-likelihoods, the dense statistics pass of OWL, the dense reference of a NeuroAL search)
streams its sequences through the slices one after the other, so one worker computes at a time
for each micro-batch. In data mode (``engine.parallel``, :mod:`neuroal.engine.data_parallel`)
every worker runs every block on its own share of the sequences:

1. the pass's micro-batches (``engine.micro_batch`` sequences each, fixed by the config) are
   dealt round-robin as in the final prune (:class:`~neuroal.engine.data_parallel.Layout`);
   rank 0 embeds the ids and sends each worker the hidden states of its rows;
2. for each block, the owner lends the block's tensors to the other workers (guests, as in the
   final prune), and each worker runs its rows through it, micro-batch by micro-batch;
3. head passes (perplexity, zero-shot): the last worker lends the final norm and the head;
   each worker scores its own sequences one at a time (:meth:`Worker.window_nll`,
   :meth:`Worker.token_logprobs`); the per-sequence results are gathered and put back in
   sequence order, so the caller reduces them (e.g. the mean NLL over windows) in an order
   that does not depend on the worker count;
4. statistics passes: each worker's micro-batch sums reach the block's owner, which folds them
   in micro-batch order with the collector's own running mean
   (:func:`~neuroal.engine.data_parallel.fold_stats`) and applies the pass's function to the
   block's weights and statistics, as the owner does in pipeline mode.

Every micro-batch holds the same sequences and goes through the same weights on the same
device type as in pipeline mode, so the results are bit-identical for any number of workers
(tests compare them). A pass with a single micro-batch has nothing to share and runs as in
pipeline mode (:func:`pass_mode`).

Each program is one worker's part, written against the :class:`Comm` protocol only, so every
executor can run it: threads in one process (:func:`passes_in_threads`, the local executor),
torch.distributed ranks (:class:`~neuroal.engine.collectives.DistComm`), or any other
:class:`Comm` (call :func:`run_pass` on every worker with the same arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import torch

from neuroal.capture.collector import new_accumulator
from neuroal.capture.moe import routed_stats
from neuroal.engine.data_parallel import (
    Comm,
    Layout,
    Phases,
    fold_stats,
    host_block,
    lend,
    resolve_parallel,
    run_in_threads,
    scatter_embedded,
)
from neuroal.engine.worker import Worker, stats_only
from neuroal.models.adapter import ModelAdapter
from neuroal.runtime.logging import get_logger, progress

log = get_logger(__name__)

Slices = Sequence[tuple[int, int]]
"""Each rank's owned blocks ``[a, b)``, in rank order."""


def pass_mode(requested: str, worker: Worker, workers: int, sequences: int | None,
              fits: bool = True) -> str:
    """The mode a pass over ``sequences`` sequences (None: a data-free pass over the weights)
    runs in: ``engine.parallel`` resolved as for the final prune
    (:func:`~neuroal.engine.data_parallel.resolve_parallel`), except that a pass of one
    micro-batch runs as in pipeline mode (no second share to give out). ``fits``: the memory
    planner's verdict on data mode (``auto`` keeps to pipeline mode where it does not fit).

    Raises:
        ValueError: An unknown mode.
    """
    mode = resolve_parallel(requested, workers, fits=fits)
    several = sequences is None or sequences > worker.spec.micro_batch
    return "data" if mode == "data" and several else "pipeline"


def head_tensors(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """The final modules' and the head's parameters and buffers, by name in the model (on a
    worker that does not own them: ``meta`` templates)."""
    out: dict[str, torch.Tensor] = {}
    for name in (*adapter.final_names, adapter.spec.head):
        module = adapter.model.get_submodule(name)
        out.update({f"{name}.{n}": p.data for n, p in module.named_parameters()})
        out.update({f"{name}.{n}": b for n, b in module.named_buffers()})
    return out


def in_row_order(parts: Sequence[torch.Tensor], layout: Layout) -> torch.Tensor:
    """Per-rank results ``(len(rows[r]), ...)`` -> one tensor ``(N, ...)`` in sequence order."""
    index = torch.tensor([i for r in range(layout.workers) for i in layout.rows(r)],
                         dtype=torch.long)
    joined = torch.cat([p.cpu() for p in parts])
    out = torch.empty_like(joined)
    out[index] = joined
    return out


class DataPass:
    """One worker's part of a data-parallel pass (module docstring).

    Args:
        worker: This worker (its own slice; other blocks and the head arrive as guests).
        comm: How data moves between the workers.
        layout: Slices and micro-batches of the pass.
    """

    def __init__(self, worker: Worker, comm: Comm, layout: Layout) -> None:
        self.w = worker
        self.comm = comm
        self.layout = layout
        self.phases = Phases(worker, comm)

    def _blocks(self, count: int, desc: str) -> Any:
        blocks = range(count)
        return progress(blocks, desc, unit="block") if self.comm.rank == 0 else blocks

    def through(self, ids: torch.Tensor, desc: str) -> torch.Tensor:
        """This worker's rows of ``ids`` ``(N, T)`` embedded and run through every block:
        ``(len(rows), T, h)``; ``desc`` labels rank 0's progress bar."""
        share = scatter_embedded(self.phases, self.layout, ids)
        for index in self._blocks(self.w.spec.num_blocks, desc):
            with ExitStack() as stack:
                host_block(self.phases, stack, index, self.layout.owner(index))
                share = self.phases(lambda i=index, s=share: self.w._forward_block(i, s))
        return share

    def head_rows(self, ids: torch.Tensor, score: Callable[[torch.Tensor, list[int]], Any],
                  desc: str) -> list[Any]:
        """``score(final hidden states of this worker's rows, its row indices)`` with the head
        lent by the last worker; every worker's result, in rank order."""
        share = self.through(ids, desc)
        last = self.layout.owner(self.w.spec.num_blocks - 1)
        rows = self.layout.rows(self.comm.rank)
        with ExitStack() as stack:
            lend(self.phases, stack, self.w.adapter.model, last,
                 lambda: head_tensors(self.w.adapter))
            if self.comm.rank != last:
                self.w.head_lent = True
                stack.callback(setattr, self.w, "head_lent", False)
            mine = self.phases(lambda: score(share, rows))
        return self.comm.gather_all(mine)

    def block_metrics(self, ids: torch.Tensor, fn: Callable[..., Any], needs: frozenset[str],
                      count: int) -> dict[int, Any]:
        """``fn(weights, stats)`` of blocks ``0 .. count-1`` over one dense pass of ``ids``;
        the values of the blocks this worker owns."""
        share, values = scatter_embedded(self.phases, self.layout, ids), {}
        for index in self._blocks(count, "dense statistics"):
            owner = self.layout.owner(index)
            with ExitStack() as stack:
                host_block(self.phases, stack, index, owner)
                share, value = self._metrics(index, share, fn, needs, owner)
            if self.comm.rank == owner:
                values[index] = value
        return values

    def _metrics(self, index: int, share: torch.Tensor, fn: Callable[..., Any],
                 needs: frozenset[str], owner: int) -> tuple[torch.Tensor, Any]:
        """One hosted block: statistics folded by its owner, which applies ``fn``; returns
        this worker's outputs of the block and the value (None elsewhere)."""
        w, mine = self.w, self.comm.rank == owner
        linears = w.adapter.prunable_linears(w.adapter.blocks[index])
        folds = {n: new_accumulator(needs) for n in linears} if mine else {}
        out = self.phases(lambda: torch.empty_like(share))
        _, tokens = fold_stats(self.phases, self.layout, index, share, linears, needs,
                               dict.fromkeys(linears, owner), folds, out)
        value = self.phases(lambda: fn({n: m.weight.data for n, m in linears.items()},
                                       routed_stats({n: folds[n].stats() for n in linears},
                                                    tokens)) if mine else None)
        return out, value


# --------------------------------------------------------------------------- the passes


def _layout(worker: Worker, slices: Slices, sequences: int) -> Layout:
    return Layout(tuple((int(a), int(b)) for a, b in slices), sequences, worker.spec.micro_batch)


def window_nll(worker: Worker, comm: Comm, slices: Slices,
               windows: torch.Tensor) -> torch.Tensor | None:
    """Per-window mean NLL ``(k,)`` float64 of the windows ``(k, T)`` on rank 0 (None
    elsewhere), as :meth:`Worker.window_nll` computes it in pipeline mode."""
    layout = _layout(worker, slices, int(windows.shape[0]))
    program = DataPass(worker, comm, layout)
    parts = program.phases.run(lambda: program.head_rows(
        windows, lambda s, rows: worker.window_nll(s, windows[rows]), "perplexity"))
    return in_row_order(parts, layout) if comm.rank == 0 else None


def token_logprobs(worker: Worker, comm: Comm, slices: Slices, inputs: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-position log-probabilities of ``targets`` ``(B, T)`` after ``inputs`` ``(B, T)``
    and their argmax flags (:meth:`Worker.token_logprobs`) on rank 0 (None elsewhere)."""
    layout = _layout(worker, slices, int(inputs.shape[0]))
    program = DataPass(worker, comm, layout)
    parts = program.phases.run(lambda: program.head_rows(
        inputs, lambda s, rows: worker.token_logprobs(s, targets[rows]), "zero-shot"))
    if comm.rank != 0:
        return None
    return in_row_order([p[0] for p in parts], layout), in_row_order([p[1] for p in parts],
                                                                     layout)


def block_metrics(worker: Worker, comm: Comm, slices: Slices, ids: torch.Tensor,
                  fn: Callable[..., Any], needs: frozenset[str],
                  count: int | None = None) -> dict[int, Any]:
    """``fn(weights, stats)`` per block over one dense pass of ``ids`` ``(N, T)`` (as
    :meth:`Worker.dense_block_metrics`), for blocks ``0 .. count-1`` (default: all); returns
    the values of the blocks this worker owns."""
    program = DataPass(worker, comm, _layout(worker, slices, int(ids.shape[0])))
    blocks = worker.spec.num_blocks if count is None else count
    return program.phases.run(lambda: program.block_metrics(ids, fn, needs, blocks))


def dense_reference(worker: Worker, comm: Comm, slices: Slices, ids: torch.Tensor,
                    needs: frozenset[str], reference_stream: str) -> dict[int, Any]:
    """A NeuroAL search's candidate-independent dense statistics (neuroal.md §B4, §B5;
    :meth:`Worker.dense_reference`) of the blocks this worker owns: block 0's (``local``) or
    every block's (``global``)."""
    count = 1 if reference_stream == "local" else None
    return block_metrics(worker, comm, slices, ids, stats_only, needs, count)


PASSES: dict[str, Callable[..., Any]] = {
    "window_nll": window_nll, "token_logprobs": token_logprobs,
    "block_metrics": block_metrics, "dense_reference": dense_reference,
}
"""Each pass by name: ``fn(worker, comm, slices, *args)``, called on every worker."""


def run_pass(name: str, worker: Worker, comm: Comm, slices: Slices, *args: Any) -> Any:
    """Run pass ``name`` (:data:`PASSES`) as this worker's part.

    Raises:
        KeyError: Unknown pass (names listed).
        Exception: This worker's own error;
            :class:`~neuroal.engine.data_parallel.Stopped` when another worker failed.
    """
    if name not in PASSES:
        raise KeyError(f"unknown data-parallel pass {name!r}; known: {', '.join(PASSES)}")
    return PASSES[name](worker, comm, slices, *args)


def passes_in_threads(workers: Sequence[Worker], name: str, *args: Any) -> list[Any]:
    """The local executor's data-parallel pass ``name``: one thread per in-process worker;
    every worker's result, in rank order.

    Raises:
        Exception: The first worker's error (rank order).
    """
    slices = [(w.spec.start, w.spec.stop) for w in workers]
    return run_in_threads(workers, lambda w, comm: run_pass(name, w, comm, slices, *args))


def weights_in_threads(workers: Sequence[Worker],
                       fn: Callable[[torch.Tensor], Any]) -> list[dict[int, dict[str, Any]]]:
    """:meth:`Worker.weight_metrics` (data-free, e.g. AlphaPruning's spectra) on every
    in-process worker at once, one thread each; the parts in rank order."""
    def metrics(worker: Worker, _comm: Comm) -> dict[int, dict[str, Any]]:
        with torch.no_grad():
            return worker.weight_metrics(fn)

    return run_in_threads(workers, metrics)
