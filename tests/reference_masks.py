"""Independent reference masks for the tests (criteria.md §2, neuroal.md §A3).

Plain Python: every row is a list of floats, ordered with ``sorted`` on ``(value, index)``
keys, and counts are computed with ``math.floor`` / ``int`` on Python floats. Nothing here
calls ``neuroal``, so the library's threshold selection is checked against a definition it
does not share. Masks are ``torch.bool`` with ``True`` = pruned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _rows(scores: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in scores.tolist()]


def _mask(pruned: list[set[int]], cols: int) -> torch.Tensor:
    return torch.tensor([[j in row for j in range(cols)] for row in pruned], dtype=torch.bool)


def _counts(k: int | Sequence[int] | torch.Tensor, rows: int) -> list[int]:
    if isinstance(k, torch.Tensor):
        k = k.reshape(-1).tolist()
    return [int(k)] * rows if isinstance(k, int) else [int(v) for v in k]


def lowest(row: list[float], count: int, tie: str) -> set[int]:
    """Indices of the ``count`` lowest values: ``low_index`` prunes the lower index first among
    equal values (stable ascending sort); ``high_index`` keeps the ``len - count`` highest with
    the lower index first (stable descending sort) and prunes the rest."""
    cols = len(row)
    if tie == "low_index":
        return set(sorted(range(cols), key=lambda j: (row[j], j))[:count])
    keep = sorted(range(cols), key=lambda j: (-row[j], j))[:cols - count]
    return set(range(cols)) - set(keep)


def select_lowest(scores: torch.Tensor, k: int | Sequence[int] | torch.Tensor,
                  tie: str = "low_index") -> torch.Tensor:
    """Prune ``k[r]`` lowest scores in row r with the tie rule ``tie``."""
    rows = _rows(scores)
    counts = _counts(k, len(rows))
    return _mask([lowest(row, c, tie) for row, c in zip(rows, counts, strict=True)],
                 scores.shape[1])


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``row`` rule: prune ``int(s * cols)`` per row, lower index first."""
    return select_lowest(scores, int(float(sparsity) * scores.shape[1]))


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Whole matrix: prune ``int(s * numel)`` lowest, lower row-major index first."""
    flat = scores.reshape(1, -1)
    return select_lowest(flat, int(float(sparsity) * flat.shape[1])).reshape(scores.shape)


def inclusive(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The references' inclusive threshold: prune every value <= the k-th (0-based) sorted value
    of its row; ``k >= cols`` prunes the whole row."""
    out = []
    for row in _rows(scores):
        threshold = sorted(row)[k] if k < len(row) else math.inf
        out.append({j for j, v in enumerate(row) if v <= threshold})
    return _mask(out, scores.shape[1])


def row_ratio_mask(scores: torch.Tensor, ratios: Sequence[float] | torch.Tensor,
                   tie: str = "high_index") -> torch.Tensor:
    """NeuroAL ``neuron`` rule: keep ``floor((1 - s_r) cols)`` per row (Python float maths)."""
    cols = scores.shape[1]
    values = ratios.tolist() if isinstance(ratios, torch.Tensor) else list(ratios)
    counts = [cols - math.floor((1.0 - float(s)) * cols) for s in values]
    return select_lowest(scores, counts, tie)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in every group of ``m`` consecutive columns prune the ``m - n`` lowest, lower index
    first."""
    out = []
    for row in _rows(scores):
        pruned: set[int] = set()
        for start in range(0, len(row), m):
            group = row[start:start + m]
            pruned |= {start + j for j in lowest(group, m - n, "low_index")}
        out.append(pruned)
    return _mask(out, scores.shape[1])
