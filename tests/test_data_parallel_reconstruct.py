"""Data mode with ``perp-reconstruct`` (neuroal.engine.data_parallel): the dense outputs are
kept by every worker's statistics forward, the stream and the targets are gathered on the
block's owner, which fits the block as pipeline mode does, and the refitted block (norms
included) reaches every worker. Every parameter of the pruned model, the layer reports and
the reconstruction facts are bit-identical to pipeline mode's on 1, 2 and 3 workers, after a
resume too (two torch.distributed ranks: tests/test_data_parallel.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import random_ids, save_tiny_model

from neuroal.allocation.plan import SparsityPlan
from neuroal.engine.data_parallel import run_in_threads, stitch_rows
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.worker import PruneJob
from neuroal.models.loading import resolve_model

NUM_BLOCKS = 3
RECONSTRUCT = {"steps": 3, "batch_size": 2, "lr": 1e-2, "rank": 2}
NORM = "model.layers.{}.input_layernorm.weight"


@pytest.fixture(scope="module")
def llama3(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three blocks: with 3 workers every worker owns one."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("perp") / "llama3", tokenizer_dir,
                           num_layers=NUM_BLOCKS)



def _job(criterion: str = "wanda", **kwargs: Any) -> PruneJob:
    return PruneJob(criterion, reconstruct=dict(RECONSTRUCT), **kwargs)


def _prune(model: Path, workers: int, parallel: str, job: PruneJob, onload: str = "device",
           ) -> tuple[str, list[Any], dict[str, torch.Tensor]]:
    """A final prune at 50 % on fresh workers; returns the mode that ran, the block reports and
    every tensor of the model."""
    ex = LocalExecutor(resolve_model(str(model)), NUM_BLOCKS, workers, ["cpu"], "float32", 2,
                       parallel=parallel, onload=onload)
    blocks = ex.workers[0].adapter.shape().blocks
    reports = ex.run_final_prune(SparsityPlan(0.5, "unstructured",
                                              [{n: 0.5 for n in b} for b in blocks]), job, random_ids())
    tensors: dict[str, torch.Tensor] = {}
    for w in ex.workers:
        tensors.update(w.state_items())
    mode = ex.parallel
    ex.shutdown()
    return mode, reports, tensors


def _facts(reports: list[Any]) -> list[Any]:
    """Layer reports and reconstruction facts (all but the wall time)."""
    return [([(x.name, x.pruned, x.zeros, x.numel) for x in r.layers],
             {k: v for k, v in r.info["perp-reconstruct"].items() if k != "seconds"})
            for r in reports]


def _assert_same(got: tuple[str, list[Any], dict[str, torch.Tensor]],
                 want: tuple[str, list[Any], dict[str, torch.Tensor]]) -> None:
    assert got[0] == "data" and want[0] == "pipeline"
    assert [r.index for r in got[1]] == list(range(NUM_BLOCKS))
    assert _facts(got[1]) == _facts(want[1])
    assert got[2].keys() == want[2].keys()
    for name, tensor in want[2].items():
        assert torch.equal(got[2][name].view(torch.uint8), tensor.view(torch.uint8)), name


@pytest.fixture(scope="module")
def wanda_pipeline(llama3: Path) -> tuple[str, list[Any], dict[str, torch.Tensor]]:
    return _prune(llama3, 1, "pipeline", _job())


def test_gather_rows_inverts_scatter_rows() -> None:
    """Three threads: each one's rows of a stream scattered, then gathered on rank 1."""
    stream = torch.arange(7 * 2 * 3, dtype=torch.float32).reshape(7, 2, 3)
    rows = [[0, 1, 6], [2, 3], [4, 5]]

    def program(rank: int, comm: Any) -> torch.Tensor | None:
        share = comm.scatter_rows(stream if rank == 0 else None, rows,
                                  (3, torch.float32, torch.device("cpu")))
        return comm.gather_rows(share, rows, 1, torch.device("cpu"))

    got = run_in_threads([0, 1, 2], program)  # type: ignore[list-item]
    assert got[0] is None and got[2] is None and torch.equal(got[1], stream)
    assert torch.equal(stitch_rows([stream[[0, 1, 6]], stream[2:4], stream[4:6]], rows,
                                   torch.device("cpu")), stream)
    alone = run_in_threads([0], lambda rank, comm: comm.gather_rows(  # type: ignore[list-item]
        stream, [list(range(7))], 0, torch.device("cpu")))
    assert alone[0] is stream  # one worker holds the whole stream: no copy


def test_data_mode_reconstruct_matches_pipeline_on_1_2_3_workers(
        llama3: Path, wanda_pipeline: tuple[str, list[Any], dict[str, torch.Tensor]]) -> None:
    dense = _prune(llama3, 1, "pipeline", PruneJob("wanda"))[2]
    for b in range(NUM_BLOCKS):  # the fit changed the norms, not only the linears
        assert not torch.equal(dense[NORM.format(b)], wanda_pipeline[2][NORM.format(b)])
    for workers in (1, 2, 3):
        _assert_same(_prune(llama3, workers, "data", _job()), wanda_pipeline)
    # the owner's block fitted on the device and written back home (sequential onloading)
    _assert_same(_prune(llama3, 2, "data", _job(), onload="host"), wanda_pipeline)


def test_data_mode_reconstruct_without_statistics(llama3: Path) -> None:
    """Magnitude needs no statistic: the dense forward runs only for the targets."""
    _assert_same(_prune(llama3, 2, "data", _job("magnitude")),
                 _prune(llama3, 1, "pipeline", _job("magnitude")))


def test_data_mode_reconstruct_resumes(
        llama3: Path, tmp_path: Path,
        wanda_pipeline: tuple[str, list[Any], dict[str, torch.Tensor]]) -> None:
    """Block states saved in data mode keep the refitted norms; a resume with another worker
    count replays them and fits the missing block as before."""
    (tmp_path / "prune").mkdir()  # as neuroal.outputs.checkpoint lays the state out
    first = _prune(llama3, 2, "data", _job(state_dir=str(tmp_path)))
    _assert_same(first, wanda_pipeline)
    assert len(list((tmp_path / "prune").glob("block_*.safetensors"))) == NUM_BLOCKS
    (tmp_path / "prune" / f"block_{NUM_BLOCKS - 1:04d}.safetensors").unlink()
    _assert_same(_prune(llama3, 3, "data", _job(state_dir=str(tmp_path))), wanda_pipeline)
