"""The engine core shared by every executor: result merges, perplexity chunks and
the worker-side block restore that a restarted Ray actor and a resume replay both use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model

from neuroal.allocation.plan import SparsityPlan
from neuroal.engine.core import chunks, merge_blocks, reference_needs
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.worker import PruneJob, Worker
from neuroal.models.loading import resolve_model


def test_merge_blocks_and_chunks() -> None:
    assert merge_blocks([{2: "c", 0: "a"}, {1: "b"}], 3) == ["a", "b", "c"]
    with pytest.raises(KeyError):
        merge_blocks([{0: "a"}], 2)
    windows = torch.arange(10).reshape(5, 2)
    assert [c.shape[0] for c in chunks(windows, 2)] == [2, 2, 1]
    assert torch.equal(torch.cat(chunks(windows, 2)), windows)
    assert "sq_norm" in reference_needs("wanda") and "hessian" in reference_needs("sparsegpt")


@pytest.mark.parametrize("onload", ["device", "host"])
def test_restore_blocks_after_perp_reconstruct(tokenizer_dir: Path, tmp_path: Path,
                                               onload: str) -> None:
    """A fresh worker restoring the saved state of a final prune with ``perp-reconstruct``
    gets every parameter back, the refitted norms included (not only the linears)."""
    model = save_tiny_model("llama", tmp_path / "m", tokenizer_dir, num_layers=2)
    ex = LocalExecutor(resolve_model(str(model)), 2, 1, ["cpu"], "float32", 2, onload=onload)
    blocks = [{n: 0.5 for n in b} for b in ex.workers[0].adapter.shape().blocks]
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    state = tmp_path / "state"
    (state / "prune").mkdir(parents=True)  # the pipeline's resume layout (neuroal.outputs.checkpoint)
    job = PruneJob("wanda", reconstruct={"steps": 3, "batch_size": 2, "lr": 1e-2, "rank": 4},
                   state_dir=str(state))
    ex.run_final_prune(SparsityPlan(0.5, "unstructured", blocks), job, ids)
    want = ex.workers[0].state_items()
    fresh = Worker(ex.specs[0])
    dense = fresh.state_items()
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(dense[norm], want[norm])  # the reconstruction refitted the norm
    assert fresh.restore_blocks(str(state)) == [0, 1]
    got = fresh.state_items()
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    fresh.close()
    ex.shutdown()
