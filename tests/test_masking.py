"""Threshold selection and mask rules against independent references (criteria.md §2;
the references are plain-Python sorts in ``tests/reference_masks.py``)."""

from __future__ import annotations

import math

import pytest
import reference_masks as ref
import torch

from neuroal.criteria.base import LayerTarget, NMPattern
from neuroal.criteria.masking import (
    NonFiniteScoresError,
    block_mask,
    build_mask,
    matrix_mask,
    nm_mask,
    row_mask,
    row_ratio_mask,
    select_inclusive,
    select_lowest,
    sorted_rows,
)

TIES = ("low_index", "high_index")


def continuous(rows: int = 48, cols: int = 96, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen)


def q4_like(rows: int = 48, cols: int = 96, seed: int = 1) -> torch.Tensor:
    """|W| of de-quantised Q4_1-style weights: 16 levels per block of 32 weights (many ties)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-cols // 32)
    levels = torch.randint(0, 16, (rows, blocks, 32), generator=gen).float()
    scale = torch.rand(rows, blocks, 1, generator=gen) * 0.01
    low = -8 * scale
    return (levels * scale + low).reshape(rows, blocks * 32)[:, :cols].abs()


MATRICES = {"continuous": continuous, "q4": q4_like}


@pytest.mark.parametrize("kind", sorted(MATRICES))
@pytest.mark.parametrize("tie", TIES)
@pytest.mark.parametrize("k", [0, 1, 17, 48, 95, 96])
def test_select_lowest_fixed_k_matches_stable_sort(kind: str, tie: str, k: int) -> None:
    scores = MATRICES[kind]()
    got = select_lowest(scores, k, tie=tie)
    assert torch.equal(got, ref.select_lowest(scores, k, tie=tie))
    assert torch.equal(got.sum(dim=1), torch.full((scores.shape[0],), k))


@pytest.mark.parametrize("kind", sorted(MATRICES))
@pytest.mark.parametrize("tie", TIES)
@pytest.mark.parametrize("distinct", [3, 200])  # kthvalue per distinct count / one value sort
def test_select_lowest_variable_k_matches_stable_sort(kind: str, tie: str, distinct: int) -> None:
    rows, cols = 200, 96
    scores = MATRICES[kind](rows, cols)
    gen = torch.Generator().manual_seed(distinct)
    choices = torch.randperm(cols + 1, generator=gen)[: min(distinct, cols + 1)]
    k = choices[torch.randint(0, choices.numel(), (rows,), generator=gen)]
    got = select_lowest(scores, k, tie=tie)
    assert torch.equal(got, ref.select_lowest(scores, k, tie=tie))
    assert torch.equal(got.sum(dim=1), k)
    reused = select_lowest(scores, k, tie=tie, sorted_values=sorted_rows(scores))
    assert torch.equal(reused, got)


def test_tie_rules_on_a_hand_made_row() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]])
    low = select_lowest(scores, 2, tie="low_index")
    high = select_lowest(scores, 2, tie="high_index")
    assert low.tolist() == [[True, False, False, True, False]]
    assert high.tolist() == [[False, False, False, True, True]]


def test_tie_heavy_matrix_really_has_ties_at_the_threshold() -> None:
    scores = q4_like()
    kth = torch.kthvalue(scores, 48, dim=1).values.unsqueeze(1)
    assert int((scores == kth).sum(dim=1).max()) > 1  # otherwise the tie tests prove nothing


@pytest.mark.parametrize("kind", sorted(MATRICES))
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.93, 1.0])
def test_row_and_matrix_masks_exact_counts(kind: str, sparsity: float) -> None:
    scores = MATRICES[kind](30, 70)
    rows, cols = scores.shape
    row = row_mask(scores, sparsity)
    assert torch.equal(row, ref.row_mask(scores, sparsity))
    assert torch.equal(row.sum(dim=1), torch.full((rows,), int(sparsity * cols)))
    whole = matrix_mask(scores, sparsity)
    assert torch.equal(whole, ref.matrix_mask(scores, sparsity))
    assert int(whole.sum()) == int(sparsity * rows * cols)


def test_matrix_ties_prune_lower_flat_index_first() -> None:
    scores = torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 0.5]])
    mask = matrix_mask(scores, 0.5)  # k = 3: 0.5, then flat indices 1 and 2
    assert mask.tolist() == [[False, True, True], [False, False, True]]


@pytest.mark.parametrize("kind", sorted(MATRICES))
def test_inclusive_threshold_matches_reference(kind: str) -> None:
    scores = MATRICES[kind](30, 64)
    for k in (0, 5, 31, 63, 64):
        assert torch.equal(select_inclusive(scores, k), ref.inclusive(scores, k))
    loose = row_mask(scores, 0.5, exact_count=False)
    assert torch.equal(loose, ref.inclusive(scores, 32))
    assert bool((loose.sum(dim=1) >= 33).all())
    flat_loose = matrix_mask(scores, 0.5, exact_count=False)
    flat = scores.reshape(1, -1)
    assert torch.equal(flat_loose.reshape(1, -1), ref.inclusive(flat, flat.numel() // 2))


def test_inclusive_threshold_prunes_all_ties() -> None:
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0]])
    assert row_mask(scores, 0.4, exact_count=False).tolist() == [[True, True, True, True, False]]
    assert row_mask(scores, 0.4).tolist() == [[True, True, False, False, False]]


@pytest.mark.parametrize("kind", sorted(MATRICES))
@pytest.mark.parametrize("tie", TIES)
def test_row_ratio_mask_counts_and_reference(kind: str, tie: str) -> None:
    rows, cols = 64, 96
    scores = MATRICES[kind](rows, cols)
    gen = torch.Generator().manual_seed(3)
    ratios = torch.rand(rows, generator=gen, dtype=torch.float64)
    ratios[:4] = torch.tensor([0.0, 1.0, 0.7, 0.3], dtype=torch.float64)
    mask = row_ratio_mask(scores, ratios, tie=tie)
    expected = [cols - math.floor((1.0 - float(r)) * cols) for r in ratios]
    assert mask.sum(dim=1).tolist() == expected
    assert torch.equal(mask, ref.row_ratio_mask(scores, ratios, tie=tie))


@pytest.mark.parametrize("kind", sorted(MATRICES))
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (0, 4), (4, 4)])
def test_nm_mask_exact_per_group(kind: str, n: int, m: int) -> None:
    scores = MATRICES[kind](24, 64)
    mask = nm_mask(scores, n, m)
    assert torch.equal(mask, ref.nm_mask(scores, n, m))
    kept = (~mask).reshape(24, 64 // m, m).sum(dim=2)
    assert bool((kept == n).all())


def test_nm_ties_prune_lower_index() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, 2.0, 2.0, 0.0]])
    expected = [[True, True, False, False, False, True, False, True]]
    assert nm_mask(scores, 2, 4).tolist() == expected


def test_nm_rejects_indivisible_columns() -> None:
    with pytest.raises(ValueError, match=r"cols=10.*M=4"):
        nm_mask(torch.rand(3, 10), 2, 4)


def test_block_mask_counts_per_block() -> None:
    scores = continuous(16, 192)
    mask = block_mask(scores, 0.5)
    assert int(mask[:, :128].sum()) == int(0.5 * 16 * 128)
    assert int(mask[:, 128:].sum()) == int(0.5 * 16 * 64)
    assert torch.equal(mask[:, 128:], ref.matrix_mask(scores[:, 128:], 0.5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_raise(bad: float) -> None:
    scores = continuous(4, 8)
    scores[2, 3] = bad
    with pytest.raises(NonFiniteScoresError, match="NaN/Inf"):
        select_lowest(scores, 3)
    with pytest.raises(ValueError):
        nm_mask(scores, 2, 4)
    with pytest.raises(ValueError):
        matrix_mask(scores, 0.5)


def test_bad_counts_and_ratios_raise() -> None:
    scores = continuous(4, 8)
    with pytest.raises(ValueError, match="prune counts"):
        select_lowest(scores, 9)
    with pytest.raises(ValueError, match="one per row"):
        select_lowest(scores, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="sparsity"):
        row_mask(scores, 1.5)
    with pytest.raises(ValueError, match="tie rule"):
        select_lowest(scores, 1, tie="random")


def test_build_mask_dispatch() -> None:
    scores = q4_like(16, 64)
    assert torch.equal(build_mask(scores, LayerTarget(0.5), "row"), row_mask(scores, 0.5))
    assert torch.equal(build_mask(scores, LayerTarget(0.5), "matrix"), matrix_mask(scores, 0.5))
    overridden = build_mask(scores, LayerTarget(0.5, group="matrix"), "row")
    assert torch.equal(overridden, matrix_mask(scores, 0.5))
    loose = build_mask(scores, LayerTarget(0.5, exact_count=False), "row")
    assert torch.equal(loose, row_mask(scores, 0.5, exact_count=False))
    nm = build_mask(scores, LayerTarget(0.5, nm=NMPattern(2, 4)), "matrix")
    assert torch.equal(nm, nm_mask(scores, 2, 4))
    ratios = torch.linspace(0.1, 0.9, 16, dtype=torch.float64)
    per_row = build_mask(scores, LayerTarget(ratios), "row")
    assert torch.equal(per_row, ref.row_ratio_mask(scores, ratios, tie="high_index"))
    with pytest.raises(ValueError, match="available"):
        build_mask(scores, LayerTarget(0.5, group="column"), "row")
