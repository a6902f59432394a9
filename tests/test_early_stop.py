"""Exact early stopping of NeuroAL candidates: same winner, same full score,
fewer blocks evaluated; ties keep the first minimum in grid order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model, tiny_cfg

from neuroal.allocation.neuroal import candidate_evaluator
from neuroal.allocation.neuroal_math import crosses
from neuroal.allocation.search import Candidate, Outcome, middle_out, run_phase
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.worker import CandidateJob
from neuroal.models.loading import resolve_model
from neuroal.pipeline import run

GRIDS = {"name": "neuroal", "block_grid": [0.0, 0.05, 0.1, 0.2, 0.3],
         "row_grid": [0.0, 0.05, 0.1, 0.2]}


def _stub(terms: dict[float, list[float]], seen: list[tuple[float, int]]):
    """An evaluator over per-block terms that honours the candidates' bound like the workers."""
    def evaluate(cands: list[Candidate]) -> list[Outcome]:
        out = []
        for c in cands:
            b = c.bound.for_index(c.grid_index) if c.bound is not None else None
            total = 0.0
            for k, t in enumerate(terms[c.value]):
                total += t
                if b is not None and k < len(terms[c.value]) - 1 and crosses(total, *b):
                    out.append(Outcome(float("inf"), None, k, total))
                    seen.append((c.value, k + 1))
                    break
            else:
                if c.bound is not None:
                    c.bound.report(c.grid_index, total)
                out.append(Outcome(total))
                seen.append((c.value, len(terms[c.value])))
        return out
    return evaluate


def test_ties_keep_the_first_minimum_in_grid_order() -> None:
    # grid order 0..4; the middle (2) is evaluated first and ties with 1 and 3
    terms = {0.0: [2.0, 2.0], 0.1: [1.0, 1.0], 0.2: [1.0, 1.0], 0.3: [2.0, 0.0], 0.4: [3.0, 0.0]}
    for early in (False, True):
        seen: list[tuple[float, int]] = []
        res = run_phase("block", [Candidate("block", v, []) for v in terms],
                        _stub(terms, seen), early_stop=early)
        assert res.winner == 1 and res.best_outcome.score == 2.0
        if early:
            assert [v for v, _ in seen] == [0.2, 0.1, 0.3, 0.0, 0.4]
            stopped = {e["value"]: e for e in res.trail if "stopped_at_block" in e}
            assert set(stopped) == {0.3, 0.4}  # 0.3 ties a better earlier one; 0.4 exceeds
            assert stopped[0.4]["lower_bound"] == 3.0 and stopped[0.4]["stopped_at_block"] == 0
            assert sum(n for _, n in seen) == 8  # 0.0 ties a later best: not stopped


def test_middle_out_order() -> None:
    assert middle_out(5) == [2, 1, 3, 0, 4]
    assert middle_out(4) == [1, 0, 2, 3]
    assert middle_out(1) == [0]


def test_worker_stops_at_the_bound(tiny_models: dict[str, Path]) -> None:
    source = resolve_model(str(tiny_models["llama"]))
    ex = LocalExecutor(source, 2, 1, ["cpu"], "float32", 2)
    ids = torch.randint(3, 320, (3, 16), generator=torch.Generator().manual_seed(1))
    ratios = [{n: 0.7 for n in blk} for blk in ex.workers[0].adapter.shape().blocks]
    full = ex.evaluate_candidates(ids, [ratios], CandidateJob("wanda"))[0]
    assert len(full) == 2
    cut = ex.evaluate_candidates(ids, [ratios], CandidateJob("wanda"),
                                 bound=lambda _c: (0.0, True))[0]
    assert len(cut) == 1 and cut[0].na == full[0].na
    # a strict bound equal to the partial sum does not stop (a tie with a later best)
    first = sum(full[0].na.values())
    kept = ex.evaluate_candidates(ids, [ratios], CandidateJob("wanda"),
                                  bound=lambda _c: (first, False))[0]
    assert len(kept) == 2


def _executor_compare(ex, shape) -> None:
    """Uniform candidates through ``run_phase``: identical winner and full score with and
    without early stopping; the badly pruned ones stop before the last block."""
    ids = torch.randint(3, 320, (3, 16), generator=torch.Generator().manual_seed(4))
    job = CandidateJob("wanda", {}, "row")
    grid = (0.2, 0.3, 0.1, 0.95, 0.99)
    evaluate = candidate_evaluator(ex, ids, job, "local", shape.num_blocks)
    res = {}
    for early in (False, True):
        cands = [Candidate("block", r, [{n: r for n in blk} for blk in shape.blocks])
                 for r in grid]
        res[early] = run_phase("block", cands, evaluate, early_stop=early)
    assert res[False].winner == res[True].winner
    assert res[False].best_outcome.score == res[True].best_outcome.score
    stopped = [e for e in res[True].trail if "stopped_at_block" in e]
    assert {e["value"] for e in stopped} >= {0.95, 0.99}
    full = {e["value"]: e["score"] for e in res[False].trail}
    for e in stopped:
        assert e["stopped_at_block"] < shape.num_blocks - 1
        assert e["lower_bound"] <= full[e["value"]]


