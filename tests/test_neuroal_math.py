"""NeuroAL maths (neuroal.md §A4, §A6-§A8, §A10, §A13, §B3): grids, ramp, metric, rows."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from neuroal.allocation.neuroal_math import (
    BLOCK_GRID,
    ROW_GRID,
    alignment,
    block_grid,
    block_ramp,
    first_minimum,
    row_plan,
    row_ratios,
    total_alignment,
)
from neuroal.allocation.plan import ModelShape, SparsityPlan

CLIP = (0.01, 0.99)

# A tiny Llama-like block: hidden 6, 3 query heads of dim 2, 1 KV head, intermediate 10.
BLOCK = {"q_proj": (6, 6), "k_proj": (2, 6), "v_proj": (2, 6), "o_proj": (6, 6),
         "gate_proj": (10, 6), "up_proj": (10, 6), "down_proj": (6, 10)}
CONSUMERS = {"q_proj": "o_proj", "k_proj": "o_proj", "v_proj": "o_proj", "o_proj": "gate_proj",
             "gate_proj": "down_proj", "up_proj": "down_proj", "down_proj": None}


def is_uniform(value: torch.Tensor) -> bool:
    return bool((value == value[0]).all())


def assert_uniform_rows(value, ratio: float, rows: int) -> bool:
    """A fallback layer's row-step entry: the constant per-row vector (never a scalar, which
    would select the ``row`` mask rule instead of the reference's ``neuron`` rule, §A9)."""
    assert isinstance(value, torch.Tensor) and value.dtype == torch.float64, value
    assert value.shape == (rows,)
    assert torch.equal(value, torch.full((rows,), float(ratio), dtype=torch.float64))
    return True


def tiny_inputs(num_blocks: int = 3, ratio: float = 0.5, seed: int = 0):
    """Shape, uniform layer ratios and random deltas (faithful zeros at q/k/v inputs)."""
    gen = torch.Generator().manual_seed(seed)
    shape = ModelShape(blocks=tuple(dict(BLOCK) for _ in range(num_blocks)))
    ratios = [{n: ratio for n in BLOCK} for _ in range(num_blocks)]
    deltas = []
    for _ in range(num_blocks):
        blk = {n: torch.randn(cols, generator=gen) for n, (_rows, cols) in BLOCK.items()}
        for n in ("q_proj", "k_proj", "v_proj"):
            blk[n] = torch.zeros(6)
        deltas.append(blk)
    return shape, ratios, deltas


# ---------------------------------------------------------------------------- grids and ramp


def test_block_grid_sizes_and_order():
    assert len(BLOCK_GRID) == 14 and BLOCK_GRID == tuple(sorted(BLOCK_GRID))
    assert block_grid(0.7) == BLOCK_GRID
    assert block_grid(0.79) == BLOCK_GRID
    high = block_grid(0.8)
    assert len(high) == 13 and 0.25 not in high and high == BLOCK_GRID[:-1]
    assert len(block_grid(0.9)) == 13
    assert 0.0 not in block_grid(0.7)
    with_uniform = block_grid(0.7, include_uniform=True)
    assert with_uniform[0] == 0.0 and with_uniform[1:] == BLOCK_GRID
    assert block_grid(0.8, include_uniform=True) == (0.0, *high)


def test_row_grid():
    assert len(ROW_GRID) == 15 and ROW_GRID[0] == 0.0 and ROW_GRID[-1] == 0.25
    assert ROW_GRID[1:] == BLOCK_GRID


def test_ramp_fixtures_smollm2():
    ramp = block_ramp(30, 0.7, 0.10)
    assert len(ramp) == 30
    assert ramp[0] == pytest.approx(0.6, abs=1e-12)
    assert ramp[1] == pytest.approx(0.6069, abs=5e-5)
    assert ramp[29] == pytest.approx(0.8, abs=1e-12)
    assert math.fsum(ramp) / 30 == pytest.approx(0.7, abs=1e-12)
    assert all(a < b for a, b in zip(ramp, ramp[1:], strict=False))
    wide = block_ramp(30, 0.7, 0.25)
    assert (wide[0], wide[-1]) == (pytest.approx(0.45, abs=1e-12), pytest.approx(0.95, abs=1e-12))
    narrow = block_ramp(30, 0.7, 0.01)
    assert (narrow[0], narrow[-1]) == (pytest.approx(0.69, abs=1e-12), pytest.approx(0.71, abs=1e-12))


