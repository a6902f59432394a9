"""Data-parallel passes (neuroal.engine.data_passes): perplexity, zero-shot log-probabilities,
the dense statistics pass (OWL) and a NeuroAL search's dense reference give bit-identical
results to pipeline mode with 1, 2 and 4 workers (local threads) and with two torch.distributed
ranks over gloo; a failure on one worker reaches the caller without a hang."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import data_mode_rank, random_ids, save_tiny_model, spawn_two_ranks, tiny_cfg

from neuroal.allocation.owl import outlier_ratio
from neuroal.criteria.base import STAT_HESSIAN, STAT_SQ_NORM
from neuroal.engine import executor as executor_mod
from neuroal.engine.data_passes import pass_mode
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.worker import CandidateJob, stats_only
from neuroal.models.loading import resolve_model

NUM_BLOCKS = 4
MICRO_BATCH = 2


@pytest.fixture(scope="module")
def llama4(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four blocks, tied head: with 4 workers every block has another owner."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("passes") / "llama4", tokenizer_dir,
                           num_layers=NUM_BLOCKS)



def _executor(model: Path, workers: int, parallel: str, blocks: int = NUM_BLOCKS,
              **kwargs: Any) -> LocalExecutor:
    return LocalExecutor(resolve_model(str(model)), blocks, workers, ["cpu"], "float32",
                         MICRO_BATCH, parallel=parallel, **kwargs)


@pytest.fixture()
def data_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the data-parallel passes the local executor runs (proves data mode ran)."""
    calls: list[str] = []
    real = executor_mod.passes_in_threads

    def spy(workers: Any, name: str, *args: Any) -> list[Any]:
        calls.append(name)
        return real(workers, name, *args)

    monkeypatch.setattr(executor_mod, "passes_in_threads", spy)
    return calls


