"""Resume state (engine.md §8): config hash, stored search candidates, stored pruned blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg
from safetensors.torch import load_file

from neuroal.allocation.base import PlanRequest
from neuroal.allocation.neuroal import NeuroALPolicy
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.worker import Worker
from neuroal.models.loading import resolve_model
from neuroal.outputs.checkpoint import (
    ResumeMismatchError,
    RunState,
    canonical_config,
    load_block_state,
    save_block_state,
)
from neuroal.pipeline import run

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

    def evaluate_candidates(self, ids, candidates, job, reference_stream="local",  # noqa: ANN001, ANN201
                            on_result=None):  # noqa: ANN001
        self.evaluated += len(candidates)
        return self.inner.evaluate_candidates(ids, candidates, job, reference_stream, on_result)


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


class _InterruptError(Exception):
    pass


def _fail_after(monkeypatch: pytest.MonkeyPatch, method: str, calls: int) -> None:
    """Make ``Worker.<method>`` raise on its ``calls + 1``-th call (a crash mid-run)."""
    original = getattr(Worker, method)
    count = {"n": 0}

    def wrapped(self, *args, **kwargs):  # noqa: ANN001, ANN202
        count["n"] += 1
        if count["n"] > calls:
            raise _InterruptError(f"{method} call {count['n']}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Worker, method, wrapped)


def _shards(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.mark.parametrize(("method", "calls"), [("prune_one", 1), ("eval_candidate", 3)])
def test_interrupted_run_resumes_to_identical_output(tiny_models: dict[str, Path], small_text: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     method: str, calls: int) -> None:
    """Crash after some blocks of the final prune (or some search candidates), rerun with
    resume: the output equals an uninterrupted run's, bit for bit (engine.md §8)."""
    over = {"calib": {"source": f"text:{small_text}"}, "sparsity": 0.6,
            "allocation": {"name": "neuroal", "block_grid": [0.05, 0.1], "row_grid": [0.0, 0.05],
                           "search_samples": 2}}
    ref = run(tiny_cfg(tiny_models["llama"], tmp_path / "ref", **over))
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _fail_after(m, method, calls)
        with pytest.raises(_InterruptError):
            run(tiny_cfg(tiny_models["llama"], out, **over))
    state = tmp_path / "out.neuroal-tmp" / "state"
    assert not out.exists() and not (tmp_path / "out.neuroal-tmp" / "model").exists()
    blocks_done = len(list((state / "prune").glob("*.safetensors")))
    candidates_done = len(list((state / "search").glob("*.pt")))
    assert (blocks_done, candidates_done) == {"prune_one": (calls, 4), "eval_candidate": (0, calls)}[method]
    work = {"prune_one": "collect_stats", "eval_candidate": "eval_candidate"}[method]
    done: list[int] = []
    original = getattr(Worker, work)
    with monkeypatch.context() as m:  # the resumed run must not redo the finished units
        m.setattr(Worker, work, lambda self, *a, **k: done.append(1) or original(self, *a, **k))
        res = run(tiny_cfg(tiny_models["llama"], out, **over, output={"dir": str(out), "resume": True}))
    blocks = len(ref.report["blocks"])
    assert len(done) == {"prune_one": blocks - calls, "eval_candidate": 4 - calls}[method]
    assert not (tmp_path / "out.neuroal-tmp").exists()
    assert res.report["search"] == ref.report["search"]
    assert res.report["layers"] == ref.report["layers"]
    a, b = _shards(out), _shards(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_config_is_refused(tiny_models: dict[str, Path], small_text: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    over = {"calib": {"source": f"text:{small_text}"}}
    with monkeypatch.context() as m:
        _fail_after(m, "prune_one", 1)
        with pytest.raises(_InterruptError):
            run(tiny_cfg(tiny_models["llama"], out, **over))
    with pytest.raises(ResumeMismatchError, match="sparsity"):
        run(tiny_cfg(tiny_models["llama"], out, **over, sparsity=0.6,
                     output={"dir": str(out), "resume": True}))
