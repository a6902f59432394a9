"""Data mode's final prune in the memory model (``engine.parallel=data``,
:mod:`neuroal.engine.data_parallel`): what one worker holds when every worker works on every
block, each on its share of the calibration stream.

Against pipeline mode (:func:`neuroal.planning.memory.prune_steps`) a data-mode worker holds:

* **weights**: its own slice as in pipeline mode (onloading included), plus one *guest* block
  in the run dtype, the largest block it does not own (the owner lends the block in use to the
  other workers; with onloading the owner's block comes from host or disk anyway). With
  evaluation, the last worker also lends the final modules and ``lm_head``: the guest is the
  larger of the two, since a block is no longer hosted while the head is lent.
* **activations**: its share of the stream, the micro-batches ``r, r + K, ...`` of ``mb``
  sequences (:meth:`~neuroal.engine.data_parallel.Layout.rows`: at most ``ceil(M / K) mb``
  sequences, ``M = ceil(N / mb)``) instead of all ``N``; 1 stream while capturing and masking,
  2 in the pruned forward, as in pipeline mode.
* **statistics**: the sums of the worker's own micro-batch for every linear of the block (fp32,
  input sums once per distinct input, as :func:`~neuroal.planning.memory.stat_bytes` counts
  them: linears fed the same tensor share it while recording); the running accumulators of the
  linears it *solves* (:func:`~neuroal.engine.data_parallel.assign_solvers` by solve cost, the
  engine's own rule over the layout's shapes, which keeps an input group on one solver when
  it folds Hessians), a shared input's once where its linears share a solver; and one
  received micro-batch's sums of one linear at a time (an input group's leader carries the
  shared input's): the solver folds each micro-batch it receives before the next arrives
  (:func:`~neuroal.engine.data_parallel.fold_received`). Freed before the pruned forward.
* **transients**: the micro-batch forward with recording hooks (the batch Hessian is the
  recorded sum itself, counted in statistics, not a transient), the mask selection or
  SparseGPT solve of the largest linear this worker solves (none when it solves nothing in a
  block: more workers than linears), the plain forward.

Each step is taken over every block (in data mode every worker runs every block), the worker's
data-mode prune phase is its largest step. The passes that run data-parallel beside the prune
(:mod:`neuroal.engine.data_passes`) are modelled too: a policy's dense statistics pass (the
block's owner folds every linear's sums) and, with evaluation, perplexity: the worker's share
of the evaluation windows (``eval_windows``; unknown: counted as ``N``), the lent head, and one
window's fp32 logits on every worker, which scores its own windows one at a time. A NeuroAL
search's dense reference runs data-parallel too when its windows fill more than one micro-batch:
the criterion's statistics folded by each block's owner, which keeps its blocks' reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import lru_cache

from neuroal.criteria.base import STAT_HESSIAN, STAT_SQ_NORM
from neuroal.engine.data_parallel import Layout, assign_solvers, solve_cost, solver_groups
from neuroal.planning.layout import ModelLayout, input_leaders
from neuroal.planning.memory import (
    DTYPE_BYTES,
    HEAD_EXTRA_BYTES,
    OVERHEAD_BYTES,
    SPECTRUM_BYTES,
    MemoryRequest,
    PruneStep,
    WorkerMemory,
    _forward_transient,
    _mask_transient,
    _needs,
    _weights,
    device_host_streams,
    stat_bytes,
)

PHASE = "data prune"
"""The phase name of a data-mode worker's final prune in the plan's rows."""

Shapes = Mapping[str, tuple[int, int]]
Slices = Sequence[tuple[int, int]]


def solvers(linears: Shapes, needs: frozenset[str], workers: int,
            groups: Sequence[Sequence[str]] = ()) -> dict[str, int]:
    """Each linear's solver rank, by the engine's rule (costliest first, to the least loaded;
    with Hessians the linears of an input group together, :func:`solver_groups`)."""
    return dict(_solvers(tuple(linears.items()), needs, workers,
                         tuple(tuple(g) for g in solver_groups(groups, needs))))


@lru_cache(maxsize=64)
def _solvers(linears: tuple[tuple[str, tuple[int, int]], ...], needs: frozenset[str],
             workers: int, groups: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, int], ...]:
    """:func:`solvers`, kept for the last few block kinds asked (a mixture-of-experts block
    has hundreds of linears, and the planner asks again for every worker, onload mode and
    worker count it tries)."""
    return tuple(assign_solvers({n: solve_cost(r, c, needs) for n, (r, c) in linears},
                                workers, groups).items())


def linear_sums(shape: tuple[int, int], needs: frozenset[str]) -> int:
    """One linear's fp32 sums or accumulator, input and output statistics, unshared."""
    return stat_bytes({"linear": shape}, needs)


