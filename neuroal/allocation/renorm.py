"""Clipping and renormalisation of sparsity ratios (allocation.md §1.4).

Policies whose raw ratios can leave the clip range ``[lo, hi]`` restore the global constraint
with one of two monotone corrections, each solved by bisection to ``|error| < 1e-12``:

* additive (OWL, NeuroAL): find ``t`` with ``sum_l P_l * clip(r_l + t) = S * sum_l P_l``;
* multiplicative (AlphaPruning, ``r_l > 0``): find ``c`` with ``sum_l P_l * clip(c * r_l) = S * sum_l P_l``.

Entries are scalars (one ratio for a whole linear or block, weight ``P`` = its parameter count)
or float64 vectors ``(rows,)`` (one ratio per output row, weight ``P`` = cols per row). Both
corrections are feasible iff ``lo <= S <= hi``. Pure functions: no logging, no devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Ratio = float | torch.Tensor

TOLERANCE = 1e-12
MAX_ITERATIONS = 200


def check_feasible(target: float, clip: tuple[float, float]) -> None:
    """Raise when no clipped plan can have mean ``target``.

    Raises:
        ValueError: ``target`` lies outside ``clip``.
    """
    lo, hi = clip
    if not lo <= target <= hi:
        raise ValueError(f"target sparsity {target} lies outside allocation.clip=[{lo}, {hi}]: no "
                         "clipped plan can reach it; widen allocation.clip or change the sparsity")


def flatten(ratios: Sequence[Ratio], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries as one float64 vector ``(E,)`` of ratios and one of per-value weights.

    Args:
        ratios: Scalars or ``(rows,)`` vectors.
        weights: One per entry: the parameter count of a scalar entry, cols of a vector entry.
    """
    if len(ratios) != len(weights):
        raise ValueError(f"{len(ratios)} ratios but {len(weights)} weights")
    values = [torch.as_tensor(r, dtype=torch.float64).reshape(-1).cpu() for r in ratios]
    sizes = [v.numel() for v in values]
    per_value = [torch.full((n,), float(w), dtype=torch.float64) for n, w in zip(sizes, weights,
                                                                                   strict=True)]
    return torch.cat(values), torch.cat(per_value)


def unflatten(flat: torch.Tensor, like: Sequence[Ratio]) -> list[Ratio]:
    """Split ``flat`` back into entries shaped like ``like`` (floats stay floats)."""
    out: list[Ratio] = []
    start = 0
    for r in like:
        if isinstance(r, torch.Tensor) and r.dim() > 0:
            out.append(flat[start : start + r.numel()].clone())
            start += r.numel()
        else:
            out.append(float(flat[start]))
            start += 1
    return out


def weighted_mean(ratios: Sequence[Ratio], weights: Sequence[float]) -> float:
    """Parameter-weighted mean ``sum P * r / sum P`` in float64."""
    r, p = flatten(ratios, weights)
    return float((p * r).sum() / p.sum())


def clip_ratios(ratios: Sequence[Ratio], clip: tuple[float, float]) -> list[Ratio]:
    """Every entry clamped into ``clip`` (no renormalisation)."""
    flat = torch.cat([torch.as_tensor(r, dtype=torch.float64).reshape(-1).cpu() for r in ratios])
    return unflatten(flat.clamp(*clip), ratios)


def _bisect(mean_at: Callable[[float], float], target: float, low: float, high: float) -> float:
    """The root of the non-decreasing ``mean_at(x) - target`` inside ``[low, high]``."""
    x = 0.5 * (low + high)
    for _ in range(MAX_ITERATIONS):
        x = 0.5 * (low + high)
        error = mean_at(x) - target
        if abs(error) < TOLERANCE or x in (low, high):
            break
        low, high = (x, high) if error < 0 else (low, x)
    return x


def additive_correction(ratios: Sequence[Ratio], weights: Sequence[float], target: float,
                        clip: tuple[float, float]) -> list[Ratio]:
    """``clip(r + t)`` with the shift ``t`` that restores the weighted mean ``target``.

    Without clipping the shift is closed-form; otherwise bisection over
    ``t in [lo - max r, hi - min r]``.

    Raises:
        ValueError: ``target`` outside ``clip`` (infeasible).
    """
    check_feasible(target, clip)
    r, p = flatten(ratios, weights)
    total = p.sum()
    shift = float(target - (p * r).sum() / total)
    if bool(((r + shift) >= clip[0]).all()) and bool(((r + shift) <= clip[1]).all()):
        return unflatten(r + shift, ratios)

    def mean_at(t: float) -> float:
        return float((p * (r + t).clamp(*clip)).sum() / total)

    t = _bisect(mean_at, target, clip[0] - float(r.max()), clip[1] - float(r.min()))
    return unflatten((r + t).clamp(*clip), ratios)


def multiplicative_correction(ratios: Sequence[Ratio], weights: Sequence[float], target: float,
                              clip: tuple[float, float]) -> list[Ratio]:
    """``clip(c * r)`` with the scale ``c > 0`` that restores the weighted mean ``target``.

    Without clipping ``c = S * sum P / sum P * r`` (AlphaPruning's own normalisation, §4.4);
    otherwise bisection over ``c in [lo / max r, hi / min r]``.

    Raises:
        ValueError: ``target`` outside ``clip``, or a ratio that is not positive.
    """
    check_feasible(target, clip)
    r, p = flatten(ratios, weights)
    if not bool((r > 0).all()):
        raise ValueError(f"multiplicative renormalisation needs positive ratios; min is {float(r.min())}")
    total = p.sum()
    scale = float(target * total / (p * r).sum())
    if bool((r * scale >= clip[0]).all()) and bool((r * scale <= clip[1]).all()):
        return unflatten(r * scale, ratios)

    def mean_at(c: float) -> float:
        return float((p * (r * c).clamp(*clip)).sum() / total)

    c = _bisect(mean_at, target, clip[0] / float(r.max()), clip[1] / float(r.min()))
    return unflatten((r * c).clamp(*clip), ratios)
