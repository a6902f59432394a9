"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, "SparseGPT:
Massive Language Models Can Be Accurately Pruned in One-Shot", arXiv 2301.00774;
criteria.md §6).

With ``H = (2/N) sum x x^T`` (cols x cols) and ``U`` the upper Cholesky factor of the damped
``H^-1``, columns are swept left to right in blocks of 128. A block's unstructured mask prunes
the lowest ``w^2 / U_jj^2`` over the whole block (all rows) on the already compensated weights;
N:M picks the ``M - N`` lowest per row and group when the sweep reaches it. Each pruned column's
error ``(w - q) / U_jj`` is pushed onto the columns to its right (immediately inside the block,
lazily for later blocks). Everything runs in fp32 on the weight's device with TF32 off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from neuroal.criteria.base import (
    STAT_HESSIAN,
    LayerPruneResult,
    LayerStats,
    LayerTarget,
    NMPattern,
)
from neuroal.criteria.masking import build_mask, check_finite, matrix_mask, nm_mask
from neuroal.criteria.scored import frozen, merged_options
from neuroal.criteria.wanda import wanda_score

logger = logging.getLogger(__name__)

DAMP_LADDER = (0.01, 0.1, 1.0)
FAILURE_MODES = ("raise", "no_update")


class CholeskyFailureError(RuntimeError):
    """The damped Hessian stayed non positive-definite at every dampening of the ladder."""


@contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """Full fp32 matmuls (TF32 off) for the duration of the block; restores the setting."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def damp_ladder(percdamp: float) -> tuple[float, ...]:
    """Dampening values to try: ``percdamp``, then the larger of 0.1 and 1.0 (§6 ladder)."""
    return (percdamp, *(value for value in DAMP_LADDER[1:] if value > percdamp))


def prepare_weight(weight: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """fp32 private copy of ``W`` (rows, cols) with the dead inputs' columns zeroed.

    Args:
        weight: ``(rows, cols)`` weight (any float dtype; not modified).
        dead: ``(cols,)`` bool, ``H_jj == 0``.
    """
    w = weight.detach().to(dtype=torch.float32, copy=True)
    w[:, dead] = 0.0
    return w


def _check_shapes(hessian: torch.Tensor, weight: torch.Tensor) -> None:
    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}; expected ({cols}, {cols})")


def load_damped(
    work: torch.Tensor, hessian: torch.Tensor, percdamp: float, check: bool = False
) -> torch.Tensor:
    """Fill ``work`` with ``H`` dead-fixed and damped: ``H_jj = 0 -> 1``, then
    ``+ percdamp * mean(diag H) * I``; returns the dead inputs ``(cols,)`` bool.

    Args:
        work: ``(cols, cols)`` fp32 buffer, column-major (the layout the Cholesky kernels use,
            so every factor below is computed in place on it).
        hessian: ``(cols, cols)`` statistic (not modified).
        percdamp: Dampening relative to the mean (dead-fixed) diagonal.
        check: Raise on NaN/Inf entries (the first load).

    Raises:
        NonFiniteScoresError: If ``check`` and ``H`` holds NaN or Inf.
    """
    work.copy_(hessian)
    if check:  # on the row-major view of the same entries: no copy
        check_finite(work.t(), what="Hessian entries")
    diag = work.diagonal()  # (cols,) view
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(percdamp * diag.mean())
    return dead


def inverse_factor_(work: torch.Tensor) -> bool:
    """In place: the damped ``H`` in ``work`` becomes the upper Cholesky factor ``U`` of its
    inverse (``U^T U = H^-1``): Cholesky, Cholesky inverse, upper Cholesky, each written over
    ``work`` (on CUDA the Cholesky inverse keeps one working copy: 3 squares with the statistic).

    Args:
        work: ``(cols, cols)`` column-major fp32 damped Hessian; overwritten.

    Returns:
        False when a factorisation fails (not positive-definite) or produces NaN/Inf; ``work``
        is then garbage.
    """
    info = torch.empty((), dtype=torch.int32, device=work.device)
    torch.linalg.cholesky_ex(work, out=(work, info))
    if int(info) != 0:
        return False
    torch.cholesky_inverse(work, out=work)
    torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
    return int(info) == 0 and _all_finite(work)


def _all_finite(work: torch.Tensor) -> bool:
    """No NaN/Inf in the column-major square ``work``, without a square temporary (``isfinite``
    allocates ``|work|``): NaN propagates through ``aminmax``, an Inf is its min or max."""
    low, high = torch.aminmax(work.t().reshape(-1))  # (cols * cols,) view
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def column_major_square(cols: int, device: torch.device) -> torch.Tensor:
    """An uninitialised ``(cols, cols)`` fp32 matrix in column-major (Fortran) layout."""
    return torch.empty_strided((cols, cols), (1, cols), dtype=torch.float32, device=device)


def factor_with_retries(
    hessian: torch.Tensor, percdamp: float, device: torch.device | None = None
) -> tuple[torch.Tensor | None, float, list[float], torch.Tensor]:
    """Try the dampening ladder until the inverse factor exists, in one working square.

    Memory: the statistic ``H`` and one ``(cols, cols)`` fp32 working matrix (plus the CUDA
    Cholesky inverse's copy): at most 3 squares alive, against 6 for out-of-place factors.

    Args:
        hessian: ``(cols, cols)`` statistic (any float dtype and device; not modified).
        percdamp: First dampening of the ladder.
        device: Where to factorise (default: the statistic's device).

    Returns:
        ``(U or None, dampening used or the last tried, retried dampening values, dead inputs
        (cols,) bool)``.

    Raises:
        NonFiniteScoresError: If ``H`` holds NaN or Inf.
    """
    work = column_major_square(hessian.shape[0], device or hessian.device)
    retries: list[float] = []
    ladder = damp_ladder(percdamp)
    dead = torch.zeros(0, dtype=torch.bool)
    for index, value in enumerate(ladder):
        if index:
            retries.append(value)
            logger.warning(
                "SparseGPT: Cholesky failed with percdamp=%g; retrying with percdamp=%g",
                ladder[index - 1],
                value,
            )
        dead = load_damped(work, hessian, value, check=index == 0)
        if inverse_factor_(work):
            return work, value, retries, dead
    return None, ladder[-1], retries, dead


def _sweep_block(
    weight: torch.Tensor,
    mask: torch.Tensor,
    upper: torch.Tensor,
    ratio: float,
    nm: NMPattern | None,
    exact_count: bool,
) -> torch.Tensor:
    """Prune and compensate one column block in place.

    Args:
        weight: ``(rows, width)`` view of the current weights of the block (updated in place).
        mask: ``(rows, width)`` bool view, filled with the block's mask.
        upper: ``(width, width)`` diagonal block of ``U``.
        ratio: Unstructured sparsity (ignored for N:M).
        nm: N:M pattern or ``None``.
        exact_count: Exact count or the reference's inclusive threshold.

    Returns:
        ``(rows, width)`` scaled errors ``(w - q) / U_jj`` for the lazy update.
    """
    diag = upper.diagonal()  # (width,)
    if nm is None:
        mask.copy_(matrix_mask(weight.square() / diag.square(), ratio, exact_count))
    errors = torch.zeros_like(weight)
    for j in range(weight.shape[1]):
        if nm is not None and j % nm.m == 0:
            group = weight[:, j : j + nm.m].square() / diag[j : j + nm.m].square()
            mask[:, j : j + nm.m] = nm_mask(group, nm.n, nm.m)
        column = weight[:, j]
        pruned = column.masked_fill(mask[:, j], 0.0)
        errors[:, j] = (column - pruned) / diag[j]
        weight[:, j + 1 :].addr_(errors[:, j], upper[j, j + 1 :], alpha=-1.0)
        weight[:, j] = pruned
    return errors


def sweep(
    weight: torch.Tensor,
    upper: torch.Tensor,
    ratio: float,
    nm: NMPattern | None = None,
    blocksize: int = 128,
    exact_count: bool = True,
) -> tuple[torch.Tensor, float]:
    """SparseGPT's column sweep, in place on an fp32 ``weight`` (rows, cols).

    Args:
        weight: ``(rows, cols)`` fp32 weights, overwritten with the pruned, updated weights.
        upper: ``(cols, cols)`` upper Cholesky factor of the damped inverse Hessian.
        ratio: Unstructured sparsity per 128-column block (ignored for N:M).
        nm: N:M pattern or ``None``.
        blocksize: Columns per block B.
        exact_count: Exact count per block or the reference's inclusive threshold.

    Returns:
        ``(mask (rows, cols) bool, error sum((w - q)^2 / U_jj^2) / 2)``.
    """
    mask = torch.zeros_like(weight, dtype=torch.bool)
    error = torch.zeros((), dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[1], blocksize):
        stop = min(start + blocksize, weight.shape[1])
        errors = _sweep_block(
            weight[:, start:stop],
            mask[:, start:stop],
            upper[start:stop, start:stop],
            ratio,
            nm,
            exact_count,
        )
        weight[:, stop:].addmm_(errors, upper[start:stop, stop:], alpha=-1.0)
        error += errors.square().sum(dtype=torch.float64)
    return mask, float(error) / 2.0


def _check_target(target: LayerTarget, blocksize: int, cols: int) -> float:
    """Validate a SparseGPT target and return its scalar ratio."""
    ratio = target.ratio
    if isinstance(ratio, torch.Tensor) and ratio.numel() != 1:
        raise ValueError(
            "SparseGPT supports one ratio per linear, got per-row ratios of shape "
            f"{tuple(ratio.shape)}; use a per-layer allocation or another criterion"
        )
    if target.group not in (None, "block128"):
        raise ValueError(f"SparseGPT only supports group 'block128', got {target.group!r}")
    if target.nm is not None and (blocksize % target.nm.m or cols % target.nm.m):
        raise ValueError(
            f"SparseGPT N:M {target.nm} needs blocksize ({blocksize}) and cols ({cols}) "
            f"divisible by M={target.nm.m}"
        )
    return float(ratio)


def _no_update_result(
    weight: torch.Tensor, hessian: torch.Tensor, target: LayerTarget, info: dict[str, Any]
) -> LayerPruneResult:
    """Fallback after a Cholesky failure: Wanda-score mask (``s_j = H_jj / 2``), no update."""
    norm = (hessian.diagonal().to(device=weight.device, dtype=torch.float32) / 2).sqrt()
    scores = wanda_score(weight, norm)
    plain = LayerTarget(ratio=target.ratio, nm=target.nm, exact_count=target.exact_count)
    info["cholesky_failure"] = "no_update"
    return LayerPruneResult(mask=build_mask(scores, plain, "row"), weight=None, info=info)


@dataclass(eq=False)
class SparseGPTCriterion:
    """SparseGPT as a registered criterion (see the module docstring)."""

    name: str = "sparsegpt"
    needs: frozenset[str] = frozenset({STAT_HESSIAN})
    default_group: str = "block128"
    groups: frozenset[str] = frozenset({"block128"})
    defaults: Mapping[str, Any] = field(
        default_factory=lambda: frozen(
            {"percdamp": 0.01, "blocksize": 128, "on_cholesky_failure": "raise"}
        )
    )
    supports_row_ratios: bool = False
    changes_values: bool = True  # the kept weights are updated (the resume state stores them)

    def prune(
        self,
        weight: torch.Tensor,
        stats: LayerStats,
        target: LayerTarget,
        options: Mapping[str, Any],
    ) -> LayerPruneResult:
        """Prune and update one ``(rows, cols)`` weight; returns the new weight and mask.

        Raises:
            ValueError: On per-row ratios, a bad group or N:M geometry, a missing Hessian.
            NonFiniteScoresError: If the Hessian holds NaN or Inf.
            CholeskyFailureError: If every dampening fails and ``on_cholesky_failure`` is
                ``raise``.
        """
        opts = merged_options(self.defaults, options)
        if opts["on_cholesky_failure"] not in FAILURE_MODES:
            raise ValueError(
                f"on_cholesky_failure={opts['on_cholesky_failure']!r}; "
                f"expected one of {', '.join(FAILURE_MODES)}"
            )
        if stats.hessian is None:
            raise ValueError(f"SparseGPT needs the {STAT_HESSIAN!r} statistic; none collected")
        if weight.ndim != 2:
            raise ValueError(f"weight must be 2-D (rows, cols), got {tuple(weight.shape)}")
        ratio = _check_target(target, int(opts["blocksize"]), weight.shape[1])
        with _ieee_fp32_matmul():
            return self._prune_fp32(weight, stats.hessian, target, ratio, opts)

    def _prune_fp32(
        self,
        weight: torch.Tensor,
        hessian: torch.Tensor,
        target: LayerTarget,
        ratio: float,
        opts: Mapping[str, Any],
    ) -> LayerPruneResult:
        _check_shapes(hessian, weight)
        upper, damp, retries, dead_cols = factor_with_retries(
            hessian, float(opts["percdamp"]), weight.device
        )
        dead = int(dead_cols.sum())
        info: dict[str, Any] = {"percdamp": damp, "damp_retries": retries, "dead_inputs": dead}
        if upper is None and opts["on_cholesky_failure"] == "no_update":
            logger.warning("SparseGPT: Cholesky failed at every dampening; pruning by Wanda")
            return _no_update_result(weight, hessian, target, info)
        if upper is None:
            raise CholeskyFailureError(
                f"damped Hessian is not positive-definite even with percdamp={damp:g}; use "
                "more calibration samples or sparsegpt.on_cholesky_failure=no_update"
            )
        w = prepare_weight(weight, dead_cols)  # after the factors: not alive while factorising
        mask, error = sweep(w, upper, ratio, target.nm, int(opts["blocksize"]), target.exact_count)
        del upper
        info["error"] = error
        return LayerPruneResult(mask=mask, weight=w.to(weight.dtype), info=info)


SPARSEGPT = SparseGPTCriterion()
