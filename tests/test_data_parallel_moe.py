"""Data mode (neuroal.engine.data_parallel) on mixture-of-experts blocks: every expert matrix's
routed-token statistics, its token count and so the magnitude fallback of an expert without
tokens are those of pipeline mode, bit for bit, with 1, 2 and 4 local workers (threads), also
when an expert gets no token in some micro-batches; the dense statistics pass gives the same
:class:`~neuroal.capture.moe.RoutedStats` as pipeline mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB, data_mode_rank, save_random_model, spawn_two_ranks

from neuroal.allocation.plan import SparsityPlan
from neuroal.capture.moe import ExpertStats, RoutedStats
from neuroal.criteria.base import STAT_HESSIAN, STAT_SQ_NORM
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.worker import PruneJob, stats_only
from neuroal.models.loading import resolve_model

NUM_BLOCKS, MICRO_BATCH, EXPERTS = 4, 2, 4
COMMON = dict(hidden_size=32, num_hidden_layers=NUM_BLOCKS, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE = {  # 4 experts of 16 (gate, up) x 32, top-2
    "mixtral": dict(intermediate_size=16, num_local_experts=EXPERTS, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=32, moe_intermediate_size=16, num_experts=EXPERTS,
                      num_experts_per_tok=2, shared_expert_intermediate_size=24),
    "deepseek_v3": dict(intermediate_size=32, moe_intermediate_size=16,
                        n_routed_experts=EXPERTS, num_experts_per_tok=2, n_shared_experts=1,
                        n_group=1, topk_group=1, first_k_dense_replace=0, q_lora_rank=None,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                        v_head_dim=16),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=EXPERTS, num_experts_per_tok=2,
                    head_dim=8, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"] * (NUM_BLOCKS // 2)),
}
DEAD = 3
"""DeepSeek-V3's router bias keeps this expert from every token (the magnitude fallback)."""


def _save(model_type: str, directory: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **COMMON, **MOE[model_type])
    return save_random_model(config, directory, tokenizer_dir, shard="100KB",
                             dead_expert=DEAD if model_type == "deepseek_v3" else None)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """One intra-op thread: these blocks are tiny, and on a busy CPU two threads wait for each
    other far longer than they compute (seconds instead of tenths)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-data")
    return {mt: _save(mt, root / mt, tokenizer_dir) for mt in MOE}


def _ids() -> torch.Tensor:
    """Seven sequences (micro-batches [0, 1], [2, 3], [4, 5], [6]); the second and the last
    micro-batch repeat one token per sequence, so every position of a sequence has the same
    hidden state, goes to the same two experts, and the other experts get no token in them."""
    ids = torch.randint(3, VOCAB, (7, 12), generator=torch.Generator().manual_seed(0))
    ids[2:4] = torch.tensor([[7], [7]])
    ids[6] = 11
    return ids


def _plan(adapter: Any) -> SparsityPlan:
    """50 % everywhere but block 1: a different ratio per linear."""
    blocks = adapter.shape().blocks
    entries: list[dict[str, Any]] = [{n: 0.5 for n in blk} for blk in blocks]
    entries[1] = {n: 0.3 + 0.4 * i / len(blocks[1]) for i, n in enumerate(blocks[1])}
    return SparsityPlan(0.5, "unstructured", entries)


def _executor(model: Path, workers: int, parallel: str) -> LocalExecutor:
    return LocalExecutor(resolve_model(str(model)), NUM_BLOCKS, workers, ["cpu"], "float32",
                         MICRO_BATCH, parallel=parallel)


def _prune(model: Path, workers: int, parallel: str, criterion: str,
           ) -> tuple[LocalExecutor, list[Any], dict[str, torch.Tensor]]:
    ex = _executor(model, workers, parallel)
    reports = ex.run_final_prune(_plan(ex.workers[0].adapter), PruneJob(criterion), _ids())
    tensors: dict[str, torch.Tensor] = {}
    for w in ex.workers:
        tensors.update(w.state_items())
    return ex, reports, tensors


def _facts(reports: list[Any]) -> list[tuple[Any, ...]]:
    """Per layer: name, counts, routed tokens and fallback."""
    return [(x.name, x.pruned, x.zeros, x.numel, x.info.get("routed_tokens"),
             x.info.get("fallback")) for r in reports for x in r.layers]


def _assert_same(got: tuple[Any, ...], want: tuple[Any, ...]) -> None:
    assert [r.index for r in got[1]] == list(range(NUM_BLOCKS))
    assert _facts(got[1]) == _facts(want[1])
    assert got[2].keys() == want[2].keys()
    for name, tensor in want[2].items():
        assert torch.equal(got[2][name].view(torch.uint8), tensor.view(torch.uint8)), name


@pytest.fixture()
def empty_folds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Tokens of every expert fold (one expert, one micro-batch): proves some are empty."""
    seen: list[int] = []
    real = ExpertStats._fold  # noqa: SLF001

    def spy(self: ExpertStats, experts: Any, expert: int, x: torch.Tensor, *args: Any) -> None:
        seen.append(int(x.shape[0]))
        real(self, experts, expert, x, *args)

    monkeypatch.setattr(ExpertStats, "_fold", spy)
    return seen


