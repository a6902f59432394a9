"""Memory planner (engine.md §7): per-worker bytes from the model config alone.

The planner reads parameter counts from a ``meta`` skeleton (no weights) and predicts, for a
given number of workers, run dtype ``b`` bytes, ``N`` calibration windows of ``T`` tokens and a
micro-batch ``mb``, what each worker holds at its peak. Every term mirrors what the engine
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
* **recovery** (``recover``, :func:`recovery_phases`): ``perp-reconstruct`` adds a ``reconstruct``
  phase to every worker: a third stream (the dense block's outputs, the fit's targets), the
  block's MaskLoRA adapters with their gradients and Adam moments, what autograd keeps for one
  micro-batch (every linear's mask and effective weight, the block's activations) and the
  largest linear's fp32 temporaries. Whole-model PERP (``perp-*`` retraining) runs after the
  prune in one process holding the whole model: :func:`retrain_memory`, reported as the plan's
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

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cache
from typing import Any, NamedTuple

from neuroal.allocation import ALLOCATIONS
from neuroal.config.inputs import parse_size
from neuroal.criteria import CRITERIA
from neuroal.criteria.base import STAT_HESSIAN, STAT_MEAN, STAT_OUT_SQ_NORM, STAT_SQ_NORM, STAT_VAR
from neuroal.engine.arena import arena_bound
from neuroal.engine.executor import split_blocks
from neuroal.models.adapter import ModelAdapter
from neuroal.models.known import KNOWN, MIXED_BLOCKS, known_alias, known_config
from neuroal.models.loading import build_skeleton, load_model_config, resolve_model
from neuroal.models.moe import ExpertLinear
from neuroal.recovery import RECOVERY_STEPS, STAGE_MODEL, resolved_options

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


class MemoryBudgetError(ValueError):
    """The predicted peak of some worker exceeds its memory; raised before loading weights."""


def parse_bytes(value: int | float | str) -> int:
    """``24GB`` -> 24e9, ``80GiB`` -> 80 * 2^30, ``1.5e9`` or ``1500000000`` -> bytes.

    Raises:
        ValueError: Not a positive size.
    """
    return parse_size(value, "memory size")


# --------------------------------------------------------------------------- model layout


@dataclass(frozen=True)
class ModelLayout:
    """Parameter counts of a model by ownership unit, read from a meta skeleton.

    Attributes:
        name: Model name for reports.
        hidden: Hidden size ``h`` (stream width).
        vocab: Vocabulary size ``V`` (logits width).
        tied: Whether ``lm_head`` reads the embedding tensor.
        block_params: All parameters of each decoder block.
        linears: ``(rows, cols)`` of each prunable linear, per block.
        context_params: Parameters every worker loads (e.g. OPT's learned positions).
        embed_params: Token embedding (first worker).
        final_params: Modules after the last block (last worker).
        head_params: ``lm_head`` (last worker).
        fused_params: Per block, the weights of MoE experts held in fused 3-D parameters (part
            of ``linears``): a search candidate swaps in a masked copy of those tensors besides
            the per-matrix masked copies (``neuroal.models.moe.swapped_weights``).
        input_groups: Linears fed the very same input tensor (q/k/v, gate/up): one input
            statistic each group (``neuroal.models.sharing``); empty: every linear alone.
        block_tensors: Parameter tensors of each block (the host arena's alignment padding).
    """

    name: str
    hidden: int
    vocab: int
    tied: bool
    block_params: tuple[int, ...]
    linears: tuple[Mapping[str, tuple[int, int]], ...]
    context_params: int
    embed_params: int
    final_params: int
    head_params: int
    fused_params: tuple[int, ...] = ()
    input_groups: tuple[tuple[str, ...], ...] = ()
    block_tensors: tuple[int, ...] = ()

    @property
    def num_blocks(self) -> int:
        return len(self.block_params)

    @property
    def params(self) -> int:
        """Parameters of the model (a tied head counted once)."""
        head = 0 if self.tied else self.head_params
        return sum(self.block_params) + self.context_params + self.embed_params \
            + self.final_params + head

    @classmethod
    def from_adapter(cls, adapter: Any, name: str) -> ModelLayout:
        """Count parameters on an adapter's (meta) model, module by module."""
        def count(modules: Iterable[str]) -> int:
            return sum(p.numel() for _, p in adapter.named_owned_parameters(list(modules)))

        def tensors(modules: Iterable[str]) -> int:
            return sum(1 for _ in adapter.named_owned_parameters(list(modules)))

        shape = adapter.shape(row_map=False)
        return cls(
            name=name, hidden=adapter.hidden_size, vocab=int(adapter.config.vocab_size),
            tied=adapter.tied,
            block_params=tuple(count([adapter.block_prefix(i)[:-1]])
                               for i in range(adapter.num_blocks)),
            linears=tuple(dict(b) for b in shape.blocks),
            context_params=count(adapter.context_names()),
            embed_params=count([adapter.spec.embed]),
            final_params=count(adapter.final_names),
            head_params=count([adapter.spec.head]),
            fused_params=tuple(fused_numel(adapter.prunable_linears(b)) for b in adapter.blocks),
            input_groups=adapter.input_groups(),
            block_tensors=tuple(tensors([adapter.block_prefix(i)[:-1]])
                                for i in range(adapter.num_blocks)),
        )

    @classmethod
    def from_config(cls, model_config: Any, name: str | None = None,
                    repeat_block: bool = False) -> ModelLayout:
        """Build the meta skeleton of ``model_config`` (a ``PretrainedConfig``) and count it.

        ``repeat_block`` builds a single block and repeats its counts: exact, and about 50x
        faster at 80 blocks, for models whose blocks are all alike (every known alias).
        """
        import torch

        config = copy.deepcopy(model_config)  # from_config records the dtype on the config
        label = name or getattr(config, "name_or_path", "") or str(config.model_type)
        depth = int(config.num_hidden_layers)
        if repeat_block:
            config.num_hidden_layers = 1
            if isinstance(getattr(config, "layer_types", None), list):
                config.layer_types = config.layer_types[:1]
        layout = cls.from_adapter(ModelAdapter(build_skeleton(config, torch.float32)), label)
        if not repeat_block:
            return layout
        return replace(layout, block_params=layout.block_params * depth,
                       linears=layout.linears * depth, fused_params=layout.fused_params * depth,
                       block_tensors=layout.block_tensors * depth)

    def weight_params(self, start: int, stop: int, first: bool, last: bool) -> int:
        """Parameters a worker owning blocks ``[start, stop)`` loads (as ``materialise`` does)."""
        total = sum(self.block_params[start:stop]) + self.context_params
        if first:
            total += self.embed_params
        if last:
            total += self.final_params
            total += 0 if (self.tied and first) else self.head_params
        return total


@cache
def _known_layout(alias: str) -> ModelLayout:
    return ModelLayout.from_config(known_config(alias), alias,
                                   repeat_block=alias not in MIXED_BLOCKS)


def fused_numel(linears: Mapping[str, Any]) -> int:
    """Weights of the MoE expert matrices among a block's prunable linears."""
    return sum(m.weight.numel() for m in linears.values() if isinstance(m, ExpertLinear))


def layout_of(model: str | ModelLayout | Any) -> ModelLayout:
    """A layout from a known alias, a model path / hub id, a ``PretrainedConfig`` or a layout."""
    if isinstance(model, ModelLayout):
        return model
    if isinstance(model, str):
        alias = known_alias(model)
        if alias is not None:
            return _known_layout(alias)
        return ModelLayout.from_config(load_model_config(resolve_model(model), network=False), model)
    return ModelLayout.from_config(model)


# --------------------------------------------------------------------------- request and plan


@dataclass(frozen=True)
class MemoryRequest:
    """The run settings that decide memory (names as in the config).

    ``eval_seqlen`` is the perplexity window length (``None``: no evaluation);
    ``search_samples`` and ``reference_stream`` matter for search policies (NeuroAL).
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

    def describe(self) -> str:
        """One line naming every setting, for messages."""
        return (f"{self.workers} worker(s), {self.dtype}, {self.nsamples} x {self.seqlen} "
                f"calibration tokens, micro-batch {self.micro_batch}, criterion "
                f"{self.criterion}, allocation {self.allocation}"
                + (", activations offloaded" if self.offload_activations else "")
                + (f", recovery {' -> '.join(self.recover)}" if self.recover else "")
                + (f", onload {self.onload}" if self.onload != "device" else ""))


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


@dataclass(frozen=True)
class MemoryPlan:
    """Per-worker predictions for one model and request."""

    model: str
    params: int
    num_blocks: int
    request: MemoryRequest
    workers: tuple[WorkerMemory, ...]
    retrain: WorkerMemory | None = None  # whole-model PERP: one process after the prune

    @property
    def peak_worker(self) -> WorkerMemory:
        return max(self.workers, key=lambda w: w.total)

    @property
    def peak(self) -> int:
        """The largest per-worker total, in bytes."""
        return self.peak_worker.total

    @property
    def host_peak(self) -> int:
        """The largest per-worker host figure (onloaded blocks + offloaded streams)."""
        return max(w.host for w in self.workers)

    @property
    def host_total(self) -> int:
        """Host bytes of every worker together (all workers on one node)."""
        return sum(w.host for w in self.workers)

    @property
    def one_process(self) -> int:
        """Bytes when every worker lives in one process (the local executor on one device):
        all weights, the largest working set of any worker (they run one after another; the
        stream is handed over, not copied) and one runtime overhead."""
        working = max(w.activations + w.statistics + w.transients + w.masked_block
                      for w in self.workers)
        return sum(w.weights for w in self.workers) + working + self.workers[0].overhead

    def over(self, limit: int | Sequence[int], retrain_limit: int | None = None) -> list[WorkerMemory]:
        """Workers whose total exceeds ``limit`` (one value, or one per worker), then the
        ``retrain`` row if it exceeds ``retrain_limit`` (default: the first worker's limit)."""
        limits = _per_worker(limit, len(self.workers))
        out = [w for w, cap in zip(self.workers, limits, strict=True) if w.total > cap]
        cap = limits[0] if retrain_limit is None else retrain_limit
        if self.retrain is not None and self.retrain.total > cap:
            out.append(self.retrain)
        return out

    def fits(self, limit: int | Sequence[int], retrain_limit: int | None = None) -> bool:
        return not self.over(limit, retrain_limit)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: request, totals and every worker's components in bytes."""
        return {
            "model": self.model, "params": self.params, "num_blocks": self.num_blocks,
            "request": {f.name: getattr(self.request, f.name) for f in fields(self.request)},
            "peak_bytes": self.peak, "host_peak_bytes": self.host_peak,
            "host_total_bytes": self.host_total,
            "workers": [{**{f.name: getattr(w, f.name) for f in fields(w)}, "total": w.total,
                         "host": w.host} for w in self.workers],
            "retrain": None if self.retrain is None else {
                **{f.name: getattr(self.retrain, f.name) for f in fields(self.retrain)},
                "total": self.retrain.total},
        }

    def table(self) -> str:
        """The per-worker table, components in GB."""
        head = ["worker", "blocks", *[c.replace("_", " ") for c in COMPONENTS], "total", "phase"]
        shown = [*self.workers, *([self.retrain] if self.retrain is not None else [])]
        rows = [[str(w.rank) if w.phase != "retrain" else "all", f"{w.start}-{w.stop - 1}",
                 *[f"{getattr(w, c) / GB:.2f}" for c in COMPONENTS], f"{w.total / GB:.2f}", w.phase]
                for w in shown]
        if any(w.host_activations for w in shown):
            head.append("host act.")
            for row, w in zip(rows, shown, strict=True):
                row.append(f"{w.host_activations / GB:.2f}")
        if any(w.host_weights for w in self.workers):
            head.append("host weights")
            for row, w in zip(rows, self.workers, strict=True):
                row.append(f"{w.host_weights / GB:.2f}")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(r, widths, strict=True))
                         for r in [head, *rows])


def _per_worker(limit: int | Sequence[int], workers: int) -> list[int]:
    if isinstance(limit, int):
        return [limit] * workers
    limits = list(limit)
    if len(limits) != workers:
        raise ValueError(f"got {len(limits)} memory limits for {workers} workers")
    return limits


# --------------------------------------------------------------------------- terms


def _needs(request: MemoryRequest) -> tuple[frozenset[str], str]:
    """The criterion's statistics and the allocation policy's kind of needs."""
    return CRITERIA.get(request.criterion).needs, ALLOCATIONS.get(request.allocation).needs


def stat_bytes(linears: Mapping[str, tuple[int, int]], needs: Iterable[str],
               groups: Iterable[Sequence[str]] = ()) -> int:
    """fp32 statistics of one block: input statistics once per distinct input (``groups``:
    linears fed the same tensor share theirs), output statistics per linear."""
    wanted = list(needs)
    followers = {name for group in groups for name in list(group)[1:]
                 if group[0] in linears and name in linears}
    return sum(_STAT_BYTES[n](rows, cols) for name, (rows, cols) in linears.items()
               for n in wanted if n == STAT_OUT_SQ_NORM or name not in followers)


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
                       needs: frozenset[str]) -> int:
    """One micro-batch through a block, with the hooks' fp32 input copies and Hessian update."""
    b = DTYPE_BYTES[request.dtype]
    tokens = min(request.micro_batch, request.nsamples) * request.seqlen
    widest = max(max(r, c) for r, c in linears.values())
    forward = tokens * widest * FORWARD_MLP_COPIES * b
    if not needs:
        return forward
    hook = tokens * widest * (b + (HOOK_FP32_BYTES if b < 4 else 0))
    if STAT_HESSIAN in needs:
        cols = max(c for _, c in linears.values())
        hook += HESSIAN_UPDATE_SQUARES * 4 * cols * cols
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
    one, host_one = _streams(request, layout, request.nsamples, 1)
    two, host_two = _streams(request, layout, request.nsamples, 2)
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


