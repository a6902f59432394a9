"""DSnoT and R²-DSnoT: training-free mask refinement by swapping weights inside a row.

DSnoT ("Dynamic Sparse No Training", Zhang et al., arXiv 2310.08915; recovery.md §1) starts from
a pruned layer and, per output row ``i``, repeatedly regrows one pruned weight and prunes one kept
weight so that the expected reconstruction error

    eps_i = sum_j (W_dense_ij - W_ij * keep_ij) * m_j    (= sum_{j pruned} c_ij, c_ij = W_ij * m_j)

shrinks, where ``m_j`` is the per-sequence *sum* of input ``j`` averaged over sequences
(:attr:`LayerStats.mean`). One swap per accepted cycle keeps every row's sparsity exactly; no
weight is ever updated. R²-DSnoT (the Symmetric Pruning paper, arXiv 2501.18980; recovery.md §2)
is the same engine with other keys: relative-importance reweighting in *one* phase, square-root
activations and a regularised decision boundary. Its exact form is not public, so every knob is
an option and reports label it "R²-DSnoT (reconstructed)".

Orientation follows ``torch.nn.Linear``: weights and masks are ``(rows, cols)``, masks are bool
with ``True`` = pruned. All functions are pure: no hooks, logging, devices or config objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import torch

from neuroal.criteria.base import STAT_MEAN, STAT_SQ_NORM, STAT_VAR, LayerStats, NMPattern
from neuroal.criteria.ria import relative_importance
from neuroal.criteria.scored import stat_vector

STAGE_PRUNE = "prune"
LAYER_CHOICES = ("attention", "all")
PRUNE_KEYS = ("wanda", "magnitude")
RELATIVE_PHASES = ("prune", "grow")
_TINY = torch.finfo(torch.float32).tiny

KeyFn = Callable[[torch.Tensor, LayerStats, Mapping[str, Any]], "RefineKeys"]
"""``keys(weight_fp32 (rows, cols), stats, options) -> RefineKeys``."""


@dataclass(frozen=True)
class RefineKeys:
    """The three per-entry quantities that drive the swap loop, all ``(rows, cols)`` fp32.

    Attributes:
        contribution: ``c_ij = W_ij * m_j``: pruning ``j`` adds it to ``eps_i``, regrowing
            ``j`` subtracts it.
        grow: Growth key; its sign must be the sign of ``c`` (``0`` where ``c = 0``). Pruned
            entries are regrown from the largest key (``eps > 0``) or the most negative one.
        prune: Prune key (lowest pruned first), e.g. the Wanda score.
    """

    contribution: torch.Tensor
    grow: torch.Tensor
    prune: torch.Tensor


# --------------------------------------------------------------------------- keys


def _stat(stats: LayerStats, name: str, cols: int, device: torch.device) -> torch.Tensor:
    """One ``(cols,)`` statistic as fp32 on ``device``; a clear error when missing or bad."""
    return stat_vector(getattr(stats, name), name, cols, device)


def contribution_and_growth(weight: torch.Tensor, stats: LayerStats,
                            var_power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DSnoT's ``c_ij = W_ij * m_j`` and growth key ``c_ij / v_j ** p`` (recovery.md §1.2).

    Args:
        weight: ``(rows, cols)`` fp32 weight.
        stats: Needs ``mean`` (m) and ``var`` (v), both ``(cols,)``.
        var_power: ``p``; 0 disables the variance denominator.

    Returns:
        ``c`` and the growth key, both ``(rows, cols)`` fp32. A zero variance is clamped to the
        smallest normal float (a constant input channel): ``0 / v`` stays 0 instead of NaN.
    """
    cols = weight.shape[1]
    mean = _stat(stats, STAT_MEAN, cols, weight.device)
    c = weight * mean.unsqueeze(0)
    if var_power == 0:
        return c, c.clone()
    var = _stat(stats, STAT_VAR, cols, weight.device)
    denom = var.clamp_min(0.0).pow(float(var_power)).clamp_min(_TINY)
    return c, c / denom.unsqueeze(0)