def test_ramp_clips_last_block_at_high_sparsity():
    ramp = block_ramp(32, 0.8, 0.20)
    assert ramp[-1] == 0.99  # 1.0 before clipping
    assert ramp[0] == pytest.approx(0.6, abs=1e-12)
    assert ramp[-2] == pytest.approx(0.8 + 0.4 * (30 / 31 - 0.5), abs=1e-12)
    assert math.fsum(ramp) / 32 == pytest.approx(0.8 - 0.01 / 32, abs=1e-12)


def test_ramp_clip_range_and_edge_cases():
    ramp = block_ramp(2, 0.5, 0.495)  # raw 0.005 and 0.995, inside (0, 1)
    assert ramp == [0.01, 0.99]
    assert block_ramp(3, 0.5, 0.2, clip=(0.35, 0.6)) == [0.35, 0.5, 0.6]
    assert block_ramp(1, 0.7, 0.25) == [0.7]
    assert block_ramp(5, 0.6, 0.0) == [0.6] * 5
    with pytest.raises(ValueError, match="num_blocks=0"):
        block_ramp(0, 0.7, 0.1)


# ---------------------------------------------------------------------------- metric


def brute_force_alignment(a: list[float], b: list[float]) -> float:
    sa, sb = sum(a), sum(b)
    return math.sqrt(sum((x / sa - y / sb) ** 2 for x, y in zip(a, b, strict=True))) / len(a)


def test_alignment_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    for cols in (1, 7, 64):
        a = torch.rand(cols, generator=gen) + 0.01
        b = torch.rand(cols, generator=gen) + 0.01
        expected = brute_force_alignment(a.double().tolist(), b.double().tolist())
        assert alignment(a, b) == pytest.approx(expected, rel=1e-12, abs=1e-18)
        assert alignment(a, b) == alignment(b, a)
    assert alignment(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(math.sqrt(2) / 2)


def test_alignment_identity_and_scale_invariance():
    a = torch.rand(50, generator=torch.Generator().manual_seed(2)) + 0.1
    assert alignment(a, a.clone()) == 0.0
    assert alignment(a * 4.0, a) == 0.0  # power-of-two scale: exact
    assert alignment(a.double() * 3.7, a.double()) < 1e-15
    assert alignment(a * 3.7, a) < 1e-9  # fp32 rounding of the product
    assert alignment(a, a.flip(0)) > 1e-4


def test_alignment_zero_sum_and_errors():
    zero = torch.zeros(4)
    assert alignment(zero, zero.clone()) == 0.0
    a = torch.tensor([1.0, 1.0, 2.0, 0.0])
    assert alignment(a, zero) == pytest.approx(math.sqrt(0.25**2 * 2 + 0.5**2) / 4, rel=1e-12)
    with pytest.raises(ValueError, match="same length"):
        alignment(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="same length"):
        alignment(torch.ones(2, 2), torch.ones(2, 2))


def test_total_alignment_sums_in_order():
    assert total_alignment([{"a": 0.25, "b": 0.5}, {"c": 1.0}]) == 1.75
    assert total_alignment([]) == 0.0
    # Sequential float64 addition: the order of blocks and of each mapping is honoured.
    assert total_alignment([{"a": 1e16, "b": 1.0}, {"c": -1e16}]) == 0.0
    assert total_alignment([{"a": 1e16, "c": -1e16, "b": 1.0}]) == 1.0
    assert total_alignment([{"c": -1e16}, {"b": 1.0}, {"a": 1e16}]) == 0.0
    assert total_alignment([{"a": 1e16}, {"c": -1e16}, {"b": 1.0}]) == 1.0


def test_first_minimum():
    assert first_minimum([0.3, 0.1, 0.2, 0.1]) == 1
    assert first_minimum([0.5, 0.5]) == 0
    assert first_minimum([0.0, -0.0]) == 0
    assert first_minimum([2.0, 1.0 + 1e-16, 1.0]) == 1  # 1 + 1e-16 == 1.0 in float64
    assert first_minimum([0.4, 0.2, 0.3]) == 1
    assert first_minimum([7.0]) == 0
    with pytest.raises(ValueError, match="none"):
        first_minimum([])
    with pytest.raises(ValueError, match="NaN"):
        first_minimum([0.1, float("nan")])


# ---------------------------------------------------------------------------- row step


def test_row_ratios_formula_mean_and_direction():
    delta = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5])
    out = row_ratios(0.6, delta, 0.1)
    assert out is not None and out.dtype == torch.float64 and out.shape == (5,)
    d = [0.5, -1.0, 2.0, 0.0, 1.5]
    u = [(x + 1.0) / 3.0 for x in d]
    expected = [0.6 - 0.2 * (x - sum(u) / 5) for x in u]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    assert float(out.mean()) == pytest.approx(0.6, abs=1e-12)
    # Larger delta (more input norm lost downstream) -> pruned less.
    order = torch.argsort(delta, descending=True)
    assert bool((out[order].diff() > 0).all())
    assert int(out.argmin()) == int(delta.argmax())


