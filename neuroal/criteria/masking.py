"""Scores to pruning masks: threshold selection, comparison groups and N:M (criteria.md §2).

Every function here is a pure tensor function. Scores have shape ``(rows, cols)`` in
``torch.nn.Linear`` orientation; masks are ``torch.bool`` of the same shape with ``True`` =
pruned. Counts are computed in float64 with truncation, as the reference repositories do.

Selection avoids a full sort: the k-th smallest score of each row is found with
``torch.kthvalue`` and ties at that value are resolved by a running count along the index
order, which reproduces a stable ascending sort bit for bit (the tests compare every rule with
independent plain-Python sorts, ``tests/reference_masks.py``).

Tie rules:
    ``low_index``: among equal scores the lower index is pruned first (stable ascending sort;
        Wanda, magnitude, RIA, SparseGPT).
    ``high_index``: the higher index is pruned first (NeuroAL's ``neuron`` masks, which keep
        the first entries of a stable *descending* sort; neuroal.md §A3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from neuroal.criteria.base import LayerTarget

TIE_RULES = ("low_index", "high_index")
SPARSEGPT_BLOCK = 128
# Above this many distinct per-row counts one value sort beats a kthvalue call per count.
_MAX_DISTINCT_KTH = 64


class NonFiniteScoresError(ValueError):
    """Scores (or statistics) contain NaN or Inf; the caller adds the layer name."""


def check_finite(values: torch.Tensor, what: str = "scores") -> None:
    """Raise :class:`NonFiniteScoresError` when ``values`` holds NaN or Inf."""
    if values.numel() == 0:
        return
    low, high = torch.aminmax(values.reshape(-1))  # NaN propagates; one pass, no temporaries
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        bad = int((~torch.isfinite(values)).sum())
        raise NonFiniteScoresError(
            f"{what} contain {bad} NaN/Inf value(s) out of {values.numel()}; check the "
            "calibration statistics (all-zero or overflowing inputs) and the weight dtype"
        )


def _check_2d(scores: torch.Tensor) -> tuple[int, int]:
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (rows, cols), got shape {tuple(scores.shape)}")
    return scores.shape[0], scores.shape[1]


def _check_tie(tie: str) -> None:
    if tie not in TIE_RULES:
        raise ValueError(f"unknown tie rule {tie!r}; expected one of {', '.join(TIE_RULES)}")


def _check_ratio(ratio: float) -> float:
    value = float(ratio)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"sparsity {value!r} is outside [0, 1]; pass a fraction of weights")
    return value


def _counts(k: int | torch.Tensor, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Per-row prune counts as an int64 tensor of shape ``(rows,)``, validated."""
    if isinstance(k, torch.Tensor):
        if k.dtype.is_floating_point or k.dtype == torch.bool:
            raise ValueError(f"k must be an integer tensor, got dtype {k.dtype}")
        counts = k.to(device=device, dtype=torch.int64).reshape(-1)
        if counts.numel() == 1:
            counts = counts.expand(rows)
        if counts.numel() != rows:
            raise ValueError(f"k has {counts.numel()} entries; expected one per row ({rows})")
    else:
        counts = torch.full((rows,), int(k), dtype=torch.int64, device=device)
    if rows and (int(counts.min()) < 0 or int(counts.max()) > cols):
        raise ValueError(
            f"prune counts must lie in [0, {cols}], got [{int(counts.min())}, {int(counts.max())}]"
        )
    return counts


def sorted_rows(scores: torch.Tensor) -> torch.Tensor:
    """Ascending per-row sorted values of ``scores`` (rows, cols), for reuse across calls.

    Candidates that share identical scores but differ in per-row counts (NeuroAL's row step,
    neuroal.md §B5) can sort once and pass the result as ``sorted_values`` to
    :func:`select_lowest`.
    """
    _check_2d(scores)
    return torch.sort(scores, dim=1).values


