"""The pure maths of NeuroAL ("NeuronAl", Cunegatti et al., arXiv 2411.07066; spec neuroal.md).

NeuroAL picks block ratios from a linear ramp over depth and then per-row ratios inside each
layer, both by a grid search minimising the neuron-alignment distance between dense and sparse
input-channel norms. This module holds only the arithmetic of that search (no engine, no I/O):

* the grids (§A6, §A7, option ``include_uniform`` of §B3) and the block ramp (§A6, §A10)

      s_b(lam) = s + 2 lam (b / (L - 1) - 1/2),   b = 0 .. L-1;

* the alignment metric (§A4)

      NA_l = || a^d_l / sum_j a^d_lj - a^s_l / sum_j a^s_lj ||_2 / cols_l,   NA = sum_blocks sum_l NA_l;

* the winner rule (§A8): the first minimum in grid order, compared as float64;
* the row step (§A7) with its uniform fallbacks (a constant per-row vector, as the reference)

      u_r = (delta_r - min delta) / (max delta - min delta),
      s_lr(mu) = clip(s_l - 2 mu (u_r - mean_r u), lo, hi).

Every ratio is float64; tensors stay on the device they came on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from neuroal.allocation.plan import ModelShape
from neuroal.allocation.search import first_minimum  # noqa: F401  (re-exported; the search's rule)
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

BLOCK_GRID: tuple[float, ...] = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10,
                                 0.12, 0.15, 0.20, 0.25)
"""Block-step half-widths lambda in evaluation order (§A6); 0.25 is dropped when s >= 0.8."""

ROW_GRID: tuple[float, ...] = (0.00, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10,
                               0.12, 0.15, 0.20, 0.25)
"""Row-step widths mu in evaluation order (§A7)."""

HIGH_SPARSITY = 0.8
"""From this target on the block grid stops at lambda = 0.20 (§A6)."""


def block_grid(target: float, include_uniform: bool = False) -> tuple[float, ...]:
    """The block-step grid Lambda_B of NeuroAL (arXiv 2411.07066; spec §A6, §B3).

    Args:
        target: Global target sparsity s.
        include_uniform: Put lambda = 0 (the uniform schedule) first (option of §B3; the
            reference never evaluates it).

    Returns:
        14 half-widths for ``target < 0.8``, 13 (without 0.25) otherwise; preceded by 0.0 when
        ``include_uniform``.
    """
    grid = BLOCK_GRID if target < HIGH_SPARSITY else tuple(v for v in BLOCK_GRID if v != 0.25)
    return (0.0, *grid) if include_uniform else grid


def block_ramp(num_blocks: int, target: float, lam: float,
               clip: tuple[float, float] = (0.01, 0.99)) -> list[float]:
    """Candidate block ratios, a linear ramp over depth (arXiv 2411.07066; spec §A6, §A10).

    ``s_b = target + 2 lam (b / (L - 1) - 1/2)`` runs from ``target - lam`` (block 0, pruned
    least) to ``target + lam`` (last block); each value is then clamped into ``clip`` without
    renormalisation. The reference maps only ``s_b <= 0`` to 0.01 and ``s_b >= 1`` to 0.99; with
    the default clip this is the same, except that values in ``(0, 0.01)`` become 0.01 and values
    in ``(0.99, 1)`` become 0.99 here (the reference keeps them), so every ratio lies in ``clip``.

    Args:
        num_blocks: L, the number of blocks (>= 1); L = 1 gives ``[target]``.
        target: Global target sparsity s.
        lam: Half-width lambda of the ramp.
        clip: ``(lo, hi)`` bounds of every ratio.

    Returns:
        L floats, block order.

    Raises:
        ValueError: ``num_blocks < 1``.
    """
    if num_blocks < 1:
        raise ValueError(f"block_ramp needs at least one block, got num_blocks={num_blocks}")
    if num_blocks == 1:
        return [float(target)]
    lo, hi = clip
    last = num_blocks - 1
    ramp = [target + 2.0 * lam * (b / last - 0.5) for b in range(num_blocks)]
    return [float(min(max(s, lo), hi)) for s in ramp]


def alignment(a_dense: torch.Tensor, a_sparse: torch.Tensor) -> float:
    """Neuron-alignment distance NA_l of one linear (arXiv 2411.07066; spec §A4).

    ``|| a_d / sum(a_d) - a_s / sum(a_s) ||_2 / cols``, computed in float64. A vector whose sum
    is exactly 0 (all-zero input norms; the reference would produce NaN) normalises to the zero
    vector: two all-zero inputs give 0.0, one all-zero input gives ``|| a / sum(a) ||_2 / cols``
    of the other.

    Args:
        a_dense: ``(cols,)`` input-channel norms ``sqrt(s_j)`` of the dense pass (usually fp32).
        a_sparse: ``(cols,)`` input-channel norms of the masked pass, same shape.

    Returns:
        NA_l as a Python float (>= 0).

    Raises:
        ValueError: the inputs are not 1-D vectors of the same non-zero length.
    """
    if a_dense.dim() != 1 or a_dense.shape != a_sparse.shape or a_dense.numel() == 0:
        raise ValueError(f"alignment needs two (cols,) vectors of the same length, got "
                         f"{tuple(a_dense.shape)} and {tuple(a_sparse.shape)}")
    p_dense = _l1_normalised(a_dense.to(torch.float64))
    p_sparse = _l1_normalised(a_sparse.to(torch.float64))
    return float(torch.linalg.vector_norm(p_dense - p_sparse)) / a_dense.numel()


def _l1_normalised(values: torch.Tensor) -> torch.Tensor:
    """``values / sum(values)``; the zero vector when the sum is exactly 0."""
    total = values.sum()
    return torch.zeros_like(values) if float(total) == 0.0 else values / total


def total_alignment(per_block: Sequence[Mapping[str, float]], start: float = 0.0) -> float:
    """Score NA of one candidate: the plain float64 sum of every NA_l (arXiv 2411.07066; §A4).

    Summed sequentially in block order, then in each mapping's insertion (module-registration)
    order, so that the same values always give the same bits.

    Args:
        per_block: ``per_block[b][name] = NA_l`` of every linear of every block.
        start: The partial sum of the blocks before ``per_block`` (a slice of the model on
            another worker): ``total_alignment(b, total_alignment(a))`` has the bits of
            ``total_alignment(a + b)``.
    """
    total = float(start)
    for block in per_block:
        for value in block.values():
            total += float(value)
    return total


def crosses(partial: float, best: float, inclusive: bool) -> bool:
    """Whether a candidate whose partial alignment sum is ``partial`` can no longer win against
    a complete score ``best`` (exact early stopping).

    Every NA_l is >= 0 and rounded float addition is monotone, so the full score is >= any
    partial sum. Under the first-minimum rule (§A8) a later candidate must beat ``best``
    strictly: it is stopped when ``partial >= best`` if the best candidate comes earlier in grid
    order (``inclusive``), and only when ``partial > best`` if it comes later.
    """
    return partial >= best if inclusive else partial > best


def row_ratios(layer_ratio: float, delta: torch.Tensor, mu: float,
               clip: tuple[float, float] = (0.01, 0.99), *, label: str = "layer") -> torch.Tensor | None:
    """Per-row ratios of one linear from its consumer's delta (arXiv 2411.07066; spec §A7).

    ``u_r = (delta_r - min delta) / (max delta - min delta)`` and
    ``s_r = clip(layer_ratio - 2 mu (u_r - mean_r u))``: rows whose consumer channel lost more
    input norm (larger dense - sparse) are pruned less. Without clipping the rows average to
    ``layer_ratio`` (all rows have the same length, §A10); ``mu = 0`` gives ``layer_ratio`` in
    every row.

    Args:
        layer_ratio: The layer's ratio s_l from the block step.
        delta: ``(rows,)`` signed ``a_dense - a_sparse`` at the consumer's input, one per row.
        mu: Width of the row step.
        clip: ``(lo, hi)`` bounds of every ratio.
        label: Names the layer in the warning about a degenerate delta.

    Returns:
        float64 ``(rows,)`` on ``delta``'s device, or None (uniform rows) when delta sums to
        exactly 0, or when ``max == min`` with a non-zero sum (logged: the reference divides
        by zero).

    Raises:
        ValueError: ``delta`` is not a non-empty 1-D vector of finite values.
    """
    if delta.dim() != 1 or delta.numel() == 0 or not bool(torch.isfinite(delta).all()):
        raise ValueError(f"{label}: row delta must be a non-empty 1-D vector of finite values, got "
                         f"shape {tuple(delta.shape)}")
    d = delta.to(torch.float64)
    if float(d.sum()) == 0.0:
        return None
    low, high = d.min(), d.max()
    if float(high) == float(low):
        log.warning("%s: row delta is constant (%.6g in every row) with a non-zero sum; using "
                    "uniform rows", label, float(high))
        return None
    u = (d - low) / (high - low)
    return (layer_ratio - 2.0 * mu * (u - u.mean())).clamp(*clip)


def row_plan(layer_ratios: Sequence[Mapping[str, float]], deltas: Sequence[Mapping[str, torch.Tensor]],
             consumers: Mapping[str, str | None], shape: ModelShape, mu: float,
             clip: tuple[float, float] = (0.01, 0.99),
             uniform_layers: frozenset[str] = frozenset(),
             tiles: Mapping[str, int] | None = None) -> list[dict[str, float | torch.Tensor]]:
    """Row-step ratios of every linear for one mu (arXiv 2411.07066; spec §A7, §A9, §B6).

    Linear ``name`` of block b is driven by ``deltas[b][consumers[name]]``, the delta at the input
    of the layer of the same block whose input channels index ``name``'s output rows. It falls
    back to uniform rows (every row gets ``layer_ratios[b][name]``) when: b is the last block; its
    consumer is None or absent (the next block's first layer, whose delta is 0 in faithful mode);
    ``name`` is in ``uniform_layers`` (e.g. the Mistral q/k/v rule, chosen by the caller); the
    delta's length differs from the layer's row count (generalised GQA guard); or
    :func:`row_ratios` returns None (zero-sum or degenerate delta).

    Every entry is a float64 ``(rows,)`` vector, the fallbacks included (a constant vector): the
    reference hands every layer a per-row list in the row step, so every layer of the row-step
    candidates and of the final prune uses the ``neuron`` rule (keep ``floor((1 - s) cols)``
    per row, higher index pruned first among ties; neuroal.md §A3, §A7, §A9). A scalar would
    select the ``row`` rule instead, which prunes one weight per row less whenever ``s cols`` is
    not an integer (e.g. 921 instead of 922 of 1536 on SmolLM2's down_proj at 60 %) and breaks
    ties the other way.

    Args:
        layer_ratios: ``layer_ratios[b][name]``, the block-step ratio of every linear.
        deltas: ``deltas[b][name]``, the ``(cols,)`` delta at every linear's input.
        consumers: Producer name -> consumer name in the same block; None or no entry means
            no consumer inside the block (uniform rows).
        shape: Row and column counts; its registration order orders each returned block.
        mu: Width of the row step.
        clip: ``(lo, hi)`` bounds of every ratio.
        uniform_layers: Names that always keep uniform rows.
        tiles: ``name -> n`` for fused producers (``gate_up_proj``, MHA ``qkv_proj``) whose rows
            are n segments each aligned with the consumer's inputs: the consumer's delta is
            repeated n times, so every segment gets the rows its unfused twin would get.

    Returns:
        One dict per block, ``name -> (rows,) float64 tensor``.

    Raises:
        ValueError: block counts disagree, or a consumer's delta is missing.
    """
    if not len(layer_ratios) == len(deltas) == shape.num_blocks:
        raise ValueError(f"row_plan got {len(layer_ratios)} blocks of ratios and {len(deltas)} of "
                         f"deltas for a model of {shape.num_blocks} blocks; pass one of each per block")
    last = shape.num_blocks - 1
    plan: list[dict[str, float | torch.Tensor]] = []
    for b, layers in enumerate(shape.blocks):
        entries: dict[str, float | torch.Tensor] = {}
        for name, (rows, _cols) in layers.items():
            ratio = float(layer_ratios[b][name])
            consumer = consumers.get(name)
            if b == last or consumer is None or name in uniform_layers:
                entries[name] = uniform_rows(ratio, rows)
                continue
            delta = _delta_of(deltas[b], consumer, b, name)
            if tiles and tiles.get(name, 1) > 1:
                delta = delta.reshape(-1).repeat(tiles[name])  # (n * cols,)
            entries[name] = _row_entry(ratio, delta, rows, mu, clip, f"block {b} {name}")
        plan.append(entries)
    return plan


def uniform_rows(ratio: float, rows: int) -> torch.Tensor:
    """The row-step entry of a layer that falls back to uniform rows: ``ratio`` in every row,
    float64 ``(rows,)`` (a per-row list, as in the reference; see :func:`row_plan`)."""
    return torch.full((rows,), float(ratio), dtype=torch.float64)


def check_row_map(shape: ModelShape) -> None:
    """Check, before any search, that the row step's map fits the model (spec §A7).

    Every producer and consumer of ``shape.consumers`` and every fused producer of
    ``shape.row_tiles`` must be a linear of every block, so that a row step can never fail after
    a long block step for want of a delta.

    Raises:
        ValueError: naming the block, the missing linear and the block's linears.
    """
    pairs = [*shape.consumers.items(), *((p, p) for p in shape.row_tiles)]
    for b, layers in enumerate(shape.blocks):
        for producer, consumer in pairs:
            for name in (producer, consumer):
                if consumer is not None and name not in layers:
                    raise ValueError(
                        f"block {b}: the row step maps {producer!r} -> {consumer!r} but the "
                        f"block has no linear {name!r} (its linears: {', '.join(layers)}); the "
                        "architecture's row map does not fit this model")


def _delta_of(block_deltas: Mapping[str, torch.Tensor], consumer: str, b: int, name: str) -> torch.Tensor:
    """``block_deltas[consumer]``, or an error naming the producer and the consumer."""
    if consumer not in block_deltas:
        raise ValueError(f"block {b}: no delta for {consumer!r}, the consumer of {name!r}; deltas "
                         f"hold {', '.join(block_deltas) or 'nothing'}")
    return block_deltas[consumer]


def _row_entry(ratio: float, delta: torch.Tensor, rows: int, mu: float, clip: tuple[float, float],
               label: str) -> torch.Tensor:
    """Row vector of one linear; uniform rows under the GQA guard or a degenerate delta."""
    if delta.numel() != rows:
        return uniform_rows(ratio, rows)
    vector = row_ratios(ratio, delta.reshape(-1), mu, clip, label=label)
    return uniform_rows(ratio, rows) if vector is None else vector.to(torch.float64)

