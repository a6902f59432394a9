"""AlphaPruning: layerwise sparsity from heavy-tailed self-regularisation (Lu et al., NeurIPS
2024, arXiv 2410.10912).

Data-free (allocation.md §4). For every prunable linear the eigenvalues ``lambda = sigma^2`` of
its fp32 weight are fitted with a power law by the Hill estimator, the cut ``x_min`` chosen by a
Kolmogorov-Smirnov scan near the peak of the log-spectrum (``alpha_peak``, §4.2). Block metrics
(the mean alpha of the block's linears) map to ratios

    r_l = (m_l - min m) / (max m - min m) * 2 eps + (1 - eps),   s_l = c * r_l,

with ``c`` making the parameter-weighted mean equal S (§4.4): a larger alpha (lighter tail, less
trained) gives more sparsity. Unlike the reference, ratios are clipped into ``allocation.clip``
and renormalised multiplicatively (§1.4). Per-linear alphas are cached on disk as JSON.

Precision (``alpha.precision``): ``float32`` (faithful) runs the scan as the reference does, in
fp32 with ``torch.histc`` and ``linspace`` bin edges and ``alpha = 1 + n / (sum ln lambda - n ln
x_min)``; ``float64`` (opt-in) uses a float64 copy, a float64 bin index and term-by-term log
ratios (a flat tail gives exactly 0, no cancellation). They can pick different cuts when the KS
minimum is shallow or an eigenvalue lies on a bin edge.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import neuroal
from neuroal.allocation.base import PlanRequest, Rule, choice, option_errors
from neuroal.allocation.owl import feasibility_errors
from neuroal.allocation.plan import ModelShape, SparsityPlan
from neuroal.allocation.renorm import (
    check_feasible,
    clip_ratios,
    multiplicative_correction,
    weighted_mean,
)
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

ESTIMATOR_VERSION = 2  # 2: the fp32 scan of the reference is the default (``precision``)
HISTOGRAM_BINS = 100
PRECISIONS: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
KS_CHUNK = 256

# --------------------------------------------------------------------------- estimator (pure)


def eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``W^T W``: ``(rows, cols) -> (min(rows, cols),)`` fp32 ``sigma^2``, ascending.

    Computed on the weight's own device (the worker owning the block).
    """
    sigma = torch.linalg.svdvals(weight.detach().to(torch.float32))
    return torch.sort(sigma.square()).values


def spectrum_peak(lam: torch.Tensor, bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """``10 ** (left edge of the fullest bin)`` of a ``bins``-bin histogram of ``log10(lam)``,
    a 0-d tensor in ``lam``'s dtype.

    Bins span ``[min, max]`` equally; the maximum falls in the last bin; ties pick the first bin.
    float32 (faithful) counts with ``torch.histc`` and takes the edge from ``torch.linspace``,
    as the reference; float64 computes the bin index by hand.
    """
    logs = torch.log10(lam)
    lo, hi = logs.min(), logs.max()
    if lam.dtype == torch.float32:
        counts = torch.histc(logs, bins, min=float(lo), max=float(hi))
        edges = torch.linspace(float(lo), float(hi), bins + 1, dtype=lam.dtype, device=lam.device)
        return torch.pow(10.0, edges[int(torch.argmax(counts))])
    low, high = float(lo), float(hi)
    if high > low:
        index = ((logs - low) * bins / (high - low)).floor().clamp(0, bins - 1).long()
    else:
        index = torch.zeros_like(logs, dtype=torch.long)
    fullest = int(torch.argmax(torch.bincount(index, minlength=bins)))
    return torch.tensor(10.0 ** (low + fullest * (high - low) / bins), dtype=lam.dtype,
                        device=lam.device)


LOWER_BOUNDS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # The reference compares linear eigenvalues with log10(0.95 * peak) (allocation.md §4.2).
    "quirk": lambda peak: torch.log10(0.95 * peak),
    "fixed": lambda peak: 0.95 * peak,
}