def _kth_by_distinct(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """k-th smallest value per row with one ``kthvalue`` call per distinct count."""
    out = torch.empty(scores.shape[0], dtype=scores.dtype, device=scores.device)
    for value in torch.unique(counts).tolist():
        rows = (counts == value).nonzero().squeeze(1)
        out[rows] = torch.kthvalue(scores.index_select(0, rows), value, dim=1).values
    return out


def kth_smallest(
    scores: torch.Tensor, counts: torch.Tensor, sorted_values: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row k-th smallest value (1-based ``counts``, shape ``(rows,)``) of ``(rows, cols)``.

    Rows with a zero count get ``-inf`` so that nothing compares below or equal to it.
    Returns a ``(rows, 1)`` tensor of the scores' dtype.
    """
    positive = counts > 0
    safe = counts.clamp(min=1)
    if sorted_values is not None and sorted_values.shape != scores.shape:
        raise ValueError(
            f"sorted_values has shape {tuple(sorted_values.shape)}; expected "
            f"{tuple(scores.shape)} (sorted_rows of the same scores)"
        )
    if sorted_values is not None:
        values = sorted_values.gather(1, (safe - 1).unsqueeze(1)).squeeze(1)
    elif bool((counts == counts[0]).all()):
        values = torch.kthvalue(scores, int(safe[0]), dim=1).values
    elif torch.unique(safe).numel() <= _MAX_DISTINCT_KTH:
        values = _kth_by_distinct(scores, safe)
    else:
        values = torch.sort(scores, dim=1).values.gather(1, (safe - 1).unsqueeze(1)).squeeze(1)
    minus_inf = torch.full_like(values, float("-inf"))
    return torch.where(positive, values, minus_inf).unsqueeze(1)


def _row_counts(mask: torch.Tensor) -> torch.Tensor:
    """Number of true entries per row of a ``(rows, cols)`` bool mask, as int64 ``(rows,)``."""
    dtype = torch.int32 if mask.shape[1] < 2**31 else torch.int64
    return mask.sum(dim=1, dtype=dtype).to(torch.int64)


def _select_ties(ties: torch.Tensor, need: torch.Tensor, tie: str) -> torch.Tensor:
    """Keep, per row, the first ``need[r]`` true entries of ``ties`` in the tie rule's order.

    Only rows holding more tied entries than needed are counted, so continuous scores (one
    tie per row) cost a single reduction.
    """
    selected = ties.clone()
    partial = (_row_counts(ties) > need).nonzero().squeeze(1)
    if partial.numel() == 0:
        return selected
    sub = ties.index_select(0, partial)  # (partial rows, cols)
    if tie == "high_index":
        sub = sub.flip(1)
    rank_dtype = torch.int32 if sub.numel() < 2**31 else torch.int64
    rank = sub.cumsum(dim=1, dtype=rank_dtype)
    chosen = sub & (rank <= need.index_select(0, partial).unsqueeze(1).to(rank_dtype))
    if tie == "high_index":
        chosen = chosen.flip(1)
    selected[partial] = chosen
    return selected


def select_lowest(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    tie: str = "low_index",
    sorted_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune exactly ``k[r]`` lowest scores in every row by threshold selection (§2).

    Args:
        scores: ``(rows, cols)`` finite scores.
        k: Prune count, an int for every row or an integer tensor of shape ``(rows,)``.
        tie: ``low_index`` or ``high_index`` (module docstring).
        sorted_values: Optional :func:`sorted_rows` output of the same scores, reused instead
            of a selection per call.

    Returns:
        ``(rows, cols)`` bool mask, ``True`` = pruned, identical to the first ``k[r]``
        entries of a stable sort of each row (ascending for ``low_index``; for
        ``high_index``, everything but the first ``cols - k[r]`` of a stable descending sort).

    Raises:
        NonFiniteScoresError: If a score is NaN or Inf.
        ValueError: On a bad shape, tie rule or count.
    """
    rows, cols = _check_2d(scores)
    _check_tie(tie)
    check_finite(scores)
    counts = _counts(k, rows, cols, scores.device)
    if rows == 0 or cols == 0 or int(counts.max()) == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = kth_smallest(scores, counts, sorted_values)  # (rows, 1)
    less = scores < threshold
    need = counts - _row_counts(less)
    return less | _select_ties(scores == threshold, need, tie)


def select_inclusive(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """The references' inclusive threshold: prune every score <= the value at sorted position k.

    Position ``k`` is 0-based, so at least ``k + 1`` weights (plus ties) go; ``k >= cols``
    prunes the whole row. This is ``mask.exact_count: false`` (criteria.md §2).

    Args:
        scores: ``(rows, cols)`` finite scores.
        k: Sorted position per row, an int or an integer tensor of shape ``(rows,)``.

    Returns:
        ``(rows, cols)`` bool mask, ``True`` = pruned.
    """
    rows, cols = _check_2d(scores)
    check_finite(scores)
    counts = _counts(k, rows, cols, scores.device)
    if rows == 0 or cols == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = kth_smallest(scores, (counts + 1).clamp(max=cols))  # (rows, 1)
    return (scores <= threshold) | (counts >= cols).unsqueeze(1)


def _select(scores: torch.Tensor, k: int, exact_count: bool) -> torch.Tensor:
    chooser = select_lowest if exact_count else select_inclusive
    return chooser(scores, k)


def row_mask(scores: torch.Tensor, sparsity: float, exact_count: bool = True) -> torch.Tensor:
    """Per-row group: prune ``floor(s * cols)`` lowest scores of every row (lower index first).

    Args:
        scores: ``(rows, cols)`` scores.
        sparsity: Fraction s in [0, 1]; s = 0 prunes nothing in either counting mode.
        exact_count: Exact count (default) or the inclusive threshold of the references.

    Returns:
        ``(rows, cols)`` bool mask, ``True`` = pruned.
    """
    ratio = _check_ratio(sparsity)
    _, cols = _check_2d(scores)
    if ratio == 0.0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return _select(scores, int(ratio * cols), exact_count)


def matrix_mask(scores: torch.Tensor, sparsity: float, exact_count: bool = True) -> torch.Tensor:
    """Whole-matrix group: prune ``floor(s * numel)`` lowest scores, row-major index order.

    Args:
        scores: ``(rows, cols)`` scores.
        sparsity: Fraction s in [0, 1]; s = 0 prunes nothing in either counting mode.
        exact_count: Exact count (default) or the inclusive threshold of the references.

    Returns:
        ``(rows, cols)`` bool mask, ``True`` = pruned.
    """
    ratio = _check_ratio(sparsity)
    _check_2d(scores)
    if ratio == 0.0:
        return torch.zeros_like(scores, dtype=torch.bool)
    flat = scores.reshape(1, -1)  # (1, rows * cols), row-major
    return _select(flat, int(ratio * flat.shape[1]), exact_count).reshape(scores.shape)


def block_mask(
    scores: torch.Tensor,
    sparsity: float,
    exact_count: bool = True,
    block: int = SPARSEGPT_BLOCK,
) -> torch.Tensor:
    """Column-block group: in each ``block`` consecutive columns x all rows, prune
    ``floor(s * rows * width)`` lowest scores (row-major order inside the block).

    This is SparseGPT's group applied to static scores; the last block may be narrower.

    Returns:
        ``(rows, cols)`` bool mask, ``True`` = pruned.
    """
    _check_2d(scores)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for start in range(0, scores.shape[1], block):
        part = scores[:, start : start + block]
        mask[:, start : start + block] = matrix_mask(part, sparsity, exact_count)
    return mask


def row_ratio_mask(
    scores: torch.Tensor, ratios: torch.Tensor, tie: str = "high_index"
) -> torch.Tensor:
    """Per-row ratios (NeuroAL ``neuron``): prune ``cols - floor((1 - s_r) * cols)`` in row r.

    Args:
        scores: ``(rows, cols)`` scores.
        ratios: ``(rows,)`` sparsities in [0, 1]; the keep count is computed in float64.
        tie: Tie rule; ``high_index`` (default) is NeuroAL's (neuroal.md §A3).

    Returns:
        ``(rows, cols)`` bool mask, ``True`` = pruned.
    """
    rows, cols = _check_2d(scores)
    ratios64 = ratios.detach().to(device=scores.device, dtype=torch.float64).reshape(-1)
    if ratios64.numel() != rows:
        raise ValueError(f"got {ratios64.numel()} row ratios for a matrix with {rows} rows")
    if rows and not bool(((ratios64 >= 0) & (ratios64 <= 1)).all()):
        raise ValueError("row ratios must lie in [0, 1]; renormalise or clip the plan")
    keep = torch.floor((1.0 - ratios64) * cols).to(torch.int64)
    return select_lowest(scores, cols - keep, tie=tie)


def _nm_groups(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = _check_2d(scores)
    if m <= 0 or not 0 <= n <= m:
        raise ValueError(f"invalid N:M pattern {n}:{m}; need 0 <= N <= M and M >= 1")
    if cols % m:
        raise ValueError(
            f"N:M needs cols divisible by M, but cols={cols} and M={m}; use another pattern "
            "or exclude this layer"
        )
    return scores.reshape(rows * (cols // m), m)  # (rows * groups, m)


def _stable_ranks(groups: torch.Tensor) -> torch.Tensor:
    """Position of each entry in a stable ascending sort of its group, for ``(m, G)`` input.

    One comparison per pair of positions (``m (m - 1) / 2`` vector operations) instead of a
    sort or selection per tiny group. Returns ``(m, G)`` ranks in ``[0, m)``.
    """
    m = groups.shape[0]
    rank_dtype = torch.uint8 if m <= 255 else torch.int32
    ranks = torch.zeros(groups.shape, dtype=rank_dtype, device=groups.device)
    for i in range(m):
        for j in range(i):
            before = groups[j] <= groups[i]  # j < i: an equal j sorts first
            ranks[i] += before
            ranks[j] += ~before
    return ranks


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in every group of ``m`` consecutive columns of a row keep ``n``, prune ``m - n``.

    Among equal scores the lower index is pruned first (stable ascending sort ranks < m - n).

    Args:
        scores: ``(rows, cols)`` scores, ``cols % m == 0``.
        n: Weights kept per group.
        m: Group size.

    Returns:
        ``(rows, cols)`` bool mask with exactly ``m - n`` pruned entries per group.
    """
    groups = _nm_groups(scores, n, m)  # (rows * cols / m, m)
    check_finite(groups)
    ranks = _stable_ranks(groups.T.contiguous())  # (m, rows * cols / m)
    return (ranks < (m - n)).T.reshape(scores.shape)


def _target_ratio(target: LayerTarget) -> float:
    ratio = target.ratio
    if isinstance(ratio, torch.Tensor):
        if ratio.numel() != 1:
            raise ValueError(
                f"group {target.group!r} needs one ratio per layer, got a tensor of shape "
                f"{tuple(ratio.shape)}"
            )
    return float(ratio)


def _rule_row(scores: torch.Tensor, target: LayerTarget) -> torch.Tensor:
    return row_mask(scores, _target_ratio(target), target.exact_count)


def _rule_matrix(scores: torch.Tensor, target: LayerTarget) -> torch.Tensor:
    return matrix_mask(scores, _target_ratio(target), target.exact_count)


def _rule_block(scores: torch.Tensor, target: LayerTarget) -> torch.Tensor:
    return block_mask(scores, _target_ratio(target), target.exact_count)


def _rule_row_ratios(scores: torch.Tensor, target: LayerTarget) -> torch.Tensor:
    assert isinstance(target.ratio, torch.Tensor)
    return row_ratio_mask(scores, target.ratio)


def _rule_nm(scores: torch.Tensor, target: LayerTarget) -> torch.Tensor:
    assert target.nm is not None
    return nm_mask(scores, target.nm.n, target.nm.m)


MASK_RULES: dict[str, Callable[[torch.Tensor, LayerTarget], torch.Tensor]] = {
    "row": _rule_row,
    "matrix": _rule_matrix,
    "block128": _rule_block,
    "row_ratios": _rule_row_ratios,
    "nm": _rule_nm,
}
GROUPS = frozenset({"row", "matrix", "block128"})


def rule_name(target: LayerTarget, default_group: str) -> str:
    """The :data:`MASK_RULES` key for ``target``: N:M, per-row ratios, or its group."""
    per_row = isinstance(target.ratio, torch.Tensor) and target.ratio.ndim > 0
    if target.nm is not None and per_row:
        raise ValueError("N:M sparsity does not combine with per-row ratios (allocation.md §5)")
    if target.nm is not None:
        return "nm"
    return "row_ratios" if per_row else (target.group or default_group)


def build_mask(scores: torch.Tensor, target: LayerTarget, default_group: str) -> torch.Tensor:
    """Build the pruning mask of one linear from its scores and target.

    Args:
        scores: ``(rows, cols)`` scores, lowest pruned first.
        target: Ratio (scalar or ``(rows,)`` tensor), N:M pattern, group and counting mode.
        default_group: The criterion's group when ``target.group`` is ``None``.

    Returns:
        ``(rows, cols)`` bool mask, ``True`` = pruned.
    """
    name = rule_name(target, default_group)
    if name not in MASK_RULES:
        raise ValueError(f"unknown comparison group {name!r}; available: {sorted(GROUPS)}")
    return MASK_RULES[name](scores, target)
