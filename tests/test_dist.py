"""The torch.distributed executor (engine.md §3.4): two CPU ranks over gloo give bit-identical
results to the local executor with one worker; launch/config mismatches fail clearly; a failure
on any rank reaches rank 0 without leaving the others waiting."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, save_tiny_model, spawn_two_ranks, tiny_cfg
from safetensors.torch import load_file

from neuroal.config.build import ConfigError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
NEUROAL = {"allocation.name": "neuroal", "allocation.block_grid": "[0.05,0.1]",
           "allocation.row_grid": "[0.0,0.05]", "allocation.search_samples": "2"}


@pytest.fixture(scope="module")
def llama3(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three blocks: two ranks own the uneven slices [0, 2) and [2, 3)."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("dist") / "llama3", tokenizer_dir,
                           num_layers=3)


def _launch_env(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    for key, value in zip(ENV_KEYS, (rank, world, rank), strict=True):
        monkeypatch.setenv(key, str(value))


# --------------------------------------------------------------------------- launch checks


def test_rank_count_must_match_workers(llama3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroal.cli import main
    from neuroal.engine.dist import rank_info

    _launch_env(monkeypatch, 0, 2)
    cfg = tiny_cfg(llama3, None, engine={"executor": "dist", "workers": 3})
    with pytest.raises(ConfigError, match=r"engine.workers=3 but launched with WORLD_SIZE=2"):
        rank_info(cfg)
    with pytest.raises(ConfigError, match=r"engine.executor='local'; pass engine.executor=dist"):
        rank_info(tiny_cfg(llama3, None, engine={"workers": 2}))
    info = rank_info(tiny_cfg(llama3, None, engine={"executor": "dist", "workers": 2}))
    assert info is not None
    assert (info.rank, info.world, info.device, info.backend) == (0, 2, "cpu", "gloo")
    # the CLI refuses before any process group or weights: exit code 2 on every rank
    argv = ["--model", str(llama3), "--workers", "3", "--device", "cpu", "--no-save",
            "engine.executor=dist"]
    assert main(argv) == 2
    _launch_env(monkeypatch, 1, 2)
    assert main(argv) == 2


def test_dist_executor_needs_a_launch(llama3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroal.engine import EXECUTORS
    from neuroal.engine.dist import rank_info

    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    cfg = tiny_cfg(llama3, None, engine={"executor": "dist", "workers": 2})
    with pytest.raises(ConfigError, match="torchrun or accelerate launch"):
        rank_info(cfg)
    assert rank_info(tiny_cfg(llama3, None)) is None  # a plain local run is untouched
    with pytest.raises(RuntimeError, match="rank 0 of `torchrun"):
        EXECUTORS.get("dist")(cfg, source=None, num_blocks=3, devices=["cpu"], dtype="float32")


# --------------------------------------------------------------------------- executor level


def _chain(stage, fail_rank: int | str, _own) -> float | None:
    """A test command: a bf16 stream through both ranks (+1 each); ``fail_rank`` raises, or
    with ``"alloc"`` rank 1 cannot allocate the stream it is about to receive."""
    from unittest import mock

    def compute(stream: torch.Tensor) -> torch.Tensor:
        if stage.info.rank == fail_rank:
            raise ValueError(f"boom on rank {stage.info.rank}")
        return stream + 1

    real_empty = torch.empty

    def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("dtype") is torch.uint8:
            raise MemoryError(f"allocation failed on rank {stage.info.rank}")
        return real_empty(*args, **kwargs)

    fails = fail_rank == "alloc" and stage.info.rank == 1
    with mock.patch.object(torch, "empty", empty) if fails else contextlib.nullcontext():
        out = stage._relay(lambda: torch.zeros(2, 3, 4, dtype=torch.bfloat16), compute)
    return None if out is None else float(out.float().sum())


def _compare_executors(model_dir: str, stage: Any) -> None:
    """Rank 0: DistExecutor (2 ranks) against LocalExecutor (1 worker), operation by operation."""
    from neuroal.allocation.plan import SparsityPlan
    from neuroal.engine import EXECUTORS
    from neuroal.engine.dist import RankError, command
    from neuroal.engine.executor import LocalExecutor
    from neuroal.engine.worker import CandidateJob, PruneJob
    from neuroal.models.loading import resolve_model

    with pytest.raises(ValueError, match="boom on rank 1") as err:
        command(stage, "chain", 1)
    assert isinstance(err.value.__cause__, RankError) and "rank 1 failed" in str(err.value.__cause__)
    with pytest.raises(ValueError, match="boom on rank 0"):
        command(stage, "chain", 0)
    assert command(stage, "chain", -1) == [24.0, 48.0]  # the protocol is still in step
    # the receiver's buffer does not fit: the sender is told before the bytes move
    with pytest.raises(MemoryError, match="allocation failed on rank 1"):
        command(stage, "chain", "alloc")
    assert command(stage, "chain", -1) == [24.0, 48.0]

    cfg = tiny_cfg(Path(model_dir), None, engine={"executor": "dist", "workers": 2})
    source = resolve_model(model_dir)
    ex = EXECUTORS.get("dist")(cfg, source=source, num_blocks=3, devices=["cpu"], dtype="float32",
                               session=stage)
    local = LocalExecutor(source, 3, 1, ["cpu"], "float32", 2)
    ids = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    blocks = local.workers[0].adapter.shape().blocks
    candidates = [[{n: r for n in blk} for blk in blocks] for r in (0.3, 0.6)]
    for reference in ("local", "global"):
        got = ex.evaluate_candidates(ids, candidates, CandidateJob("wanda"), reference)
        want = local.evaluate_candidates(ids, candidates, CandidateJob("wanda"), reference)
        for g_c, w_c in zip(got, want, strict=True):
            for g, w in zip(g_c, w_c, strict=True):
                assert g.na == w.na
                assert all(torch.equal(g.delta[n], w.delta[n]) for n in w.delta)
    assert torch.equal(ex.window_nll(ids), local.window_nll(ids))
    assert torch.equal(ex.last_logits(ids), local.last_logits(ids))
    targets = ids.roll(-1, dims=1)  # zero-shot scoring (neuroal.evaluation.zeroshot)
    for g, w in zip(ex.token_logprobs(ids, targets), local.token_logprobs(ids, targets), strict=True):
        assert torch.equal(g, w)
    plan = SparsityPlan(0.5, "unstructured", [{n: 0.5 for n in blk} for blk in blocks])
    # SparseGPT, then the PERP reconstruction of each block (recovery.md §3.6) on the ranks
    job = PruneJob("sparsegpt", reconstruct={"steps": 3, "batch_size": 2, "lr": 1e-2, "rank": 4})
    reports = ex.run_final_prune(plan, job, ids)
    want_reports = local.run_final_prune(plan, job, ids)
    assert [r.index for r in reports] == [0, 1, 2]
    assert [r.layers[0].zeros for r in reports] == [r.layers[0].zeros for r in want_reports]
    fitted = [{k: v for k, v in r.info["perp-reconstruct"].items() if k != "seconds"}
              for r in (*reports, *want_reports)]
    assert fitted[:3] == fitted[3:] and all(f["steps"] == 3 for f in fitted), fitted
    got_masks, want_masks = ex.masks(), local.masks()
    assert got_masks.keys() == want_masks.keys()
    assert all(torch.equal(got_masks[n], want_masks[n]) for n in want_masks)
    assert torch.equal(ex.logits(ids), local.logits(ids))
    info = ex.worker_info()
    assert [(i["rank"], i["blocks"]) for i in info] == [(0, [0, 2]), (1, [2, 3])]
    assert all(i["peak_memory_bytes"] > 0 for i in info)
    assert ex.block_prefix(2) == local.block_prefix(2)
    ex.shutdown()


def _rank_main(rank: int, port: int, model_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from neuroal.engine import dist, dist_stage
    from neuroal.runtime.process import seed_everything

    dist_stage._OPS["chain"] = _chain
    cfg = tiny_cfg(Path(model_dir), None, engine={"executor": "dist", "workers": 2})
    if rank > 0:
        assert dist.serve(cfg) == 0
        return
    seed_everything(cfg.seed, cfg.engine.deterministic)
    with dist.coordinator(cfg) as stage:
        _compare_executors(model_dir, stage)


def test_two_gloo_ranks_match_local_executor(llama3: Path) -> None:
    """Both ranks spawned here; rank 0 checks every executor operation against the local one
    (candidates with both reference streams, NLL, logits, SparseGPT prune with PERP block
    reconstruction, masks, the reconstructed model's logits) and that an
    error on either rank is raised on rank 0 while the ranks stay in step."""
    spawn_two_ranks(_rank_main, str(llama3))


# --------------------------------------------------------------------------- end to end


def _cli_args(model_dir: Path, text: Path, out: Path, workers: int) -> list[str]:
    return ["--model", str(model_dir), "--calib", f"text:{text}", "--nsamples", "4",
            "--seqlen", "32", "--eval", f"text:{text}", "--eval-windows", "3", "--device", "cpu",
            "--micro-batch", "2", "--workers", str(workers), "--output", str(out)]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("model-*.safetensors")):
        out.update(load_file(f))
    return out


def test_torchrun_two_ranks_match_local(llama3: Path, small_text: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 launch/prune.py`` with NeuroAL (tiny grid) and export:
    the same search trail, lambdas, perplexities, masks and exported bytes as one local worker,
    and the export loads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    from neuroal.pipeline import run

    overrides = [f"{k}={v}" for k, v in NEUROAL.items()]
    env = {**os.environ, "NEUROAL_PROGRESS": "0"}
    env.pop("OMP_NUM_THREADS", None)
    # engine.threads=1 on both sides: every process of both runs applies the same settings
    # (neuroal.engine.determinism), nothing is pinned by hand
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "prune.py"), *_cli_args(llama3, small_text, tmp_path / "dist", 2),
           "engine.executor=dist", "engine.threads=1", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "lambda_block" in proc.stderr and "rank 1 owns blocks [2, 3)" in proc.stderr

    threads = torch.get_num_threads()
    try:
        cfg = tiny_cfg(llama3, tmp_path / "local", calib={"source": f"text:{small_text}"},
                       eval={"datasets": [f"text:{small_text}"], "max_windows": 3},
                       allocation={"name": "neuroal", "block_grid": [0.05, 0.1],
                                   "row_grid": [0.0, 0.05], "search_samples": 2},
                       engine={"threads": 1})
        local = run(cfg, keep_executor=True)
        assert torch.get_num_threads() == 1  # applied by the run itself
    finally:
        torch.set_num_threads(threads)  # restore for the rest of the session

    report = json.loads((tmp_path / "dist" / "report.json").read_text())
    want = json.loads((tmp_path / "local" / "report.json").read_text())
    assert report["search"] == want["search"] and report["search"]["candidates"]
    for key in ("lambda_block", "lambda_row"):
        assert report["plan"]["policy"][key] == want["plan"]["policy"][key]
    assert report["eval"] == want["eval"]
    assert report["layers"] == want["layers"]
    assert [w["blocks"] for w in report["workers"]] == [[0, 2], [2, 3]]
    assert not (tmp_path / "dist.neuroal-tmp").exists()

    got, expected = _weights(tmp_path / "dist"), _weights(tmp_path / "local")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name
    masks = local.executor.masks()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dist").eval()
    for name, mask in masks.items():
        assert torch.equal(loaded.get_parameter(name + ".weight") == 0, mask), name
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "local").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=0, atol=0)