def _same(got: Any, want: Any, where: str = "") -> None:
    """Bit-identical tensors (nested in dicts, lists, tuples and stats dataclasses)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, where
        assert got.shape == want.shape, where
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            _same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(g, w, f"{where}[{i}]")
    elif hasattr(want, "__dataclass_fields__"):
        for k in want.__dataclass_fields__:
            _same(getattr(got, k), getattr(want, k), f"{where}.{k}")
    else:
        assert got == want, where


# --------------------------------------------------------------------------- rule


def test_pass_mode_rule(llama4: Path) -> None:
    ex = _executor(llama4, 2, "auto")
    w = ex.workers[0]
    assert pass_mode("auto", w, 2, 7) == "data"
    assert pass_mode("auto", w, 1, 7) == "pipeline"
    assert pass_mode("data", w, 1, 7) == "data"
    assert pass_mode("pipeline", w, 2, 7) == "pipeline"
    assert pass_mode("data", w, 2, MICRO_BATCH) == "pipeline"  # one micro-batch: nothing to share
    assert pass_mode("data", w, 2, None) == "data"  # data-free pass
    with pytest.raises(ValueError, match="engine.parallel='fast'"):
        pass_mode("fast", w, 2, 7)


# --------------------------------------------------------------------------- local threads


def test_perplexity_and_logprobs_match_pipeline(llama4: Path, data_calls: list[str]) -> None:
    windows, targets = random_ids(), random_ids(seed=1)
    ref = _executor(llama4, 1, "pipeline")
    want = ref.window_nll(windows), ref.token_logprobs(windows, targets)
    assert not data_calls
    for workers in (1, 2, 4):
        ex = _executor(llama4, workers, "data")
        _same((ex.window_nll(windows), ex.token_logprobs(windows, targets)), want, str(workers))
        assert all(not w.head_lent for w in ex.workers)  # the lent head is given back
        ex.shutdown()
    assert data_calls == ["window_nll", "token_logprobs"] * 3
    # auto with 2 workers is data mode; a single micro-batch is not shared out
    ex = _executor(llama4, 2, "auto")
    _same(ex.window_nll(windows), want[0])
    _same(ex.window_nll(windows[:MICRO_BATCH]), want[0][:MICRO_BATCH])
    assert data_calls[-1] == "window_nll" and len(data_calls) == 7


def test_untied_head_with_bias_and_onloading(tokenizer_dir: Path, tmp_path: Path) -> None:
    """OPT: a final LayerNorm with a bias and an untied head are lent; blocks kept in host
    memory (onloading) are lent from there."""
    model = save_tiny_model("opt", tmp_path / "opt", tokenizer_dir)
    windows = random_ids(5)
    want = _executor(model, 1, "pipeline", blocks=2).window_nll(windows)
    got = _executor(model, 2, "data", blocks=2, onload="host")
    _same(got.window_nll(windows), want)
    assert got.workers[1].store is not None and got.workers[1].store.fetches > 0


def test_dense_statistics_match_pipeline(llama4: Path, data_calls: list[str]) -> None:
    """OWL's outlier ratios, and the raw statistics with a Hessian (every statistic the folding
    touches), per block."""
    ids = random_ids()
    owl = functools.partial(outlier_ratio, m=5.0, pool="block")
    needs = frozenset({STAT_SQ_NORM, STAT_HESSIAN})
    ref = _executor(llama4, 1, "pipeline")
    want = (ref.dense_block_metrics(ids, owl, frozenset({STAT_SQ_NORM})),
            ref.dense_block_metrics(ids, stats_only, needs))
    assert len(set(want[0])) > 1  # the ratios differ between blocks: a real comparison
    for workers in (1, 2, 4):
        ex = _executor(llama4, workers, "data")
        got = (ex.dense_block_metrics(ids, owl, frozenset({STAT_SQ_NORM})),
               ex.dense_block_metrics(ids, stats_only, needs))
        _same(got, want, str(workers))
        groups = ex.workers[0].adapter.input_groups()
        assert _shares(got[1], groups) == _shares(want[1], groups)  # one Hessian per input
        ex.shutdown()
    assert data_calls == ["block_metrics"] * 6
    assert all(any(blk) for blk in _shares(want[1], groups))


def _shares(per_block: list[dict[str, Any]], groups: Any) -> list[list[bool]]:
    """Per block, whether each follower of an input group holds its leader's Hessian tensor
    itself (one copy kept, as the pipeline collector keeps one)."""
    return [[blk[f].hessian is blk[g[0]].hessian for g in groups for f in g[1:]]
            for blk in per_block]


@pytest.mark.parametrize("reference_stream", ["local", "global"])
def test_search_dense_reference_matches_pipeline(llama4: Path, data_calls: list[str],
                                                 reference_stream: str) -> None:
    """The search's candidates pipeline as before; their shared dense reference is computed
    data-parallel, and every candidate's alignment terms are unchanged."""
    ids = random_ids(6)
    ref = _executor(llama4, 1, "pipeline")
    shape = ref.workers[0].adapter.shape().blocks
    candidates = [[{n: r for n in blk} for blk in shape] for r in (0.3, 0.6)]
    job = CandidateJob("wanda")
    want = ref.evaluate_candidates(ids, candidates, job, reference_stream)
    for workers in (2, 4):
        got = _executor(llama4, workers, "data").evaluate_candidates(ids, candidates, job,
                                                                      reference_stream)
        _same([[(b.na, b.delta) for b in c] for c in got],
              [[(b.na, b.delta) for b in c] for c in want], str(workers))
    assert data_calls == ["dense_reference"] * 2


def test_weight_metrics_in_threads(llama4: Path) -> None:
    want = _executor(llama4, 1, "pipeline").weight_metrics(lambda w: w.double().norm())
    got = _executor(llama4, 4, "data").weight_metrics(lambda w: w.double().norm())
    _same(got, want)


def test_failure_on_one_worker_is_raised(llama4: Path) -> None:
    """A pass function failing on block 2's owner only: its error reaches the caller, the
    other workers stop at the next phase boundary (no hang), and the executor still works."""
    def fails_on_block_2(weights: dict[str, torch.Tensor], stats: dict[str, Any]) -> float:
        if weights["mlp.down_proj"].data_ptr() == block2_down:
            raise ArithmeticError("block 2 refused")
        return 0.0

    ex = _executor(llama4, 4, "data")
    block2_down = ex.workers[2].adapter.blocks[2].mlp.down_proj.weight.data_ptr()
    with pytest.raises(ArithmeticError, match="block 2 refused"):
        ex.dense_block_metrics(random_ids(), fails_on_block_2, frozenset({STAT_SQ_NORM}))
    _same(ex.window_nll(random_ids()), _executor(llama4, 1, "pipeline").window_nll(random_ids()))


# --------------------------------------------------------------------------- torch.distributed


def _missing_linear(weights: dict[str, torch.Tensor], _stats: Any) -> Any:
    """A pass function that fails on every block's owner (picklable, for the ranks)."""
    return weights["no_such_linear"]