@pytest.mark.parametrize("workers", [1, 2])
def test_local_executor_same_winner_fewer_blocks(tokenizer_dir: Path, tmp_path: Path,
                                                 workers: int) -> None:
    model_dir = save_tiny_model("llama", tmp_path / "l4", tokenizer_dir, num_layers=4)
    ex = LocalExecutor(resolve_model(str(model_dir)), 4, workers, ["cpu"], "float32", 2)
    _executor_compare(ex, ex.workers[0].adapter.shape())


@pytest.mark.ray
def test_ray_executor_same_winner_fewer_blocks(tokenizer_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from neuroal.engine.ray_executor import RayExecutor, RayOptions, init_ray
    from neuroal.engine.worker import WorkerSpec

    owned = init_ray(num_cpus=2)
    model_dir = save_tiny_model("llama", tmp_path / "l4", tokenizer_dir, num_layers=4)
    source = resolve_model(str(model_dir))
    shape = LocalExecutor(source, 4, 1, ["cpu"], "float32", 2).workers[0].adapter.shape()
    ex = RayExecutor(WorkerSpec(source, 0, 0, 4, "cpu", "float32", 2), 2, RayOptions(inflight=1))
    try:
        _executor_compare(ex, shape)
    finally:
        ex.shutdown()
        if owned:
            import ray
            ray.shutdown()


def test_pipeline_same_plan_with_early_stop(tokenizer_dir: Path, tmp_path: Path,
                                            small_text: Path) -> None:
    model_dir = save_tiny_model("llama", tmp_path / "l4", tokenizer_dir, num_layers=4)
    plans = {}
    for early in (False, True):
        cfg = tiny_cfg(model_dir, None, calib={"source": f"text:{small_text}"}, sparsity=0.7,
                       allocation={**GRIDS, "early_stop": early})
        result = run(cfg, keep_executor=True)
        plans[early] = (result.plan, result.executor.masks())
    (p0, m0), (p1, m1) = plans[False], plans[True]
    assert p0.policy["lambda_block"] == p1.policy["lambda_block"]
    assert p0.policy["lambda_row"] == p1.policy["lambda_row"]
    assert [e["score"] for e in p0.trail["candidates"] if e["chosen"]] == \
        [e["score"] for e in p1.trail["candidates"] if e["chosen"]]
    for name in m0:
        assert torch.equal(m0[name], m1[name]), name


class _CountingBlocks:
    """An executor proxy counting the candidates and blocks it evaluates."""

    def __init__(self, inner: LocalExecutor) -> None:
        self.inner, self.candidates, self.blocks = inner, 0, 0

    def evaluate_candidates(self, ids, candidates, job, reference_stream="local",  # noqa: ANN001, ANN201
                            **kwargs):  # noqa: ANN003
        out = self.inner.evaluate_candidates(ids, candidates, job, reference_stream, **kwargs)
        self.candidates += len(candidates)
        self.blocks += sum(len(r) for r in out)
        return out


def test_resume_keeps_stopped_candidates(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Stopped candidates are stored in the resume state (lower bound, stop block): a resumed
    search evaluates nothing again and ends with the uninterrupted trail; interrupted before
    its last candidate, it evaluates that one only, stopped at the same block."""
    from neuroal.allocation.neuroal import Checkpointed
    from neuroal.outputs.checkpoint import RunState

    model_dir = save_tiny_model("llama", tmp_path / "l4", tokenizer_dir, num_layers=4)
    ex = LocalExecutor(resolve_model(str(model_dir)), 4, 2, ["cpu"], "float32", 2)
    shape = ex.workers[0].adapter.shape()
    ids = torch.randint(3, 320, (3, 16), generator=torch.Generator().manual_seed(4))
    job = CandidateJob("wanda", {}, "row")
    canon = {"sparsity": 0.6, "criterion.name": "wanda"}

    def phase(counting: _CountingBlocks, state: RunState | None):  # noqa: ANN202
        cands = [Candidate("block", r, [{n: r for n in blk} for blk in shape.blocks])
                 for r in (0.2, 0.3, 0.1, 0.95, 0.99)]
        evaluate = candidate_evaluator(counting, ids, job, "local", shape.num_blocks)
        if state is not None:
            evaluate = Checkpointed(state, evaluate)
        return run_phase("block", cands, evaluate, early_stop=True)

    ref = phase(_CountingBlocks(ex), None)
    stopped = [e for e in ref.trail if "stopped_at_block" in e]
    assert {e["value"] for e in stopped} >= {0.95, 0.99}
    first = _CountingBlocks(ex)
    r1 = phase(first, RunState(tmp_path / "s", canon, resume=False))
    assert first.candidates == 5
    again = _CountingBlocks(ex)
    r2 = phase(again, RunState(tmp_path / "s", canon, resume=True))
    assert again.candidates == 0  # the stopped candidates were stored too
    # interrupted before the last candidate submitted (middle-out: grid index 4, 0.99)
    (tmp_path / "s" / "search" / "block-004.pt").unlink()
    last = _CountingBlocks(ex)
    r3 = phase(last, RunState(tmp_path / "s", canon, resume=True))
    assert last.candidates == 1 and last.blocks == ref.trail[4]["stopped_at_block"] + 1
    for r in (r1, r2, r3):
        assert r.trail == ref.trail and r.winner == ref.winner
        assert r.best_outcome.score == ref.best_outcome.score
