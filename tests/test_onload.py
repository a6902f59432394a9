"""Sequential onloading: with ``engine.onload`` = host or disk a worker keeps its
blocks off the device and brings one at a time (plus one prefetched); every phase is
bit-identical to the on-device run, for the local, Ray and torch.distributed executors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model, spawn_two_ranks, tiny_cfg

from neuroal.allocation.plan import SparsityPlan
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.worker import CandidateJob, PruneJob, Worker, WorkerSpec
from neuroal.models.loading import resolve_model

RECONSTRUCT = {"steps": 3, "batch_size": 2, "lr": 1e-2, "rank": 4}


@pytest.fixture(scope="module")
def llama4(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four blocks: two per worker with two workers, so prefetching has a next block."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("onload") / "llama4", tokenizer_dir,
                           num_layers=4)


def _ids(n: int = 3, t: int = 16) -> torch.Tensor:
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(0))


_SHAPE: list = []


def run_phases(ex, criterion: str, reconstruct: bool, tmp: Path) -> dict:
    """Every executor phase on fixed inputs: candidates (both reference streams), dense
    metrics, weight metrics, NLL, the final prune (optionally with PERP), masks, logits and
    the exported shard bytes."""
    ids = _ids()
    blocks = [{n: 0.5 for n in blk} for blk in _SHAPE]
    candidates = [[{n: r for n in blk} for blk in _SHAPE] for r in (0.3, 0.6)]
    out: dict = {}
    for reference in ("local", "global"):
        res = ex.evaluate_candidates(ids, candidates, CandidateJob(criterion), reference)
        out[f"na_{reference}"] = [[b.na for b in c] for c in res]
        out[f"delta_{reference}"] = [[b.delta for b in c] for c in res]
    out["weight_norms"] = ex.weight_metrics(torch.linalg.matrix_norm)  # picklable by name
    out["nll_dense"] = ex.window_nll(ids)
    job = PruneJob(criterion, reconstruct=RECONSTRUCT if reconstruct else None)
    reports = ex.run_final_prune(SparsityPlan(0.5, "unstructured", blocks), job, ids)
    out["zeros"] = [[layer.zeros for layer in r.layers] for r in reports]
    out["masks"] = ex.masks()
    out["nll_sparse"] = ex.window_nll(ids)
    out["logits"] = ex.logits(ids)
    tmp.mkdir(parents=True, exist_ok=True)
    files = ex.write_shards(str(tmp), "float32", 10**6)
    from safetensors.torch import load_file

    out["shards"] = {}
    for f in files:
        out["shards"].update(load_file(tmp / f["file"]))
    return out


def assert_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        _equal(got[key], value, key)


def _equal(a, b, where: str) -> None:
    if isinstance(b, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in b:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _local(model: Path, workers: int, onload: str, prefetch: bool = True) -> LocalExecutor:
    return LocalExecutor(resolve_model(str(model)), 4, workers, ["cpu"], "float32", 2,
                         onload=onload, prefetch=prefetch)


@pytest.fixture(scope="module")
def reference(llama4: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """On-device results (one worker) for wanda and for SparseGPT + PERP reconstruction."""
    ex = _local(llama4, 1, "device")
    _SHAPE[:] = [dict(b) for b in ex.workers[0].adapter.shape().blocks]
    root = tmp_path_factory.mktemp("ref")
    out = {"wanda": run_phases(ex, "wanda", False, root / "w")}
    ex.shutdown()
    ex = _local(llama4, 1, "device")
    out["sparsegpt"] = run_phases(ex, "sparsegpt", True, root / "s")
    ex.shutdown()
    return out


@pytest.mark.parametrize("onload", ["host", "disk"])
@pytest.mark.parametrize(("criterion", "workers", "prefetch"),
                         [("wanda", 2, True), ("sparsegpt", 1, True), ("sparsegpt", 2, False)])
def test_local_onload_is_bit_identical(llama4: Path, reference: dict, tmp_path: Path,
                                       onload: str, criterion: str, workers: int,
                                       prefetch: bool) -> None:
    """NeuroAL candidates (local and global reference), weight metrics, dense and pruned NLL,
    final prune (SparseGPT with PERP block reconstruction), masks, logits and exported bytes
    equal the on-device run; at most two blocks per worker were ever on the device."""
    ex = _local(llama4, workers, onload, prefetch)
    got = run_phases(ex, criterion, criterion == "sparsegpt", tmp_path / "x")
    assert_identical(got, reference[criterion])
    for w in ex.workers:
        stats = w.store.stats()
        assert stats["mode"] == onload and stats["fetches"] > 0
        assert stats["max_resident"] <= (2 if prefetch else 1)
        assert (stats["prefetch_hits"] > 0) == prefetch
        for index in w.blocks:  # between operations no block is on the "device" copy
            assert index not in w.store.depth
    spill = [w.store.spill_dir for w in ex.workers]
    ex.shutdown()
    assert all(d is None or not d.exists() for d in spill)  # spill files removed


def test_disk_onload_keeps_blocks_in_the_checkpoint(llama4: Path) -> None:
    """``disk``: outside an operation the blocks' parameters are on ``meta`` (nothing held),
    a pruned block is spilled to the worker's own file and read back from there."""
    source = resolve_model(str(llama4))
    worker = Worker(WorkerSpec(source, 0, 4, 4, "cpu", "float32", 2, onload="disk"))
    block = worker.adapter.blocks[1]
    assert all(p.device.type == "meta" for p in block.parameters())
    stream = worker.embed(_ids())
    entries = {n: 0.5 for n in worker.adapter.prunable_linears(block)}
    for index in worker.blocks:
        stream, _ = worker.prune_one(index, stream, entries, PruneJob("wanda"))
    assert all(p.device.type == "meta" for p in block.parameters())
    assert worker.store.spilled == {0, 1, 2, 3}
    assert sorted(p.name for p in worker.store.spill_dir.iterdir())[0] == "block_00000.safetensors"
    masks = worker.masks()
    assert all(m.float().mean() == 0.5 for m in masks.values())
    spill = worker.store.spill_dir
    worker.close()
    assert not spill.exists()


