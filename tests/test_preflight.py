"""Preflight before loading (neuroal.engine.preflight / cluster / ray_preflight): cgroup-aware
host memory, disk space, a relative output under `ray job submit`, non-shared filesystems and
devices the workers cannot honour, LOCAL_RANK devices under torchrun, and the separate dist
and Ray timeouts. Cluster cases run on CPU: two Ray nodes on this machine
(``ray.cluster_utils.Cluster``, one CPU each) and a one-rank gloo group."""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_cfg

from neuroal.config.build import ConfigError, build_config
from neuroal.engine import cluster, dist, dist_launch, dist_stage
from neuroal.engine import preflight as pf
from neuroal.runtime.errors import PreflightError
from neuroal.runtime.logging import WarningBuffer, replay
from neuroal.runtime.process import Timings, cgroup_available, host_available

GB = 10**9


# --------------------------------------------------------------------------- host memory


def _cgroup_tree(tmp: Path, lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake ``/sys/fs/cgroup`` and ``/proc`` (``self/cgroup``, ``meminfo``)."""
    root, proc = tmp / "cgroup", tmp / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(lines)
    (proc / "meminfo").write_text(f"MemTotal: {64 * 10**6} kB\nMemAvailable: {50 * 10**6} kB\n")
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root, proc


def test_cgroup_v2_limit_caps_host_memory(tmp_path: Path) -> None:
    """memory.max - (memory.current - inactive_file), the tightest ancestor wins, and the
    result is below /proc/meminfo's 51.2 GB, which host_available() therefore no longer uses."""
    root, proc = _cgroup_tree(tmp_path, "0::/job/step\n", {
        "cgroup.controllers": "cpu memory\n",
        "job/memory.max": f"{8 * GB}\n", "job/memory.current": f"{3 * GB}\n",
        "job/step/memory.max": "max\n", "job/step/memory.current": f"{2 * GB}\n",
        "job/memory.stat": f"anon 1\ninactive_file {GB}\n"})
    assert cgroup_available(root, proc) == 8 * GB - (3 * GB - GB)
    assert host_available(root, proc) == 6 * GB


def test_cgroup_v1_limit_and_container_root(tmp_path: Path) -> None:
    """v1: limit_in_bytes - (usage - total_inactive_file); a path from /proc/self/cgroup that
    the container does not show falls back to the mount's root; no limit: meminfo."""
    root, proc = _cgroup_tree(tmp_path, "5:cpu:/x\n4:memory:/docker/abc\n", {
        "memory/memory.limit_in_bytes": f"{4 * GB}\n",
        "memory/memory.usage_in_bytes": f"{3 * GB}\n",
        "memory/memory.stat": f"total_inactive_file {GB // 2}\n"})
    assert host_available(root, proc) == 4 * GB - (3 * GB - GB // 2)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_available(root, proc) is None
    assert host_available(root, proc) == 50 * 10**6 * 1024  # MemAvailable is in KiB
    assert host_available(tmp_path / "none", tmp_path / "none") is None


# --------------------------------------------------------------------------- pure checks


def _facts(rank: int, **kw) -> pf.NodeFacts:
    host = kw.pop("host", "h0")
    return pf.NodeFacts(rank, host, kw.pop("node", host), kw.pop("device", "cpu"), **kw)


def test_filesystem_not_shared_names_who_cannot_see_what() -> None:
    facts = [_facts(-1, seen=("driver", "worker-0")),
             _facts(0, seen=("driver", "worker-0")),
             _facts(1, host="h1", node="n1", seen=("worker-1",))]
    errors = pf.filesystem_errors(facts, "/out.neuroal-tmp")
    assert len(errors) == 1
    assert "worker 1 on host h1 (node n1) cannot see driver, worker-0" in errors[0]
    assert "the driver on host h0 cannot see worker-1" in errors[0]
    assert "not on a filesystem every worker shares" in errors[0]
    every = ("driver", "worker-0", "worker-1")
    assert pf.filesystem_errors([_facts(r, seen=every) for r in (-1, 0, 1)], "/t") == []
    failed = pf.filesystem_errors([_facts(-1, seen=("driver",)),
                                   _facts(0, probe_error="cannot write (read-only)")], "/t")
    assert failed == ["worker 0 on host h0: cannot write (read-only); the output must be "
                      "writable from every worker"]


def test_device_type_resolves_on_the_cluster_not_the_driver() -> None:
    """`auto` on a GPU-less head node with GPU workers is cuda (not a silent CPU fp32 run);
    cuda on a cluster without GPUs is refused; a worker without usable CUDA is refused."""
    assert pf.cluster_device_type("auto", 8.0) == ("cuda", [])
    assert pf.cluster_device_type("auto", 0.0) == ("cpu", [])
    kind, errors = pf.cluster_device_type("cuda", 0.0)
    assert "the Ray cluster has no GPU" in errors[0] and "--device cpu" in errors[0]
    error, free = pf.device_state("cuda:0")
    if not torch.cuda.is_available():
        assert "torch sees no CUDA device" in error and free is None
    bad = pf.device_errors([_facts(0, device="cuda:0", device_error="no CUDA"),
                            _facts(1, device="cpu")], "cuda")
    assert "worker 0 on host h0: no CUDA" in bad[0]
    assert "would run on 'cpu' but the run needs cuda" in bad[1]


def test_disk_needed_and_budgets() -> None:
    needed, detail = pf.disk_needed(138 * GB, 137 * GB, existing_state=37 * GB)
    assert needed == 238 * GB and detail == "resume state 100.0 GB + export 138.0 GB"
    errors = pf.disk_errors([_facts(0, disk_free=500 * GB), _facts(1, disk_free=10 * GB)],
                            needed, detail, "/o.neuroal-tmp")
    assert "only 10.0 GB free" in errors[0] and "about 238.0 GB" in errors[0]
    assert pf.disk_errors([_facts(0, disk_free=10 * GB)], 0, "", "/o") == []
    facts = [_facts(0, node="a", device_free=70 * GB, host_available=200 * GB),
             _facts(1, node="a", device_free=60 * GB, host_available=200 * GB),
             _facts(2, node="b", device_free=75 * GB, host_available=120 * GB)]
    assert pf.worker_budgets(facts) == (60 * GB, 100 * GB)  # node a's host is shared by two


def test_probe_files_round_trip(tmp_path: Path) -> None:
    facts = pf.gather_facts(0, "cpu", tmp_path, "nonce-1")
    assert facts.probe_error is None and facts.disk_free and facts.disk_free > 0
    assert (tmp_path / pf.PROBE_DIR / "worker-0").read_text() == "nonce-1"
    assert pf.see_probes(facts, tmp_path, ["driver", "worker-0"], "nonce-1").seen == ("worker-0",)
    assert pf.read_probes(tmp_path / pf.PROBE_DIR, ["worker-0"], "other-run") == ()
    pf.remove_probes(tmp_path)
    assert not (tmp_path / pf.PROBE_DIR).exists()


# --------------------------------------------------------------------------- driver checks


def test_relative_output_under_a_ray_job_is_refused(tiny_models: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"},
           "metadata": {"job_submission_id": "raysubmit_X"}}
    env = {pf.RAY_JOB_ENV: json.dumps(job)}
    errors = pf.relative_output_errors("outputs/llama-70b", env)
    assert "is a relative path, and this run is Ray job raysubmit_X" in errors[0]
    assert "--output /shared/outputs/llama-70b" in errors[0]
    assert pf.relative_output_errors("/abs/out", env) == []
    assert pf.relative_output_errors("outputs/x", {}) == []
    # through the pipeline: refused before the output is touched or the model is read
    monkeypatch.setenv(pf.RAY_JOB_ENV, json.dumps(job))
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(tiny_models["llama"], Path("rel_out"))
    from neuroal.pipeline import prepare

    with pytest.raises(PreflightError, match="'rel_out' is a relative path"):
        prepare(cfg, Timings())
    assert os.listdir(tmp_path) == []


def test_full_disk_is_refused_before_loading(tiny_models: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A mocked disk_usage with 10 bytes free: prepare() refuses with the sizes, removes its probe
    and temporary folder, and nothing at the output."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**12, 10**12 - 10, 10))
    out = tmp_path / "out"
    cfg = tiny_cfg(tiny_models["llama"], out)
    from neuroal.pipeline import prepare

    with pytest.raises(PreflightError) as err:
        prepare(cfg, Timings())
    text = str(err.value)
    assert "only 0.0 GB free" in text and "needs about" in text
    assert "resume state" in text and "export" in text
    assert not out.exists() and not (tmp_path / "out.neuroal-tmp").exists()


def test_disk_needs_counts_the_model(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Export at the output dtype (bf16: 2 B) + resume state at the run dtype (fp32: 4 B per
    block parameter); on --resume the state already written is subtracted."""
    from neuroal.models.adapter import ModelAdapter
    from neuroal.models.loading import build_skeleton, load_model_config, resolve_model
    from neuroal.outputs.export import OutputDir
    from neuroal.planning.preflight import disk_needs

    out = tmp_path / "out"
    cfg = tiny_cfg(tiny_models["llama"], out, output={"dtype": "bfloat16"})
    source = resolve_model(cfg.model.name, None)
    config = load_model_config(source, False)
    adapter = ModelAdapter(build_skeleton(config, torch.float32))
    total = sum(p.numel() for p in adapter.model.parameters())
    blocks = sum(p.numel() for b in adapter.blocks for p in b.parameters())
    needed, detail = disk_needs(cfg, adapter, config, source, torch.float32, OutputDir(out))
    assert needed == 2 * total + 4 * blocks and detail.startswith("resume state")
    (out.parent / "out.neuroal-tmp" / "state").mkdir(parents=True)
    (out.parent / "out.neuroal-tmp" / "state" / "block_0").write_bytes(b"x" * 1000)
    resumed = tiny_cfg(tiny_models["llama"], out, output={"dtype": "bfloat16", "resume": True})
    again, _ = disk_needs(resumed, adapter, config, source, torch.float32, OutputDir(out))
    assert again == needed - 1000


def test_memory_check_uses_the_workers_figures(tiny_models: dict[str, Path]) -> None:
    """A driver without a GPU checks a CUDA run against the free device memory its workers
    reported (never torch.cuda on the driver): 1 MB per worker does not fit, 1 TB does."""
    from neuroal.models.adapter import ModelAdapter
    from neuroal.models.loading import build_skeleton, load_model_config, resolve_model
    from neuroal.planning import MemoryBudgetError
    from neuroal.planning.preflight import check_memory

    cfg = tiny_cfg(tiny_models["llama"], None, engine={"executor": "ray", "workers": 2,
                                                       "device": "cpu"})
    config = load_model_config(resolve_model(cfg.model.name), False)
    adapter = ModelAdapter(build_skeleton(config, torch.bfloat16))
    cuda = torch.device("cuda")
    with pytest.raises(MemoryBudgetError):
        check_memory(cfg, config, adapter, cuda, torch.bfloat16, budgets=(10**6, 10**12))
    assert check_memory(cfg, config, adapter, cuda, torch.bfloat16,
                        budgets=(10**12, 10**12)) in ("device", "host", "disk")


# --------------------------------------------------------------------------- torchrun / dist


@pytest.fixture()
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_devices_follow_local_rank(four_gpus: None) -> None:
    """Two 4-GPU nodes, 8 ranks: global ranks 4-7 use the node's cuda:0-3 (LOCAL_RANK)."""
    listed = build_config({"engine": {"executor": "dist", "workers": 8,
                                      "devices": [f"cuda:{i}" for i in range(8)]}})
    plain = build_config({"engine": {"executor": "dist", "workers": 8, "device": "cuda"}})
    for rank in range(8):
        local = rank % 4
        assert dist.rank_device(listed, rank, local) == (f"cuda:{local}", [])
        assert dist.rank_device(plain, rank, local) == (f"cuda:{local}", [])
    _, errors = dist.rank_device(plain, 5, 4)
    assert "LOCAL_RANK=4" in errors[0] and "4 are visible" in errors[0]


def test_timeouts_validated_and_defaults() -> None:
    cfg = build_config({})
    assert cfg.engine.dist.timeout == 14400 and cfg.engine.dist.collective_timeout == 1800
    assert cfg.engine.ray.placement_timeout == 600
    with pytest.raises(ConfigError) as err:
        build_config({"engine": {"dist": {"collective_timeout": 0},
                                 "ray": {"placement_timeout": "soon"}}})
    text = str(err.value)
    assert "engine.dist.collective_timeout=0" in text
    assert "engine.ray.placement_timeout='soon'" in text


def test_timeouts_reach_the_process_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default group (commands) gets engine.dist.timeout, the stream group (send/recv)
    engine.dist.collective_timeout, and the stream transfers use the stream group."""
    calls: dict[str, object] = {}
    monkeypatch.setattr(dist_launch.dist, "init_process_group",
                        lambda backend, **kw: calls.update(init=kw["timeout"]))
    monkeypatch.setattr(dist_launch.dist, "new_group",
                        lambda **kw: calls.update(group=kw["timeout"]) or "streams")
    monkeypatch.setattr(dist_launch.dist, "destroy_process_group", lambda: None)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = build_config({"engine": {"executor": "dist", "workers": 2, "device": "cpu",
                                   "dist": {"timeout": 7200, "collective_timeout": 90}}})
    info = dist.rank_info(cfg)
    sent, received = [], []
    monkeypatch.setattr(dist_stage.dist, "send", lambda t, dst, group=None: sent.append(group))

    def recv(tensor: torch.Tensor, src: int, group: object = None) -> None:
        tensor.fill_(1)  # the next rank is ready for the bytes
        received.append(group)

    monkeypatch.setattr(dist_stage.dist, "recv", recv)
    with dist.process_group(info) as streams:
        stage = dist.RankStage(info)
        stage.streams = streams
        stage._send(torch.zeros(1, 2, 3))
    assert calls == {"init": datetime.timedelta(seconds=7200),
                     "group": datetime.timedelta(seconds=90)}
    assert sent == ["streams", "streams"] and received == ["streams"]  # header, flag, bytes


def test_dist_preflight_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-rank gloo group: run_preflight gathers the rank's facts through the ``probe`` and
    ``probe_read`` commands, and refuses when the rank cannot see the driver's probe."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    info = dist.RankInfo(0, 1, 0, "cpu")
    cfg = build_config({"engine": {"device": "cpu"}})
    tmp = tmp_path / "out.neuroal-tmp"
    tmp.mkdir()
    with dist.process_group(info) as streams:
        stage = dist.RankStage(info)
        stage.streams = streams
        facts = cluster.run_preflight(cfg, "cpu", tmp, session=stage)
        assert [f.rank for f in facts] == [0]
        assert facts[0].seen == ("driver", "worker-0") and facts[0].disk_free
        monkeypatch.setattr(dist_stage, "read_probes", lambda root, names, nonce: ("worker-0",))
        with pytest.raises(PreflightError, match="worker 0 on host .* cannot see driver"):
            cluster.run_preflight(cfg, "cpu", tmp, session=stage)
    assert os.listdir(tmp) == []  # probes removed


# --------------------------------------------------------------------------- Ray


def test_warning_records_are_replayed_into_the_driver_log(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    buffer = WarningBuffer(limit=2)
    logger = logging.getLogger("neuroal.test_buffer")
    logger.addHandler(buffer)
    try:
        logger.info("not kept")
        for i in range(3):
            logger.warning("dampening %d", i)
    finally:
        logger.removeHandler(buffer)
    records = buffer.drain()
    assert [m for _, _, m in records] == ["dampening 0", "dampening 1",
                                          "1 more warning(s) dropped"]
    assert buffer.drain() == []
    with caplog.at_level(logging.WARNING, logger="neuroal"):
        logging.getLogger("neuroal").addHandler(caplog.handler)
        try:
            replay(records + [(logging.WARNING, "py.warnings", "UserWarning: x")], "ray worker 1")
        finally:
            logging.getLogger("neuroal").removeHandler(caplog.handler)
    assert "[ray worker 1] dampening 1" in caplog.text
    assert [r.name for r in caplog.records][-1] == "neuroal.worker"


@pytest.fixture(scope="module")
def two_nodes():
    """Two Ray nodes on this machine, one CPU each; the second declares one (fake) GPU."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                          "include_dashboard": False})
    gpu_node = nodes.add_node(num_cpus=1, num_gpus=1)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    yield nodes, gpu_node.node_id
    ray.shutdown()
    nodes.shutdown()


def _ray_cfg(workers: int, **ray_options):
    return build_config({"engine": {"executor": "ray", "workers": workers, "device": "cpu",
                                    "ray": {"placement": "STRICT_SPREAD", "cpus": 1,
                                            "placement_timeout": 60, **ray_options}}})


@pytest.mark.ray
def test_ray_two_nodes_shared_and_node_local_output(two_nodes, tmp_path: Path) -> None:
    """Shared folder: one report per node; node-local folders (each node sees its own copy of
    the path): refused, naming both workers; the probes are cleaned up either way."""
    _, gpu_node = two_nodes
    cfg = _ray_cfg(2)
    tmp = tmp_path / "out.neuroal-tmp"
    tmp.mkdir()
    facts = cluster.run_preflight(cfg, "cpu", tmp)
    assert len({f.node for f in facts}) == 2
    assert all(set(f.seen) == {"driver", "worker-0", "worker-1"} for f in facts)
    local = tmp_path / "nodes"

    def node_local(path: Path) -> Path:  # runs inside the probe task, on its node
        import ray

        node = ray.get_runtime_context().get_node_id()
        return local / node / path.relative_to(path.anchor)

    with pytest.raises(PreflightError) as err:
        cluster.run_preflight(cfg, "cpu", tmp, remap=node_local)
    text = str(err.value)
    assert "not on a filesystem every worker shares" in text
    assert "worker 0 on host" in text and "worker 1 on host" in text
    assert os.listdir(tmp) == []


@pytest.mark.ray
def test_ray_auto_device_on_gpu_less_driver_and_placement_timeout(
        two_nodes, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The cluster has one (fake) GPU, the driver none: `auto` resolves to cuda, and the probe
    on that node finds no usable CUDA and refuses; an unplaceable group times out."""
    cfg = build_config({"engine": {"executor": "ray", "workers": 1, "device": "auto",
                                   "ray": {"placement_timeout": 60}}})
    assert cluster.resolve_device(cfg).type == "cuda"
    if not torch.cuda.is_available():
        with pytest.raises(PreflightError, match="torch sees no CUDA device"):
            cluster.run_preflight(cfg, "cuda", None)
        from neuroal.pipeline import prepare  # the same refusal through the pipeline, no output

        out = tmp_path / "out"
        run_cfg = tiny_cfg(tiny_models["llama"], out, engine={
            "executor": "ray", "workers": 1, "device": "auto", "ray": {"placement_timeout": 60}})
        with pytest.raises(PreflightError, match="worker 0 on host .* torch sees no CUDA"):
            prepare(run_cfg, Timings())
        assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="placement_timeout=1 s"):
        cluster.run_preflight(_ray_cfg(3, placement_timeout=1), "cpu", None)


@pytest.mark.ray
def test_ray_actor_warnings_reach_the_driver_log(two_nodes, caplog: pytest.LogCaptureFixture
                                                 ) -> None:
    """An actor set up like a worker (``_setup``) keeps its neuroal warnings and Python
    warnings; the executor's relay logs them on the driver, under the driver's handlers."""
    import warnings

    import ray

    from neuroal.engine.ray_executor import RayExecutor, _setup

    class Noisy:
        def warn(self, text: str) -> None:
            logging.getLogger("neuroal.engine.worker").warning("block 3: %s", text)
            warnings.warn(f"python {text}", UserWarning, stacklevel=1)

    actor = ray.remote(Noisy).options(num_cpus=0).remote()
    ray.get(actor.__ray_call__.remote(_setup, True, None, "INFO", 30.0))
    ray.get(actor.warn.remote("dampening 0.02"))
    ex = object.__new__(RayExecutor)
    ex.workers = [actor]
    root = logging.getLogger("neuroal")
    with caplog.at_level(logging.WARNING, logger="neuroal"):
        root.addHandler(caplog.handler)
        try:
            ex._relay_warnings()
        finally:
            root.removeHandler(caplog.handler)
    ray.kill(actor)
    assert "[ray worker 0] block 3: dampening 0.02" in caplog.text
    assert "UserWarning: python dampening 0.02" in caplog.text


@pytest.mark.ray
def test_ray_lost_node_without_spare_capacity_stops(two_nodes, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    """A real lost node: the placement group cannot be re-placed (no other node has the
    bundle's resources), so restarting its actor stops after engine.ray.placement_timeout with
    the --resume hint instead of waiting forever."""
    import ray

    from neuroal.engine.ray_executor import ObjectStoreTransport, RayExecutor, RayOptions
    from neuroal.engine.ray_preflight import reserve

    nodes, _ = two_nodes
    extra = nodes.add_node(num_cpus=1, resources={"spare": 1})
    nodes.wait_for_nodes()
    group = reserve(1, {"CPU": 1, "spare": 1}, "PACK", 60)
    nodes.remove_node(extra)
    ex = object.__new__(RayExecutor)
    ex.options, ex.state_dir, ex._group, ex._failed = RayOptions(placement_timeout=3), \
        "/o.neuroal-tmp/state", group, "pruning block 7"
    ex.specs = [type("Spec", (), {"start": 0, "stop": 8, "device": "cpu"})()]
    ex.workers, ex.restarts, ex.max_restarts, ex._owns_ray = ["gone"], [0], 3, False
    ex._busy_offset, ex._last_busy, ex._num_blocks = [0.0], [0.0], 8
    ex.transport, ex._channel = ObjectStoreTransport(), None
    monkeypatch.setattr(ray, "kill", lambda actor: None)
    monkeypatch.setattr(ex, "_relay_warnings", lambda: None)
    with pytest.raises(RuntimeError, match=r"could not re-place worker 0 .*placement_timeout=3 s"
                       r".*/o.neuroal-tmp/state: rerun with --resume"):
        ex._respawn(0, RuntimeError("node lost"))
    assert ex._group is None  # released by shutdown()


def test_ray_reload_timeout_names_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted actor that does not reload within engine.ray.placement_timeout stops the
    run with the --resume hint; the timeout reaches ray.get; a group that cannot be re-placed
    stops it too."""
    import ray

    from neuroal.engine.ray_executor import RayExecutor, RayOptions

    ex = object.__new__(RayExecutor)
    ex.options, ex.state_dir, ex.workers, ex._group = RayOptions(placement_timeout=42), \
        "/o.neuroal-tmp/state", [], None
    ex._failed, ex._owns_ray = "running", False
    seen = []

    def stuck(refs, timeout=None):
        seen.append(timeout)
        raise ray.exceptions.GetTimeoutError("timed out")

    monkeypatch.setattr(ray, "get", stuck)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError) as err:
        ex._get([], "reloading the slice of worker 1", 42)
    assert seen == [42]
    assert "placement_timeout=42 s while reloading the slice of worker 1" in str(err.value)
    assert "rerun with --resume" in str(err.value) and "/o.neuroal-tmp/state" in str(err.value)
    group = type("Group", (), {"wait": lambda self, t: seen.append(("wait", t)) and False})()
    ex._group, ex.specs, ex.restarts, ex.max_restarts = group, [None, None], [0, 0], 3
    ex.specs = [None, type("Spec", (), {"start": 2, "stop": 4, "device": "cuda:0"})()]
    ex._busy_offset, ex._last_busy, ex.workers = [0.0, 0.0], [0.0, 0.0], ["a0", "a1"]
    monkeypatch.setattr(ray, "kill", lambda actor: None)
    with pytest.raises(RuntimeError, match=r"could not re-place worker 1 .*--resume"):
        ex._respawn(1, RuntimeError("node lost"))
    assert ("wait", 42) in seen