def _cuts_peak(lam: torch.Tensor, lower_bound: str) -> torch.Tensor:
    """Cut indices ``i`` in ``0..N-2`` with ``lower <= lambda_i``, stopping once ``> 1.5 peak``."""
    peak = spectrum_peak(lam)
    lower, upper = LOWER_BOUNDS[lower_bound](peak), 1.5 * peak
    x = lam[:-1]
    over = torch.nonzero(x > upper)
    stop = int(over[0]) if over.numel() else x.numel()
    cuts = torch.arange(stop, device=lam.device)
    return cuts[x[:stop] >= lower]


def _cuts_mid(lam: torch.Tensor, lower_bound: str) -> torch.Tensor:
    """The single cut ``x_min = lambda[N // 2]`` (no scan)."""
    return torch.tensor([min(lam.numel() // 2, lam.numel() - 2)], device=lam.device)


def _cuts_full(lam: torch.Tensor, lower_bound: str) -> torch.Tensor:
    """Every cut ``0..N-2`` (full KS scan)."""
    return torch.arange(lam.numel() - 1, device=lam.device)


FIX_FINGERS: dict[str | None, Callable[[torch.Tensor, str], torch.Tensor]] = {
    "xmin_peak": _cuts_peak,
    "xmin_mid": _cuts_mid,
    None: _cuts_full,
}


def _tail_tables(lam: torch.Tensor, cuts: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Per chunk of ascending cuts ``(c,)``: the cuts, tail sizes ``n`` ``(c, 1)``, offsets
    ``k`` ``(w,)`` and the tail table ``lambda[i + k]`` ``(c, w)`` (entries with ``k >= n`` are
    padding), ``w = N - first cut of the chunk``."""
    size = lam.numel()
    for cut in cuts.split(KS_CHUNK):
        k = torch.arange(size - int(cut[0]), dtype=lam.dtype, device=lam.device)
        index = (cut.unsqueeze(1) + k.long()).clamp(max=size - 1)  # (c, w)
        yield cut, (size - cut).to(lam.dtype).unsqueeze(1), k, lam[index]


def hill_estimates(lam: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """``alpha(i) = 1 + n / (sum_{k=0}^{n-1} ln lambda_{i+k} - n ln lambda_i)``, tail ``n = N - i``.

    In float32 the denominator is formed as written, as the reference does (subject to its
    cancellation); in float64 it is summed term by term as ``sum ln(lambda_{i+k} / lambda_i)``,
    so a flat tail gives exactly 0.

    Args:
        lam: ``(N,)`` float32 or float64 ascending positive eigenvalues.
        cuts: ``(C,)`` ascending cut indices, ``C >= 1``.

    Returns:
        ``(C,)`` alphas in ``lam``'s dtype; 0 where the denominator is not positive (a flat
        tail; the reference would divide by zero there).
    """
    out = []
    tiny = torch.finfo(lam.dtype).tiny
    for cut, n, k, tail in _tail_tables(lam, cuts):
        if lam.dtype == torch.float32:
            denom = tail.log().masked_fill(k >= n, 0.0).sum(1) - n.squeeze(1) * lam[cut].log()
        else:
            denom = (tail / lam[cut].unsqueeze(1)).log().masked_fill(k >= n, 0.0).sum(1)
        out.append(torch.where(denom > 0, 1.0 + n.squeeze(1) / denom.clamp_min(tiny),
                               torch.zeros_like(denom)))
    return torch.cat(out)


def ks_distances(lam: torch.Tensor, cuts: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """``D(i) = max_k |1 - (lambda_{i+k} / lambda_i)^(1 - alpha_i) - k / n|``, ``k = 0..n-1``.

    Args:
        lam: ``(N,)`` float32 or float64 ascending positive eigenvalues.
        cuts: ``(C,)`` ascending cut indices, ``C >= 1``.
        alphas: ``(C,)`` their Hill estimates.

    Returns:
        ``(C,)`` KS distances.
    """
    out = []
    for (cut, n, k, tail), alpha in zip(_tail_tables(lam, cuts), alphas.split(KS_CHUNK), strict=True):
        ratio = tail / lam[cut].unsqueeze(1)
        dev = (1.0 - ratio.pow(1.0 - alpha.unsqueeze(1)) - k / n).abs()
        out.append(dev.masked_fill(k >= n, 0.0).amax(1))
    return torch.cat(out)


def hill_alpha(eigenvalues: torch.Tensor, xmin_lower_bound: str = "quirk",
               fix_fingers: str | None = "xmin_peak", precision: str = "float32") -> float:
    """Power-law exponent of an eigenvalue spectrum (AlphaPruning's ``alpha_peak``, §4.2).

    Args:
        eigenvalues: ``(N,)`` eigenvalues (ascending; fp32 ``sigma^2`` in the reference).
        xmin_lower_bound: ``quirk`` (the reference's log-space lower bound) or ``fixed``.
        fix_fingers: ``xmin_peak`` (scan near the histogram peak), ``xmin_mid`` or ``None``
            (full scan).
        precision: ``float32`` (faithful: the reference's arithmetic) or ``float64`` (module
            docstring).

    Returns:
        ``alpha(i*)`` with ``i*`` the first argmin of the KS distance; unvisited cuts hold
        ``alpha = 0, D = 1``, so a spectrum where every visited alpha is <= 1 returns
        ``alpha(0)`` (0 when cut 0 was not visited). Non-positive eigenvalues are dropped (their
        logarithm is undefined; the reference returns NaN there).
    """
    lam = torch.sort(eigenvalues.detach().to(PRECISIONS[precision]).reshape(-1)).values
    lam = lam[lam > 0]
    if lam.numel() < 2:
        return 0.0
    cuts = FIX_FINGERS[fix_fingers](lam, xmin_lower_bound)
    alphas = lam.new_zeros(lam.numel() - 1)
    dists = lam.new_ones(lam.numel() - 1)
    if cuts.numel():
        alphas[cuts] = hill_estimates(lam, cuts)
    fitted = cuts[alphas[cuts] > 1]
    if fitted.numel():
        dists[fitted] = ks_distances(lam, fitted, alphas[fitted])
    return float(alphas[int(torch.argmin(dists))])


def layer_alpha(weight: torch.Tensor, xmin_lower_bound: str = "quirk",
                fix_fingers: str | None = "xmin_peak", precision: str = "float32") -> float:
    """Hill alpha of one ``(rows, cols)`` weight (module-level, so ``partial`` of it pickles)."""
    return hill_alpha(eigenvalues(weight), xmin_lower_bound, fix_fingers, precision)


def alpha_ratios(metrics: Sequence[float], numels: Sequence[int], target: float,
                 epsilon: float) -> list[float]:
    """AlphaPruning's mapping (§4.4) from metrics ``(G,)`` to unclipped ratios ``(G,)``.

    ``r = (m - min m) / (max m - min m) * 2 eps + (1 - eps)``; ``s = c r`` with
    ``c = S sum P / sum P r`` (``P`` = ``numels``). Equal metrics give the uniform plan.

    Raises:
        ValueError: A metric that is not finite.
    """
    if not all(math.isfinite(m) for m in metrics):
        raise ValueError(f"alpha metrics must be finite, got {list(metrics)}")
    lo, hi = min(metrics), max(metrics)
    span = hi - lo
    r = [(m - lo) / span * 2.0 * epsilon + (1.0 - epsilon) if span > 0 else 1.0 for m in metrics]
    scale = target * math.fsum(numels) / math.fsum(p * x for p, x in zip(numels, r, strict=True))
    return [scale * x for x in r]


# --------------------------------------------------------------------------- aggregation

Group = tuple[int, tuple[str, ...]]


def _block_groups(alphas: list[dict[str, float]], shape: ModelShape) -> list[tuple[Group, float, int]]:
    """One group per block: mean alpha of its linears, all linears share the ratio."""
    return [((b, tuple(blk)), math.fsum(alphas[b][n] for n in blk) / len(blk),
             sum(r * c for r, c in blk.values())) for b, blk in enumerate(shape.blocks)]


def _linear_groups(alphas: list[dict[str, float]], shape: ModelShape) -> list[tuple[Group, float, int]]:
    """One group per linear: its own alpha."""
    return [((b, (n,)), alphas[b][n], shape.numel(b, n))
            for b, blk in enumerate(shape.blocks) for n in blk]


MAPPINGS: dict[str, Callable[[list[dict[str, float]], ModelShape], list[tuple[Group, float, int]]]] = {
    "block_wise": _block_groups,
    "layer_wise": _linear_groups,
}

# --------------------------------------------------------------------------- cache


def estimator_key(opts: Mapping[str, Any]) -> dict[str, Any]:
    """What determines the cached alphas besides the weights."""
    return {"metric": "alpha_peak", "xmin_lower_bound": opts["xmin_lower_bound"],
            "fix_fingers": opts["fix_fingers"], "precision": opts.get("precision", "float32"),
            "version": ESTIMATOR_VERSION}


def cache_path(cache_dir: str | None, model_key: str, opts: Mapping[str, Any]) -> Path | None:
    """``<cache_dir>/alpha/<model_key>-<options hash>.json``; None without a key or directory."""
    if not cache_dir or not model_key:
        return None
    digest = hashlib.sha256(json.dumps(estimator_key(opts), sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / "alpha" / f"{model_key}-{digest[:12]}.json"


def read_cache(path: Path, shape: ModelShape) -> list[dict[str, float]] | None:
    """Cached per-linear alphas if the file exists and matches the model's linears."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        alphas = [{n: float(a) for n, a in blk.items()} for blk in data["alpha"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("alpha: cache %s is unreadable (%s); recomputing", path, exc)
        return None
    if [set(b) for b in alphas] != [set(b) for b in shape.blocks]:
        log.warning("alpha: cache %s does not match the model's linears; recomputing", path)
        return None
    return alphas


def write_cache(path: Path, alphas: list[dict[str, float]], meta: Mapping[str, Any]) -> None:
    """Write atomically (temporary file in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({**meta, "alpha": alphas}, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- policy


def _fix_fingers_ok(value: Any) -> bool:
    return value is None or choice("xmin_peak", "xmin_mid", "none")(value)


ALPHA_RULES: dict[str, Rule] = {
    "epsilon": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                and 0 <= v < 1, "a number in [0, 1) (ratios span c * [1 - eps, 1 + eps]; "
                "the reference scripts use 0.2-0.5)"),
    "mapping": (choice(*MAPPINGS), f"one of {', '.join(MAPPINGS)}"),
    "xmin_lower_bound": (choice(*LOWER_BOUNDS), f"one of {', '.join(LOWER_BOUNDS)}"),
    "fix_fingers": (_fix_fingers_ok, "one of xmin_peak, xmin_mid, none"),
    "renormalise": (lambda v: isinstance(v, bool), "true or false"),
    "precision": (choice(*PRECISIONS), "float32 (faithful: the reference's fp32 scan) or float64"),
}


def clip_or_renormalise(raw: list[float], groups: list[Group], numels: list[int], target: float,
                        clip: tuple[float, float], renormalise: bool) -> tuple[list[float], list[str]]:
    """Clip group ratios; rescale multiplicatively if asked; warn about clipped blocks and misses."""
    clipped = sorted({g[0] for g, s in zip(groups, raw, strict=True) if not clip[0] <= s <= clip[1]})
    ratios = (multiplicative_correction(raw, numels, target, clip) if renormalise
              else clip_ratios(raw, clip))
    warnings = []
    if clipped:
        warnings.append(f"alpha: blocks {clipped} had ratios outside {list(clip)} and were clipped"
                        + ("; renormalised multiplicatively" if renormalise else ""))
    planned = weighted_mean(ratios, numels)
    if abs(planned - target) > 1e-6:
        warnings.append(f"alpha: planned global sparsity {planned:.6f} misses the target {target} "
                        "after clipping; set allocation.renormalise=true or lower allocation.epsilon")
    return [float(s) for s in ratios], warnings


class AlphaPolicy:
    """AlphaPruning allocation (arXiv 2410.10912): ratios from per-linear Hill alphas."""

    name = "alpha"
    needs = "weights"
    defaults: Mapping[str, Any] = {"epsilon": 0.3, "mapping": "block_wise",
                                   "xmin_lower_bound": "quirk", "fix_fingers": "xmin_peak",
                                   "renormalise": True, "precision": "float32"}
    nm_compatible = False

    def validate(self, cfg: Any) -> list[str]:
        return option_errors(self.name, cfg.allocation.options, ALPHA_RULES) + feasibility_errors(cfg)

    def resolve(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``options`` (``fix_fingers: none`` -> None)."""
        errors = option_errors(self.name, options, ALPHA_RULES)
        if errors:
            raise ValueError("; ".join(errors))
        opts = {**self.defaults, **options}
        opts["fix_fingers"] = None if opts["fix_fingers"] in (None, "none") else opts["fix_fingers"]
        return opts

    def alphas(self, request: PlanRequest, opts: Mapping[str, Any]) -> list[dict[str, float]]:
        """Per-linear alphas ``[block][name]``, from the cache or the executor's workers."""
        path = cache_path(request.cache_dir, request.model_key, opts)
        cached = read_cache(path, request.shape) if path is not None else None
        if cached is not None:
            log.info("alpha: cache hit %s; skipped the SVD of %d linears", path,
                     sum(len(b) for b in cached))
            return cached
        if request.executor is None:
            raise RuntimeError("allocation 'alpha' needs an executor to compute weight spectra; "
                               "run it through neuroal.pipeline")
        fn = functools.partial(layer_alpha, xmin_lower_bound=opts["xmin_lower_bound"],
                               fix_fingers=opts["fix_fingers"], precision=opts["precision"])
        log.info("alpha: computing the spectra of %d linears (SVD on each worker's device)",
                 sum(len(b) for b in request.shape.blocks))
        alphas = [{n: float(a) for n, a in blk.items()} for blk in request.executor.weight_metrics(fn)]
        if path is not None:
            try:
                write_cache(path, alphas, {"model_key": request.model_key,
                                           "estimator": estimator_key(opts)})
                log.info("alpha: wrote cache %s", path)
            except OSError as exc:
                log.warning("alpha: could not write the cache %s (%s); continuing without it",
                            path, exc)
        return alphas

    def plan(self, request: PlanRequest) -> SparsityPlan:
        opts = self.resolve(request.options)
        check_feasible(request.target, request.clip)
        alphas = self.alphas(request, opts)
        for b, blk in enumerate(alphas):
            for n, a in blk.items():
                if a <= 1:
                    log.warning("alpha: block %d %s: no power-law fit with alpha > 1 (alpha=%g)", b, n, a)
        groups, metrics, numels = zip(*MAPPINGS[opts["mapping"]](alphas, request.shape), strict=True)
        raw = alpha_ratios(metrics, numels, request.target, float(opts["epsilon"]))
        ratios, warnings = clip_or_renormalise(raw, list(groups), list(numels), request.target,
                                               request.clip, bool(opts["renormalise"]))
        for w in warnings:
            log.warning(w)
        plan_ratios: list[dict[str, float]] = [{} for _ in request.shape.blocks]
        for (b, names), s in zip(groups, ratios, strict=True):
            plan_ratios[b].update(dict.fromkeys(names, s))
        block_alpha = [math.fsum(blk.values()) / len(blk) for blk in alphas]
        return SparsityPlan(
            target=request.target, pattern=request.pattern,
            ratios=[{n: plan_ratios[b][n] for n in blk} for b, blk in enumerate(request.shape.blocks)],
            policy={"name": self.name, **opts, "version": neuroal.__version__},
            trail={"alpha": alphas, "block_alpha": block_alpha, "unclipped": raw},
            warnings=warnings)
