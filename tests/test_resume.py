"""Resume state (engine.md §8): config hash, stored search candidates, stored pruned blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neuroal.allocation.base import PlanRequest
from neuroal.allocation.neuroal import NeuroALPolicy
from neuroal.checkpoint import (
    ResumeMismatchError,
    RunState,
    canonical_config,
    load_block_state,
    save_block_state,
)
from neuroal.engine.executor import LocalExecutor
from neuroal.models.loading import resolve_model

CANON = {"sparsity": 0.6, "criterion.name": "wanda"}


def test_hash_ignores_layout_and_mismatch_names_keys(tmp_path: Path) -> None:
    a = canonical_config({"sparsity": 0.6, "engine": {"workers": 1, "executor": "local",
                                                      "micro_batch": 8}}, {"torch": "2"})
    b = canonical_config({"sparsity": 0.6, "engine": {"workers": 3, "executor": "ray",
                                                      "micro_batch": 8}}, {"torch": "2"})
    assert a == b and "engine.micro_batch" in a
    RunState(tmp_path / "state", a, resume=False)
    with pytest.raises(ResumeMismatchError, match="sparsity"):
        RunState(tmp_path / "state", {**a, "sparsity": 0.7}, resume=True)


def test_block_state_round_trip(tmp_path: Path) -> None:
    RunState(tmp_path, CANON, resume=False)
    w = {"mlp.up_proj": torch.randn(4, 3)}
    assert load_block_state(tmp_path, 2) is None
    save_block_state(tmp_path, 2, w, {"achieved": 0.5})
    got, report = load_block_state(tmp_path, 2)
    assert torch.equal(got["mlp.up_proj"], w["mlp.up_proj"]) and report == {"achieved": 0.5}


class _Counting:
    """An executor proxy that counts evaluated candidates."""

    def __init__(self, inner: LocalExecutor) -> None:
        self.inner, self.evaluated = inner, 0

    def evaluate_candidates(self, ids, candidates, job, reference_stream="local"):  # noqa: ANN001, ANN201
        self.evaluated += len(candidates)
        return self.inner.evaluate_candidates(ids, candidates, job, reference_stream)


def test_search_resumes_from_stored_candidates(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    executor = LocalExecutor(resolve_model(str(tiny_models["llama"])), 2, 1, ["cpu"], "float32", 2)
    shape = executor.workers[0].adapter.shape()
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    opts = {"block_grid": [0.05, 0.1, 0.2], "row_grid": [0.0, 0.05], "search_samples": 2}

    def plan(state: RunState | None, counting: _Counting):  # noqa: ANN202
        req = PlanRequest(shape, 0.6, "unstructured", (0.01, 0.99), opts, counting, ids,
                          state=state)
        return NeuroALPolicy().plan(req)

    ref = plan(None, _Counting(executor))
    first = _Counting(executor)
    p1 = plan(RunState(tmp_path, CANON, resume=False), first)
    assert first.evaluated == 5
    (tmp_path / "search" / "row-001.pt").unlink()  # as if interrupted before the last candidate
    second = _Counting(executor)
    p2 = plan(RunState(tmp_path, CANON, resume=True), second)
    assert second.evaluated == 1
    for p in (p1, p2):
        assert p.trail == ref.trail and p.policy == ref.policy
        for a, b in zip(p.ratios, ref.ratios, strict=True):
            for name in a:
                assert torch.equal(torch.as_tensor(a[name]), torch.as_tensor(b[name])), name
