"""The memory model (engine.md §7): per-worker bytes from the model config alone.

The planner reads parameter counts from a ``meta`` skeleton (no weights;
:mod:`neuroal.planning.layout`) and predicts, for a given number of workers, run dtype ``b``
bytes, ``N`` calibration windows of ``T`` tokens and a micro-batch ``mb``, what each worker
holds at its peak in pipeline mode (``engine.parallel=pipeline``; data mode's final prune is
modelled in :mod:`neuroal.planning.data_mode`). Every term mirrors what the engine
allocates (``engine/worker.py``, ``capture.py``, ``criteria/``, ``masking.py``):

* **weights**: every owned parameter in the run dtype: the blocks ``[a, b)``, the modules every
  worker rebuilds block arguments with (OPT's learned positions), the embedding on the first
  worker, the final modules and ``lm_head`` on the last one (a tied head is a separate copy of
  the embedding unless the same worker owns both).
* **activations**: a stream is ``N x T x h`` in the run dtype (``Worker.embed`` returns the
  embedding's dtype); the pruned block's forward keeps its input and writes a new output
  (``torch.empty_like``), so 2 streams are live then; the statistics pass drops each
  micro-batch's output, so capture and masking see 1 stream. The NeuroAL search uses ``n_s`` windows and the
  first worker also keeps the shared embeddings (3 streams). With
  ``engine.offload_activations`` on a GPU the streams live in host memory (``host_activations``)
  and the device holds one micro-batch in and out.
* **statistics**: fp32 per distinct input of the block in flight (``capture.StatsCollector``
  shares one accumulator between linears fed the same tensor, q/k/v and gate/up:
  :attr:`ModelLayout.input_groups`): ``sq_norm``, ``mean``, ``var``: ``4 cols``; ``hessian``:
  ``4 cols^2``; per linear ``out_sq_norm``: ``4 rows``. They are freed before the pruned
  forward. The search adds the sparse pass's ``sq_norm``, the first worker block 0's shared
  reference, and under ``reference_stream: global`` the dense statistics of every owned block.
* **transients** (the largest of, each in its sub-phase): mask selection on the largest linear,
  ``16 B`` per weight (fp32 scores + ``kthvalue``'s fp32 copy and int64 indices); SparseGPT
  beyond its Hessian (counted in statistics), the larger of its factorisation, ``w x 4 cols^2``
  (one working square written over in place by the Cholesky factor, inverse and upper factor;
  ``w`` = 2 on CUDA, whose Cholesky inverse copies its input, 1 on the CPU) and its sweep,
  ``4 cols^2 + 12 rows cols + 28 x 128 rows`` (the factor, the fp32 working weight, strided
  update temporaries); a micro-batch forward, the larger of ``mb T I 4 b`` (the block's own
  intermediates) and, at the widest linear's hook, ``mb T I (b + 8)`` (its input, the hook's
  fp32 copy and square of a half-precision input, none in fp32) plus the batch Hessian
  ``4 cols^2`` (doubled and folded in place), ``I`` the widest linear dimension;
  AlphaPruning's spectrum, ``5 B`` per weight; the last worker's evaluation logits
  ``T_eval V (b + 8)``.
* **masked block** (search only): the temporary masked copy of one block's linears, ``b`` per
  weight.
* **overhead**: a fixed runtime constant per worker (:data:`OVERHEAD_BYTES`).
* **recovery** (``recover``, :mod:`neuroal.planning.recovery`): ``perp-reconstruct`` adds a ``reconstruct``
  phase to every worker: a third stream (the dense block's outputs, the fit's targets), the
  block's MaskLoRA adapters with their gradients and Adam moments, what autograd keeps for one
  micro-batch (every linear's mask and effective weight, the block's activations) and the
  largest linear's fp32 temporaries. Whole-model PERP (``perp-*`` retraining) runs after the
  prune in one process holding the whole model: ``retrain_memory``, reported as the plan's
  ``retrain`` row.

Sequential onloading (``onload``: ``host`` or ``disk``, :mod:`neuroal.engine.onload`) changes
only the weights: the device holds the non-block modules plus the block in use and the one
fetched ahead (``2 x`` the largest owned block; 1 without prefetch), and the host holds the
blocks (``host``: every owned block in one arena per block, pinned on CUDA, counted as
allocated: :func:`neuroal.engine.arena.arena_bound`; ``disk``: the block being read ahead and
the block being spilled, ``2 x`` the largest; none on a CPU, where the block read is the
compute copy) in ``host_weights``, reported beside the device total. ``onload: auto`` picks
the first mode of ``device``, ``host``, ``disk`` whose every worker fits the device (and, when
a host limit is given, the host).

A worker's peak is the larger of its final-prune phase and (for search policies) its search
phase; each row reports the components of that phase, which add up to the total. The transient
coefficients were measured on CPU (peak RSS around one call, ``launch/bench_scale.py`` checks
the whole) and are kept for CUDA, where ``kthvalue`` copies less: there they err on the safe side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from neuroal.allocation import ALLOCATIONS
from neuroal.config.inputs import parse_size
from neuroal.criteria import CRITERIA
from neuroal.criteria.base import STAT_HESSIAN, STAT_MEAN, STAT_OUT_SQ_NORM, STAT_SQ_NORM, STAT_VAR
from neuroal.engine.arena import arena_bound
from neuroal.planning.layout import ModelLayout, input_leaders

ONLOAD_MODES = ("device", "host", "disk")  # as neuroal.engine.onload (kept import-free here)

GB = 10**9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Fixed runtime overhead per worker. cpu: measured: a worker process holds 0.31-0.32 GB after
# importing torch, transformers and neuroal (launch/bench_scale.py reports it as baseline_rss),
# and its peak exceeds baseline + predicted terms by another 0.1-0.2 GB of allocator slack
# (0.37 GB with a 70B meta skeleton built). cuda: CUDA context, cuBLAS workspaces and
# caching-allocator slack, estimated (0.5-1 GB on H100s), not measured here.
OVERHEAD_BYTES: dict[str, int] = {"cpu": 450 * 10**6, "cuda": 2**30}

SELECT_BYTES = 16  # per weight: fp32 scores + kthvalue's fp32 copy + int64 indices
# fp32 cols x cols matrices beyond the Hessian while factorising: the in-place working square,
# plus on CUDA the copy cusolver's Cholesky inverse makes (criteria/sparsegpt.py)
SPARSEGPT_WORK_SQUARES: dict[str, int] = {"cpu": 1, "cuda": 2}
SPARSEGPT_BYTES = 12  # per weight: fp32 working copy, mask, strided update temporaries
SPARSEGPT_ROW_BYTES = 28 * 128  # per row: selection inside one 128-column block
HESSIAN_UPDATE_SQUARES = 1  # the batch sum 2 X^T X; doubled, divided and folded in place
SPECTRUM_BYTES = 5  # per weight: fp32 copy for svdvals (AlphaPruning)
FORWARD_MLP_COPIES = 4  # (mb, T, I) run-dtype tensors alive in a block forward (gate, up, ...)
HOOK_FP32_BYTES = 8  # per (token, I): the hooks' fp32 copy of a half-precision input + its square
HEAD_EXTRA_BYTES = 8  # per logit beyond the run dtype: fp32 copy + log-softmax

_STAT_BYTES: dict[str, Callable[[int, int], int]] = {
    STAT_SQ_NORM: lambda rows, cols: 4 * cols,
    STAT_MEAN: lambda rows, cols: 4 * cols,
    STAT_VAR: lambda rows, cols: 4 * cols,
    STAT_OUT_SQ_NORM: lambda rows, cols: 4 * rows,
    STAT_HESSIAN: lambda rows, cols: 4 * cols * cols,
}


def parse_bytes(value: int | float | str) -> int:
    """``24GB`` -> 24e9, ``80GiB`` -> 80 * 2^30, ``1.5e9`` or ``1500000000`` -> bytes.

    Raises:
        ValueError: Not a positive size.
    """
    return parse_size(value, "memory size")


# --------------------------------------------------------------------------- request and worker


@dataclass(frozen=True)
class MemoryRequest:
    """The run settings that decide memory (names as in the config).

    ``eval_seqlen`` is the perplexity window length (``None``: no evaluation);
    ``search_samples`` and ``reference_stream`` matter for search policies (NeuroAL).
    ``parallel`` is the final prune's mode: ``pipeline`` (this module), ``data``
    (:mod:`neuroal.planning.data_mode`) or ``auto`` (:func:`~neuroal.planning.plan.choose_parallel`);
    ``eval_windows`` sizes data mode's share of the evaluation windows (``None``: unknown).
    """

    workers: int = 1
    dtype: str = "bfloat16"
    nsamples: int = 128
    seqlen: int = 2048
    micro_batch: int = 8
    criterion: str = "wanda"
    allocation: str = "uniform"
    search_samples: int = 8
    reference_stream: str = "local"
    offload_activations: bool = False
    device_type: str = "cuda"
    eval_seqlen: int | None = None
    recover: tuple[str, ...] = ()
    recover_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    onload: str = "device"  # device | host | disk | auto (resolved by choose_onload)
    prefetch: bool = True
    parallel: str = "pipeline"  # engine.parallel: pipeline | data | auto (choose_parallel)
    eval_windows: int | None = None  # perplexity windows per pass (data mode's share of them)

    def describe(self) -> str:
        """One line naming every setting, for messages."""
        return (f"{self.workers} worker(s), {self.dtype}, {self.nsamples} x {self.seqlen} "
                f"calibration tokens, micro-batch {self.micro_batch}, criterion "
                f"{self.criterion}, allocation {self.allocation}"
                + (", activations offloaded" if self.offload_activations else "")
                + (f", recovery {' -> '.join(self.recover)}" if self.recover else "")
                + (f", onload {self.onload}" if self.onload != "device" else "")
                + (f", engine.parallel={self.parallel}" if self.parallel != "pipeline" else ""))


COMPONENTS = ("weights", "activations", "statistics", "transients", "masked_block", "overhead")


@dataclass(frozen=True)
class WorkerMemory:
    """Predicted bytes of one worker at its peak phase (``prune`` or ``search``).

    ``host_activations`` are streams kept in host memory (offloaded) and ``host_weights`` the
    blocks kept there by sequential onloading; neither is in ``total`` (the device's bytes).
    """

    rank: int
    start: int
    stop: int
    phase: str
    weights: int
    activations: int
    statistics: int
    transients: int
    masked_block: int
    overhead: int
    host_activations: int = 0
    host_weights: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in COMPONENTS)

    @property
    def host(self) -> int:
        """Host bytes beyond the runtime: onloaded blocks and offloaded streams."""
        return self.host_weights + self.host_activations

    def describe(self) -> str:
        """``worker 0 (blocks 0-39): weights 69.5 GB, ...``."""
        parts = ", ".join(f"{name.replace('_', ' ')} {getattr(self, name) / GB:.1f} GB"
                          for name in COMPONENTS)
        return f"worker {self.rank} (blocks {self.start}-{self.stop - 1}, {self.phase}): {parts}"


# --------------------------------------------------------------------------- terms


def _needs(request: MemoryRequest) -> tuple[frozenset[str], str]:
    """The criterion's statistics and the allocation policy's kind of needs."""
    return CRITERIA.get(request.criterion).needs, ALLOCATIONS.get(request.allocation).needs


def stat_bytes(linears: Mapping[str, tuple[int, int]], needs: Iterable[str],
               groups: Iterable[Sequence[str]] = ()) -> int:
    """fp32 statistics of one block: input statistics once per distinct input (``groups``:
    linears fed the same tensor share theirs), output statistics per linear."""
    wanted = list(needs)
    leaders = set(input_leaders(linears, groups))
    return sum(_STAT_BYTES[n](rows, cols) for name, (rows, cols) in linears.items()
               for n in wanted if n == STAT_OUT_SQ_NORM or name in leaders)


def stream_bytes(sequences: int, tokens: int, hidden: int, dtype_bytes: int) -> int:
    """One activation stream ``(N, T, h)`` in the run dtype."""
    return sequences * tokens * hidden * dtype_bytes


def _mask_transient(linears: Mapping[str, tuple[int, int]], hessian: bool,
                    device_type: str = "cuda") -> int:
    """Mask selection (score criteria) or SparseGPT's prune of the costliest linear beyond its
    Hessian: the larger of the factorisation's working squares and the sweep (the factor, the
    fp32 working weight and its temporaries)."""
    if hessian:
        work = SPARSEGPT_WORK_SQUARES.get(device_type, SPARSEGPT_WORK_SQUARES["cuda"])
        return max(max(work * 4 * c * c,
                       4 * c * c + SPARSEGPT_BYTES * r * c + SPARSEGPT_ROW_BYTES * r)
                   for r, c in linears.values())
    return max(SELECT_BYTES * r * c for r, c in linears.values())


def _forward_transient(linears: Mapping[str, tuple[int, int]], request: MemoryRequest,
                       needs: frozenset[str], squares: int = HESSIAN_UPDATE_SQUARES) -> int:
    """One micro-batch through a block, with the hooks' fp32 input copies and ``squares`` batch
    Hessians being folded (0 where the batch sum is kept as a statistic: data mode)."""
    b = DTYPE_BYTES[request.dtype]
    tokens = min(request.micro_batch, request.nsamples) * request.seqlen
    widest = max(max(r, c) for r, c in linears.values())
    forward = tokens * widest * FORWARD_MLP_COPIES * b
    if not needs:
        return forward
    hook = tokens * widest * (b + (HOOK_FP32_BYTES if b < 4 else 0))
    if STAT_HESSIAN in needs:
        cols = max(c for _, c in linears.values())
        hook += squares * 4 * cols * cols
    return max(forward, hook)


def _transients(layout: ModelLayout, request: MemoryRequest, blocks: range, last: bool,
                needs: frozenset[str], policy_needs: str) -> int:
    b = DTYPE_BYTES[request.dtype]
    hessian = STAT_HESSIAN in needs
    worst = 0
    for i in blocks:
        linears = layout.linears[i]
        worst = max(worst, _mask_transient(linears, hessian, request.device_type),
                    _forward_transient(linears, request, needs))
        if policy_needs == "weights":
            worst = max(worst, max(SPECTRUM_BYTES * r * c for r, c in linears.values()))
    if last and request.eval_seqlen:
        worst = max(worst, request.eval_seqlen * layout.vocab * (b + HEAD_EXTRA_BYTES))
    return worst


class PruneStep(NamedTuple):
    """Device bytes of one step of the final prune (the worker's other components apart)."""

    activations: int
    statistics: int
    host_activations: int
    transients: int


def prune_steps(layout: ModelLayout, request: MemoryRequest, blocks: range,
                last: bool) -> dict[str, PruneStep]:
    """Each step of the final prune (``Worker.prune_one``) over ``blocks``: ``capture``, the
    statistics pass (1 stream: each micro-batch's output is dropped; the hooks); ``mask`` (1
    stream, the statistics, the criterion's transient); ``forward``, the pruned block's forward
    (2 streams, statistics freed; beside it the last worker's evaluation and AlphaPruning's
    spectrum); for ``stats``/``search`` policies ``dense``, the dense pass (2 streams, input
    norms). The worker's prune phase is the step with the most device bytes."""
    needs, policy_needs = _needs(request)
    extra = {STAT_SQ_NORM} if policy_needs in ("stats", "search") else set()
    prune_needs = needs | extra
    groups = layout.input_groups
    statistics = max(stat_bytes(layout.linears[i], prune_needs, groups) for i in blocks)
    one, host_one = device_host_streams(request, layout, request.nsamples, 1)
    two, host_two = device_host_streams(request, layout, request.nsamples, 2)
    capture = max(_forward_transient(layout.linears[i], request, prune_needs) for i in blocks)
    mask = max(_mask_transient(layout.linears[i], STAT_HESSIAN in needs, request.device_type)
               for i in blocks)
    after = _transients(layout, request, blocks, last, frozenset(), policy_needs)
    steps = {"capture": PruneStep(one, statistics, host_one, capture),
             "mask": PruneStep(one, statistics, host_one, mask),
             "forward": PruneStep(two, 0, host_two, after)}
    if extra:
        dense = max(stat_bytes(layout.linears[i], extra, groups) for i in blocks)
        steps["dense"] = PruneStep(two, dense, host_two, max(
            _forward_transient(layout.linears[i], request, frozenset(extra)) for i in blocks))
    return steps


def device_host_streams(request: MemoryRequest, layout: ModelLayout, sequences: int,
                        count: int) -> tuple[int, int]:
    """(device, host) bytes of ``count`` streams of ``sequences`` windows."""
    b = DTYPE_BYTES[request.dtype]
    full = count * stream_bytes(sequences, request.seqlen, layout.hidden, b)
    if not request.offload_activations or request.device_type == "cpu":
        return full, 0
    batch = min(request.micro_batch, sequences)
    return 2 * stream_bytes(batch, request.seqlen, layout.hidden, b), full


def _weights(layout: ModelLayout, request: MemoryRequest, start: int,
             stop: int) -> tuple[int, int]:
    """(device, host) weight bytes of a worker owning ``[start, stop)`` under ``onload``."""
    b = DTYPE_BYTES[request.dtype]
    first, last = start == 0, stop == layout.num_blocks
    full = layout.weight_params(start, stop, first, last) * b
    if request.onload == "device":
        return full, 0
    owned = layout.block_params[start:stop]
    resident = min(2 if request.prefetch else 1, len(owned)) * max(owned) * b
    device = full - sum(owned) * b + resident
    if request.onload == "host":  # one arena per block, counted as allocated
        tensors = layout.block_tensors[start:stop] or (0,) * len(owned)
        return device, sum(arena_bound(n * b, t) for n, t in zip(owned, tensors, strict=True))
    if request.device_type == "cpu":  # a block read from disk is the "device" copy itself
        return device, 0
    return device, min(2, len(owned)) * max(owned) * b  # disk: read ahead + spill


def worker_phases(layout: ModelLayout, request: MemoryRequest, rank: int, start: int,
                  stop: int) -> dict[str, WorkerMemory]:
    """Every phase of one worker owning blocks ``[start, stop)``: ``prune`` (the final prune,
    and any dense statistics pass) and, for search policies, ``search`` (one NeuroAL candidate)."""
    needs, policy_needs = _needs(request)
    b = DTYPE_BYTES[request.dtype]
    first, last = start == 0, stop == layout.num_blocks
    blocks = range(start, stop)
    weights, host_weights = _weights(layout, request, start, stop)
    overhead = OVERHEAD_BYTES.get(request.device_type, OVERHEAD_BYTES["cuda"])
    transients = _transients(layout, request, blocks, last, needs, policy_needs)
    steps = prune_steps(layout, request, blocks, last)
    peak = max(steps.values(), key=lambda step: step.activations + step.statistics
               + step.transients)
    prune = WorkerMemory(rank, start, stop, "prune", weights, peak.activations, peak.statistics,
                         peak.transients, 0, overhead,
                         max(step.host_activations for step in steps.values()), host_weights)
    if policy_needs != "search":
        return {"prune": prune}
    dense = needs | {STAT_SQ_NORM}
    samples = min(request.search_samples, request.nsamples)
    device, host = device_host_streams(request, layout, samples, 3 if first else 2)
    per_block = [stat_bytes(layout.linears[i], dense, layout.input_groups) for i in blocks]
    sparse = max(stat_bytes(layout.linears[i], {STAT_SQ_NORM}, layout.input_groups)
                 for i in blocks)
    if request.reference_stream == "global":
        statistics = sum(per_block) + sparse
    else:
        statistics = max(per_block) + sparse + (per_block[0] if first else 0)
    masked = max(sum(r * c for r, c in layout.linears[i].values())
                 + (layout.fused_params[i] if layout.fused_params else 0) for i in blocks) * b
    search = WorkerMemory(rank, start, stop, "search", weights, device, statistics, transients,
                          masked, overhead, host, host_weights)
    return {"prune": prune, "search": search}