@pytest.mark.parametrize(("model_type", "criterion"), [
    ("mixtral", "wanda"), ("mixtral", "sparsegpt"), ("qwen2_moe", "wanda"),
    ("gpt_oss", "sparsegpt"),  # transposed, interleaved gate/up: non-contiguous expert views
])
def test_moe_data_mode_matches_pipeline_on_any_worker_count(
        moe_models: dict[str, Path], model_type: str, criterion: str,
        empty_folds: list[int]) -> None:
    want = _prune(moe_models[model_type], 1, "pipeline", criterion)
    assert 0 in empty_folds and any(empty_folds), "some expert must miss some micro-batch"
    routed = [x.info["routed_tokens"] for r in want[1] for x in r.layers if ".experts." in x.name]
    assert len(routed) == NUM_BLOCKS * EXPERTS * 3 and all(routed)
    for workers in (1, 2, 4):
        got = _prune(moe_models[model_type], workers, "data", criterion)
        assert got[0].parallel == "data"
        _assert_same(got, want)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_expert_without_tokens_falls_back_to_magnitude_in_data_mode(
        moe_models: dict[str, Path], criterion: str) -> None:
    """DeepSeek-V3 layout (shared experts, biased router): expert 3 never routed to, so pruned
    by magnitude in both modes; the routed-token counts of every expert agree."""
    want = _prune(moe_models["deepseek_v3"], 1, "pipeline", criterion)
    dead = [f for f in _facts(want[1]) if f".experts.{DEAD}." in f[0]]
    assert len(dead) == NUM_BLOCKS * 3
    assert all(f[4] == 0 and f[5] == "magnitude" for f in dead)
    for workers in (2, 4):
        got = _prune(moe_models["deepseek_v3"], workers, "auto", criterion)
        assert got[0].parallel == "data"
        _assert_same(got, want)


def test_dense_statistics_of_experts_match_pipeline(moe_models: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense statistics pass (OWL, a search's dense reference) gives each expert matrix
    the same RoutedStats, token count included, in data mode."""
    from neuroal.engine import executor as executor_mod

    calls: list[str] = []
    real = executor_mod.passes_in_threads
    monkeypatch.setattr(executor_mod, "passes_in_threads",
                        lambda workers, name, *a: calls.append(name) or real(workers, name, *a))
    needs = frozenset({STAT_SQ_NORM, STAT_HESSIAN})
    model = moe_models["deepseek_v3"]
    want = _executor(model, 1, "pipeline").dense_block_metrics(_ids(), stats_only, needs)
    got = _executor(model, 2, "data").dense_block_metrics(_ids(), stats_only, needs)
    assert calls == ["block_metrics"]
    assert len(got) == len(want) == NUM_BLOCKS
    for stats, mine in zip(want, got, strict=True):
        assert mine.keys() == stats.keys()
        for name, s in stats.items():
            g = mine[name]
            assert type(g) is type(s), name
            if isinstance(s, RoutedStats):
                assert g.tokens == s.tokens and (s.tokens == 0) == (f".experts.{DEAD}." in name)
            assert g.nsamples == s.nsamples, name
            for key in ("sq_norm", "hessian"):
                assert torch.equal(getattr(g, key), getattr(s, key)), (name, key)


def _dist_compare(model_dir: str, stage: Any) -> None:
    """Rank 0 of two gloo ranks: a SparseGPT prune in data mode against one local worker in
    pipeline mode (the expert views travel as contiguous copies and are written back)."""
    from conftest import tiny_cfg

    from neuroal.engine import EXECUTORS

    cfg = tiny_cfg(Path(model_dir), None, engine={"executor": "dist", "workers": 2,
                                                   "parallel": "data"})
    ex = EXECUTORS.get("dist")(cfg, source=resolve_model(model_dir), num_blocks=NUM_BLOCKS,
                               devices=["cpu"], dtype="float32", session=stage)
    reports = ex.run_final_prune(_plan(stage.w.adapter), PruneJob("sparsegpt"), _ids())
    assert ex.parallel == "data"
    local = _prune(Path(model_dir), 1, "pipeline", "sparsegpt")
    assert _facts(reports) == _facts(local[1])
    masks, want = ex.masks(), local[0].masks()
    assert masks.keys() == want.keys() and all(torch.equal(masks[n], m) for n, m in want.items())
    assert torch.equal(ex.logits(_ids()), local[0].logits(_ids()))  # weights equal where kept
    ex.shutdown()


def test_two_gloo_ranks_prune_experts_as_pipeline(moe_models: dict[str, Path]) -> None:
    spawn_two_ranks(data_mode_rank, str(moe_models["gpt_oss"]), _dist_compare)
