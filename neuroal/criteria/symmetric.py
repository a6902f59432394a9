"""The symmetric pruning family (Yi & Richtárik, "Symmetric Pruning of Large Language Models",
arXiv 2501.18980; criteria.md §8).

The paper explains Wanda and RIA through a reconstruction objective that measures the error
both at a layer's input and at its output. In torch orientation (``W``: ``(rows, cols)`` =
``(out_features, in_features)``), with calibration inputs ``X`` (tokens, cols) and outputs
``Y`` (tokens, rows),

    g(W_hat) = ||X (W_hat - W)^T||_F + ||Y (W_hat - W)||_F,

and removing the single weight ``W_ij`` costs ``|W_ij| * (x_j + y_i)`` with
``x_j = ||X_{:,j}||_2`` and ``y_i = ||Y_{:,i}||_2`` (criteria.md §8.2). Up to one common
constant these are ``sqrt(s_j)`` and ``sqrt(z_i)`` of the collected statistics (§1.2).

Criteria defined here:

* ``symwanda`` (the paper's "General Sym."): ``|W_ij| * (x_j + y_i)``.
* ``owanda`` (output only, ``X = 0``): ``|W_ij| * y_i``; ranked per row it is magnitude.
* ``ria_lp``: ``(|W_ij| / ||W_{:,j}||_p + |W_ij| / ||W_{i,:}||_p) * x_j ** a``; ``p = 1`` is RIA.
* ``stoch_ria``: RIA whose row and column sums are estimated from random subsets (§8.5).

What is [reconstructed] (no official code exists; criteria.md §8.1): that ``Y`` is the layer's
own output (``owanda``, ``symwanda``); how stochRIA draws its subsets, their sizes, the
rescaling and the activation factor (its options below; the defaults are the spec's
decisions). Because ``y_i`` is constant along a row, it enters an *additive* mix with ``x_j``:
the relative scale of the two statistics changes the mask (§8.4), so both use the same
normaliser (mean over sequences of token sums of squares, then a square root), recorded as
``stat_scale`` in each layer's report entry together with the ratio ``mean(y) / mean(x)``.

Default comparison group for the whole family: ``matrix`` [decision]; any group may be set.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from neuroal.criteria.base import (
    STAT_OUT_SQ_NORM,
    STAT_SQ_NORM,
    LayerPruneResult,
    LayerStats,
    LayerTarget,
)
from neuroal.criteria.ria import relative_importance, ria_score
from neuroal.criteria.scored import ScoreCriterion, frozen, input_norm, merged_options, stat_norm

STAT_SCALE = "sqrt(mean over sequences of token sums of squares), same for x_j and y_i"
SUBSET_MODES = ("independent", "shared")
SIZE_MODES = ("proportional", "absolute_min")
_SAMPLED_SUM_EPS = 1e-12  # floor for a sampled |W| sum that happens to be all zeros [decision]
_SEED_PROBES = 64  # weight entries hashed into the per-layer seed


# --------------------------------------------------------------------------- statistics


def output_norm(stats: LayerStats, weight: torch.Tensor) -> torch.Tensor:
    """Output-channel norm ``y_i = sqrt(z_i)``, shape ``(rows,)``, fp32 on the weight's device.

    Raises:
        ValueError: If ``out_sq_norm`` is missing, has the wrong shape, is negative or not finite.
    """
    return stat_norm(stats.out_sq_norm, STAT_OUT_SQ_NORM, weight.shape[0], weight.device)


def _scale_info(stats: LayerStats, weight: torch.Tensor) -> dict[str, Any]:
    """The statistics' normaliser and the relative scale ``mean(y) / mean(x)`` (§8.4)."""
    x_mean = float(input_norm(stats, weight).mean())
    y_mean = float(output_norm(stats, weight).mean())
    return {"stat_scale": STAT_SCALE, "y_over_x": y_mean / x_mean if x_mean > 0 else None}


# --------------------------------------------------------------------------- SymWanda, OWanda


def symwanda_score(weight: torch.Tensor, in_norm: torch.Tensor, out_norm: torch.Tensor) -> torch.Tensor:
    """Symmetric Wanda score, the single-weight cost of the symmetric objective (§8.2).

    Args:
        weight: ``(rows, cols)`` weight.
        in_norm: ``(cols,)`` input-channel norms ``x_j = sqrt(s_j)``.
        out_norm: ``(rows,)`` output-channel norms ``y_i = sqrt(z_i)``.

    Returns:
        ``(rows, cols)`` fp32 scores ``|W_ij| * (x_j + y_i)``.
    """
    magnitude = weight.detach().to(torch.float32).abs()
    both = in_norm.to(torch.float32).unsqueeze(0) + out_norm.to(torch.float32).unsqueeze(1)  # (rows, cols)
    return magnitude * both