def test_row_ratios_keep_mean_on_random_deltas():
    gen = torch.Generator().manual_seed(3)
    for mu in ROW_GRID:
        for ratio in (0.5, 0.7):
            out = row_ratios(ratio, torch.randn(97, generator=gen), mu)
            assert out is not None
            assert float(out.min()) >= 0.01 and float(out.max()) <= 0.99
            assert float(out.mean()) == pytest.approx(ratio, abs=1e-12)


def test_row_ratios_clip_and_mu_zero():
    delta = torch.linspace(-1.0, 1.0, 11)
    out = row_ratios(0.95, delta, 0.25)
    assert out is not None
    assert float(out.max()) == 0.99 and float(out.min()) >= 0.01
    assert float(out.mean()) < 0.95  # clipping removes sparsity, nothing renormalises
    low = row_ratios(0.05, delta, 0.25, clip=(0.02, 0.98))
    assert low is not None and float(low.min()) == 0.02
    flat = row_ratios(0.7, delta, 0.0)
    assert flat is not None and torch.equal(flat, torch.full((11,), 0.7, dtype=torch.float64))


def test_row_ratios_uniform_fallbacks(caplog):
    assert row_ratios(0.7, torch.zeros(8), 0.1) is None
    assert row_ratios(0.7, torch.tensor([1.0, -1.0, 2.0, -2.0]), 0.1) is None  # sums to exactly 0
    with caplog.at_level(logging.WARNING, logger="neuroal.allocation.neuroal_math"):
        assert row_ratios(0.7, torch.full((4,), 0.3), 0.1, label="block 2 o_proj") is None
    assert "block 2 o_proj" in caplog.text and "constant" in caplog.text
    with pytest.raises(ValueError, match="finite"):
        row_ratios(0.7, torch.tensor([1.0, float("nan")]), 0.1)
    with pytest.raises(ValueError, match="1-D"):
        row_ratios(0.7, torch.ones(2, 2), 0.1)


def test_row_plan_fallbacks_and_vectors():
    shape, ratios, deltas = tiny_inputs()
    plan = row_plan(ratios, deltas, CONSUMERS, shape, mu=0.1)
    assert len(plan) == 3
    for b in range(2):
        blk = plan[b]
        assert list(blk) == list(BLOCK)
        # q: 6 rows driven by the 6-long o_proj delta; k/v: 2 rows -> GQA guard -> uniform.
        assert isinstance(blk["q_proj"], torch.Tensor)
        assert_uniform_rows(blk["k_proj"], 0.5, 2) and assert_uniform_rows(blk["v_proj"], 0.5, 2)
        assert_uniform_rows(blk["down_proj"], 0.5, 6)  # consumer None
        for name in ("q_proj", "o_proj", "gate_proj", "up_proj"):
            vec = blk[name]
            assert isinstance(vec, torch.Tensor) and vec.dtype == torch.float64
            assert vec.shape == (BLOCK[name][0],)
            assert float(vec.mean()) == pytest.approx(0.5, abs=1e-12)
        expected = row_ratios(0.5, deltas[b]["down_proj"], 0.1)
        torch.testing.assert_close(blk["gate_proj"], expected, rtol=0, atol=0)
        torch.testing.assert_close(blk["up_proj"], expected, rtol=0, atol=0)
        torch.testing.assert_close(blk["o_proj"], row_ratios(0.5, deltas[b]["gate_proj"], 0.1))
    for name, value in plan[2].items():  # last block
        assert_uniform_rows(value, 0.5, BLOCK[name][0])
    SparsityPlan(target=0.5, pattern="unstructured", ratios=plan).validate(shape, strict=True)


