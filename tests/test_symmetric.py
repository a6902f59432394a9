"""Symmetric criteria (criteria.md §8): brute-force objective, reductions to Wanda / RIA /
magnitude, stochRIA sampling and seeding, and end-to-end runs on a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import reference_masks as ref
import torch
from conftest import save_tiny_model, tiny_cfg
from torch import nn

from neuroal.capture.collector import StatsCollector
from neuroal.criteria import (
    CRITERIA,
    STAT_OUT_SQ_NORM,
    STAT_SQ_NORM,
    LayerStats,
    LayerTarget,
    NMPattern,
)
from neuroal.criteria.symmetric import (
    StochOptions,
    layer_seed,
    sampled_abs_sums,
    stoch_relative_importance,
)

NEW = ("symwanda", "owanda", "ria_lp", "stoch_ria")
TARGETS = (
    LayerTarget(0.5),
    LayerTarget(0.5, group="row"),
    LayerTarget(0.5, group="matrix"),
    LayerTarget(0.5, nm=NMPattern(2, 4)),
)


def small_layer(rows: int = 6, cols: int = 8, seed: int = 0) -> tuple[torch.Tensor, LayerStats]:
    """Random weight with input and output statistics of unequal scales."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    sq_norm = torch.rand(cols, generator=gen) * 3 + 0.1
    out_sq_norm = torch.rand(rows, generator=gen) * 5 + 0.2
    return weight, LayerStats(nsamples=1, sq_norm=sq_norm, out_sq_norm=out_sq_norm)


def prune(name: str, weight: torch.Tensor, stats: LayerStats, target: LayerTarget, **options):
    return CRITERIA.get(name).prune(weight, stats, target, options)


def score(name: str, weight: torch.Tensor, stats: LayerStats, **options) -> torch.Tensor:
    return CRITERIA.get(name).score(weight, stats, options)


# --------------------------------------------------------------------------- registry


def test_registered_with_spec_defaults() -> None:
    expected = {
        "symwanda": frozenset({STAT_SQ_NORM, STAT_OUT_SQ_NORM}),
        "owanda": frozenset({STAT_OUT_SQ_NORM}),
        "ria_lp": frozenset({STAT_SQ_NORM}),
        "stoch_ria": frozenset({STAT_SQ_NORM}),
    }
    for name, needs in expected.items():
        crit = CRITERIA.get(name)
        assert (crit.needs, crit.default_group) == (needs, "matrix"), name
        assert crit.groups == frozenset({"row", "matrix", "block128"}), name
    assert dict(CRITERIA.get("ria_lp").defaults) == {"p": 1.0, "a": 0.5}
    assert dict(CRITERIA.get("stoch_ria").defaults) == {
        "beta": 0.1, "subsets": "independent", "size": "proportional", "rescale": True,
        "activation": True, "a": 0.5, "seed": 0,
    }


# --------------------------------------------------------------------------- SymWanda


def test_symwanda_without_output_statistics_is_wanda() -> None:
    weight, stats = small_layer(16, 32, seed=1)
    zero = LayerStats(nsamples=1, sq_norm=stats.sq_norm, out_sq_norm=torch.zeros(16))
    assert torch.equal(score("symwanda", weight, zero), score("wanda", weight, zero))
    for target in TARGETS:
        got = prune("symwanda", weight, zero, target).mask
        want = prune("wanda", weight, zero, target if target.group or target.nm else
                     LayerTarget(0.5, group="matrix")).mask
        assert torch.equal(got, want), target
    # with real output statistics the additive y_i term changes the matrix-wide ranking
    assert not torch.equal(prune("symwanda", weight, stats, TARGETS[0]).mask,
                           prune("wanda", weight, stats, TARGETS[2]).mask)


def symmetric_objective(x: torch.Tensor, y: torch.Tensor, dense: torch.Tensor,
                        pruned: torch.Tensor) -> float:
    """g(W_hat) = ||X (W_hat - W)^T||_F + ||Y (W_hat - W)||_F in torch orientation (§8.2)."""
    delta = pruned - dense  # (rows, cols)
    return float(torch.linalg.norm(x @ delta.T) + torch.linalg.norm(y @ delta))


