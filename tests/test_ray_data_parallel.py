"""Data-parallel final prune under the Ray executor (``engine.parallel=data``): every actor runs
its DataPrune program in one call over a torch.distributed group formed inside the actors; masks
and weights are bit-identical to the local executor's pipeline mode, the resume state is written
per block, the report records the mode, and a lost actor stops the run with the ``--resume``
hint instead of hanging."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from conftest import save_tiny_model, tiny_cfg
from safetensors.torch import load_file

from neuroal.allocation.plan import SparsityPlan
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.worker import PruneJob, WorkerSpec
from neuroal.models.loading import resolve_model
from neuroal.pipeline import run

pytestmark = pytest.mark.ray

NUM_BLOCKS = 4


@pytest.fixture(scope="module")
def ray_instance():
    from neuroal.engine.ray_executor import init_ray

    owned = init_ray(num_cpus=2)
    yield
    if owned:
        ray.shutdown()


@pytest.fixture(scope="module")
def llama4(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("raydata") / "llama4", tokenizer_dir,
                           num_layers=NUM_BLOCKS)


def _ids() -> torch.Tensor:
    """Seven sequences: with micro-batch 2, four micro-batches, the last one short."""
    return torch.randint(0, 320, (7, 16), generator=torch.Generator().manual_seed(0))


def _plan(blocks: list[dict[str, tuple[int, int]]]) -> SparsityPlan:
    """50 % everywhere but block 1: per-row ratios (neuron masks)."""
    entries: list[dict[str, Any]] = [{n: 0.5 for n in blk} for blk in blocks]
    entries[1] = {n: torch.linspace(0.3, 0.7, rows, dtype=torch.float64)
                  for n, (rows, _cols) in blocks[1].items()}
    return SparsityPlan(0.5, "unstructured", entries)


def _remote_state(executor: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part in ray.get([a.__ray_call__.remote(lambda w: w.state_items())
                         for a in executor.workers]):
        out.update(part)
    return out


def _exported(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(directory / f))
    return out


def _assert_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_data_and_ray_is_accepted(llama4: Path) -> None:
    cfg = tiny_cfg(llama4, None, engine={"parallel": "data", "executor": "ray", "workers": 2})
    assert (cfg.engine.parallel, cfg.engine.executor) == ("data", "ray")


def test_group_backend_follows_the_devices() -> None:
    """gloo between CPU actors; NCCL for tensors between distinct GPUs; through host memory
    over gloo when two actors share a GPU (NCCL refuses two ranks on one device)."""
    from neuroal.engine.ray_executor import data_channel

    assert data_channel([None, None]) == ("gloo", None)
    assert data_channel(["n/gpu-a", "n/gpu-b"]) == ("cpu:gloo,cuda:nccl", None)
    assert data_channel(["n/gpu-a", "n/gpu-a"]) == ("gloo", "cpu")


def test_mode_is_decided_as_in_dist() -> None:
    """The Ray executor decides the mode with the same rule as local / dist: neither
    perp-reconstruct nor the model rules data mode out."""
    from neuroal.engine.ray_executor import RayExecutor

    executor = RayExecutor.__new__(RayExecutor)
    executor._requested, executor.workers = "data", [None, None]  # noqa: SLF001
    assert executor._prune_mode(PruneJob("wanda", reconstruct={"steps": 1})) == "data"  # noqa: SLF001
    executor._requested = "auto"  # noqa: SLF001
    assert executor._prune_mode(PruneJob("wanda")) == "data"  # noqa: SLF001
    assert executor._prune_mode(PruneJob("wanda", reconstruct={"steps": 1})) == "data"  # noqa: SLF001
    executor.workers = [None]
    assert executor._prune_mode(PruneJob("wanda")) == "pipeline"  # noqa: SLF001


def test_wanda_matches_local_pipeline(ray_instance, llama4: Path, tmp_path: Path) -> None:
    """Two actors, ``engine.parallel=auto`` (data), the gloo transport taken down for the
    prune's own group and rebuilt after: masks, weights and reports equal the local executor's
    pipeline mode bit for bit; each block's resume state is written; the pruned model's NLL
    (streams crossing over the rebuilt channel) equals the local one. Then a failing worker and
    a lost actor."""
    from neuroal.engine.ray_executor import RayExecutor, RayOptions

    source = resolve_model(str(llama4))
    local = LocalExecutor(source, NUM_BLOCKS, 1, ["cpu"], "float32", 2, parallel="pipeline")
    plan = _plan(local.workers[0].adapter.shape().blocks)
    want = local.run_final_prune(plan, PruneJob("wanda"), _ids())
    remote = RayExecutor(WorkerSpec(source, 0, 0, NUM_BLOCKS, "cpu", "float32", 2), 2,
                         RayOptions(transport="gloo"))
    try:
        state = tmp_path / "state"
        (state / "prune").mkdir(parents=True)
        got = remote.run_final_prune(plan, PruneJob("wanda", state_dir=str(state)), _ids())
        assert remote.parallel == "data"
        assert [r.index for r in got] == list(range(NUM_BLOCKS))
        assert [[(x.name, x.zeros, x.numel) for x in r.layers] for r in got] == \
            [[(x.name, x.zeros, x.numel) for x in r.layers] for r in want]
        _assert_bits(_remote_state(remote), local.workers[0].state_items())
        assert sorted(p.name for p in (state / "prune").glob("*.safetensors")) == \
            [f"block_{b:04d}.safetensors" for b in range(NUM_BLOCKS)]
        nll = remote.window_nll(_ids())
        assert torch.equal(nll, local.window_nll(_ids()))

        # a worker's own error mid-prune: agreed by both actors, raised on the driver with its
        # message; both leave the group and the executor stays usable
        def inject(worker: Any) -> None:  # inside actor 1 (pickled by value): solves raise
            def boom(*_args: Any, **_kwargs: Any) -> None:
                raise RuntimeError(f"injected failure on worker {worker.spec.rank}")

            worker.prune_block = boom

        ray.get(remote.workers[1].__ray_call__.remote(inject))
        with pytest.raises(RuntimeError, match="injected failure on worker 1"):
            remote.run_final_prune(plan, PruneJob("wanda"), _ids())
        ray.get(remote.workers[1].__ray_call__.remote(lambda w: delattr(w, "prune_block")))
        assert torch.isfinite(remote.window_nll(_ids())).all()

        # an actor killed while the data-parallel prune runs: the driver names it and the
        # --resume hint at once (no wait for the survivor's collective timeout), and releases
        # every actor
        def kill(self: Any, operation: str, unit: int) -> None:
            if operation == "prune" and unit == 0:
                ray.kill(self.workers[1])

        remote.fault_hook = types.MethodType(kill, remote)
        with pytest.raises(RuntimeError) as err:
            remote.run_final_prune(plan, PruneJob("wanda", state_dir=str(state)), _ids())
        for part in ("Ray worker 1", "blocks [2, 4)", "engine.parallel=data",
                     f"resume state is kept at {state}", "--resume"):
            assert part in str(err.value), (part, str(err.value))
        assert remote.workers == []
    finally:
        remote.shutdown()
        local.shutdown()


def test_sparsegpt_run_matches_local_and_reports_data(ray_instance, llama4: Path,
                                                      small_text: Path, tmp_path: Path) -> None:
    """A whole SparseGPT run with 2 Ray actors (``auto``, object store, sequential onloading
    from host memory) against one local worker in pipeline mode with its blocks on the device:
    the same exported weights and layer report; ``engine.parallel`` is ``data`` in
    report.json."""
    def cfg(executor: str, workers: int, parallel: str, onload: str, out: Path) -> Any:
        return tiny_cfg(llama4, out, calib={"source": f"text:{small_text}"}, sparsity=0.6,
                        criterion={"name": "sparsegpt"},
                        engine={"executor": executor, "workers": workers, "parallel": parallel,
                                "onload": onload, "ray": {"transport": "object-store"}})

    want = run(cfg("local", 1, "pipeline", "device", tmp_path / "local"))
    got = run(cfg("ray", 2, "auto", "host", tmp_path / "ray"))
    report = json.loads((tmp_path / "ray" / "report.json").read_text())
    assert report["engine"]["parallel"] == "data"
    assert report["config"]["engine"]["onload"] == "host"
    assert want.report["engine"]["parallel"] == "pipeline"
    assert got.report["layers"] == want.report["layers"]
    _assert_bits(_exported(tmp_path / "ray"), _exported(tmp_path / "local"))
