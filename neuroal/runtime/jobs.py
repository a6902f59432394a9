"""Plain job, spec and report types shared by the pipeline, the engine and the policies.

Leaf module (no higher neuroal import; ``ModelSource`` is named for type checkers only): the
executors, the worker, the allocation policies and the resume state all pass these values, so
they live below every one of them. ``neuroal.engine.worker`` and ``neuroal.criteria.base``
re-export them under their historical names.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: no torch (this module is imported by the light schema)
    import torch

    from neuroal.models.loading import ModelSource

# Names of the calibration statistics a criterion may need (criteria.md §1.2).
STAT_SQ_NORM = "sq_norm"
STAT_HESSIAN = "hessian"
STAT_MEAN = "mean"
STAT_VAR = "var"
STAT_OUT_SQ_NORM = "out_sq_norm"
STAT_SQ_NORM_WINDOWED = "sq_norm_windowed"
INPUT_STATS = (STAT_SQ_NORM, STAT_HESSIAN, STAT_MEAN, STAT_VAR, STAT_SQ_NORM_WINDOWED)



@dataclass(frozen=True)
class NMPattern:
    """N:M sparsity: ``n`` weights *kept* in every group of ``m`` consecutive input weights."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build itself (picklable, for remote construction)."""

    source: ModelSource
    start: int
    stop: int
    num_blocks: int
    device: str
    dtype: str
    micro_batch: int
    offload_activations: bool = False
    trust_remote_code: bool = False
    rank: int = 0
    onload: str = "device"  # where blocks live between uses: device, host or disk (onload.py)
    prefetch: bool = True  # fetch the next block while one is in use (onload host / disk)
    targets: tuple[str, ...] = ()  # layer selection (neuroal.models.selection): pruned linears
    ignore: tuple[str, ...] = ()
    spill_dir: str | None = None  # onload disk's spill folder (<output>.neuroal-tmp/onload)


@dataclass(frozen=True)
class PruneJob:
    """How to prune: criterion, its options and the mask rule (plain values from the config).

    ``refine`` lists block-wise mask refiners (``neuroal.recovery.REFINERS``, e.g. DSnoT) with
    their resolved options, applied in order to each linear they target between the criterion's
    mask and the zeroing. ``reconstruct`` holds the resolved options of ``perp-reconstruct``
    (:class:`~neuroal.recovery.perp.ReconstructOptions` fields) or None: each block is then
    fitted to the dense block's outputs after pruning (recovery.md §3.6).
    """

    criterion: str
    options: Mapping[str, Any] = field(default_factory=dict)
    nm: NMPattern | None = None
    group: str | None = None
    exact_count: bool = True
    refine: tuple[tuple[str, Mapping[str, Any]], ...] = ()  # (refiner name, resolved options)
    reconstruct: Mapping[str, Any] | None = None  # perp-reconstruct's resolved options
    state_dir: str | None = None  # resume state (neuroal.outputs.checkpoint): finished blocks are replayed


@dataclass(frozen=True)
class CandidateJob:
    """How a search candidate is realised: criterion, options, comparison group and counting.

    ``group`` is ``row`` for every score criterion inside NeuroAL (neuroal.md §A3); per-row
    ratio vectors select NeuroAL's ``neuron`` masks automatically. ``exact_count`` is the run's
    ``mask.exact_count``, so candidates are masked as the final prune masks. ``alignment_stat``
    is the statistic whose square root is the alignment's input norm: ``sq_norm``, or for
    SparseGPT in faithful mode ``sq_norm_windowed`` (the reference's wrapper weights the search
    windows by ``1/k``; neuroal.md §A11).
    """

    criterion: str
    options: Mapping[str, Any] = field(default_factory=dict)
    group: str | None = "row"
    exact_count: bool = True
    alignment_stat: str = STAT_SQ_NORM


@dataclass
class BlockAlignment:
    """Per-linear neuron-alignment terms of one block (neuroal.md §A4-A5).

    ``na[name]``: float64 NA_l; ``delta[name]``: ``a_dense - a_sparse`` of shape ``(cols,)``.
    """

    na: dict[str, float]
    delta: dict[str, torch.Tensor]


@dataclass
class LayerReport:
    """Per-linear outcome of the final prune."""

    name: str
    target: float
    pruned: int
    zeros: int
    numel: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockReport:
    """Per-block outcome: its linears (execution order), the wall time and block-level facts
    (``info["perp-reconstruct"]``: :class:`~neuroal.recovery.perp.ReconstructInfo` as a dict)."""

    index: int
    layers: list[LayerReport]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> float:
        """Parameter-weighted target of the pruned linears (0 for a block kept dense by the
        layer selection)."""
        numel = sum(r.numel for r in self.layers)
        return math.fsum(r.target * r.numel for r in self.layers) / numel if numel else 0.0

    @property
    def achieved(self) -> float:
        numel = sum(r.numel for r in self.layers)
        return sum(r.zeros for r in self.layers) / numel if numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (resume state)."""
        return json.loads(json.dumps(asdict(self), default=_jsonable))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockReport:
        return cls(data["index"], [LayerReport(**r) for r in data["layers"]], data["seconds"],
                   dict(data.get("info") or {}))


def _jsonable(value: Any) -> Any:
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