def owanda_score(weight: torch.Tensor, out_norm: torch.Tensor) -> torch.Tensor:
    """Output-only Wanda score (the objective with ``X = 0``).

    Args:
        weight: ``(rows, cols)`` weight.
        out_norm: ``(rows,)`` output-channel norms ``y_i = sqrt(z_i)``.

    Returns:
        ``(rows, cols)`` fp32 scores ``|W_ij| * y_i``. A positive factor constant along a row:
        ranked per row this is magnitude pruning (§8.4).
    """
    return weight.detach().to(torch.float32).abs() * out_norm.to(torch.float32).unsqueeze(1)


def _symwanda(weight: torch.Tensor, stats: LayerStats, options: Mapping[str, Any]) -> torch.Tensor:
    return symwanda_score(weight, input_norm(stats, weight), output_norm(stats, weight))


def _owanda(weight: torch.Tensor, stats: LayerStats, options: Mapping[str, Any]) -> torch.Tensor:
    return owanda_score(weight, output_norm(stats, weight))


# --------------------------------------------------------------------------- lp-normalised RIA


def check_p(p: Any) -> float:
    """Validate the ``ria_lp`` norm order: a number > 0 (``.inf`` allowed)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or p <= 0:
        raise ValueError(f"criterion.p={p!r} is not a valid norm order; use a number > 0 "
                         "(1 = RIA, 2 = Euclidean, .inf = max)")
    return float(p)


def lp_relative_importance(weight: torch.Tensor, p: float) -> torch.Tensor:
    """``|W_ij| / ||W_{:,j}||_p + |W_ij| / ||W_{i,:}||_p`` of a ``(rows, cols)`` weight, fp32.

    ``p = 1`` calls :func:`neuroal.criteria.ria.relative_importance`, so it equals RIA's term
    bit for bit. An all-zero column or row contributes 0 instead of 0/0.
    """
    if check_p(p) == 1.0:
        return relative_importance(weight)
    magnitude = weight.detach().to(torch.float32).abs()
    tiny = torch.finfo(torch.float32).tiny
    col_norms = torch.linalg.vector_norm(magnitude, ord=p, dim=0, keepdim=True).clamp_min(tiny)  # (1, cols)
    row_norms = torch.linalg.vector_norm(magnitude, ord=p, dim=1, keepdim=True).clamp_min(tiny)  # (rows, 1)
    return magnitude / col_norms + magnitude / row_norms


def ria_lp_score(weight: torch.Tensor, norm: torch.Tensor, p: float = 1.0, a: float = 0.5) -> torch.Tensor:
    """lp-normalised RIA score (criteria.md §8.3).

    Args:
        weight: ``(rows, cols)`` weight.
        norm: ``(cols,)`` input-channel norms ``x_j = sqrt(s_j)``.
        p: Norm order of the column and row normalisers (1 = RIA's l1 sums).
        a: Activation exponent (RIA's ``--a``).

    Returns:
        ``(rows, cols)`` fp32 scores; equal to :func:`ria_score` for ``p = 1``.
    """
    if check_p(p) == 1.0:
        return ria_score(weight, norm, a)
    return lp_relative_importance(weight, p) * norm.to(torch.float32).pow(a).unsqueeze(0)


def _ria_lp(weight: torch.Tensor, stats: LayerStats, options: Mapping[str, Any]) -> torch.Tensor:
    return ria_lp_score(weight, input_norm(stats, weight), options["p"], float(options["a"]))


# --------------------------------------------------------------------------- stochRIA


@dataclass(frozen=True)
class StochOptions:
    """Validated stochRIA options (criteria.md §8.5).

    Attributes:
        beta: Fraction of each row / column sampled, in (0, 1].
        subsets: ``independent`` (a fresh subset per row and per column) or ``shared`` (one
            column subset for every row sum, one row subset for every column sum).
        size: ``proportional`` (``ceil(beta * length)`` entries for each sum) or
            ``absolute_min`` (``tau = max(1, floor(beta * min(rows, cols)))`` for both sums).
        rescale: Multiply each sampled sum by ``length / |subset|`` (unbiased sums).
        activation: Multiply by ``x_j ** a`` as RIA does (the reviewers read eq. 4 without it).
        a: Activation exponent.
        seed: Base seed; the per-layer seed is derived from it (:func:`layer_seed`).
    """

    beta: float
    subsets: str
    size: str
    rescale: bool
    activation: bool
    a: float
    seed: int

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> StochOptions:
        """Check every option, raising one error that lists all bad values."""
        beta, seed = options["beta"], options["seed"]
        errors = []
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
            errors.append(f"criterion.beta={beta!r}: expected a fraction in (0, 1], e.g. 0.1")
        if options["subsets"] not in SUBSET_MODES:
            errors.append(f"criterion.subsets={options['subsets']!r}: expected one of "
                          f"{', '.join(SUBSET_MODES)}")
        if options["size"] not in SIZE_MODES:
            errors.append(f"criterion.size={options['size']!r}: expected one of {', '.join(SIZE_MODES)}")
        for key in ("rescale", "activation"):
            if not isinstance(options[key], bool):
                errors.append(f"criterion.{key}={options[key]!r}: expected true or false")
        if isinstance(seed, bool) or not isinstance(seed, int):
            errors.append(f"criterion.seed={seed!r}: expected an integer")
        if errors:
            raise ValueError("invalid stoch_ria options: " + "; ".join(errors))
        return cls(float(beta), options["subsets"], options["size"], options["rescale"],
                   options["activation"], float(options["a"]), seed)

    def subset_sizes(self, rows: int, cols: int) -> tuple[int, int]:
        """Entries sampled for each row sum (out of ``cols``) and each column sum (of ``rows``)."""
        if self.size == "absolute_min":
            tau = max(1, math.floor(round(self.beta * min(rows, cols), 9)))
            return min(tau, cols), min(tau, rows)
        # round() first so that e.g. 0.3 * 10 = 3.0000000000000004 counts as 3, not 4
        return (min(cols, max(1, math.ceil(round(self.beta * cols, 9)))),
                min(rows, max(1, math.ceil(round(self.beta * rows, 9)))))


def layer_seed(weight: torch.Tensor, seed: int) -> int:
    """A per-layer seed derived from ``seed``, the weight's shape and a few of its entries.

    Criteria do not see layer names, so the layer is identified by its content: up to 64 evenly
    spaced entries (fp32 bytes) are hashed together with the shape and the base seed. The
    result is the same for the same dense weight in every executor and on every device (the
    random draws made from it follow the device's generator, so CPU and CUDA masks differ).
    """
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // _SEED_PROBES)
    probe = flat[::step][:_SEED_PROBES].to(device="cpu", dtype=torch.float32).contiguous()
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{seed}:{tuple(weight.shape)}:".encode())
    digest.update(bytes(probe.view(torch.uint8).tolist()))
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def sampled_abs_sums(magnitude: torch.Tensor, dim: int, k: int, generator: torch.Generator,
                     shared: bool, rescale: bool) -> torch.Tensor:
    """Estimate ``magnitude.sum(dim, keepdim=True)`` from ``k`` random entries of each line.

    Args:
        magnitude: ``(rows, cols)`` non-negative fp32 values ``|W|``.
        dim: 1 for row sums (``(rows, 1)``), 0 for column sums (``(1, cols)``).
        k: Entries sampled per line, in ``[1, length]``; ``k = length`` gives the exact sum.
        generator: Random source on ``magnitude``'s device.
        shared: One subset of positions for every line instead of one per line.
        rescale: Multiply the sampled sums by ``length / k``.

    Returns:
        The sums, shaped for broadcasting against ``magnitude``.
    """
    length = magnitude.shape[dim]
    if k >= length:
        return magnitude.sum(dim=dim, keepdim=True)
    if shared:
        picks = torch.randperm(length, generator=generator, device=magnitude.device)[:k]
        total = magnitude.index_select(dim, picks).sum(dim=dim, keepdim=True)
    else:
        # top-k of uniform noise = a uniformly random k-subset per line, exactly k entries
        noise = torch.rand(magnitude.shape, generator=generator, device=magnitude.device)
        picks = noise.topk(k, dim=dim, sorted=False).indices  # (rows, k) or (k, cols)
        total = magnitude.gather(dim, picks).sum(dim=dim, keepdim=True)
    return total * (length / k) if rescale else total


def stoch_relative_importance(weight: torch.Tensor, opts: StochOptions) -> torch.Tensor:
    """RIA's relative-importance term with sampled row and column sums, ``(rows, cols)`` fp32.

    One generator, seeded with :func:`layer_seed`, draws the row subsets first, then the
    column subsets. With ``beta = 1`` and ``size = proportional`` both sums are exact and the
    term equals :func:`neuroal.criteria.ria.relative_importance` bit for bit.
    """
    magnitude = weight.detach().to(torch.float32).abs()
    rows, cols = magnitude.shape
    k_row, k_col = opts.subset_sizes(rows, cols)
    if k_row >= cols and k_col >= rows:
        return relative_importance(weight)
    generator = torch.Generator(device=magnitude.device)
    generator.manual_seed(layer_seed(weight, opts.seed))
    shared = opts.subsets == "shared"
    row_sums = sampled_abs_sums(magnitude, 1, k_row, generator, shared, opts.rescale)  # (rows, 1)
    col_sums = sampled_abs_sums(magnitude, 0, k_col, generator, shared, opts.rescale)  # (1, cols)
    return magnitude / col_sums.clamp_min(_SAMPLED_SUM_EPS) + magnitude / row_sums.clamp_min(_SAMPLED_SUM_EPS)


def stoch_ria_score(weight: torch.Tensor, norm: torch.Tensor | None, opts: StochOptions) -> torch.Tensor:
    """stochRIA score (paper eq. 4 as the reviewers describe it; criteria.md §8.5).

    Args:
        weight: ``(rows, cols)`` weight.
        norm: ``(cols,)`` input-channel norms ``x_j``; required when ``opts.activation``.
        opts: Sampling options.

    Returns:
        ``(rows, cols)`` fp32 scores ``stochRI_ij * x_j ** a`` (without the factor when
        ``activation`` is off).
    """
    term = stoch_relative_importance(weight, opts)
    if not opts.activation:
        return term
    if norm is None:
        raise ValueError("stoch_ria with activation=true needs the input norms (sq_norm statistic)")
    return term * norm.to(torch.float32).pow(opts.a).unsqueeze(0)


def _stoch_ria(weight: torch.Tensor, stats: LayerStats, options: Mapping[str, Any]) -> torch.Tensor:
    opts = StochOptions.parse(options)
    norm = input_norm(stats, weight) if opts.activation else None
    return stoch_ria_score(weight, norm, opts)


def _stoch_info(weight: torch.Tensor, stats: LayerStats, options: Mapping[str, Any]) -> dict[str, Any]:
    opts = StochOptions.parse(options)
    k_row, k_col = opts.subset_sizes(*weight.shape)
    return {"seed": layer_seed(weight, opts.seed), "row_subset": k_row, "col_subset": k_col}


# --------------------------------------------------------------------------- registration

InfoFn = Callable[[torch.Tensor, LayerStats, Mapping[str, Any]], dict[str, Any]]


@dataclass(eq=False)
class ReportingScoreCriterion(ScoreCriterion):
    """A :class:`ScoreCriterion` that adds per-layer facts to the report (``info_fn``).

    Attributes:
        info_fn: ``(weight, stats, options) -> dict`` of small JSON-able values.
    """

    info_fn: InfoFn | None = None

    def prune(self, weight: torch.Tensor, stats: LayerStats, target: LayerTarget,
              options: Mapping[str, Any]) -> LayerPruneResult:
        """Score, build the mask (as :class:`ScoreCriterion`) and record ``info_fn``'s facts."""
        result = super().prune(weight, stats, target, options)
        if self.info_fn is not None:
            result.info.update(self.info_fn(weight, stats, merged_options(self.defaults, options)))
        return result


SYMWANDA = ReportingScoreCriterion(
    name="symwanda",
    score_fn=_symwanda,
    needs=frozenset({STAT_SQ_NORM, STAT_OUT_SQ_NORM}),
    default_group="matrix",
    info_fn=lambda weight, stats, options: _scale_info(stats, weight),
    label="SymWanda (reconstructed)",
)

OWANDA = ScoreCriterion(
    name="owanda", score_fn=_owanda, needs=frozenset({STAT_OUT_SQ_NORM}), default_group="matrix",
    label="OWanda (reconstructed)",
)

RIA_LP = ScoreCriterion(
    name="ria_lp",
    score_fn=_ria_lp,
    needs=frozenset({STAT_SQ_NORM}),
    default_group="matrix",
    defaults=frozen({"p": 1.0, "a": 0.5}),
    label="lp-RIA (reconstructed)",
)

STOCH_RIA = ReportingScoreCriterion(
    name="stoch_ria",
    score_fn=_stoch_ria,
    needs=frozenset({STAT_SQ_NORM}),
    default_group="matrix",
    defaults=frozen({"beta": 0.1, "subsets": "independent", "size": "proportional",
                     "rescale": True, "activation": True, "a": 0.5, "seed": 0}),
    info_fn=_stoch_info,
    label="stochRIA (reconstructed)",
)
