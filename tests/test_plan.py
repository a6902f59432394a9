"""The SparsityPlan contract (allocation.md §1) and the uniform policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neuroal.allocation import ALLOCATIONS, ModelShape, PlanError, PlanRequest, SparsityPlan

SHAPE = ModelShape(({"q": (4, 8), "down": (8, 16)}, {"q": (4, 8), "down": (8, 16)}))


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_uniform_plan_meets_target(target: float) -> None:
    plan = ALLOCATIONS.get("uniform").plan(PlanRequest(SHAPE, target, "unstructured", (0.01, 0.99)))
    plan.validate(SHAPE)
    assert plan.planned_global(SHAPE) == pytest.approx(target, abs=1e-12)
    assert plan.granularity == "block"
    assert all(plan.block_ratio(SHAPE, b) == pytest.approx(target) for b in range(2))


def test_parameter_weighted_global() -> None:
    # down has 4x the parameters of q: 0.2 * 32 + 0.8 * 128 over 160 per block.
    plan = SparsityPlan(0.68, "unstructured", [{"q": 0.2, "down": 0.8}] * 2)
    assert plan.granularity == "linear"
    assert plan.planned_global(SHAPE) == pytest.approx((0.2 * 32 + 0.8 * 128) / 160)
    plan.validate(SHAPE)


def test_validation_lists_every_violation() -> None:
    plan = SparsityPlan(0.5, "unstructured", [{"q": 0.5, "extra": 0.5}, {"q": 1.2, "down": 0.5}])
    with pytest.raises(PlanError) as info:
        plan.validate(SHAPE)
    text = str(info.value)
    assert "no ratio for down" in text and "unknown linears extra" in text
    assert "outside [0.01, 0.99]" in text
    wrong_len = SparsityPlan(0.5, "unstructured",
                             [{"q": torch.full((3,), 0.5), "down": 0.5}, {"q": 0.5, "down": 0.5}])
    with pytest.raises(PlanError, match="per-row vector of shape"):
        wrong_len.validate(SHAPE)
    off_target = SparsityPlan(0.5, "unstructured", [{"q": 0.5, "down": 0.6}] * 2)
    with pytest.raises(PlanError, match="differs from the target"):
        off_target.validate(SHAPE)


def test_row_plan_round_trips_through_disk(tmp_path: Path) -> None:
    rows = torch.tensor([0.25, 0.75, 0.5, 0.5], dtype=torch.float64)
    plan = SparsityPlan(0.5, "unstructured", [{"q": rows, "down": 0.5}, {"q": 0.5, "down": 0.5}],
                        policy={"name": "test"}, trail={"lambda": [0.1]})
    plan.validate(SHAPE)
    assert plan.granularity == "row"
    plan.save(tmp_path)
    back = SparsityPlan.load(tmp_path)
    assert torch.equal(back.ratios[0]["q"], rows) and back.ratios[1]["down"] == 0.5
    assert back.policy == {"name": "test"} and back.trail == {"lambda": [0.1]}
    back.validate(SHAPE)