def _dist_compare(model_dir: str, stage: Any) -> None:
    from neuroal.engine import EXECUTORS

    cfg = tiny_cfg(Path(model_dir), None, engine={"executor": "dist", "workers": 2,
                                                   "parallel": "data"})
    ex = EXECUTORS.get("dist")(cfg, source=resolve_model(model_dir), num_blocks=NUM_BLOCKS,
                               devices=["cpu"], dtype="float32", session=stage)
    local = _executor(Path(model_dir), 1, "pipeline")
    windows, targets = random_ids(), random_ids(seed=1)
    owl = functools.partial(outlier_ratio, m=5.0, pool="block")
    needs = frozenset({STAT_SQ_NORM, STAT_HESSIAN})
    _same(ex.window_nll(windows), local.window_nll(windows), "window_nll")
    _same(ex.token_logprobs(windows, targets), local.token_logprobs(windows, targets), "logprobs")
    _same(ex.dense_block_metrics(windows, owl, frozenset({STAT_SQ_NORM})),
          local.dense_block_metrics(windows, owl, frozenset({STAT_SQ_NORM})), "owl")
    _same(ex.dense_block_metrics(windows, stats_only, needs),
          local.dense_block_metrics(windows, stats_only, needs), "stats")
    shape = local.workers[0].adapter.shape().blocks
    candidates = [[{n: r for n in blk} for blk in shape] for r in (0.3, 0.6)]
    job = CandidateJob("wanda")
    got = ex.evaluate_candidates(windows, candidates, job, "global")
    want = local.evaluate_candidates(windows, candidates, job, "global")
    _same([[(b.na, b.delta) for b in c] for c in got],
          [[(b.na, b.delta) for b in c] for c in want], "search")
    with pytest.raises(KeyError, match="no_such_linear"):
        ex.dense_block_metrics(windows, _missing_linear, needs)
    _same(ex.window_nll(windows), local.window_nll(windows), "after a failure")
    _reference_fails_on_rank_1(ex, windows, candidates, job)
    _same(ex.window_nll(windows), local.window_nll(windows), "after the reference failed")
    ex.shutdown()


_REFERENCE_TRIGGER = "NEUROAL_TEST_REFERENCE_TRIGGER"


def _fail_rank1_reference(rank: int) -> None:
    """On rank 1, the data-parallel statistics passes fail on the blocks it owns while the file
    named by ``$NEUROAL_TEST_REFERENCE_TRIGGER`` exists (rank 0 creates it)."""
    if rank != 1:
        return
    from neuroal.engine import data_passes

    real = data_passes.routed_stats

    def routed_stats(stats: dict[str, Any], tokens: Any) -> Any:
        if Path(os.environ[_REFERENCE_TRIGGER]).exists():
            raise RuntimeError("reference failed on rank 1")
        return real(stats, tokens)

    data_passes.routed_stats = routed_stats


def _reference_fails_on_rank_1(ex: Any, windows: torch.Tensor, candidates: Any,
                               job: CandidateJob) -> None:
    """The search's data-parallel dense reference fails on rank 1: rank 0 raises that error
    and evaluates no candidate on the way (it was stopped, not failed itself)."""
    from neuroal.engine.worker import Worker

    real, calls = Worker.eval_candidate, []

    def counted(self: Worker, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(self, *args, **kwargs)

    trigger = Path(os.environ[_REFERENCE_TRIGGER])
    Worker.eval_candidate = counted  # type: ignore[method-assign]
    trigger.touch()
    try:
        with pytest.raises(RuntimeError, match="reference failed on rank 1"):
            ex.evaluate_candidates(windows, candidates, job, "global")
    finally:
        trigger.unlink()
        Worker.eval_candidate = real  # type: ignore[method-assign]
    assert calls == []


def test_two_gloo_ranks_match_local_pipeline(llama4: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 runs perplexity, zero-shot log-probabilities, OWL's statistics pass, the raw
    statistics and a search with the global dense reference in data mode over both ranks,
    each checked bit for bit against one local worker in pipeline mode; a failing pass
    function, and a search reference that fails on rank 1, are raised on rank 0 and the ranks
    stay in step."""
    monkeypatch.setenv(_REFERENCE_TRIGGER, str(tmp_path / "fail-reference"))
    spawn_two_ranks(data_mode_rank, str(llama4), _dist_compare, _fail_rank1_reference)