def test_row_plan_zero_delta_uniform_layers_and_mu_zero():
    shape, ratios, deltas = tiny_inputs()
    deltas[1]["down_proj"] = torch.zeros(10)
    plan = row_plan(ratios, deltas, CONSUMERS, shape, mu=0.2)
    assert_uniform_rows(plan[1]["gate_proj"], 0.5, 10)
    assert_uniform_rows(plan[1]["up_proj"], 0.5, 10)
    assert not is_uniform(plan[0]["gate_proj"])
    skip = frozenset({"q_proj", "k_proj", "v_proj"})
    plan = row_plan(ratios, deltas, CONSUMERS, shape, mu=0.2, uniform_layers=skip)
    assert_uniform_rows(plan[0]["q_proj"], 0.5, 6) and not is_uniform(plan[0]["o_proj"])
    absent = {k: v for k, v in CONSUMERS.items() if v is not None and k != "up_proj"}  # adapter style
    plan = row_plan(ratios, deltas, absent, shape, mu=0.2)
    assert_uniform_rows(plan[0]["up_proj"], 0.5, 10)
    assert_uniform_rows(plan[0]["down_proj"], 0.5, 6)
    assert not is_uniform(plan[0]["gate_proj"])
    ratios[0] = {n: 0.6 for n in BLOCK}
    plan = row_plan(ratios, deltas, CONSUMERS, shape, mu=0.0)
    for b, blk in enumerate(plan):
        for name, value in blk.items():
            assert_uniform_rows(value, ratios[b][name], BLOCK[name][0])


def test_row_plan_gqa_guard_smollm2_sizes():
    block = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}
    consumers = {"q_proj": "o_proj", "k_proj": "o_proj", "v_proj": "o_proj", "o_proj": None}
    shape = ModelShape(blocks=(block, dict(block)))
    delta_o = torch.randn(576, generator=torch.Generator().manual_seed(4))
    deltas = [{"o_proj": delta_o}, {"o_proj": delta_o}]
    ratios = [{n: 0.7 for n in block} for _ in range(2)]
    plan = row_plan(ratios, deltas, consumers, shape, mu=0.05)
    assert isinstance(plan[0]["q_proj"], torch.Tensor) and plan[0]["q_proj"].shape == (576,)
    assert_uniform_rows(plan[0]["k_proj"], 0.7, 192)
    assert_uniform_rows(plan[0]["v_proj"], 0.7, 192)


def test_row_plan_errors():
    shape, ratios, deltas = tiny_inputs()
    with pytest.raises(ValueError, match="3 blocks"):
        row_plan(ratios[:2], deltas[:2], CONSUMERS, shape, mu=0.1)
    del deltas[0]["down_proj"]
    with pytest.raises(ValueError, match="down_proj"):
        row_plan(ratios, deltas, CONSUMERS, shape, mu=0.1)




def test_fallback_rows_use_the_neuron_rule():
    """A layer that falls back to uniform rows (here: the last block, SmolLM2's
    down_proj size) keeps floor((1 - s) cols) per row like every other row-step layer, and
    prunes the higher index first among ties (neuroal.md §A3, §A9): 922 of 1536 at 60 %, where
    the ``row`` rule would prune 921 and the lower indices."""
    from neuroal.criteria.base import LayerTarget
    from neuroal.criteria.masking import build_mask

    shape = ModelShape(blocks=({"down_proj": (4, 1536)},))
    plan = row_plan([{"down_proj": 0.6}], [{}], {"down_proj": None}, shape, mu=0.1)
    scores = torch.ones(4, 1536)  # all tied
    mask = build_mask(scores, LayerTarget(ratio=plan[0]["down_proj"], group="row"), "row")
    assert mask.sum(dim=1).tolist() == [922] * 4
    assert bool(mask[:, 1536 - 922:].all()) and not bool(mask[:, :1536 - 922].any())