def _streams(request: MemoryRequest, layout: ModelLayout, sequences: int,
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
    device, host = _streams(request, layout, samples, 3 if first else 2)
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


# --------------------------------------------------------------------------- recovery terms

RECONSTRUCT_STEP = "perp-reconstruct"
TRAIN_STATE_BYTES = 16  # per trainable parameter: fp32 value, gradient, two fp32 Adam moments
SAVED_TOKEN_H = 12  # per token, run-dtype values of width h autograd keeps in a block (estimate)
SAVED_TOKEN_I = 5  # per token, values of the MLP width (gate, up, activation, product; estimate)
LORA_TEMP_BYTES = 20  # per weight of the largest linear: fp32 B A, scaled, masked, W and sum
LORA_SAVED_BYTES = 1  # per weight kept for backward besides the effective weight: the bool mask
HOST_MASK_BYTES = 2  # per block weight: the zero masks before and after retraining (host)


def _recovery_options(name: str, request: MemoryRequest) -> Mapping[str, Any]:
    return resolved_options(name, request.recover_options)


def _block_saved_bytes(linears: Mapping[str, tuple[int, int]], hidden: int, tokens: int,
                       lora: bool, b: int) -> int:
    """What autograd keeps for one block's backward on ``tokens`` tokens: its activations and,
    under MaskLoRA, every linear's mask and effective weight."""
    widest = max(max(r, c) for r, c in linears.values())
    acts = tokens * (SAVED_TOKEN_H * hidden + SAVED_TOKEN_I * widest) * b
    numel = sum(r * c for r, c in linears.values())
    return acts + ((LORA_SAVED_BYTES + b) * numel if lora else 0)


def _lora_temp_bytes(linears: Mapping[str, tuple[int, int]]) -> int:
    """fp32 temporaries of one MaskLoRA linear (the largest) in its forward or backward."""
    return LORA_TEMP_BYTES * max(r * c for r, c in linears.values())


def _adapter_state_bytes(linears: Mapping[str, tuple[int, int]], rank: int) -> int:
    """MaskLoRA's A and B on every linear, with gradients and Adam moments."""
    return TRAIN_STATE_BYTES * rank * sum(r + c for r, c in linears.values())


def recovery_phases(layout: ModelLayout, request: MemoryRequest, rank: int, start: int,
                    stop: int) -> dict[str, WorkerMemory]:
    """The ``reconstruct`` phase of a worker when ``perp-reconstruct`` is in ``request.recover``
    (recovery.md §3.6): the prune phase plus the targets stream (3 streams instead of 2) and
    the fit of its costliest block (MaskLoRA rank and micro-batch from the step's options)."""
    if RECONSTRUCT_STEP not in request.recover:
        return {}
    prune = worker_phases(layout, request, rank, start, stop)["prune"]
    opts = _recovery_options(RECONSTRUCT_STEP, request)
    b = DTYPE_BYTES[request.dtype]
    device, host = _streams(request, layout, request.nsamples, 3)
    tokens = int(opts["batch_size"]) * request.seqlen
    fit = max(_adapter_state_bytes(layout.linears[i], int(opts["rank"]))
              + _block_saved_bytes(layout.linears[i], layout.hidden, tokens, True, b)
              + _lora_temp_bytes(layout.linears[i]) for i in range(start, stop))
    return {"reconstruct": replace(prune, phase="reconstruct", activations=device,
                                   host_activations=host, transients=max(prune.transients, fit))}


def retrain_memory(layout: ModelLayout, request: MemoryRequest) -> WorkerMemory | None:
    """Whole-model PERP (recovery.md §3.3-3.5) in one process after the prune, or None when
    ``request.recover`` has no such step.

    The whole model in the run dtype (plus an untied head copy for the head LoRA); trainables
    with gradients and Adam moments (``full``: every block weight, upcast to fp32, and its
    packed mask); what autograd keeps for one micro-batch through every block (with gradient
    checkpointing: the block inputs plus one block); the logits with their fp32 copy and
    gradient; on CPU the zero masks checked before and after.
    """
    names = [s for s in request.recover if RECOVERY_STEPS.get(s).stage == STAGE_MODEL]
    if not names:
        return None
    step = RECOVERY_STEPS.get(names[-1])
    opts = _recovery_options(names[-1], request)
    perp, train = step.perp_options(opts), step.train_options(opts)  # type: ignore[attr-defined]
    b = DTYPE_BYTES[request.dtype]
    blocks = layout.linears
    numel = sum(r * c for blk in blocks for r, c in blk.values())
    small = sum(layout.block_params) - numel + layout.final_params  # norms, biases
    lora = perp.adapter == "mask_lora"
    per_adapter = {"mask_lora": perp.rank, "scale_lora": 1}.get(perp.adapter or "", 0)
    trainable = small + per_adapter * sum(r + c for blk in blocks for r, c in blk.values())
    weights = layout.params * b
    if perp.lm_head_lora:
        trainable += perp.rank * (layout.vocab + layout.hidden)
        weights += layout.head_params * b if layout.tied else 0  # untied copy
    extra = (TRAIN_STATE_BYTES - b) * numel + numel // 8 if perp.weights else 0
    tokens = train.batch_size * request.seqlen
    kept = [_block_saved_bytes(blk, layout.hidden, tokens, lora, b) for blk in blocks]
    saved = (tokens * layout.hidden * b * len(blocks) + max(kept) if train.gradient_checkpointing
             else sum(kept))
    temps = max(_lora_temp_bytes(blk) for blk in blocks) if lora else 0
    logits = max(tokens, train.eval_batch_size * request.seqlen) * layout.vocab * (b + 8)
    host = HOST_MASK_BYTES * numel if request.device_type == "cpu" else 0
    overhead = OVERHEAD_BYTES.get(request.device_type, OVERHEAD_BYTES["cuda"])
    return WorkerMemory(0, 0, layout.num_blocks, "retrain", weights, saved + logits, host,
                        TRAIN_STATE_BYTES * trainable + extra + temps, 0, overhead)


def plan_memory(model: str | ModelLayout | Any, request: MemoryRequest) -> MemoryPlan:
    """Predict every worker's peak bytes for ``request`` (no weights are read).

    Args:
        model: A known alias (``llama-2-70b``), a model path or hub id, a ``PretrainedConfig``
            or a :class:`ModelLayout`.
        request: Workers, dtype, calibration size, micro-batch, criterion and allocation.

    Returns:
        One :class:`WorkerMemory` per worker, in slice order.

    Raises:
        ValueError: Unknown dtype, or more workers than blocks.
    """
    if request.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {request.dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
    if request.onload == "auto":  # no budget to choose by: the workers keep their blocks
        request = replace(request, onload="device")
    if request.onload not in ONLOAD_MODES:
        raise ValueError(f"onload {request.onload!r}: expected one of auto, "
                         f"{', '.join(ONLOAD_MODES)}")
    layout = layout_of(model)
    slices = split_blocks(layout.num_blocks, request.workers)
    workers = tuple(max({**worker_phases(layout, request, r, a, b),
                         **recovery_phases(layout, request, r, a, b)}.values(),
                        key=lambda w: w.total)
                    for r, (a, b) in enumerate(slices))
    return MemoryPlan(layout.name, layout.params, layout.num_blocks, request, workers,
                      retrain_memory(layout, request))


def choose_onload(model: str | ModelLayout | Any, request: MemoryRequest,
                  limit: int | Sequence[int], host_limit: int | None = None) -> MemoryPlan:
    """The plan of ``request.onload``, or under ``auto`` of the first of ``device``, ``host``,
    ``disk`` whose every worker fits ``limit`` on the device and, when given, whose workers
    together fit ``host_limit`` on the host. When none fits: the ``disk`` plan (the smallest
    device peak), so the refusal names the best that could be done."""
    layout = layout_of(model)
    if request.onload != "auto":
        return plan_memory(layout, request)
    plan = None
    for mode in ONLOAD_MODES:
        plan = plan_memory(layout, replace(request, onload=mode))
        if _fits(plan, limit, host_limit):
            return plan
    assert plan is not None
    return plan


def _fits(plan: MemoryPlan, limit: int | Sequence[int], host_limit: int | None) -> bool:
    """Device and host fit; on a CPU "device" the host copies share the same memory."""
    if plan.request.device_type == "cpu":
        limits = _per_worker(limit, len(plan.workers))
        return all(w.total + w.host <= cap for w, cap in zip(plan.workers, limits, strict=True))
    return plan.fits(limit) and (host_limit is None or plan.host_total <= host_limit)


def min_workers(model: str | ModelLayout | Any, request: MemoryRequest, limit: int,
                host_limit: int | None = None) -> int | None:
    """The smallest worker count whose every worker fits in ``limit`` bytes (``None``: none)."""
    layout = layout_of(model)
    for workers in range(1, layout.num_blocks + 1):
        plan = choose_onload(layout, replace(request, workers=workers), limit, host_limit)
        if _fits(plan, limit, host_limit):
            return workers
    return None


def largest_fit(request: MemoryRequest, limit: int,
                candidates: Iterable[str] | None = None) -> MemoryPlan | None:
    """The known model with the most parameters that fits ``request.workers`` x ``limit``.

    Args:
        request: The run settings (its ``workers`` is the device count).
        limit: Bytes per worker.
        candidates: Aliases to consider (default: every known model).
    """
    names = list(candidates) if candidates is not None else list(
        {hub: alias for alias, (hub, _) in reversed(list(KNOWN.items()))}.values())
    best: MemoryPlan | None = None
    for alias in names:
        layout = layout_of(alias)
        if layout.num_blocks < request.workers:
            continue
        plan = choose_onload(layout, request, limit)
        if plan.fits(limit) and (best is None or plan.params > best.params):
            best = plan
    return best


# --------------------------------------------------------------------------- config checks


def request_from_config(cfg: Any, dtype: str, device_type: str) -> MemoryRequest:
    """The :class:`MemoryRequest` of a validated ``PruneConfig`` and its resolved dtype."""
    defaults = ALLOCATIONS.get(cfg.allocation.name).defaults
    options = {**defaults, **cfg.allocation.options}
    evaluates = bool(cfg.eval.datasets)
    return MemoryRequest(
        workers=cfg.engine.workers, dtype=dtype, nsamples=cfg.calib.nsamples,
        seqlen=cfg.calib.seqlen, micro_batch=cfg.engine.micro_batch,
        criterion=cfg.criterion.name, allocation=cfg.allocation.name,
        search_samples=int(options.get("search_samples", 8)),
        reference_stream=str(options.get("reference_stream", "local")),
        offload_activations=cfg.engine.offload_activations, device_type=device_type,
        eval_seqlen=(cfg.eval.seqlen or cfg.calib.seqlen) if evaluates else None,
        recover=tuple(RECOVERY_STEPS.canonical(s) for s in cfg.recover.steps),
        recover_options={(RECOVERY_STEPS.canonical(k) if k in RECOVERY_STEPS else k): dict(v)
                         for k, v in cfg.recover.options.items()},
        onload=str(getattr(cfg.engine, "onload", "device")),
        prefetch=bool(getattr(cfg.engine, "prefetch", True)))


def check_fits(cfg: Any, model_config: Any, device_memory_bytes: int | Sequence[int], *,
               dtype: str | None = None, device_type: str = "cuda",
               layout: ModelLayout | None = None, retrain_limit: int | None = None,
               host_limit: int | None = None) -> MemoryPlan:
    """Refuse a run whose predicted per-worker peak exceeds the memory of its device.

    Args:
        cfg: The validated ``PruneConfig``.
        model_config: The model's ``PretrainedConfig`` (no weights needed).
        device_memory_bytes: Bytes available to each worker (one value, or one per worker).
        dtype: Run dtype name (default: ``cfg.model.dtype``, ``auto`` read as bfloat16).
        device_type: ``cuda`` or ``cpu`` (selects the runtime overhead).
        layout: A layout already built from ``model_config`` (saves a second skeleton).
        retrain_limit: Bytes for whole-model PERP, which runs in one process after the workers
            are released (default: the first worker's limit).
        host_limit: Host bytes all workers of this node may use (onloaded blocks, offloaded
            streams); None: not checked.

    Returns:
        The plan, when every worker fits; under ``engine.onload: auto`` its request carries
        the chosen mode.

    Raises:
        MemoryBudgetError: Naming the request, the worst worker's predicted peak and its
            components, the limit and the smallest worker count that would fit.
    """
    run_dtype = dtype or (cfg.model.dtype if cfg.model.dtype != "auto" else "bfloat16")
    request = request_from_config(cfg, run_dtype, device_type)
    layout = layout or ModelLayout.from_config(model_config, cfg.model.name)
    plan = choose_onload(layout, request, device_memory_bytes, host_limit)
    over = plan.over(device_memory_bytes, retrain_limit)
    if not over and host_limit is not None and plan.host_total > host_limit:
        raise MemoryBudgetError(
            f"model {cfg.model.name!r} fits the device with engine.onload="
            f"{plan.request.onload} but needs {plan.host_total / GB:.1f} GB of host memory for "
            f"the onloaded blocks and offloaded streams; {host_limit / GB:.1f} GB are available. "
            "Use engine.onload=disk (blocks read from the checkpoint), more nodes, or "
            "engine.offload_activations=false. Nothing was loaded.")
    if not over:
        return plan
    limit = min(_per_worker(device_memory_bytes, len(plan.workers)))
    if over[-1] is plan.retrain:
        cap = limit if retrain_limit is None else retrain_limit
        raise MemoryBudgetError(_retrain_refusal(cfg.model.name, plan.retrain, cap))
    worst = max(over, key=lambda w: w.total)
    raise MemoryBudgetError(_refusal(cfg.model.name, plan, worst, limit,
                                     min_workers(layout, request, limit)))


def _retrain_refusal(model: str, row: WorkerMemory, limit: int) -> str:
    parts = ", ".join(f"{name.replace('_', ' ')} {getattr(row, name) / GB:.1f} GB"
                      for name in COMPONENTS)
    return (f"model {model!r} does not fit for whole-model PERP retraining, which holds the whole "
            f"model in one process after the prune: predicted peak {row.total / GB:.1f} GB "
            f"({parts}), limit {limit / GB:.1f} GB. Enable gradient checkpointing "
            "(recover.<step>.gradient_checkpointing=true), lower recover.<step>.batch_size or "
            "calib.seqlen, or drop the step from recover.steps (perp-reconstruct works block by "
            "block). Nothing was loaded.")


def _refusal(model: str, plan: MemoryPlan, worst: WorkerMemory, limit: int,
             fewest: int | None) -> str:
    request = plan.request
    if fewest is not None:
        fix = (f"the smallest worker count that fits is {fewest} (engine.workers={fewest}, one "
               f"device of {limit / GB:.1f} GB each)")
    else:
        fix = statistics_refusal(plan, limit) or (
            f"no worker count fits (even one block per worker exceeds {limit / GB:.1f} GB); "
            f"{_other_fixes(request)}")
    return (f"model {model!r} does not fit: {request.describe()} need a predicted peak of "
            f"{worst.total / GB:.1f} GB on {worst.describe()}; the limit is {limit / GB:.1f} GB "
            f"per worker. {fix[0].upper()}{fix[1:]}. Nothing was loaded.")


def statistics_refusal(plan: MemoryPlan, limit: int) -> str | None:
    """What to change when one block's calibration statistics alone exceed a worker's memory
    (SparseGPT's fp32 Hessians, one ``cols x cols`` per prunable linear and every expert's
    matrix: about 111 GB per DeepSeek-V3 MoE block); None when they fit.

    Workers, onloading, offloading and the micro-batch do not shrink this term, and neuroal does
    not collect experts' statistics in groups over several passes, so the run is refused."""
    worst = max(plan.workers, key=lambda w: w.statistics)
    if worst.statistics + worst.overhead <= limit:
        return None
    light = [n for n in CRITERIA.names() if STAT_HESSIAN not in CRITERIA.get(n).needs]
    return (f"the calibration statistics of one block alone (worker {worst.rank}, blocks "
            f"{worst.start}-{worst.stop - 1}) need {worst.statistics / GB:.1f} GB with criterion "
            f"{plan.request.criterion} (fp32, every prunable linear and expert matrix of the "
            f"block), more than the {limit / GB:.1f} GB of a worker; no worker count, onloading, "
            "activation offloading or micro-batch lowers them, and neuroal does not collect "
            "experts' statistics in groups. Use a criterion with vector statistics or none "
            f"({', '.join(light)}), or devices well above "
            f"{(worst.statistics + worst.overhead) / GB:.0f} GB (the statistics alone)")


def _other_fixes(request: MemoryRequest) -> str:
    """The settings that lower the peak other than the worker count."""
    fixes = ["shrink engine.micro_batch, calib.nsamples or calib.seqlen"]
    if DTYPE_BYTES[request.dtype] > 2:
        fixes.append("use model.dtype=bfloat16")
    if not request.offload_activations and request.device_type != "cpu":
        fixes.append("set engine.offload_activations=true")
    if request.onload in ("device", "auto"):
        fixes.append("set engine.onload=host or disk (weights off the device)")
    return ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1]


# --------------------------------------------------------------------------- report


def summarize(model: str | ModelLayout | Any, request: MemoryRequest, limit: int,
              host_limit: int | None = None) -> dict[str, Any]:
    """The plan (``onload: auto``: of the chosen mode), the verdict, the host memory the run
    needs, the largest known model that fits and the fewest workers."""
    layout = layout_of(model)
    plan = choose_onload(layout, request, limit, host_limit)
    largest = largest_fit(request, limit)
    fits = _fits(plan, limit, host_limit)
    return {
        "plan": plan.to_dict(),
        "limit_bytes": limit,
        "host_limit_bytes": host_limit,
        "onload": plan.request.onload,
        "fits": fits,
        "min_workers": min_workers(layout, request, limit, host_limit),
        "statistics_refusal": statistics_refusal(plan, limit),
        "largest_fit": None if largest is None else {"model": largest.model,
                                                      "params": largest.params,
                                                      "peak_bytes": largest.peak},
        "table": plan.table(),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable lines for :func:`summarize`'s result."""
    plan, limit = summary["plan"], summary["limit_bytes"]
    req = plan["request"]
    peak = plan["peak_bytes"]
    lines = [f"{plan['model']}: {plan['params'] / 1e9:.2f} B parameters, {plan['num_blocks']} "
             f"blocks | {MemoryRequest(**req).describe()} | device {req['device_type']}",
             "", summary["table"], ""]
    verdict = "fits" if summary["fits"] else "does NOT fit"
    lines.append(f"verdict: {verdict}: peak {peak / GB:.2f} GB per worker vs {limit / GB:.2f} GB "
                 f"({(limit - peak) / GB:+.2f} GB to spare) with engine.onload={req['onload']}")
    host_peak, host_total = plan.get("host_peak_bytes", 0), plan.get("host_total_bytes", 0)
    if host_total:
        host_limit = summary.get("host_limit_bytes")
        lines.append(f"host memory needed: {host_peak / GB:.2f} GB per worker, "
                     f"{host_total / GB:.2f} GB for all {req['workers']} worker(s) on one node "
                     "(onloaded blocks and offloaded streams, beyond the runtime)"
                     + (f"; host limit {host_limit / GB:.1f} GB" if host_limit else ""))
    if plan.get("retrain"):
        need = plan["retrain"]["total"]
        lines.append(f"whole-model PERP (one process, after the prune): {need / GB:.2f} GB vs "
                     f"{limit / GB:.2f} GB ({(limit - need) / GB:+.2f} GB to spare)")
    largest = summary["largest_fit"]
    lines.append(f"largest known model that fits on {req['workers']} x {limit / GB:.0f} GB: "
                 + (f"{largest['model']} ({largest['params'] / 1e9:.2f} B, peak "
                    f"{largest['peak_bytes'] / GB:.1f} GB)" if largest else "none"))
    if summary.get("statistics_refusal"):
        lines.append(f"why: {summary['statistics_refusal']}")
    fewest = summary["min_workers"]
    lines.append(f"fewest workers for {plan['model']} on {limit / GB:.0f} GB devices: "
                 + (str(fewest) if fewest else "none (even one block per worker is too large)"))
    return "\n".join(lines)
