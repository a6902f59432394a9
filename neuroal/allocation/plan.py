"""The ``SparsityPlan`` contract every allocation policy returns (allocation.md §1)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

Ratio = float | torch.Tensor


@dataclass(frozen=True)
class ModelShape:
    """Shapes of the prunable linears: ``blocks[b][name] = (rows, cols)`` (registration order).

    ``consumers`` (producer -> consumer linear of the same block), ``uniform_rows``, ``heads``
    and ``kv_heads`` come from the model adapter for policies that allocate per output row;
    ``row_tiles[p] = n`` marks a fused producer whose rows are n segments, each aligned with its
    consumer's input channels (e.g. ``gate_up_proj``: n = 2).
    """

    blocks: tuple[Mapping[str, tuple[int, int]], ...]
    consumers: Mapping[str, str] = field(default_factory=dict)
    uniform_rows: frozenset[str] = frozenset()
    heads: int = 0
    kv_heads: int = 0
    row_tiles: Mapping[str, int] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def numel(self, block: int, name: str) -> int:
        rows, cols = self.blocks[block][name]
        return rows * cols

    def total_numel(self) -> int:
        return sum(r * c for blk in self.blocks for r, c in blk.values())


class PlanError(ValueError):
    """A plan violates the invariants of allocation.md §1.2."""


@dataclass
class SparsityPlan:
    """Per-block, per-linear (and optionally per-row) sparsity ratios.

    Attributes:
        target: Global target S in (0, 1).
        pattern: ``unstructured`` or ``N:M`` (N kept).
        ratios: ``ratios[b][name]``: float, or float64 tensor of shape ``(rows,)``.
        policy: Policy name and resolved parameters.
        trail: Optional provenance (search candidates, per-block metrics).
        warnings: Deviations the policy knowingly accepted (e.g. clipping).
    """

    target: float
    pattern: str
    ratios: list[dict[str, Ratio]]
    policy: dict[str, Any] = field(default_factory=dict)
    trail: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def granularity(self) -> str:
        """``row`` if any entry is a vector, ``block`` if all linears of each block agree."""
        if any(isinstance(r, torch.Tensor) for blk in self.ratios for r in blk.values()):
            return "row"
        same = all(len({float(v) for v in blk.values()}) <= 1 for blk in self.ratios)
        return "block" if same else "linear"

    def block(self, b: int) -> dict[str, Ratio]:
        """The entries of block ``b`` (what a worker reads)."""
        return self.ratios[b]

    def planned_pruned(self, shape: ModelShape, b: int, name: str) -> float:
        """Planned pruned weights of one linear: sum over rows of cols * s_r."""
        rows, cols = shape.blocks[b][name]
        r = self.ratios[b][name]
        if isinstance(r, torch.Tensor):
            return float(r.to(torch.float64).sum()) * cols
        return float(r) * rows * cols

    def planned_global(self, shape: ModelShape) -> float:
        """Parameter-weighted mean sparsity of the plan (allocation.md §1.1)."""
        pruned = math.fsum(self.planned_pruned(shape, b, n)
                           for b in range(shape.num_blocks) for n in shape.blocks[b])
        return pruned / shape.total_numel()

    def block_ratio(self, shape: ModelShape, b: int) -> float:
        """Parameter-weighted mean ratio of block ``b``."""
        pruned = math.fsum(self.planned_pruned(shape, b, n) for n in shape.blocks[b])
        return pruned / sum(r * c for r, c in shape.blocks[b].values())

    # ------------------------------------------------------------------ validation

    def validate(self, shape: ModelShape, clip: tuple[float, float] = (0.01, 0.99),
                 strict: bool = False, tol: float = 1e-6) -> None:
        """Check allocation.md §1.2; raise PlanError listing every violation."""
        errors = self._check_keys(shape) + self._check_values(shape, clip)
        if not errors:
            glob = self.planned_global(shape)
            if abs(glob - self.target) > tol:
                msg = (f"planned global sparsity {glob:.8f} differs from the target "
                       f"{self.target:.8f} by more than {tol:g}")
                if strict or not self.warnings:
                    errors.append(msg)
        if errors:
            raise PlanError("invalid sparsity plan:\n" + "\n".join(f"  - {e}" for e in errors))

    def _check_keys(self, shape: ModelShape) -> list[str]:
        if len(self.ratios) != shape.num_blocks:
            return [f"plan has {len(self.ratios)} blocks, the model has {shape.num_blocks}"]
        errors = []
        for b, (entries, layers) in enumerate(zip(self.ratios, shape.blocks, strict=True)):
            missing = sorted(set(layers) - set(entries))
            extra = sorted(set(entries) - set(layers))
            if missing:
                errors.append(f"block {b}: no ratio for {', '.join(missing)}")
            if extra:
                errors.append(f"block {b}: unknown linears {', '.join(extra)}")
        return errors

    def _check_values(self, shape: ModelShape, clip: tuple[float, float]) -> list[str]:
        lo, hi = clip
        errors = []
        for b, entries in enumerate(self.ratios):
            for name, r in entries.items():
                values = torch.as_tensor(r, dtype=torch.float64).reshape(-1)
                inside = bool(values.min() >= lo - 1e-12) and bool(values.max() <= hi + 1e-12)
                if isinstance(r, torch.Tensor) and r.shape != (shape.blocks[b][name][0],):
                    errors.append(f"block {b} {name}: per-row vector of shape {tuple(r.shape)}, "
                                  f"expected ({shape.blocks[b][name][0]},)")
                elif not torch.isfinite(values).all() or not inside:
                    errors.append(f"block {b} {name}: ratio outside [{lo}, {hi}] "
                                  f"(min {float(values.min()):.4f}, max {float(values.max()):.4f})")
        return errors

    # ------------------------------------------------------------------ serialisation

    def to_json(self) -> dict[str, Any]:
        """Everything except per-row vectors (those go to ``plan.safetensors``)."""
        return {
            "target": self.target,
            "pattern": self.pattern,
            "granularity": self.granularity,
            "policy": self.policy,
            "warnings": self.warnings,
            "trail": self.trail,
            "ratios": [{n: (None if isinstance(r, torch.Tensor) else float(r))
                        for n, r in blk.items()} for blk in self.ratios],
        }

    def save(self, directory: str | Path) -> None:
        """Write ``plan.json`` (+ ``plan.safetensors`` for per-row vectors)."""
        directory = Path(directory)
        (directory / "plan.json").write_text(json.dumps(self.to_json(), indent=1))
        vectors = {f"blocks.{b}.{n}": r.to(torch.float64).contiguous()
                   for b, blk in enumerate(self.ratios) for n, r in blk.items()
                   if isinstance(r, torch.Tensor)}
        if vectors:
            save_file(vectors, str(directory / "plan.safetensors"))

    @classmethod
    def load(cls, directory: str | Path) -> SparsityPlan:
        """Read a plan written by :meth:`save` (validate it against the model afterwards)."""
        directory = Path(directory)
        data = json.loads((directory / "plan.json").read_text())
        vec_path = directory / "plan.safetensors"
        vectors = load_file(str(vec_path)) if vec_path.exists() else {}
        ratios = [{n: (vectors[f"blocks.{b}.{n}"] if r is None else float(r)) for n, r in blk.items()}
                  for b, blk in enumerate(data["ratios"])]
        return cls(target=data["target"], pattern=data["pattern"], ratios=ratios,
                   policy=data.get("policy", {}), trail=data.get("trail", {}),
                   warnings=data.get("warnings", []))
