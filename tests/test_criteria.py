"""Criteria: scores against brute-force loops, SparseGPT reconstruction and failure paths."""

from __future__ import annotations

import logging

import pytest
import reference_masks as ref
import torch

from neuroal.criteria import (
    CRITERIA,
    STAT_HESSIAN,
    STAT_SQ_NORM,
    CholeskyFailureError,
    LayerStats,
    LayerTarget,
    NMPattern,
)
from neuroal.criteria.masking import NonFiniteScoresError
from neuroal.runtime.registry import UnknownNameError


def small_layer(rows: int = 4, cols: int = 8, seed: int = 0) -> tuple[torch.Tensor, LayerStats]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    sq_norm = torch.rand(cols, generator=gen) * 3 + 0.1
    return weight, LayerStats(nsamples=1, sq_norm=sq_norm)


def loop_wanda(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    out = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            out[i, j] = abs(float(weight[i, j])) * float(sq_norm[j]) ** 0.5
    return out


def loop_ria(weight: torch.Tensor, sq_norm: torch.Tensor, a: float) -> torch.Tensor:
    rows, cols = weight.shape
    out = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            w = abs(float(weight[i, j]))
            col_sum = sum(abs(float(weight[r, j])) for r in range(rows))
            row_sum = sum(abs(float(weight[i, c])) for c in range(cols))
            out[i, j] = (w / col_sum + w / row_sum) * (float(sq_norm[j]) ** 0.5) ** a
    return out


def loop_multiflow(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    flow = [
        [abs(float(weight[i, j])) * float(sq_norm[j]) ** 0.5 for j in range(cols)]
        for i in range(rows)
    ]
    out = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            o_i = sum(flow[i]) / cols
            n_j = sum(flow[r][j] for r in range(rows)) / rows
            out[i, j] = abs(float(weight[i, j])) * o_i * n_j
    return out


def prune(name: str, weight: torch.Tensor, stats: LayerStats, target: LayerTarget):
    return CRITERIA.get(name).prune(weight, stats, target, {})


def test_registry_names_and_unknown_name() -> None:
    assert CRITERIA.names() == ["magnitude", "multiflow", "owanda", "ria", "ria_lp", "sparsegpt",
                                "stoch_ria", "symwanda", "wanda"]
    with pytest.raises(UnknownNameError, match="available: magnitude, multiflow, owanda, ria"):
        CRITERIA.get("wandaa")


def test_metadata() -> None:
    expected = {
        "magnitude": (frozenset(), "matrix"),
        "wanda": (frozenset({STAT_SQ_NORM}), "row"),
        "ria": (frozenset({STAT_SQ_NORM}), "matrix"),
        "multiflow": (frozenset({STAT_SQ_NORM}), "row"),
        "sparsegpt": (frozenset({STAT_HESSIAN}), "block128"),
    }
    for name, (needs, group) in expected.items():
        crit = CRITERIA.get(name)
        assert (crit.needs, crit.default_group) == (needs, group)
    assert dict(CRITERIA.get("ria").defaults) == {"a": 0.5}
    assert dict(CRITERIA.get("sparsegpt").defaults) == {
        "percdamp": 0.01,
        "blocksize": 128,
        "on_cholesky_failure": "raise",
    }
    assert not CRITERIA.get("sparsegpt").supports_row_ratios


def test_wanda_matches_brute_force_per_row() -> None:
    weight, stats = small_layer()
    scores = CRITERIA.get("wanda").score(weight, stats)
    torch.testing.assert_close(scores, loop_wanda(weight, stats.sq_norm))
    result = prune("wanda", weight, stats, LayerTarget(0.5))
    assert result.weight is None
    assert torch.equal(result.mask, ref.row_mask(loop_wanda(weight, stats.sq_norm), 0.5))
    assert result.mask.sum(dim=1).tolist() == [4, 4, 4, 4]


def test_wanda_hand_made_layer() -> None:
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    stats = LayerStats(nsamples=1, sq_norm=torch.tensor([16.0, 1.0, 1.0, 0.0]))
    # scores: [[4, 2, 3, 0], [16, 3, 2, 0]] -> per row prune the two lowest
    mask = prune("wanda", weight, stats, LayerTarget(0.5)).mask
    assert mask.tolist() == [[False, True, False, True], [False, False, True, True]]


@pytest.mark.parametrize("a", [0.5, 1.0])
def test_ria_matches_brute_force_per_matrix(a: float) -> None:
    weight, stats = small_layer(6, 8, seed=2)
    scores = CRITERIA.get("ria").score(weight, stats, {"a": a})
    expected = loop_ria(weight, stats.sq_norm, a)
    torch.testing.assert_close(scores, expected)
    result = CRITERIA.get("ria").prune(weight, stats, LayerTarget(0.5), {"a": a})
    assert torch.equal(result.mask, ref.matrix_mask(expected, 0.5))
    assert int(result.mask.sum()) == 24


def test_ria_zero_column_is_finite() -> None:
    weight, stats = small_layer(4, 8, seed=5)
    weight[:, 3] = 0.0
    mask = prune("ria", weight, stats, LayerTarget(0.25)).mask
    assert bool(mask[:, 3].all())


def test_multiflow_matches_brute_force() -> None:
    weight, stats = small_layer(5, 8, seed=3)
    scores = CRITERIA.get("multiflow").score(weight, stats)
    expected = loop_multiflow(weight, stats.sq_norm)
    torch.testing.assert_close(scores, expected)
    result = prune("multiflow", weight, stats, LayerTarget(0.5))
    assert torch.equal(result.mask, ref.row_mask(expected, 0.5))


def test_magnitude_per_matrix_and_group_override() -> None:
    weight, _ = small_layer(4, 8, seed=4)
    stats = LayerStats()
    assert torch.equal(
        prune("magnitude", weight, stats, LayerTarget(0.5)).mask,
        ref.matrix_mask(weight.abs(), 0.5),
    )
    per_row = prune("magnitude", weight, stats, LayerTarget(0.5, group="row")).mask
    assert torch.equal(per_row, ref.row_mask(weight.abs(), 0.5))


@pytest.mark.parametrize("name", ["wanda", "ria", "multiflow"])
def test_scaling_statistics_leaves_masks_unchanged(name: str) -> None:
    weight, stats = small_layer(32, 64, seed=6)
    scaled = LayerStats(nsamples=1, sq_norm=stats.sq_norm * 3.7)
    for target in (
        LayerTarget(0.5),
        LayerTarget(0.5, group="matrix"),
        LayerTarget(0.5, nm=NMPattern(2, 4)),
    ):
        assert torch.equal(
            prune(name, weight, stats, target).mask, prune(name, weight, scaled, target).mask
        )


def test_activations_change_the_wanda_mask() -> None:
    weight, stats = small_layer(32, 64, seed=6)
    wanda = prune("wanda", weight, stats, LayerTarget(0.5)).mask
    magnitude = prune("magnitude", weight, stats, LayerTarget(0.5, group="row")).mask
    assert not torch.equal(wanda, magnitude)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "ria", "multiflow"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_score_criteria_nm_exact(name: str, n: int, m: int) -> None:
    weight, stats = small_layer(16, 64, seed=7)
    mask = prune(name, weight, stats, LayerTarget(1 - n / m, nm=NMPattern(n, m))).mask
    kept = (~mask).reshape(16, 64 // m, m).sum(dim=2)
    assert bool((kept == n).all())


def test_score_criteria_compute_in_fp32_and_never_modify_inputs() -> None:
    weight, stats = small_layer(8, 32, seed=8)
    half = weight.to(torch.bfloat16)
    before = half.clone()
    for name in ("magnitude", "wanda", "ria", "multiflow"):
        crit = CRITERIA.get(name)
        scores = crit.score(half, stats)
        assert scores.dtype == torch.float32
        assert torch.equal(crit.score(half.float(), stats), scores)
        crit.prune(half, stats, LayerTarget(0.5), {})
    assert torch.equal(half, before)


def test_per_row_ratios_for_score_criteria() -> None:
    weight, stats = small_layer(4, 10, seed=9)
    ratios = torch.tensor([0.0, 0.25, 0.5, 0.95], dtype=torch.float64)
    mask = prune("wanda", weight, stats, LayerTarget(ratios)).mask
    assert mask.sum(dim=1).tolist() == [0, 3, 5, 10]  # cols - floor((1 - s) * cols)


def test_missing_statistic_raises() -> None:
    weight, _ = small_layer()
    with pytest.raises(ValueError, match="sq_norm"):
        prune("wanda", weight, LayerStats(), LayerTarget(0.5))
    with pytest.raises(ValueError, match="hessian"):
        prune("sparsegpt", weight, LayerStats(), LayerTarget(0.5))


def test_non_finite_statistics_raise() -> None:
    weight, stats = small_layer()
    bad = stats.sq_norm.clone()
    bad[1] = float("nan")
    with pytest.raises(NonFiniteScoresError):
        prune("wanda", weight, LayerStats(sq_norm=bad), LayerTarget(0.5))


# --- SparseGPT -------------------------------------------------------------------------------


def correlated_layer(
    rows: int = 32, cols: int = 64, tokens: int = 512, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, LayerStats]:
    """Weight, inputs X (tokens, cols) with strongly correlated channels, and their stats."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, cols // 4, generator=gen)
    mixing = torch.randn(cols // 4, cols, generator=gen)
    x = latent @ mixing + 0.1 * torch.randn(tokens, cols, generator=gen)
    weight = torch.randn(rows, cols, generator=gen)
    stats = LayerStats(nsamples=1, sq_norm=x.square().sum(dim=0), hessian=2 * x.T @ x)
    return weight, x, stats


def reconstruction_error(x: torch.Tensor, dense: torch.Tensor, pruned: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ dense.T - x @ pruned.T))


def test_sparsegpt_beats_wanda_on_reconstruction() -> None:
    weight, x, stats = correlated_layer()
    result = prune("sparsegpt", weight, stats, LayerTarget(0.5))
    wanda_mask = prune("wanda", weight, stats, LayerTarget(0.5)).mask
    wanda_weight = weight.masked_fill(wanda_mask, 0.0)
    assert result.weight is not None
    sgpt_error = reconstruction_error(x, weight, result.weight)
    wanda_error = reconstruction_error(x, weight, wanda_weight)
    assert sgpt_error < 0.7 * wanda_error
    assert result.info["error"] > 0 and result.info["damp_retries"] == []


def test_sparsegpt_output_contract() -> None:
    weight, _, stats = correlated_layer(rows=16, cols=192)
    dense = weight.to(torch.bfloat16)
    before = dense.clone()
    result = prune("sparsegpt", dense, stats, LayerTarget(0.5))
    assert torch.equal(dense, before)
    assert result.weight is not None and result.weight.dtype == torch.bfloat16
    assert bool((result.weight[result.mask] == 0).all())
    assert int(result.mask[:, :128].sum()) == 16 * 64  # per-128-column block count
    assert int(result.mask[:, 128:].sum()) == 16 * 32  # narrower last block
    assert not torch.equal(result.weight[~result.mask], dense[~result.mask])  # it updated


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_sparsegpt_nm_exact(n: int, m: int) -> None:
    weight, _, stats = correlated_layer(rows=16, cols=64)
    result = prune("sparsegpt", weight, stats, LayerTarget(1 - n / m, nm=NMPattern(n, m)))
    assert result.weight is not None
    kept = (~result.mask).reshape(16, 64 // m, m).sum(dim=2)
    assert bool((kept == n).all())
    assert bool((result.weight[result.mask] == 0).all())


def inverse_upper(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Written from the SparseGPT paper, in float64 and without the library: dead inputs
    (H_jj = 0) get H_jj = 1 and a zero weight column; 1 % of the mean diagonal is added; the
    upper factor U of the inverse (U^T U = H^-1) is the transpose of the lower Cholesky factor
    of ``inv(H)``. Returns ``(U, W)``."""
    h, w = hessian.double().clone(), weight.double().clone()
    dead = torch.nonzero(h.diagonal() == 0).flatten().tolist()
    for j in dead:
        h[j, j] = 1.0
        w[:, j] = 0.0
    h += 0.01 * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(torch.linalg.inv(h)).T, w


def naive_sweep(weight: torch.Tensor, hessian: torch.Tensor, ratio: float) -> torch.Tensor:
    """Column sweep updating every later column at once (no lazy block updates), float64;
    each 128-column block's mask is the plain-sort matrix mask of w^2 / U_jj^2."""
    upper, w = inverse_upper(hessian, weight)
    cols = w.shape[1]
    for start in range(0, cols, 128):
        stop = min(start + 128, cols)
        diag = upper.diagonal()[start:stop]
        mask = ref.matrix_mask(w[:, start:stop] ** 2 / diag**2, ratio)
        for j in range(start, stop):
            pruned = torch.where(mask[:, j - start], 0.0, w[:, j])
            err = (w[:, j] - pruned) / upper[j, j]
            w[:, j + 1 :] -= torch.outer(err, upper[j, j + 1 :])
            w[:, j] = pruned
    return w.float()


def test_sparsegpt_lazy_updates_match_naive_sweep() -> None:
    weight, _, stats = correlated_layer(rows=8, cols=192, seed=3)
    result = prune("sparsegpt", weight, stats, LayerTarget(0.5))
    torch.testing.assert_close(
        result.weight, naive_sweep(weight, stats.hessian, 0.5), rtol=1e-4, atol=1e-4
    )


def test_sparsegpt_dead_inputs() -> None:
    weight, x, _ = correlated_layer(rows=8, cols=32)
    x[:, 5] = 0.0
    stats = LayerStats(nsamples=1, hessian=2 * x.T @ x)
    result = prune("sparsegpt", weight, stats, LayerTarget(0.25))
    assert result.info["dead_inputs"] == 1
    assert bool((result.weight[:, 5] == 0).all())


def indefinite_hessian(cols: int, coupling: float) -> torch.Tensor:
    """Block-diagonal [[1, c], [c, 1]] blocks: eigenvalues 1 +- c, indefinite for c > 1."""
    h = torch.eye(cols)
    for j in range(0, cols, 2):
        h[j, j + 1] = h[j + 1, j] = coupling
    return h


def test_sparsegpt_cholesky_retry_ladder(caplog: pytest.LogCaptureFixture) -> None:
    weight, _ = small_layer(4, 8)
    # damping 0.01 leaves eigenvalue 1.01 - 1.05 < 0; damping 0.1 fixes it (1.1 - 1.05 > 0)
    stats = LayerStats(nsamples=1, hessian=indefinite_hessian(8, 1.05))
    with caplog.at_level(logging.WARNING, logger="neuroal.criteria.sparsegpt"):
        result = prune("sparsegpt", weight, stats, LayerTarget(0.5))
    assert result.info["damp_retries"] == [0.1]
    assert result.info["percdamp"] == 0.1
    assert "percdamp=0.1" in caplog.text
    assert result.weight is not None and int(result.mask.sum()) == 16


def test_sparsegpt_cholesky_failure_modes() -> None:
    weight, _ = small_layer(4, 8)
    stats = LayerStats(nsamples=1, hessian=indefinite_hessian(8, 2.5))  # 1 + 1.0 < 2.5
    with pytest.raises(CholeskyFailureError, match="no_update"):
        prune("sparsegpt", weight, stats, LayerTarget(0.5))
    crit = CRITERIA.get("sparsegpt")
    result = crit.prune(weight, stats, LayerTarget(0.5), {"on_cholesky_failure": "no_update"})
    assert result.weight is None
    assert result.info["cholesky_failure"] == "no_update"
    assert result.info["damp_retries"] == [0.1, 1.0]
    assert torch.equal(result.mask, ref.row_mask(weight.abs(), 0.5))  # H_jj all equal


def test_sparsegpt_nan_hessian_raises() -> None:
    weight, _, stats = correlated_layer(rows=4, cols=16)
    hessian = stats.hessian.clone()
    hessian[3, 4] = float("nan")
    with pytest.raises(NonFiniteScoresError, match="Hessian"):
        prune("sparsegpt", weight, LayerStats(hessian=hessian), LayerTarget(0.5))


def test_sparsegpt_rejects_row_ratios_and_other_groups() -> None:
    weight, _, stats = correlated_layer(rows=4, cols=16)
    with pytest.raises(ValueError, match="per-row ratios"):
        prune("sparsegpt", weight, stats, LayerTarget(torch.full((4,), 0.5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="block128"):
        prune("sparsegpt", weight, stats, LayerTarget(0.5, group="row"))
    with pytest.raises(ValueError, match="divisible"):
        prune(
            "sparsegpt",
            weight[:, :10],
            LayerStats(hessian=stats.hessian[:10, :10]),
            LayerTarget(0.5, nm=NMPattern(2, 4)),
        )


def test_nm_mask_helper_is_what_sparsegpt_uses_per_group() -> None:
    # One block of exactly M columns: the N:M choice is made on the untouched first group.
    weight, _, stats = correlated_layer(rows=8, cols=4, tokens=64)
    result = prune("sparsegpt", weight, stats, LayerTarget(0.5, nm=NMPattern(2, 4)))
    upper, _ = inverse_upper(stats.hessian, weight)
    expected = ref.nm_mask(weight.double() ** 2 / upper.diagonal() ** 2, 2, 4)
    assert torch.equal(result.mask, expected)
