"""Frozen copy of SparseGPT's pruning as it was before the in-place factorisation (the
memory work: one working square instead of separate damped, Cholesky, inverse and inverse-factor
matrices). ``tests/test_sparsegpt_memory.py`` checks that the library's masks and weights are
bit-identical to :func:`reference_prune`. Do not edit: it is the reference, not the library.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from neuroal.criteria.base import LayerPruneResult, LayerTarget, NMPattern
from neuroal.criteria.masking import build_mask, check_finite, matrix_mask, nm_mask
from neuroal.criteria.sparsegpt import CholeskyFailureError
from neuroal.criteria.wanda import wanda_score

logger = logging.getLogger(__name__)

DAMP_LADDER = (0.01, 0.1, 1.0)
FAILURE_MODES = ("raise", "no_update")


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


def prepare_hessian(
    hessian: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """fp32 copies of ``H`` (cols, cols) and ``W`` (rows, cols) with dead inputs handled.

    A dead input (``H_jj = 0``) gets ``H_jj = 1`` and its weight column is zeroed.

    Returns:
        ``(H, W, number of dead inputs)``; both tensors are private copies.

    Raises:
        NonFiniteScoresError: If ``H`` holds NaN or Inf.
        ValueError: If the shapes do not match.
    """
    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}; expected ({cols}, {cols})")
    h = hessian.detach().to(device=weight.device, dtype=torch.float32, copy=True)
    check_finite(h, what="Hessian entries")
    w = weight.detach().to(dtype=torch.float32, copy=True)
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    return h, w, int(dead.sum())


def inverse_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor | None:
    """Upper Cholesky factor ``U`` of ``(H + percdamp * mean(diag H) * I)^-1``, or ``None``.

    Args:
        hessian: ``(cols, cols)`` symmetric fp32 matrix (not modified).
        percdamp: Dampening relative to the mean diagonal.

    Returns:
        ``(cols, cols)`` upper-triangular ``U`` with ``U^T U = H_damped^-1``, or ``None`` when a
        factorisation fails (not positive-definite) or produces NaN/Inf.
    """
    damped = hessian.clone()
    damped.diagonal().add_(percdamp * hessian.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return None
    inverse = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(upper).all()):
        return None
    return upper


def factor_with_retries(
    hessian: torch.Tensor, percdamp: float
) -> tuple[torch.Tensor | None, float, list[float]]:
    """Try the dampening ladder until the inverse factor exists.

    Returns:
        ``(U or None, dampening used or the last tried, retried dampening values)``.
    """
    retries: list[float] = []
    ladder = damp_ladder(percdamp)
    for index, value in enumerate(ladder):
        if index:
            retries.append(value)
            logger.warning(
                "SparseGPT: Cholesky failed with percdamp=%g; retrying with percdamp=%g",
                ladder[index - 1],
                value,
            )
        upper = inverse_factor(hessian, value)
        if upper is not None:
            return upper, value, retries
    return None, ladder[-1], retries


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


def _prune_fp32(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: LayerTarget,
    ratio: float,
    opts: Mapping[str, Any],
) -> LayerPruneResult:
    h, w, dead = prepare_hessian(hessian, weight)
    upper, damp, retries = factor_with_retries(h, float(opts["percdamp"]))
    info: dict[str, Any] = {"percdamp": damp, "damp_retries": retries, "dead_inputs": dead}
    if upper is None and opts["on_cholesky_failure"] == "no_update":
        logger.warning("SparseGPT: Cholesky failed at every dampening; pruning by Wanda")
        return _no_update_result(weight, hessian, target, info)
    if upper is None:
        raise CholeskyFailureError(
            f"damped Hessian is not positive-definite even with percdamp={damp:g}; use "
            "more calibration samples or sparsegpt.on_cholesky_failure=no_update"
        )
    del h
    mask, error = sweep(w, upper, ratio, target.nm, int(opts["blocksize"]), target.exact_count)
    info["error"] = error
    return LayerPruneResult(mask=mask, weight=w.to(weight.dtype), info=info)


def reference_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: LayerTarget,
    opts: dict[str, Any],
) -> LayerPruneResult:
    """The pre-change ``SparseGPTCriterion.prune`` (fp32 matmuls, no TF32) for a scalar ratio."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return _prune_fp32(weight, hessian, target, float(target.ratio), opts)
    finally:
        torch.set_float32_matmul_precision(previous)


# --------------------------------------------------------------------------- capture, frozen


class ReferenceHessians:
    """The pre-change Hessian capture: one accumulator per linear, the batch sum ``2.0 * X^T X``
    shared by linears fed the same tensor, folded out of place as
    ``old * (n / total) + value / total`` (``neuroal.capture.collector`` before the memory work)."""

    def __init__(self, linears: Mapping[str, torch.nn.Module]) -> None:
        self.linears = dict(linears)
        self.n = dict.fromkeys(self.linears, 0)
        self.hessian: dict[str, torch.Tensor | None] = dict.fromkeys(self.linears)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sequences = 0

    def _hook(self, name: str):  # noqa: ANN202 - hook factory
        def hook(_module: torch.nn.Module, args: tuple, _output: torch.Tensor) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                value = self._last[1]
            else:
                flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
                value = 2.0 * (flat.t() @ flat)
                self._last = (x, value)
            total = self.n[name] + self.sequences
            old = self.hessian[name]
            self.hessian[name] = value / total if old is None else (
                old * (self.n[name] / total) + value / total)
            self.n[name] = total

        return hook

    def run(self, forward: Any, batches: list[torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """``forward(batch)`` for every micro-batch with the hooks attached."""
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.linears.items()]
        try:
            for batch in batches:
                self.sequences = batch.shape[0]
                forward(batch)
                self._last = None
        finally:
            for handle in handles:
                handle.remove()
        return self.hessian