def _act_norm(stats: LayerStats, weight: torch.Tensor) -> torch.Tensor:
    """``sqrt(s_j)``, ``(cols,)`` fp32 (proportional to ``||X_j||_2``)."""
    return _stat(stats, STAT_SQ_NORM, weight.shape[1], weight.device).clamp_min(0.0).sqrt()


def dsnot_keys(weight: torch.Tensor, stats: LayerStats, options: Mapping[str, Any]) -> RefineKeys:
    """DSnoT keys: growth ``c / v^p``; prune key Wanda ``|W| * sqrt(s)`` (or ``|W|``).

    Options: ``var_power`` (p, default 1), ``prune_key`` (``wanda`` | ``magnitude``).
    """
    c, grow = contribution_and_growth(weight, stats, float(options["var_power"]))
    prune = weight.abs()
    if options["prune_key"] == "wanda":
        prune = prune * _act_norm(stats, weight).unsqueeze(0)
    return RefineKeys(c, grow, prune)


def r2dsnot_keys(weight: torch.Tensor, stats: LayerStats,
                 options: Mapping[str, Any]) -> RefineKeys:
    """R²-DSnoT keys [reconstructed, recovery.md §2.2].

    * Activation term ``a_j = ||X_j||_2 ** alpha`` (``alpha`` = 0.5: the square-root
      activation), computed as ``sqrt(s_j) ** alpha``.
    * ``relative_phase: prune``: prune key ``RI_ij * a_j`` with RI the relative importance
      ``|W_ij| / sum_i' |W_i'j| + |W_ij| / sum_j' |W_ij'|`` (criteria.md §5); growth key as DSnoT.
    * ``relative_phase: grow``: prune key ``|W_ij| * a_j``; growth key ``(c_ij / v_j^p) * RI_ij``
      (RI >= 0 keeps the sign of ``c``). Reweighting both phases is rejected by the config.
    * Regularised decision boundary: with ``n_j = ||W_:,j||_p`` (column l_p norm over rows),
      growth key ``sign(g) * (|g| + gamma1 * n_j)`` and prune key ``+ gamma2 * n_j``; with the
      default ``gamma1 = gamma2 = 0`` the hook is inert.
    """
    c, grow = contribution_and_growth(weight, stats, float(options["var_power"]))
    act = _act_norm(stats, weight).pow(float(options["alpha"])).unsqueeze(0)  # (1, cols)
    if options["relative_phase"] == "prune":
        prune = relative_importance(weight) * act
    else:
        prune = weight.abs() * act
        grow = grow * relative_importance(weight)
    gamma1, gamma2 = float(options["gamma1"]), float(options["gamma2"])
    if gamma1 or gamma2:
        norms = torch.linalg.vector_norm(weight, ord=float(options["p"]), dim=0).unsqueeze(0)
        grow = torch.sign(grow) * (grow.abs() + gamma1 * norms)
        prune = prune + gamma2 * norms
    return RefineKeys(c, grow, prune)


# --------------------------------------------------------------------------- candidate lists


