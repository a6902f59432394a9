"""The time model: predicted wall seconds per phase of a run, from throughput figures.

The memory model (:mod:`neuroal.planning.memory`) says whether a run fits; this module says how long it
takes. Every figure is a count of work divided by a throughput of the device class, so the model
is a few lines of arithmetic a user can check by hand:

* **forward** of ``n`` tokens through a block of linears ``(rows, cols)``:
  ``n (2 sum(rows cols) + 2 T h) / forward_flops`` (the second term: causal attention on windows
  of ``T`` tokens, hidden ``h``);
* **statistics** (the hooks of a statistics forward): ``n sum(cols) / stats_elems``, plus the
  Hessians ``2 n sum(cols^2) / hessian_flops`` for criteria that need them (SparseGPT); the sums
  run over the block's *distinct inputs*, as the collector folds them: linears fed the very same
  tensor (q/k/v, gate/up) share one statistic (:attr:`Workload.inputs`);
* **masks** of one linear: ``rows cols / select_weights`` (Wanda, magnitude, RIA), or
  SparseGPT's factorisation and sweep ``(rows cols^2 + cols^3) / solve_flops + cols
  solve_column_s`` (the second term: the per-column loop's fixed cost);
* **load**: the bytes a worker materialises / ``load_bytes``, plus ``startup_s`` once;
  **export**: the model's bytes / ``export_bytes``;
* **transfers**: bytes / ``link_bytes[transport]`` plus ``link_latency_s`` per transfer.

Phases (:data:`PHASES`):

* **search** (NeuroAL): per candidate and block, a statistics forward of the dense block and one
  of the masked block on the search windows, and the masks (block 0's dense statistics are
  shared). With a concurrent executor (Ray, dist) candidates pipeline through the K slices:
  ``(C + K - 1)`` slice times, each slice ``ceil(L / K)`` blocks plus one stream hop.
* **prune**: per block a statistics forward, the masks, and the forward of the pruned block on
  all ``N x T`` calibration tokens. ``pipeline`` mode: the slices run one after the other (block
  b needs block b-1's outputs), so K workers take as long as one, plus ``K - 1`` stream hops.
  ``data`` mode: every worker runs the forwards on its share of whole micro-batches (the
  busiest's, :func:`busiest_share`), the linears' masks are spread over the workers (longest
  first, with Hessians an input group on one worker, the slowest worker counts), and per
  block the weights go out to the workers, each micro-batch's statistics of each distinct
  input go to its linears' solvers (:func:`routed_bytes`: the busiest worker's share) and the
  pruned weights come back.
* **evaluation**: dense and pruned perplexity passes (blocks plus the head's logits and
  log-softmax); in ``data`` mode the busiest worker's share of the windows, except under Ray,
  whose micro-batch chunks pipeline through the K slices in either mode (``(chunks + K - 1)``
  slice times).
* **load** and **export** as above; ``compare`` runs (another allocation on the same data, as
  the quickstart does) add a load, a prune and a pruned evaluation each.

The constants live in ``neuroal/planning/throughput.json``, each with its provenance (measured
on which machine by which command, or derived from which published figure).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from neuroal.allocation import ALLOCATIONS
from neuroal.criteria import CRITERIA
from neuroal.criteria.base import STAT_HESSIAN
from neuroal.engine.data_parallel import assign_solvers, solve_cost, solver_groups
from neuroal.planning.layout import input_leader_of, input_leaders

PHASES = ("load", "search", "prune", "evaluation", "export")
MODES = ("pipeline", "data")
EXECUTORS = ("local", "ray", "dist")
CONCURRENT = frozenset({"ray", "dist"})  # executors whose workers run at the same time
THROUGHPUT_FILE = Path(__file__).with_name("throughput.json")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STAT_BYTES = 4  # fp32 statistics


@dataclass(frozen=True)
class Throughput:
    """Throughput figures of one device class (units in the field names; see the module doc)."""

    name: str
    description: str
    forward_flops: float
    stats_elems: float
    hessian_flops: float
    select_weights: float
    solve_flops: float
    solve_column_s: float
    load_bytes: float
    export_bytes: float
    link_bytes: Mapping[str, float]
    link_latency_s: float
    startup_s: float
    provenance: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> Throughput:
        """One entry of the throughput file (``name`` is its key)."""
        return cls(name=name, **{k: v for k, v in data.items() if k != "name"})

    def link(self, transport: str) -> float:
        """Bytes per second of one transfer over ``transport``."""
        if transport not in self.link_bytes:
            raise ValueError(f"transport {transport!r} has no figure for device class "
                             f"{self.name!r}; known: {', '.join(sorted(self.link_bytes))}")
        return float(self.link_bytes[transport])


def load_throughputs(path: str | Path = THROUGHPUT_FILE) -> dict[str, Throughput]:
    """Every device class of the throughput file (keys starting with ``_`` are comments)."""
    data = json.loads(Path(path).read_text())
    return {k: Throughput.from_dict(k, v) for k, v in data.items() if not k.startswith("_")}


def throughput(name: str, path: str | Path = THROUGHPUT_FILE) -> Throughput:
    """The figures of device class ``name``; unknown names list the known ones."""
    known = load_throughputs(path)
    if name not in known:
        raise ValueError(f"device class {name!r} has no throughput figures; known: "
                         f"{', '.join(sorted(known))} (add one to {Path(path).name})")
    return known[name]


# --------------------------------------------------------------------------- workload


class LayoutLike(Protocol):
    """What the time model reads of :class:`neuroal.planning.layout.ModelLayout`."""

    hidden: int
    vocab: int
    linears: tuple[Mapping[str, tuple[int, int]], ...]

    @property
    def params(self) -> int: ...


def _leader_indices(names: Sequence[str], groups: Sequence[Sequence[str]]) -> tuple[int, ...]:
    """Per linear of ``names``, the index of the linear that folds its input
    (:func:`~neuroal.planning.layout.input_leader_of`)."""
    leader, where = input_leader_of(names, groups), {n: i for i, n in enumerate(names)}
    return tuple(where[leader[n]] for n in names)


@dataclass(frozen=True)
class Workload:
    """The model as the time model sees it: per block the ``(rows, cols)`` of its linears and
    the widths of its distinct linear inputs (``inputs``; empty: every linear has its own) and,
    per linear, the index of the linear whose input it shares (``leaders``: its own index for
    a leader; empty: every linear has its own)."""

    hidden: int
    vocab: int
    blocks: tuple[tuple[tuple[int, int], ...], ...]
    params: int
    inputs: tuple[tuple[int, ...], ...] = ()
    leaders: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def from_layout(cls, layout: LayoutLike) -> Workload:
        """From a memory-planner layout (the same meta skeleton, nothing loaded)."""
        groups = getattr(layout, "input_groups", ())
        return cls(hidden=layout.hidden, vocab=layout.vocab,
                   blocks=tuple(tuple(b.values()) for b in layout.linears), params=layout.params,
                   inputs=tuple(tuple(b[n][1] for n in input_leaders(b, groups))
                                for b in layout.linears),
                   leaders=tuple(_leader_indices(list(b), groups) for b in layout.linears))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def input_leaders(self, block: int) -> tuple[int, ...]:
        """Per linear of block ``block``, the index of the linear whose input it shares."""
        if self.leaders:
            return self.leaders[block]
        return tuple(range(len(self.blocks[block])))

    def input_cols(self, block: int) -> tuple[int, ...]:
        """Widths of block ``block``'s distinct linear inputs (one statistic each)."""
        if self.inputs:
            return self.inputs[block]
        return tuple(c for _, c in self.blocks[block])