def guest_bytes(layout: ModelLayout, request: MemoryRequest, start: int, stop: int) -> int:
    """The largest block a worker owning ``[start, stop)`` does not own, in the run dtype (0:
    it owns every block); with evaluation on a worker that is not last, at least the lent
    final modules and head."""
    b = DTYPE_BYTES[request.dtype]
    others = layout.block_params[:start] + layout.block_params[stop:]
    block = max(others, default=0) * b
    lent_head = (layout.final_params + layout.head_params) * b \
        if request.eval_seqlen and stop < layout.num_blocks else 0
    return max(block, lent_head)


def share_rows(request: MemoryRequest, slices: Slices, rank: int, sequences: int) -> int:
    """Sequences ``rank`` holds of a stream of ``sequences`` (its micro-batches)."""
    return len(Layout(tuple(slices), sequences, request.micro_batch).rows(rank))


def _block_statistics(linears: Shapes, needs: frozenset[str], groups: Sequence[Sequence[str]],
                      mine: Sequence[str], workers: int) -> tuple[int, int, int]:
    """(own micro-batch's recorded sums, accumulators of the linears solved here, one received
    linear's micro-batch sums) of one block: a solver folds a shared input once, and the
    largest single transfer it receives is a leader's (input and output) sums."""
    recorded = stat_bytes(linears, needs, groups)
    folds = stat_bytes({n: linears[n] for n in mine}, needs, groups)
    return recorded, folds, _received(linears, needs, groups, mine) if workers > 1 else 0


def _received(linears: Shapes, needs: frozenset[str], groups: Sequence[Sequence[str]],
              mine: Sequence[str]) -> int:
    """The largest micro-batch's sums one linear of ``mine`` receives: an input group's leader
    carries the shared input's (a follower solved with it only its output statistics)."""
    leaders = set(input_leaders({n: linears[n] for n in mine}, groups))
    return max((linear_sums(linears[n], needs) for n in mine if n in leaders), default=0)


def _prune_block_steps(layout: ModelLayout, request: MemoryRequest, index: int, rank: int,
                       one: tuple[int, int], two: tuple[int, int]) -> dict[str, PruneStep]:
    """Capture, routing, solving and the pruned forward of block ``index`` on worker ``rank``
    (``one``, ``two``: (device, host) bytes of 1 and 2 share streams)."""
    needs, _ = _needs(request)
    linears, workers = layout.linears[index], request.workers
    solver = solvers(linears, needs, workers, layout.input_groups)
    mine = [n for n in linears if solver[n] == rank]
    steps = {"forward": PruneStep(two[0], 0, two[1],
                                  _forward_transient(linears, request, frozenset()))}
    mask = _mask_transient({n: linears[n] for n in mine}, STAT_HESSIAN in needs,
                           request.device_type) if mine else 0
    if not needs:
        steps["mask"] = PruneStep(one[0], 0, one[1], mask)
        return steps
    recorded, folds, received = _block_statistics(linears, needs, layout.input_groups, mine,
                                                  workers)
    steps["capture"] = PruneStep(one[0], recorded + folds, one[1],
                                 _forward_transient(linears, request, needs, squares=0))
    steps["route"] = PruneStep(one[0], recorded + folds + received, one[1], 0)
    steps["mask"] = PruneStep(one[0], folds, one[1], mask)
    return steps


def _dense_step(layout: ModelLayout, request: MemoryRequest, index: int, owner: bool,
                two: tuple[int, int], needs: frozenset[str] = frozenset({STAT_SQ_NORM}),
                kept: int = 0) -> PruneStep:
    """A dense statistics pass over block ``index`` (a policy's ``sq_norm``; a search's
    reference: the criterion's statistics too): the block's owner folds every linear's sums
    (a shared input's once), every worker keeps its own micro-batch's and its outputs; ``kept``: the
    statistics of earlier blocks the pass keeps."""
    linears, groups = layout.linears[index], layout.input_groups
    recorded = stat_bytes(linears, needs, groups)
    folds = recorded if owner else 0
    received = _received(linears, needs, groups, list(linears)) \
        if owner and request.workers > 1 else 0
    return PruneStep(two[0], kept + recorded + folds + received, two[1],
                     _forward_transient(linears, request, needs, squares=0))