def test_symwanda_is_the_cost_of_removing_one_weight() -> None:
    """Statistics from the capture hooks; each score equals the objective with that single
    weight removed, evaluated from its definition on the raw inputs and outputs."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    sequences, tokens = 3, 5
    inputs = torch.randn(sequences, tokens, 6) * torch.linspace(0.2, 3.0, 6)
    collector = StatsCollector({"lin": linear}, CRITERIA.get("symwanda").needs)
    with collector.attached(), torch.no_grad():
        collector.begin_batch(sequences)
        linear(inputs)
        collector.end_batch()
    stats = collector.stats()["lin"]
    assert stats.nsamples == sequences and tuple(stats.out_sq_norm.shape) == (4,)

    dense = linear.weight.detach().double()
    x = inputs.reshape(-1, 6).double()  # (N*T, cols)
    with torch.no_grad():
        y = linear(inputs).reshape(-1, 4).double()  # (N*T, rows): the layer's outputs
    brute = torch.empty(4, 6, dtype=torch.float64)
    for i in range(4):
        for j in range(6):
            pruned = dense.clone()
            pruned[i, j] = 0.0
            brute[i, j] = symmetric_objective(x, y, dense, pruned)
    # the statistics are means over N sequences: both norms carry the same factor 1/sqrt(N)
    scores = score("symwanda", linear.weight, stats).double() * math.sqrt(sequences)
    torch.testing.assert_close(scores, brute, rtol=1e-5, atol=1e-6)
    mask = prune("symwanda", linear.weight, stats, LayerTarget(0.5)).mask
    assert torch.equal(mask, ref.matrix_mask(brute, 0.5))


def test_symwanda_reports_the_statistics_scale() -> None:
    weight, stats = small_layer()
    info = prune("symwanda", weight, stats, LayerTarget(0.5)).info
    assert info["rule"] == "matrix" and "stat_scale" in info
    expected = float(stats.out_sq_norm.sqrt().mean() / stats.sq_norm.sqrt().mean())
    assert info["y_over_x"] == pytest.approx(expected)


# --------------------------------------------------------------------------- OWanda


def test_owanda_per_row_is_magnitude() -> None:
    weight, stats = small_layer(16, 32, seed=2)
    for target in (LayerTarget(0.5, group="row"), LayerTarget(0.5, nm=NMPattern(2, 4))):
        assert torch.equal(prune("owanda", weight, stats, target).mask,
                           prune("magnitude", weight, stats, target).mask)
    assert torch.equal(prune("owanda", weight, stats, LayerTarget(0.5, group="row")).mask,
                       ref.row_mask(weight.abs(), 0.5))
    # per matrix the output norms matter
    expected = weight.abs() * stats.out_sq_norm.sqrt().unsqueeze(1)
    torch.testing.assert_close(score("owanda", weight, stats), expected)
    owanda = prune("owanda", weight, stats, LayerTarget(0.5)).mask
    assert torch.equal(owanda, ref.matrix_mask(expected, 0.5))
    assert not torch.equal(owanda, prune("magnitude", weight, stats, LayerTarget(0.5)).mask)


def test_output_statistic_is_required_and_checked() -> None:
    weight, stats = small_layer()
    with pytest.raises(ValueError, match="out_sq_norm"):
        prune("owanda", weight, LayerStats(sq_norm=stats.sq_norm), LayerTarget(0.5))
    with pytest.raises(ValueError, match=r"expected \(6,\)"):
        prune("symwanda", weight, LayerStats(sq_norm=stats.sq_norm, out_sq_norm=torch.ones(8)),
              LayerTarget(0.5))


# --------------------------------------------------------------------------- lp-normalised RIA


def loop_ria_lp(weight: torch.Tensor, sq_norm: torch.Tensor, p: float, a: float) -> torch.Tensor:
    rows, cols = weight.shape
    out = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            w = abs(float(weight[i, j]))
            col = [abs(float(weight[r, j])) for r in range(rows)]
            row = [abs(float(weight[i, c])) for c in range(cols)]
            if math.isinf(p):
                col_norm, row_norm = max(col), max(row)
            else:
                col_norm = sum(v**p for v in col) ** (1 / p)
                row_norm = sum(v**p for v in row) ** (1 / p)
            out[i, j] = (w / col_norm + w / row_norm) * (float(sq_norm[j]) ** 0.5) ** a
    return out


def test_ria_lp_with_p1_is_ria_exactly() -> None:
    weight, stats = small_layer(16, 32, seed=3)
    for a in (0.5, 1.0):
        assert torch.equal(score("ria_lp", weight, stats, a=a), score("ria", weight, stats, a=a))
    for target in TARGETS:
        assert torch.equal(prune("ria_lp", weight, stats, target).mask,
                           prune("ria", weight, stats, target).mask)


@pytest.mark.parametrize("p", [2.0, 3.0, math.inf])
def test_ria_lp_matches_brute_force(p: float) -> None:
    weight, stats = small_layer(6, 8, seed=4)
    expected = loop_ria_lp(weight, stats.sq_norm, p, 0.5)
    torch.testing.assert_close(score("ria_lp", weight, stats, p=p), expected)
    mask = prune("ria_lp", weight, stats, LayerTarget(0.5), p=p).mask
    assert torch.equal(mask, ref.matrix_mask(expected, 0.5))


def test_ria_lp_p_changes_the_mask_and_rejects_bad_p() -> None:
    weight, stats = small_layer(32, 64, seed=5)
    assert not torch.equal(prune("ria_lp", weight, stats, LayerTarget(0.5), p=1).mask,
                           prune("ria_lp", weight, stats, LayerTarget(0.5), p=2).mask)
    for bad in (0, -1.0, "two", True):
        with pytest.raises(ValueError, match="criterion.p="):
            score("ria_lp", weight, stats, p=bad)


# --------------------------------------------------------------------------- stochRIA


def test_stoch_ria_reproducible_for_a_seed_and_different_for_another() -> None:
    weight, stats = small_layer(32, 64, seed=6)
    for subsets in ("independent", "shared"):
        first = score("stoch_ria", weight, stats, subsets=subsets, seed=7)
        again = score("stoch_ria", weight, stats, subsets=subsets, seed=7)
        other = score("stoch_ria", weight, stats, subsets=subsets, seed=8)
        assert torch.equal(first, again)
        assert not torch.equal(first, other)
        assert not torch.equal(first, score("ria", weight, stats))
    masks = [prune("stoch_ria", weight, stats, LayerTarget(0.5), seed=s).mask for s in (7, 7, 8)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("subsets", ["independent", "shared"])
def test_stoch_ria_with_beta1_is_ria(subsets: str) -> None:
    weight, stats = small_layer(16, 32, seed=7)
    assert torch.equal(score("stoch_ria", weight, stats, beta=1.0, subsets=subsets),
                       score("ria", weight, stats))
    # without the activation factor it is RIA's relative importance alone (a = 0)
    assert torch.equal(score("stoch_ria", weight, LayerStats(), beta=1.0, activation=False),
                       score("ria", weight, stats, a=0.0))
    # absolute_min with beta = 1 samples min(rows, cols) = 16 of the 32 entries of each row
    assert not torch.equal(score("stoch_ria", weight, stats, beta=1.0, size="absolute_min"),
                           score("ria", weight, stats))


def test_stoch_ria_subset_sizes() -> None:
    def sizes(rows: int, cols: int, **options) -> tuple[int, int]:
        merged = {**CRITERIA.get("stoch_ria").defaults, **options}
        return StochOptions.parse(merged).subset_sizes(rows, cols)

    assert sizes(6, 40) == (4, 1)  # ceil(0.1 * 40), ceil(0.1 * 6)
    assert sizes(10, 10, beta=0.3) == (3, 3)  # 0.3 * 10 is 3.0000000000000004 in floats
    assert sizes(6, 40, size="absolute_min") == (1, 1)  # max(1, floor(0.6))
    assert sizes(64, 128, beta=0.25, size="absolute_min") == (16, 16)
    weight, stats = small_layer(6, 40)
    info = prune("stoch_ria", weight, stats, LayerTarget(0.5), seed=3).info
    assert (info["row_subset"], info["col_subset"]) == (4, 1)
    assert info["seed"] == layer_seed(weight, 3)


def test_stoch_ria_options_are_validated_together() -> None:
    weight, stats = small_layer()
    with pytest.raises(ValueError, match=r"beta=0\b.*subsets='some'.*rescale='yes'.*seed=1\.5"):
        score("stoch_ria", weight, stats, beta=0, subsets="some", rescale="yes", seed=1.5)


def test_layer_seed_depends_on_seed_and_weight_not_dtype_or_copy() -> None:
    weight, stats = small_layer(32, 64, seed=8)
    other, _ = small_layer(32, 64, seed=9)
    assert layer_seed(weight, 0) == layer_seed(weight.clone(), 0)
    assert len({layer_seed(weight, 0), layer_seed(weight, 1), layer_seed(other, 0)}) == 3
    half = weight.to(torch.bfloat16)
    assert layer_seed(half, 0) == layer_seed(half.float(), 0)
    assert torch.equal(prune("stoch_ria", half, stats, LayerTarget(0.5)).mask,
                       prune("stoch_ria", half.float(), stats, LayerTarget(0.5)).mask)


def test_sampled_sums_exact_unbiased_and_shared() -> None:
    gen = torch.Generator().manual_seed(0)
    magnitude = torch.rand(8, 20, generator=gen) + 0.5
    exact = magnitude.sum(dim=1, keepdim=True)
    assert torch.equal(sampled_abs_sums(magnitude, 1, 20, gen, False, True), exact)
    draws = torch.stack([sampled_abs_sums(magnitude, 1, 5, gen, False, True) for _ in range(4000)])
    torch.testing.assert_close(draws.mean(dim=0), exact, rtol=0.01, atol=0)  # rescaled: unbiased
    raw = sampled_abs_sums(magnitude, 1, 5, gen, False, False)
    assert bool((raw < exact).all())  # without rescaling: 5 of 20 positive entries
    # shared subsets: every row sums the same columns (distinct entries identify the column)
    distinct = torch.arange(8 * 20, dtype=torch.float32).reshape(8, 20)
    cols = sampled_abs_sums(distinct, 1, 1, gen, True, False).squeeze(1).long() % 20
    assert len(set(cols.tolist())) == 1
    cols = sampled_abs_sums(distinct, 1, 1, gen, False, False).squeeze(1).long() % 20
    assert len(set(cols.tolist())) > 1
    # column sums sample rows: k = 1 picks one row entry per column
    picked = sampled_abs_sums(distinct, 0, 1, gen, False, False)
    assert tuple(picked.shape) == (1, 20)
    assert bool(((picked.long() % 20) == torch.arange(20)).all())


def test_stoch_term_survives_all_zero_samples() -> None:
    weight = torch.zeros(4, 40)
    weight[:, 0] = 1.0  # one non-zero per row: most sampled row sums are 0
    opts = StochOptions.parse({**CRITERIA.get("stoch_ria").defaults, "seed": 1})
    term = stoch_relative_importance(weight, opts)
    assert bool(torch.isfinite(term).all())
    assert bool((term[:, 1:] == 0).all())


# --------------------------------------------------------------------------- shared invariants


@pytest.mark.parametrize("name", NEW)
def test_new_criteria_contract(name: str) -> None:
    weight, stats = small_layer(16, 64, seed=10)
    half = weight.to(torch.bfloat16)
    before = half.clone()
    scores = score(name, half, stats)
    assert scores.dtype == torch.float32 and tuple(scores.shape) == (16, 64)
    assert torch.equal(half, before)
    for n, m in ((2, 4), (4, 8)):
        mask = prune(name, weight, stats, LayerTarget(1 - n / m, nm=NMPattern(n, m))).mask
        assert bool(((~mask).reshape(16, 64 // m, m).sum(dim=2) == n).all())
    assert int(prune(name, weight, stats, LayerTarget(0.3)).mask.sum()) == int(0.3 * 16 * 64)
    per_row = prune(name, weight, stats, LayerTarget(0.3, group="row")).mask
    assert per_row.sum(dim=1).tolist() == [int(0.3 * 64)] * 16
    ratios = torch.linspace(0.1, 0.9, 16, dtype=torch.float64)
    per_row = prune(name, weight, stats, LayerTarget(ratios)).mask
    assert per_row.sum(dim=1).tolist() == [64 - math.floor((1 - r) * 64) for r in ratios.tolist()]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("sym") / "llama", tokenizer_dir)


def _cfg(model_dir: Path, text: Path, **overrides):
    return tiny_cfg(model_dir, None, calib={"source": f"text:{text}"}, **overrides)


@pytest.mark.parametrize("name", NEW)
def test_pipeline_exact_sparsity(name: str, llama_dir: Path, small_text: Path) -> None:
    from neuroal.pipeline import run

    for pattern in ("unstructured", "2:4"):
        result = run(_cfg(llama_dir, small_text, pattern=pattern, criterion={"name": name}),
                     keep_executor=True)
        masks = result.executor.masks()
        assert masks and set(masks) == set(result.report["layers"])
        for layer, mask in masks.items():
            rows, cols = mask.shape
            if pattern == "2:4":
                assert bool(((~mask).reshape(rows, cols // 4, 4).sum(-1) == 2).all()), layer
            else:  # the family's default group: the whole matrix
                assert int(mask.sum()) == int(0.5 * rows * cols), layer
        assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert result.report["criterion_label"].endswith("(reconstructed)")
        infos = [entry.get("info", {}) for entry in result.report["layers"].values()]
        if name == "stoch_ria":
            assert len({info["seed"] for info in infos}) == len(infos)  # one seed per layer
        if name == "symwanda":
            assert all(info["y_over_x"] > 0 for info in infos)


def test_pipeline_with_owl(llama_dir: Path, small_text: Path) -> None:
    from neuroal.pipeline import run

    cfg = _cfg(llama_dir, small_text, sparsity=0.6, criterion={"name": "symwanda"},
               allocation={"name": "owl", "lam": 0.05})
    result = run(cfg, keep_executor=True)
    layers = result.report["layers"]
    assert len({round(entry["target"], 6) for entry in layers.values()}) > 1  # non-uniform
    for layer, mask in result.executor.masks().items():
        assert int(mask.sum()) == int(layers[layer]["target"] * mask.numel()), layer
    assert result.report["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)


def test_reconstructed_criteria_are_labelled() -> None:
    """The specs' [reconstructed] criteria say so in reports; the others do not."""
    from neuroal.criteria import CRITERIA, criterion_label

    labels = {name: criterion_label(name) for name in CRITERIA.names()}
    assert {n for n, label in labels.items() if "(reconstructed)" in label} == set(NEW)
    assert labels["wanda"] == "wanda" and labels["symwanda"] == "SymWanda (reconstructed)"