@dataclass(frozen=True)
class TimeRequest:
    """The run settings that decide time (names as in the config where one exists).

    ``candidates``: search candidates (0: no search); ``hessian``: the criterion accumulates
    Hessians and solves (SparseGPT); ``eval_windows`` x ``eval_seqlen`` tokens per perplexity
    pass, ``eval_passes`` passes (dense and pruned: 2); ``compare``: extra runs with another
    allocation on the same data.
    """

    workers: int = 1
    mode: str = "pipeline"
    device: str = "cpu"
    executor: str = "ray"
    transport: str = "direct"
    dtype: str = "bfloat16"
    nsamples: int = 128
    seqlen: int = 2048
    micro_batch: int = 8
    hessian: bool = False
    candidates: int = 0
    search_samples: int = 8
    eval_windows: int = 0
    eval_seqlen: int = 2048
    eval_passes: int = 2
    compare: int = 0
    save_model: bool = True

    def errors(self) -> list[str]:
        """Every bad setting, with what is expected."""
        out = []
        if self.mode not in MODES:
            out.append(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.executor not in EXECUTORS:
            out.append(f"executor {self.executor!r}: expected one of {', '.join(EXECUTORS)}")
        if self.dtype not in DTYPE_BYTES:
            out.append(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
        for name in ("workers", "nsamples", "seqlen", "micro_batch", "eval_seqlen",
                     "search_samples"):
            if getattr(self, name) < 1:
                out.append(f"{name}={getattr(self, name)}: expected an integer >= 1")
        for name in ("candidates", "eval_windows", "eval_passes", "compare"):
            if getattr(self, name) < 0:
                out.append(f"{name}={getattr(self, name)}: expected an integer >= 0")
        return out


def needs_hessian(criterion: str) -> bool:
    """Whether the criterion accumulates Hessians and solves per linear (SparseGPT)."""
    return STAT_HESSIAN in CRITERIA.get(criterion).needs


def search_candidates(allocation: str, options: Mapping[str, Any], criterion: str,
                      target: float) -> int:
    """Candidates a search policy evaluates (0 for policies without a search)."""
    policy = ALLOCATIONS.get(allocation)
    count = getattr(policy, "candidate_count", None)
    return 0 if count is None else int(count(options, criterion, target))


def request_from_config(cfg: Any, device: str, eval_windows: int, mode: str = "pipeline",
                        transport: str = "direct") -> TimeRequest:
    """A :class:`TimeRequest` from a validated ``PruneConfig`` (``eval_windows``: perplexity
    windows per pass and dataset, which depend on the dataset's length)."""
    dtype = cfg.model.dtype if cfg.model.dtype in DTYPE_BYTES else "bfloat16"
    search = {**getattr(ALLOCATIONS.get(cfg.allocation.name), "defaults", {}),
              **cfg.allocation.options}
    return TimeRequest(
        workers=cfg.engine.workers, mode=mode, device=device, executor=cfg.engine.executor,
        transport=transport, dtype=dtype, nsamples=cfg.calib.nsamples, seqlen=cfg.calib.seqlen,
        micro_batch=cfg.engine.micro_batch,
        hessian=needs_hessian(cfg.criterion.name),
        candidates=search_candidates(cfg.allocation.name, cfg.allocation.options,
                                     cfg.criterion.name, cfg.sparsity),
        search_samples=min(int(search.get("search_samples", 1)), cfg.calib.nsamples),
        eval_windows=eval_windows * len(cfg.eval.datasets),
        eval_seqlen=cfg.eval.seqlen or cfg.calib.seqlen,
        eval_passes=1 + int(cfg.eval.dense) if cfg.eval.datasets else 0,
        compare=len(cfg.compare), save_model=cfg.output.save_model)


# --------------------------------------------------------------------------- per-block work


def forward_seconds(linears: Sequence[tuple[int, int]], hidden: int, tokens: int, seqlen: int,
                    tp: Throughput) -> float:
    """Forward of ``tokens`` tokens (windows of ``seqlen``) through one block."""
    flops = 2 * sum(r * c for r, c in linears) + 2 * seqlen * hidden
    return tokens * flops / tp.forward_flops


def stats_seconds(inputs: Sequence[int], tokens: int, hessian: bool, tp: Throughput) -> float:
    """The hooks' statistics of one block on ``tokens`` tokens (beside its forward); ``inputs``:
    the widths of the block's distinct linear inputs (:meth:`Workload.input_cols`)."""
    seconds = tokens * sum(inputs) / tp.stats_elems
    if hessian:
        seconds += 2 * tokens * sum(c * c for c in inputs) / tp.hessian_flops
    return seconds


def mask_seconds(rows: int, cols: int, hessian: bool, tp: Throughput) -> float:
    """Masks of one ``(rows, cols)`` linear: selection, or SparseGPT's solve."""
    if hessian:
        return (rows * cols * cols + cols ** 3) / tp.solve_flops + cols * tp.solve_column_s
    return rows * cols / tp.select_weights


def makespan(jobs: Sequence[float], workers: int) -> float:
    """Longest-first assignment of ``jobs`` (seconds) to ``workers``: the busiest one's total."""
    loads = [0.0] * workers
    for job in sorted(jobs, reverse=True):
        loads[loads.index(min(loads))] += job
    return max(loads)


def transfer_seconds(nbytes: float, tp: Throughput, transport: str) -> float:
    """One transfer of ``nbytes`` (a hop, a broadcast or a block's routed statistics)."""
    return nbytes / tp.link(transport) + tp.link_latency_s


def slices(num_blocks: int, workers: int) -> int:
    """Blocks of the largest slice (``split_blocks``: ``ceil(L / K)``)."""
    return -(-num_blocks // workers)


# --------------------------------------------------------------------------- phases


def prune_block_seconds(index: int, w: Workload, req: TimeRequest, tp: Throughput) -> float:
    """Block ``index`` of the final prune, ``req.mode`` with ``req.workers`` workers."""
    linears, inputs = w.blocks[index], w.input_cols(index)
    k = req.workers if req.mode == "data" else 1
    tokens = busiest_share(req.nsamples, k, req.micro_batch) * req.seqlen
    compute = (2 * forward_seconds(linears, w.hidden, tokens, req.seqlen, tp)
               + stats_seconds(inputs, tokens, req.hessian, tp))
    lead = w.input_leaders(index)
    solves = [mask_seconds(r, c, req.hessian, tp) for r, c in linears]
    masks = makespan([sum(solves[i] for i in unit) for unit in solve_units(lead, req)], k)
    if k == 1:
        return compute + masks
    weight_bytes = sum(r * c for r, c in linears) * DTYPE_BYTES[req.dtype]
    comm = (2 * transfer_seconds(weight_bytes, tp, req.transport)  # weights out, pruned back
            + transfer_seconds(routed_bytes(linears, req, lead), tp, req.transport))
    return compute + masks + comm


def busiest_share(sequences: int, workers: int, micro_batch: int) -> int:
    """Sequences of the busiest worker when micro-batches of ``micro_batch`` sequences are
    dealt round-robin to ``workers`` workers, as data mode deals them
    (:meth:`~neuroal.engine.data_parallel.Layout.rows`): 128 sequences in micro-batches of 8
    on 3 workers give the busiest 48, not 43."""
    sizes = [min(micro_batch, sequences - i) for i in range(0, sequences, micro_batch)]
    return max((sum(sizes[r::workers]) for r in range(workers)), default=0)


def solve_units(leaders: Sequence[int], req: TimeRequest) -> list[list[int]]:
    """The linears (indices) that go to one solver together: with Hessians an input group
    (``leaders[i]``: the linear whose input linear ``i`` shares), else each linear alone
    (:func:`~neuroal.engine.data_parallel.solver_groups`)."""
    needs = frozenset({STAT_HESSIAN}) if req.hessian else frozenset()
    groups = [[j for j, m in enumerate(leaders) if m == i] for i in sorted(set(leaders))]
    return [list(g) for g in solver_groups(groups, needs)] or [[i] for i in range(len(leaders))]


def routed_bytes(linears: Sequence[tuple[int, int]], req: TimeRequest,
                 leaders: Sequence[int] = ()) -> float:
    """Statistics the busiest worker of a data-mode block sends and receives: every worker
    sends each micro-batch's sums of every linear to its solver (longest solve first, to the
    least loaded worker, as the engine assigns them, :func:`solve_units`), which folds them in
    micro-batch order; a linear's sums are its input's (``4 cols``, plus ``4 cols^2`` with
    Hessians), sent once for the linears fed that input (``leaders[i]``: the linear whose
    input linear ``i`` shares) that have one solver."""
    k = req.workers
    batches = -(-req.nsamples // req.micro_batch)
    needs = frozenset({STAT_HESSIAN}) if req.hessian else frozenset()
    lead = list(leaders) or list(range(len(linears)))
    units = [[str(i) for i in unit] for unit in solve_units(lead, req)]
    assigned = assign_solvers({str(i): solve_cost(r, c, needs) for i, (r, c) in
                               enumerate(linears)}, k, [u for u in units if len(u) > 1])
    solver = [assigned[str(i)] for i in range(len(linears))]
    size = [0 if lead[i] != i and solver[i] == solver[lead[i]] else
            STAT_BYTES * (c + (c * c if req.hessian else 0)) for i, (_, c) in enumerate(linears)]
    busiest = 0.0
    for r in range(k):
        own = len(range(r, batches, k))
        mine = sum(b for b, s in zip(size, solver, strict=True) if s == r)
        busiest = max(busiest, mine * (batches - own) + own * (sum(size) - mine))
    return busiest


def stream_bytes(req: TimeRequest, w: Workload, sequences: int, seqlen: int) -> float:
    """An activation stream of ``sequences x seqlen`` tokens in the run dtype."""
    return sequences * seqlen * w.hidden * DTYPE_BYTES[req.dtype]


def prune_seconds(w: Workload, req: TimeRequest, tp: Throughput) -> float:
    """The final prune: every block, plus the stream's hops between slices in pipeline mode."""
    total = sum(prune_block_seconds(i, w, req, tp) for i in range(w.num_blocks))
    if req.mode == "pipeline" and req.workers > 1:
        hop = stream_bytes(req, w, req.nsamples, req.seqlen)
        total += (req.workers - 1) * transfer_seconds(hop, tp, req.transport)
    return total


def candidate_block_seconds(index: int, w: Workload, req: TimeRequest, tp: Throughput,
                            dense_stats: bool) -> float:
    """One NeuroAL candidate on block ``index``: dense statistics forward (unless shared),
    masks, masked statistics forward."""
    linears, inputs = w.blocks[index], w.input_cols(index)
    tokens = req.search_samples * req.seqlen
    fwd = forward_seconds(linears, w.hidden, tokens, req.seqlen, tp)
    sparse = fwd + stats_seconds(inputs, tokens, False, tp)
    dense = fwd + stats_seconds(inputs, tokens, req.hessian, tp) if dense_stats else 0.0
    return dense + sparse + sum(mask_seconds(r, c, req.hessian, tp) for r, c in linears)


def search_seconds(w: Workload, req: TimeRequest, tp: Throughput) -> float:
    """The NeuroAL search (0 without candidates): pipelined over the slices with a concurrent
    executor, one worker at a time with the local one."""
    if req.candidates == 0:
        return 0.0
    per_block = [candidate_block_seconds(i, w, req, tp, i > 0) for i in range(w.num_blocks)]
    tokens = req.search_samples * req.seqlen
    reference = (forward_seconds(w.blocks[0], w.hidden, tokens, req.seqlen, tp)
                 + stats_seconds(w.input_cols(0), tokens, req.hessian, tp))
    k = req.workers
    if k == 1 or req.executor not in CONCURRENT:
        hops = 0.0 if k == 1 else (k - 1) * transfer_seconds(
            stream_bytes(req, w, req.search_samples, req.seqlen), tp, req.transport)
        return reference + req.candidates * (sum(per_block) + hops)
    slice_s = sum(per_block) * slices(w.num_blocks, k) / w.num_blocks + transfer_seconds(
        stream_bytes(req, w, req.search_samples, req.seqlen), tp, req.transport)
    return reference + (req.candidates + k - 1) * slice_s


def eval_pass_seconds(w: Workload, req: TimeRequest, tp: Throughput) -> float:
    """One perplexity pass: every block and the head. Data mode deals the windows' micro-batches
    to the workers (after every block's weights went out to them); under Ray, in either mode,
    the micro-batch chunks pipeline through the actors' slices instead (the Ray executor keeps
    evaluation pipelined, docs/parallelism.md)."""
    if req.eval_windows == 0:
        return 0.0
    data = req.mode == "data" and req.executor != "ray"
    k = req.workers if data else 1
    tokens = busiest_share(req.eval_windows, k, req.micro_batch) * req.eval_seqlen
    blocks = sum(forward_seconds(b, w.hidden, tokens, req.eval_seqlen, tp) for b in w.blocks)
    head = tokens * (2 * w.vocab * w.hidden / tp.forward_flops + w.vocab / tp.stats_elems)
    if req.workers == 1:
        return blocks + head
    if data:  # every block's weights go out to every worker
        weights = sum(r * c for b in w.blocks for r, c in b) * DTYPE_BYTES[req.dtype]
        return blocks + head + transfer_seconds(weights, tp, req.transport)
    if req.executor == "ray":  # chunks in flight: (chunks + K - 1) times the slowest slice
        chunks = -(-req.eval_windows // req.micro_batch)
        hop = stream_bytes(req, w, min(req.micro_batch, req.eval_windows), req.eval_seqlen)
        stage = (blocks * slices(w.num_blocks, req.workers) / w.num_blocks + head) / chunks \
            + transfer_seconds(hop, tp, req.transport)
        return (chunks + req.workers - 1) * stage
    hop = stream_bytes(req, w, req.eval_windows, req.eval_seqlen)
    return blocks + head + (req.workers - 1) * transfer_seconds(hop, tp, req.transport)


def load_seconds(w: Workload, req: TimeRequest, tp: Throughput) -> float:
    """One load of the model: the busiest worker's slice (every slice, one after the other,
    with the local executor)."""
    total = w.params * DTYPE_BYTES[req.dtype]
    if req.executor in CONCURRENT:
        total *= slices(w.num_blocks, req.workers) / w.num_blocks
    return total / tp.load_bytes


def predict(w: Workload, req: TimeRequest, tp: Throughput) -> dict[str, float]:
    """Predicted seconds per phase (:data:`PHASES`) and ``total``.

    Raises:
        ValueError: A bad setting (every one named).
    """
    errors = req.errors()
    if errors:
        raise ValueError("time request: " + "; ".join(errors))
    runs = 1 + req.compare
    prune = prune_seconds(w, req, tp)
    eval_pass = eval_pass_seconds(w, req, tp)
    out = {
        "load": tp.startup_s + runs * load_seconds(w, req, tp),
        "search": search_seconds(w, req, tp),
        "prune": runs * prune,
        "evaluation": (req.eval_passes + req.compare) * eval_pass,
        "export": (w.params * DTYPE_BYTES[req.dtype] / tp.export_bytes) if req.save_model else 0.0,
    }
    out["total"] = sum(out[p] for p in PHASES)
    return out


# --------------------------------------------------------------------------- measured runs


def phase_of(timing: str) -> str | None:
    """The time-model phase a ``report.json`` timing key belongs to (None: not modelled, e.g.
    zero-shot tasks, or the total)."""
    base = timing.split("[", 1)[0]
    return {"resolve": "load", "data": "load", "load": "load", "calibrate": "load",
            "allocate": "search", "prune": "prune", "eval_dense": "evaluation",
            "eval_sparse": "evaluation", "export": "export"}.get(base)


def measured_phases(timings: Mapping[str, Any]) -> dict[str, float]:
    """A run's ``report["timings"]`` summed into :data:`PHASES` (and ``total`` of those)."""
    out = dict.fromkeys(PHASES, 0.0)
    for key, value in timings.items():
        phase = phase_of(key)
        if phase is not None and isinstance(value, (int, float)):
            out[phase] += float(value)
    out["total"] = sum(out[p] for p in PHASES)
    return out


def relative_error(predicted: float, measured: float) -> float:
    """``predicted / measured - 1`` (0 when both are 0)."""
    if measured == 0:
        return 0.0 if predicted == 0 else math.inf
    return predicted / measured - 1