def _reference_step(layout: ModelLayout, request: MemoryRequest, slices: Slices, rank: int,
                    ) -> PruneStep | None:
    """A NeuroAL search's dense reference, data-parallel when its windows fill more than one
    micro-batch (:func:`~neuroal.engine.data_passes.pass_mode`; else it is pipelined, the
    search phase's figure): the criterion's statistics and ``sq_norm`` of each block, folded
    on its owner, which keeps them (one copy per input) for block 0 (``local``) or for every
    owned block (``global``): counted whole beside every block of the pass (a bound)."""
    samples = min(request.search_samples, request.nsamples)
    if samples <= request.micro_batch or request.workers == 1:
        return None
    needs = _needs(request)[0] | {STAT_SQ_NORM}
    start, stop = slices[rank]
    count = 1 if request.reference_stream == "local" else layout.num_blocks
    two = device_host_streams(request, layout, share_rows(request, slices, rank, samples), 2)
    owned = [i for i in range(start, stop) if i < count]
    kept = sum(stat_bytes(layout.linears[i], needs, layout.input_groups) for i in owned)
    others = [i for i in range(count) if i not in owned]
    return max([_dense_step(layout, request, i, True, two, needs, kept)
                for i in _distinct_blocks(layout, owned)]
               + [_dense_step(layout, request, i, False, two, needs, kept)
                  for i in _distinct_blocks(layout, others)], key=_device_bytes)


def _evaluate_step(layout: ModelLayout, request: MemoryRequest, slices: Slices,
                   rank: int) -> PruneStep:
    """Perplexity in data mode: 2 share streams of the evaluation windows, one window's logits
    (fp32 copy and log-softmax) on every worker."""
    assert request.eval_seqlen is not None
    windows = request.eval_windows or request.nsamples
    rows = share_rows(request, slices, rank, windows)
    eval_request = replace(request, seqlen=request.eval_seqlen)
    device, host = device_host_streams(eval_request, layout, rows, 2)
    b = DTYPE_BYTES[request.dtype]
    logits = request.eval_seqlen * layout.vocab * (b + HEAD_EXTRA_BYTES)
    return PruneStep(device, 0, host, logits)


def data_prune_steps(layout: ModelLayout, request: MemoryRequest, slices: Slices,
                     rank: int) -> dict[str, PruneStep]:
    """Each step of worker ``rank``'s data-mode final prune (and data-parallel passes), its
    largest over every block (module docstring)."""
    start, stop = slices[rank]
    rows = share_rows(request, slices, rank, request.nsamples)
    one = device_host_streams(request, layout, rows, 1)
    two = device_host_streams(request, layout, rows, 2)
    steps: dict[str, PruneStep] = {}
    for index in _distinct_blocks(layout, range(layout.num_blocks)):
        for name, step in _prune_block_steps(layout, request, index, rank, one, two).items():
            steps[name] = max(steps.get(name, step), step, key=_device_bytes)
    _, policy_needs = _needs(request)
    if policy_needs in ("stats", "search"):
        owned = _distinct_blocks(layout, range(start, stop))
        others = _distinct_blocks(layout, [*range(start), *range(stop, layout.num_blocks)])
        steps["dense"] = max([_dense_step(layout, request, i, True, two) for i in owned]
                             + [_dense_step(layout, request, i, False, two) for i in others],
                             key=_device_bytes)
    if policy_needs == "search" and (reference := _reference_step(layout, request, slices,
                                                                   rank)) is not None:
        steps["reference"] = reference
    if policy_needs == "weights":  # AlphaPruning's spectra of the owned linears
        spectrum = max(SPECTRUM_BYTES * r * c for i in range(start, stop)
                       for r, c in layout.linears[i].values())
        steps["spectrum"] = PruneStep(0, 0, 0, spectrum)
    if request.eval_seqlen:
        steps["evaluate"] = _evaluate_step(layout, request, slices, rank)
    return steps


def _distinct_blocks(layout: ModelLayout, blocks: Sequence[int]) -> list[int]:
    """One block of each distinct set of linear shapes among ``blocks`` (a model's blocks are
    mostly alike: their steps are computed once)."""
    seen: dict[int, int] = {}
    for index in blocks:
        seen.setdefault(layout.block_kinds[index], index)
    return list(seen.values())


def _device_bytes(step: PruneStep) -> int:
    return step.activations + step.statistics + step.transients


def data_prune_phase(layout: ModelLayout, request: MemoryRequest, slices: Slices,
                     rank: int) -> WorkerMemory:
    """Worker ``rank``'s peak in data mode's final prune (phase :data:`PHASE`), components
    adding up to its total."""
    start, stop = slices[rank]
    weights, host_weights = _weights(layout, request, start, stop)
    steps = data_prune_steps(layout, request, slices, rank)
    peak = max(steps.values(), key=_device_bytes)
    overhead = OVERHEAD_BYTES.get(request.device_type, OVERHEAD_BYTES["cuda"])
    return WorkerMemory(rank, start, stop, PHASE, weights + guest_bytes(layout, request, start,
                                                                         stop),
                        peak.activations, peak.statistics, peak.transients, 0, overhead,
                        max(step.host_activations for step in steps.values()), host_weights)