@dataclass
class TwoEndedList:
    """Static per-row candidate order read from both ends (recovery.md §1.2-1.3).

    ``order[i]`` lists column indices; its first ``n_front[i]`` entries serve one direction,
    its last ``n_back[i]`` the other. A pointer that leaves its valid range reports ``ok =
    False`` (the reference reads on into zero-key or already-kept entries; we stop the row).
    """

    order: torch.Tensor  # (rows, cols) int64
    n_front: torch.Tensor  # (rows,) int64
    n_back: torch.Tensor  # (rows,) int64
    lo: torch.Tensor = field(init=False)
    hi: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        rows, cols = self.order.shape
        self.lo = torch.zeros(rows, dtype=torch.int64, device=self.order.device)
        self.hi = torch.full((rows,), cols - 1, dtype=torch.int64, device=self.order.device)

    def take(self, from_back: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next candidate of every row (back end where ``from_back``); advances the pointers.

        Returns:
            Column index ``(rows,)`` and whether it lies in the valid range ``(rows,)``.
        """
        cols = self.order.shape[1]
        pos = torch.where(from_back, self.hi, self.lo)
        ok = torch.where(from_back, self.hi >= cols - self.n_back, self.lo < self.n_front)
        index = self.order.gather(1, pos.clamp(0, cols - 1).unsqueeze(1)).squeeze(1)
        self.hi = self.hi - from_back.long()
        self.lo = self.lo + (~from_back).long()
        return index, ok


def growth_list(grow_key: torch.Tensor, mask: torch.Tensor) -> TwoEndedList:
    """Pruned entries sorted ascending by growth key (kept entries count as 0), once.

    The front holds the negative keys (most negative first, served when ``eps <= 0``), the back
    the positive ones (largest last, served when ``eps > 0``).
    """
    key = torch.where(mask, grow_key, torch.zeros((), dtype=grow_key.dtype, device=mask.device))
    order = torch.sort(key, dim=1, stable=True).indices
    return TwoEndedList(order, (key < 0).sum(1), (key > 0).sum(1))


class PruneSide(Protocol):
    """Chooses each row's prune candidate for a cycle and learns which swaps were made."""

    def take(self, grow: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate column ``(rows,)`` given the regrown columns and ``eps``, and validity."""
        ...

    def commit(self, rows: torch.Tensor, pruned: torch.Tensor) -> None:
        """Record the swaps made in ``rows`` (columns ``pruned``)."""
        ...


@dataclass
class RowPruneList:
    """Unstructured prune side: a static :class:`TwoEndedList` of kept weights, back end
    (positive contributions) when ``eps < 0``, front end (negative ones) otherwise."""

    candidates: TwoEndedList

    def take(self, grow: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.candidates.take(eps < 0)

    def commit(self, rows: torch.Tensor, pruned: torch.Tensor) -> None:
        """Nothing to record: the list is static and each entry is visited once."""


def prune_list(prune_key: torch.Tensor, contribution: torch.Tensor,
               mask: torch.Tensor) -> RowPruneList:
    """Kept entries ordered for pruning (recovery.md §1.2).

    Kept weights sorted ascending by prune key, then rearranged: negative-contribution ones fill
    the list from the front in that order (served when ``eps > 0``), positive-contribution ones
    fill it from the back (the lowest-scoring positive one last, served when ``eps < 0``).
    Pruned and zero-contribution entries sit in between and are never valid.
    """
    rows, cols = mask.shape
    rank = torch.empty_like(mask, dtype=torch.int64)
    rank.scatter_(1, torch.sort(prune_key, dim=1, stable=True).indices,
                  torch.arange(cols, device=mask.device).expand(rows, cols))
    kept = ~mask
    negative = kept & (contribution < 0)
    positive = kept & (contribution > 0)
    group = torch.ones_like(rank) + positive.long() - negative.long()  # 0 front, 1 middle, 2 back
    within = torch.where(positive, cols - 1 - rank, rank)  # positives reversed: lowest last
    order = torch.sort(group * cols + within, dim=1).indices  # unique keys: no ties
    return RowPruneList(TwoEndedList(order, negative.sum(1), positive.sum(1)))


class GroupPicker:
    """N:M prune side (recovery.md §1.4): in the regrown weight's M-group, the initially kept,
    not yet pruned weight with the smallest prune key. A group with none left reports ``ok =
    False`` (the reference's sentinel then picks an already-pruned weight; we stop the row)."""

    def __init__(self, prune_key: torch.Tensor, mask: torch.Tensor, m: int) -> None:
        self.key = prune_key
        self.available = ~mask  # (rows, cols) initially kept and not yet pruned
        self.m = m

    def take(self, grow: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prune candidate ``(rows,)`` for regrown columns ``grow`` and whether it exists."""
        start = (grow // self.m) * self.m
        cols = start.unsqueeze(1) + torch.arange(self.m, device=grow.device)  # (rows, m)
        free = self.available.gather(1, cols)
        key = self.key.gather(1, cols).masked_fill(~free, float("inf"))
        choice = cols.gather(1, key.argmin(dim=1, keepdim=True)).squeeze(1)
        return choice, free.any(dim=1)

    def commit(self, rows: torch.Tensor, pruned: torch.Tensor) -> None:
        self.available[rows, pruned] = False


# --------------------------------------------------------------------------- swap loop


@dataclass
class LoopResult:
    """Outcome of the swap loop: new mask, final ``eps`` (float64) and counters."""

    mask: torch.Tensor
    eps: torch.Tensor
    cycles: int
    swaps: torch.Tensor  # (rows,) int64
    stopped: torch.Tensor  # (rows,) bool: ran out of candidates while still active


def initial_error(contribution: torch.Tensor, mask: torch.Tensor, dense: torch.Tensor | None,
                  mean: torch.Tensor) -> torch.Tensor:
    """``eps_i`` in float64, shape ``(rows,)``.

    Without a weight update (``dense`` None) ``eps_i = sum_{j pruned} c_ij``. After SparseGPT the
    kept weights differ from the dense ones, so ``eps_i = sum_j W_dense_ij m_j - sum_{j kept}
    c_ij``: still the expected dense-minus-sparse output, and swaps update it the same way.
    """
    if dense is None:
        return torch.where(mask, contribution, 0.0).sum(1, dtype=torch.float64)
    full = (dense.to(torch.float64) * mean.to(torch.float64).unsqueeze(0)).sum(1)
    return full - torch.where(mask, 0.0, contribution).sum(1, dtype=torch.float64)


def swap_loop(contribution: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor,
              grow: TwoEndedList, prune: PruneSide, threshold: float,
              max_cycles: int, sign_check: bool) -> LoopResult:
    """The vectorised DSnoT loop over all rows (recovery.md §1.3; N:M: a GroupPicker).

    Per cycle and row: regrow from the back of ``grow`` if ``eps > 0`` else from the front;
    prune from the back of ``prune`` if ``eps < 0`` else from the front (N:M: inside the regrown
    weight's group). A row stays active while ``|eps| > threshold`` (checked before the swap),
    the optional sign check keeps ``sign(eps + c_prune - c_grow)`` equal to the initial sign,
    and both candidates lie in their valid ranges; a row that fails once is frozen for good.
    """
    mask, eps = mask.clone(), eps.clone()
    rows = mask.shape[0]
    every = torch.arange(rows, device=mask.device)
    sign0 = torch.sign(eps)
    active = torch.ones(rows, dtype=torch.bool, device=mask.device)
    swaps = torch.zeros(rows, dtype=torch.int64, device=mask.device)
    stopped = torch.zeros_like(active)
    cycles = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        g, g_ok = grow.take(eps > 0)
        p, p_ok = prune.take(g, eps)
        new = eps + (contribution[every, p] - contribution[every, g]).to(torch.float64)
        accept = active & (eps.abs() > threshold)
        if sign_check:
            accept &= torch.sign(new) == sign0
        stopped |= accept & ~(g_ok & p_ok)
        active = accept & g_ok & p_ok
        r = active.nonzero().squeeze(1)
        mask[r, p[r]] = True
        mask[r, g[r]] = False
        prune.commit(r, p[r])
        eps = torch.where(active, new, eps)
        swaps += active.long()
    return LoopResult(mask, eps, cycles, swaps, stopped)


# --------------------------------------------------------------------------- refinement


def check_nm(mask: torch.Tensor, nm: NMPattern, when: str) -> None:
    """Raise unless every group of ``nm.m`` consecutive columns has exactly ``m - n`` pruned."""
    rows, cols = mask.shape
    if cols % nm.m:
        raise ValueError(f"N:M {nm}: cols={cols} is not divisible by M={nm.m}")
    pruned = mask.reshape(rows, cols // nm.m, nm.m).sum(-1)  # (rows, groups)
    if not bool((pruned == nm.m - nm.n).all()):
        raise RuntimeError(f"the mask {when} refinement violates the {nm} pattern in "
                           f"{int((pruned != nm.m - nm.n).sum())} group(s)")


def effective_threshold(options: Mapping[str, Any], seqlen: int | None) -> float:
    """``threshold``, or ``threshold * seqlen / threshold_seqlen`` when the latter is set.

    ``eps`` is in units of W x (sum over one sequence), so an absolute threshold means a
    different tolerance at another calibration length (recovery.md §1.5).
    """
    threshold = float(options["threshold"])
    reference = options.get("threshold_seqlen")
    if reference is None:
        return threshold
    if seqlen is None:
        raise ValueError("threshold_seqlen is set but the calibration seqlen is unknown")
    return threshold * seqlen / float(reference)


def _summary(before: torch.Tensor, result: LoopResult) -> dict[str, Any]:
    """JSON-able facts: cycles, swaps, rows changed/stopped/worse, mean and max |eps|."""
    b, a = before.abs(), result.eps.abs()
    return {"cycles": result.cycles, "swaps": int(result.swaps.sum()),
            "rows": int(before.numel()), "rows_changed": int((result.swaps > 0).sum()),
            "stopped_rows": int(result.stopped.sum()),
            "rows_worse": int((a > b * (1 + 1e-9) + 1e-12).sum()),
            "eps_before": float(b.mean()) if b.numel() else 0.0,
            "eps_after": float(a.mean()) if a.numel() else 0.0,
            "eps_max_before": float(b.max()) if b.numel() else 0.0,
            "eps_max_after": float(a.max()) if a.numel() else 0.0}


def refine_mask(weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats, keys: KeyFn,
                options: Mapping[str, Any], nm: NMPattern | None = None,
                seqlen: int | None = None, dense: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Refine one layer's mask with the DSnoT loop and the given keys.

    Args:
        weight: ``(rows, cols)`` weights a kept or regrown entry has: the dense weight, or after
            SparseGPT its updated weights where kept and the dense ones where pruned.
        mask: ``(rows, cols)`` bool initial mask, ``True`` = pruned (the criterion's).
        stats: ``mean`` and ``var`` (and ``sq_norm`` for activation-weighted prune keys).
        keys: :func:`dsnot_keys` or :func:`r2dsnot_keys`.
        options: Resolved options (``max_cycles``, ``threshold``, ``threshold_seqlen``,
            ``sign_check`` and the key options).
        nm: The N:M pattern of ``mask``, or None for the unstructured loop.
        seqlen: Calibration tokens per sequence (for ``threshold_seqlen``).
        dense: The dense weight when it differs from ``weight`` at kept entries (SparseGPT).

    Returns:
        The new mask (every row keeps its count; N:M stays valid) and a summary dict.
    """
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool of shape {tuple(weight.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if nm is not None:
        check_nm(mask, nm, "before")
    w = weight.detach().to(torch.float32)
    k = keys(w, stats, options)
    mean = _stat(stats, STAT_MEAN, w.shape[1], w.device)
    eps = initial_error(k.contribution, mask, None if dense is None else dense.detach(), mean)
    sign_check = options.get("sign_check")
    sign_check = nm is not None if sign_check is None else bool(sign_check)
    if nm is not None and not sign_check:
        raise ValueError("the N:M loop always checks the sign (recovery.md §1.4); "
                         "sign_check=false is only valid for unstructured masks")
    prune: PruneSide = (prune_list(k.prune, k.contribution, mask) if nm is None
                        else GroupPicker(k.prune, mask, nm.m))
    result = swap_loop(k.contribution, mask, eps, growth_list(k.grow, mask), prune,
                       effective_threshold(options, seqlen), int(options["max_cycles"]), sign_check)
    if not torch.equal(result.mask.sum(1), mask.sum(1)):
        raise RuntimeError("mask refinement changed a row's sparsity; this is a bug")
    if nm is not None:
        check_nm(result.mask, nm, "after")
    return result.mask, _summary(eps, result)


# --------------------------------------------------------------------------- registered steps


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


DSNOT_DEFAULTS = _frozen({
    "max_cycles": 50,  # T; the reference default since 297993f (Neural Compressor: 100)
    "threshold": 0.1,  # absolute |eps| below which a row stops
    "threshold_seqlen": None,  # e.g. 2048: scale the threshold by seqlen / 2048
    "var_power": 1,  # p in the growth key c / v^p; 0 disables the denominator
    "sign_check": None,  # None: off for unstructured (faithful), always on for N:M
    "layers": "attention",  # attention (faithful: MLP keeps its mask) | all
    "prune_key": "wanda",  # wanda |W| sqrt(s) (faithful) | magnitude |W|
})
R2DSNOT_DEFAULTS = _frozen({
    **{k: v for k, v in DSNOT_DEFAULTS.items() if k != "prune_key"},
    "relative_phase": "prune",  # prune | grow: where RI reweights (never both, App. D)
    "alpha": 0.5,  # activation exponent: ||X_j||_2 ** alpha (0.5 = square-root activation)
    "gamma1": 0.0,  # grow-side regulariser weight on ||W_:,j||_p
    "gamma2": 0.0,  # prune-side regulariser weight on ||W_:,j||_p
    "p": 2,  # the l_p norm of the regulariser
})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_OPTION_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_cycles": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (50 in the reference)"),
    "threshold": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0.1)"),
    "threshold_seqlen": (lambda v: v is None or (_is_int(v) and v > 0),
                         "null or a positive integer (2048)"),
    "var_power": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (1; 0 disables it)"),
    "sign_check": (lambda v: v is None or isinstance(v, bool), "true, false or null (auto)"),
    "layers": (lambda v: v in LAYER_CHOICES, f"one of {', '.join(LAYER_CHOICES)}"),
    "prune_key": (lambda v: v in PRUNE_KEYS, f"one of {', '.join(PRUNE_KEYS)}"),
    "relative_phase": (lambda v: v in RELATIVE_PHASES,
                       "prune or grow, not both (relative importance in both phases degrades "
                       "performance substantially, Symmetric Pruning App. D)"),
    "alpha": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0.5)"),
    "gamma1": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0)"),
    "gamma2": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0)"),
    "p": (lambda v: _is_number(v) and v > 0, "a number > 0 (2)"),
}


def _check_value(key: str, value: Any) -> str | None:
    """The expectation ``value`` violates, or None (keys absent from the table pass)."""
    if key not in _OPTION_CHECKS:
        return None
    test, expected = _OPTION_CHECKS[key]
    return None if test(value) else expected


@dataclass(frozen=True, eq=False)
class MaskRefiner:
    """A registered block-wise mask refiner (recovery step of stage ``prune``).

    It runs inside the final prune, per linear, after the criterion's mask and before zeroing.

    Attributes:
        name: Registry name (``recover.steps`` entry).
        label: Name used in reports.
        keys: The key function handed to :func:`refine_mask`.
        defaults: Option names and default values (``recover.<name>.<option>``).
        needs: Statistics the engine must collect on every linear's input.
        stage: ``prune``: block-wise, inside the final prune.
        changes_values: False: a refiner swaps which weights are pruned, never their values
            (the resume state stores bit-packed masks unless the criterion changes values).
    """

    name: str
    label: str
    keys: KeyFn
    defaults: Mapping[str, Any]
    needs: frozenset[str] = frozenset({STAT_SQ_NORM, STAT_MEAN, STAT_VAR})
    stage: str = STAGE_PRUNE
    changes_values: bool = False

    def validate(self, options: Mapping[str, Any], cfg: Any) -> list[str]:
        """Errors in resolved ``options`` for the run ``cfg`` (a PruneConfig), named fully."""
        errors = []
        for key, value in options.items():
            expected = _check_value(key, value)
            if expected is not None:
                errors.append(f"recover.{self.name}.{key}={value!r}: expected {expected}")
        if getattr(cfg, "pattern", "unstructured") != "unstructured" and options.get("sign_check") is False:
            errors.append(f"recover.{self.name}.sign_check=False with pattern={cfg.pattern!r}: the "
                          "N:M loop always checks the sign (recovery.md §1.4); remove the option "
                          "or use an unstructured pattern")
        return errors

    def applies_to(self, is_attention: bool, options: Mapping[str, Any]) -> bool:
        """Whether a linear is refined under ``options["layers"]`` (attention or all)."""
        return options["layers"] == "all" or is_attention

    def refine(self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats,
               options: Mapping[str, Any], nm: NMPattern | None = None, seqlen: int | None = None,
               dense: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Refine one linear's mask; see :func:`refine_mask` (``options`` over ``defaults``)."""
        return refine_mask(weight, mask, stats, self.keys, {**self.defaults, **options}, nm,
                           seqlen, dense)


DSNOT = MaskRefiner(name="dsnot", label="DSnoT", keys=dsnot_keys, defaults=DSNOT_DEFAULTS)
R2DSNOT = MaskRefiner(name="r2dsnot", label="R²-DSnoT (reconstructed)", keys=r2dsnot_keys,
                      defaults=R2DSNOT_DEFAULTS)