def test_onload_config_is_validated(llama4: Path) -> None:
    from neuroal.config.build import ConfigError

    with pytest.raises(ConfigError, match=r"engine.onload='gpu': expected one of auto, device"):
        tiny_cfg(llama4, None, engine={"onload": "gpu"})
    with pytest.raises(ValueError, match="engine.onload='gpu'"):
        Worker(WorkerSpec(resolve_model(str(llama4)), 0, 2, 4, "cpu", "float32", 2,
                          onload="gpu"))


def test_pipeline_run_with_onload_matches_device(llama4: Path, small_text: Path,
                                                 tmp_path: Path) -> None:
    """End to end through the pipeline (NeuroAL search, SparseGPT, PERP reconstruction,
    perplexity, export): ``engine.onload=host`` == ``device``, report and bytes."""
    import json

    from neuroal.pipeline import run

    def go(onload: str) -> dict:
        cfg = tiny_cfg(llama4, tmp_path / onload, calib={"source": f"text:{small_text}"},
                       criterion={"name": "sparsegpt"},
                       eval={"datasets": [f"text:{small_text}"], "max_windows": 2},
                       engine={"onload": onload, "workers": 2},
                       allocation={"name": "neuroal", "block_grid": [0.05, 0.1],
                                   "row_grid": [0.0, 0.05], "search_samples": 2},
                       recover={"steps": ["perp-reconstruct"],
                                "perp-reconstruct": {"steps": 2, "batch_size": 2, "rank": 4}})
        run(cfg)
        return json.loads((tmp_path / onload / "report.json").read_text())

    want, got = go("device"), go("host")
    for key in ("search", "eval", "layers"):
        assert got[key] == want[key], key
    from safetensors.torch import load_file

    def weights(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("model-*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = weights(tmp_path / "host"), weights(tmp_path / "device")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


# --------------------------------------------------------------------------- Ray


def test_ray_onload_is_bit_identical(llama4: Path, reference: dict, tmp_path: Path) -> None:
    """Two Ray actors with ``onload=host`` and ``disk``: every phase equals the local
    on-device run."""
    ray = pytest.importorskip("ray")
    from neuroal.engine.ray_executor import RayExecutor, RayOptions, init_ray
    from neuroal.engine.worker import WorkerSpec

    owned = init_ray(num_cpus=2)
    try:
        for onload in ("host", "disk"):
            template = WorkerSpec(resolve_model(str(llama4)), 0, 0, 4, "cpu", "float32", 2,
                                  onload=onload)
            ex = RayExecutor(template, 2, RayOptions(deterministic=True))
            try:
                got = run_phases(ex, "sparsegpt", True, tmp_path / onload)
            finally:
                ex.shutdown()
            assert_identical(got, reference["sparsegpt"])
    finally:
        if owned:
            ray.shutdown()


# --------------------------------------------------------------------------- torch.distributed


def _rank_main(rank: int, port: int, model_dir: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from neuroal.engine import EXECUTORS, dist
    from neuroal.runtime.process import seed_everything

    cfg = tiny_cfg(Path(model_dir), None,
                   engine={"executor": "dist", "workers": 2, "onload": "disk"})
    if rank > 0:
        assert dist.serve(cfg) == 0
        return
    seed_everything(cfg.seed, cfg.engine.deterministic)
    with dist.coordinator(cfg) as session:
        ex = EXECUTORS.get("dist")(cfg, source=resolve_model(model_dir), num_blocks=4,
                                   devices=["cpu"], dtype="float32", session=session)
        local = _local(Path(model_dir), 1, "device")
        _SHAPE[:] = [dict(b) for b in local.workers[0].adapter.shape().blocks]
        got = run_phases(ex, "sparsegpt", True, Path(result) / "dist")
        want = run_phases(local, "sparsegpt", True, Path(result) / "local")
        ex.shutdown()
        assert_identical(got, want)
        (Path(result) / "ok").write_text("ok")


def test_dist_onload_is_bit_identical(llama4: Path, tmp_path: Path) -> None:
    """Two gloo ranks with ``onload=disk``: every phase equals one local on-device worker."""
    spawn_two_ranks(_rank_main, str(llama4), str(tmp_path))
    assert (tmp_path / "ok").exists()


# --------------------------------------------------------------------------- planner


def test_planner_onload_terms_and_choice() -> None:
    """Onloading moves all but two blocks' weights off the device into ``host_weights``
    (``disk``: two blocks of host staging), and ``auto`` picks the first mode that fits:
    Llama-2-70B now fits 1 x 80 GB and 2 x 24 GB (wanda), with the host memory reported."""
    from dataclasses import replace

    from neuroal.engine.arena import arena_bound
    from neuroal.planning import GB, MemoryRequest, choose_onload, layout_of, plan_memory

    layout = layout_of("llama-2-70b")
    block = layout.block_params[0] * 2
    arena = arena_bound(block, layout.block_tensors[0])  # one pinned arena per block
    assert block < arena <= block + 2 * 4096
    req = MemoryRequest(workers=2)
    dev, host, disk = (plan_memory(layout, replace(req, onload=m)) for m in
                       ("device", "host", "disk"))
    for d, h, k in zip(dev.workers, host.workers, disk.workers, strict=True):
        owned = (d.stop - d.start) * block
        assert h.weights == d.weights - owned + 2 * block
        assert h.host_weights == (d.stop - d.start) * arena
        assert k.weights == h.weights and k.host_weights == 2 * block
        assert h.total - h.weights == d.total - d.weights  # the rest is unchanged
    no_prefetch = plan_memory(layout, replace(req, onload="host", prefetch=False))
    assert no_prefetch.workers[0].weights == host.workers[0].weights - block
    one = choose_onload(layout, replace(req, workers=1, onload="auto"), 80 * GB)
    assert one.request.onload == "host" and one.fits(80 * GB)
    assert one.host_total == 80 * arena
    two = choose_onload(layout, replace(req, onload="auto"), 24 * GB)
    assert two.request.onload == "host" and two.fits(24 * GB)
    # with too little host memory for every block, disk is chosen
    assert choose_onload(layout, replace(req, onload="auto"), 24 * GB,
                         host_limit=64 * GB).request.onload == "disk"
    eight = choose_onload(layout, replace(req, workers=8, onload="auto"), 80 * GB)
    assert eight.request.onload == "device"


def test_plan_cli_answers_fits_with_host_memory() -> None:
    import subprocess
    import sys

    from conftest import REPO

    for args in (["--workers", "1", "--gpu-memory", "80GB"],
                 ["--workers", "2", "--gpu-memory", "24GB"]):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "plan.py"), "--model",
                               "llama-2-70b", *args], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "verdict: fits" in proc.stdout and "engine.onload=host" in proc.stdout
        assert "136.91 GB for all" in proc.stdout  # 80 arenas: the blocks + 2 pages each


def test_pipeline_auto_onload_follows_the_planner(llama4: Path) -> None:
    """``engine.onload=auto`` with a CPU budget below the on-device peak but above the
    ``disk`` peak runs with ``disk``; a large budget keeps ``device``."""
    from conftest import tiny_config

    from neuroal.models.adapter import ModelAdapter
    from neuroal.models.loading import build_skeleton
    from neuroal.planning import ModelLayout, plan_memory
    from neuroal.planning.checks import request_from_config
    from neuroal.planning.preflight import check_memory

    config = tiny_config("llama", 8)  # 8 blocks on one worker: onloading keeps 2 on device
    adapter = ModelAdapter(build_skeleton(config, torch.float32))
    cfg = tiny_cfg(llama4, None)
    request = request_from_config(cfg, "float32", "cpu")
    layout = ModelLayout.from_adapter(adapter, "tiny")
    from dataclasses import replace

    device = plan_memory(layout, replace(request, onload="device")).peak
    disk = plan_memory(layout, replace(request, onload="disk"))
    disk_need = max(w.total + w.host for w in disk.workers)
    assert disk_need < device
    limit = (device + disk_need) // 2
    small = tiny_cfg(llama4, None, engine={"memory_limit": limit})
    assert check_memory(small, config, adapter, torch.device("cpu"), torch.float32) == "disk"
    big = tiny_cfg(llama4, None, engine={"memory_limit": device * 2})
    assert check_memory(big, config, adapter, torch.device("cpu"), torch.float32) == "device"
    fixed = tiny_cfg(llama4, None, engine={"memory_limit": device * 2, "onload": "host"})
    assert check_memory(fixed, config, adapter, torch.device("cpu"), torch.float32) == "host"


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_onload_is_bit_identical(tmp_path: Path, dtype: str) -> None:
    """On a GPU: ``host`` (pinned host copies, prefetch on a side stream) and ``disk`` give
    the on-device results bit for bit; blocks not in use stay in pinned host memory."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", 4)).save_pretrained(tmp_path / "m")
    source = resolve_model(str(tmp_path / "m"))

    def local(onload: str) -> LocalExecutor:
        return LocalExecutor(source, 4, 2, ["cuda"], dtype, 2, onload=onload)

    ref = local("device")
    _SHAPE[:] = [dict(b) for b in ref.workers[0].adapter.shape().blocks]
    want = run_phases(ref, "sparsegpt", True, tmp_path / "ref")
    ref.shutdown()
    for onload in ("host", "disk"):
        ex = local(onload)
        if onload == "host":
            w = ex.workers[0]
            block = w.adapter.blocks[1]
            assert all(p.device.type == "cpu" and p.is_pinned() for p in block.parameters())
        got = run_phases(ex, "sparsegpt", True, tmp_path / onload)
        assert all(w.store.stats()["max_resident"] <= 2 for w in ex.workers)
        assert all(w.store.stats()["prefetch_hits"] > 0 for w in ex.workers)
        ex.shutdown()
        assert_identical(got, want)
