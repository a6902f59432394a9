"""Exact early stopping on the torch.distributed executor: two CPU ranks over
gloo stop the same candidates at the same blocks as the local executor (the candidate's partial
alignment sum travels with the stream), with the winner and full score of the full search."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from conftest import save_tiny_model, spawn_two_ranks, tiny_cfg

GRID = (0.2, 0.3, 0.1, 0.95, 0.99)


class _Counting:
    """An executor proxy counting the blocks evaluated (a stopped candidate returns fewer)."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner, self.blocks = inner, 0

    def evaluate_candidates(self, ids, candidates, job, reference_stream="local",  # noqa: ANN001, ANN201
                            **kwargs):  # noqa: ANN003
        out = self.inner.evaluate_candidates(ids, candidates, job, reference_stream, **kwargs)
        self.blocks += sum(len(r) for r in out)
        return out


def _compare(model_dir: str, session: object) -> None:
    """Rank 0: the same search phase through the dist executor (2 ranks) and the local one."""
    from neuroal.allocation.neuroal import candidate_evaluator
    from neuroal.allocation.search import Candidate, run_phase
    from neuroal.engine import EXECUTORS
    from neuroal.engine.executor import LocalExecutor
    from neuroal.engine.worker import CandidateJob
    from neuroal.models.loading import resolve_model

    cfg = tiny_cfg(Path(model_dir), None, engine={"executor": "dist", "workers": 2})
    source = resolve_model(model_dir)
    executors = {"dist": EXECUTORS.get("dist")(cfg, source=source, num_blocks=4, devices=["cpu"],
                                               dtype="float32", session=session),
                 "local": LocalExecutor(source, 4, 1, ["cpu"], "float32", 2)}
    shape = executors["local"].workers[0].adapter.shape()
    ids = torch.randint(3, 320, (3, 16), generator=torch.Generator().manual_seed(4))
    job = CandidateJob("wanda", {}, "row")
    for reference in ("local", "global"):
        got = {}
        for name, ex in executors.items():
            for early in (False, True):
                counting = _Counting(ex)
                cands = [Candidate("block", r, [{n: r for n in blk} for blk in shape.blocks])
                         for r in GRID]
                res = run_phase("block", cands, candidate_evaluator(counting, ids, job, reference,
                                                                    4), early_stop=early)
                got[name, early] = (res, counting.blocks)
        full, early = got["dist", False], got["dist", True]
        assert early[0].winner == full[0].winner
        assert early[0].best_outcome.score == full[0].best_outcome.score
        assert full[1] == 4 * len(GRID) and early[1] < full[1], (reference, early[1])
        stopped = {e["value"]: e["stopped_at_block"] for e in early[0].trail
                   if "stopped_at_block" in e}
        assert set(stopped) >= {0.95, 0.99}, stopped
        if reference == "global":  # one stops on rank 1, from rank 0's relayed partial sum
            assert any(b >= 2 for b in stopped.values()), stopped
        for mode in (False, True):  # the trail (scores, bounds, stop blocks) is the local one
            assert got["dist", mode][0].trail == got["local", mode][0].trail, (reference, mode)
            assert got["dist", mode][1] == got["local", mode][1]
    executors["dist"].shutdown()


def _rank_main(rank: int, port: int, model_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from neuroal.engine import dist
    from neuroal.runtime.process import seed_everything

    cfg = tiny_cfg(Path(model_dir), None, engine={"executor": "dist", "workers": 2})
    if rank > 0:
        assert dist.serve(cfg) == 0
        return
    seed_everything(cfg.seed, cfg.engine.deterministic)
    with dist.coordinator(cfg) as session:
        _compare(model_dir, session)


def test_dist_early_stop_matches_local(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Same winner and full score as the full search, fewer blocks, and the local executor's
    trail, with both reference streams (the kept dense reference is reused per candidate)."""
    model_dir = save_tiny_model("llama", tmp_path / "l4", tokenizer_dir, num_layers=4)
    spawn_two_ranks(_rank_main, str(model_dir))
