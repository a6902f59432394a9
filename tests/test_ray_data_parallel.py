"""Data-parallel final prune under the Ray executor (``engine.parallel=data``): every actor runs
its DataPrune program in one call over a torch.distributed group formed inside the actors; masks
and weights are bit-identical to the local executor's pipeline mode, the resume state is written
per block, the report records the mode, and a lost actor stops the run with the ``--resume``
hint instead of hanging."""

from __future__ import annotations

import json
import time
import types
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from conftest import random_ids, save_tiny_model, tiny_cfg
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
    """The Ray executor decides the mode with the same rule as local / dist
    (:func:`~neuroal.engine.data_parallel.resolve_parallel`): data under ``auto`` with several
    workers, pipeline with one."""
    from neuroal.engine.ray_executor import RayExecutor

    executor = RayExecutor.__new__(RayExecutor)
    executor._requested, executor.workers = "data", [None, None]  # noqa: SLF001
    assert executor._prune_mode() == "data"  # noqa: SLF001
    executor._requested = "auto"  # noqa: SLF001
    assert executor._prune_mode() == "data"  # noqa: SLF001
    executor.workers = [None]
    assert executor._prune_mode() == "pipeline"  # noqa: SLF001


@pytest.fixture()
def one_thread():
    """One intra-op thread in the driver, hence in its actors (they take the driver's count):
    two actors computing at once on a 2-core machine, each with 2 threads, run several times
    slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def data_programs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The programs the Ray executor runs in data mode, in call order (proves data mode ran)."""
    from neuroal.engine.ray import data as ray_data

    programs: list[str] = []
    real = ray_data.DataParallel._in_actors  # noqa: SLF001

    def spy(self: Any, program: Any, *args: Any, **kwargs: Any) -> Any:
        programs.append(program.__name__)
        return real(self, program, *args, **kwargs)

    monkeypatch.setattr(ray_data.DataParallel, "_in_actors", spy)
    return programs


def _dense_passes_match(remote: Any, local: LocalExecutor) -> None:
    """On the dense model: OWL's allocation (its dense statistics pass) and a NeuroAL search's
    dense reference (``local`` and ``global``) under Ray equal the local executor's bit for
    bit; then a pass function failing on one actor only: its error reaches the driver (the
    other actor stops at the same phase boundary) and the executor stays usable."""
    from neuroal.allocation.base import PlanRequest
    from neuroal.allocation.owl import OWLPolicy
    from neuroal.engine.worker import CandidateJob

    shape = local.workers[0].adapter.shape()

    def owl(executor: Any) -> SparsityPlan:
        return OWLPolicy().plan(PlanRequest(shape, 0.5, "unstructured", (0.0, 1.0), {"lam": 0.2},
                                            executor=executor, calibration=random_ids()))

    want, got = owl(local), owl(remote)
    assert len(set(want.trail["lod"])) == NUM_BLOCKS  # the blocks differ: a real check
    assert got.trail == want.trail
    assert [dict(b) for b in got.ratios] == [dict(b) for b in want.ratios]
    candidates = [[{n: r for n in blk} for blk in shape.blocks] for r in (0.3, 0.6)]
    for stream in ("local", "global"):
        want_c = local.evaluate_candidates(random_ids(), candidates, CandidateJob("wanda"), stream)
        got_c = remote.evaluate_candidates(random_ids(), candidates, CandidateJob("wanda"), stream)
        for w_c, g_c in zip(want_c, got_c, strict=True):
            for w_b, g_b in zip(w_c, g_c, strict=True):
                assert w_b.na == g_b.na
                assert all(torch.equal(w_b.delta[n], g_b.delta[n]) for n in w_b.delta)

    block2_down = local.workers[0].adapter.blocks[2].mlp.down_proj.weight.data.clone()

    def fails_on_block_2(weights: dict[str, torch.Tensor], _stats: Any) -> float:
        """Fails on block 2's owner only (actor 1 of 2); pickled by value into the actors."""
        if torch.equal(weights["mlp.down_proj"], block2_down):
            raise ArithmeticError("block 2 refused")
        return 0.0

    with pytest.raises(ArithmeticError, match="block 2 refused"):
        remote.dense_block_metrics(random_ids(), fails_on_block_2, frozenset({"sq_norm"}))


def test_wanda_matches_local_pipeline(ray_instance, llama4: Path, tmp_path: Path, one_thread,
                                      data_programs: list[str]) -> None:
    """Two actors, ``engine.parallel=auto`` (data), the gloo transport taken down for each
    data-parallel call's own group and rebuilt after. First the dense passes in the actors
    (:func:`_dense_passes_match`). Then the prune: masks, weights and reports equal the local
    executor's pipeline mode bit for bit; each block's resume state is written; the pruned
    model's NLL (streams crossing over the rebuilt channel, pipelined: evaluation chunks do
    not use data mode under Ray) equals the local one. Then a failing worker and a lost
    actor."""
    from neuroal.engine.ray_executor import RayExecutor, RayOptions

    source = resolve_model(str(llama4))
    local = LocalExecutor(source, NUM_BLOCKS, 1, ["cpu"], "float32", 2, parallel="pipeline")
    plan = _plan(local.workers[0].adapter.shape().blocks)
    remote = RayExecutor(WorkerSpec(source, 0, 0, NUM_BLOCKS, "cpu", "float32", 2), 2,
                         RayOptions(transport="gloo"))
    try:
        _dense_passes_match(remote, local)
        assert data_programs == ["_pass_program", "_reference_program", "_reference_program",
                                 "_pass_program"]
        want = local.run_final_prune(plan, PruneJob("wanda"), random_ids())
        state = tmp_path / "state"
        (state / "prune").mkdir(parents=True)
        got = remote.run_final_prune(plan, PruneJob("wanda", state_dir=str(state)), random_ids())
        assert remote.parallel == "data"
        assert [r.index for r in got] == list(range(NUM_BLOCKS))
        assert [[(x.name, x.zeros, x.numel) for x in r.layers] for r in got] == \
            [[(x.name, x.zeros, x.numel) for x in r.layers] for r in want]
        _assert_bits(_remote_state(remote), local.workers[0].state_items())
        assert sorted(p.name for p in (state / "prune").glob("*.safetensors")) == \
            [f"block_{b:04d}.safetensors" for b in range(NUM_BLOCKS)]
        nll = remote.window_nll(random_ids())
        assert torch.equal(nll, local.window_nll(random_ids()))
        assert data_programs[4:] == ["_prune_program"]  # the NLL pipelined

        # a worker's own error mid-prune: agreed by both actors, raised on the driver with its
        # message; both leave the group and the executor stays usable
        def inject(worker: Any) -> None:  # inside actor 1 (pickled by value): solves raise
            def boom(*_args: Any, **_kwargs: Any) -> None:
                raise RuntimeError(f"injected failure on worker {worker.spec.rank}")

            worker.prune_block = boom

        ray.get(remote.workers[1].__ray_call__.remote(inject))
        with pytest.raises(RuntimeError, match="injected failure on worker 1"):
            remote.run_final_prune(plan, PruneJob("wanda"), random_ids())
        ray.get(remote.workers[1].__ray_call__.remote(lambda w: delattr(w, "prune_block")))
        assert torch.isfinite(remote.window_nll(random_ids())).all()

        # an actor killed while the data-parallel prune runs: the driver names it and the
        # --resume hint at once (no wait for the survivor's collective timeout), and releases
        # every actor
        def kill(self: Any, operation: str, unit: int) -> None:
            if operation == "prune" and unit == 0:
                ray.kill(self.workers[1])

        remote.fault_hook = types.MethodType(kill, remote)
        with pytest.raises(RuntimeError) as err:
            remote.run_final_prune(plan, PruneJob("wanda", state_dir=str(state)), random_ids())
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



def test_actor_lost_in_a_dense_pass_stops_the_run(ray_instance, llama4: Path, one_thread,
                                                  data_programs: list[str]) -> None:
    """An actor killed while the search's dense reference runs data-parallel: the search is
    not retried (its peers cannot go on without it), the driver names the actor, the pass
    and the ``--resume`` hint at once, and every actor is released."""
    from neuroal.engine.ray_executor import RayExecutor, RayOptions
    from neuroal.engine.worker import CandidateJob

    source = resolve_model(str(llama4))
    remote = RayExecutor(WorkerSpec(source, 0, 0, NUM_BLOCKS, "cpu", "float32", 2), 2,
                         RayOptions(transport="object-store"))

    def kill(self: Any, operation: str, unit: int) -> None:
        if operation == "reference":
            ray.kill(self.workers[1])

    remote.fault_hook = types.MethodType(kill, remote)
    try:
        blocks = [{"mlp.down_proj": 0.5}] * NUM_BLOCKS
        with pytest.raises(RuntimeError) as err:
            remote.evaluate_candidates(random_ids(), [blocks], CandidateJob("wanda"), "global")
        for part in ("Ray worker 1", "blocks [2, 4)", "dense reference", "engine.parallel=data",
                     "--resume"):
            assert part in str(err.value), (part, str(err.value))
        assert data_programs == ["_reference_program"]
        assert remote.workers == [] and remote.restarts == [0, 0]
    finally:
        remote.shutdown()


def test_actor_0_lost_before_the_rendezvous_is_restarted(ray_instance, llama4: Path,
                                                         one_thread) -> None:
    """Actor 0 dies after the devices are read, before it opens the group's rendezvous: no
    collective has started, so it is restarted like an actor lost outside a data-parallel call
    (before, every actor's call failed on the missing address, one of them was blamed at
    random and all were killed); the dense statistics pass then equals the local one."""
    from neuroal.engine.ray_executor import RayExecutor, RayOptions

    source = resolve_model(str(llama4))
    local = LocalExecutor(source, NUM_BLOCKS, 1, ["cpu"], "float32", 2, parallel="pipeline")
    remote = RayExecutor(WorkerSpec(source, 0, 0, NUM_BLOCKS, "cpu", "float32", 2), 2,
                         RayOptions(transport="object-store"))
    real_get = remote._get  # noqa: SLF001

    def get(refs: Any, what: str, *args: Any, **kwargs: Any) -> Any:
        out = real_get(refs, what, *args, **kwargs)
        if what == "reading the workers' devices" and not remote.restarts[0]:
            ray.kill(remote.workers[0])
            _until_dead(remote.workers[0])
        return out

    def norms(weights: dict[str, torch.Tensor], stats: Any) -> dict[str, torch.Tensor]:
        return {n: stats[n].sq_norm for n in weights}

    remote._get = get  # noqa: SLF001
    try:
        needs = frozenset({"sq_norm"})
        got = remote.dense_block_metrics(random_ids(), norms, needs)
        want = local.dense_block_metrics(random_ids(), norms, needs)
        assert remote.restarts == [1, 0] and len(remote.workers) == 2
        for g, w in zip(got, want, strict=True):
            assert all(torch.equal(g[n], w[n]) for n in w)
    finally:
        remote.shutdown()
        local.shutdown()


def _until_dead(actor: Any) -> None:
    """Wait until a killed actor no longer answers (``ray.kill`` returns before it is gone)."""
    for _ in range(200):
        try:
            ray.get(actor.__ray_call__.remote(lambda _w: None), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers")


def test_actor_lost_after_the_reference_pass_runs_the_search_again(
        ray_instance, llama4: Path, one_thread, data_programs: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An actor that dies once the search's data-parallel reference is done is found dead when
    the gloo channel is rebuilt, before a rendezvous starts (one with dead rank 0 held the live
    actor for Ray's 30 s metadata timeout; with another dead rank, torch's own timeout could
    hold it longer): it held part of the reference, so it is restarted and the whole search
    attempt (windows, reference, candidates) runs again; the alignment terms equal the local
    executor's."""
    from neuroal.engine.ray_executor import RayExecutor, RayOptions
    from neuroal.engine.worker import CandidateJob

    source = resolve_model(str(llama4))
    local = LocalExecutor(source, NUM_BLOCKS, 1, ["cpu"], "float32", 2, parallel="pipeline")
    remote = RayExecutor(WorkerSpec(source, 0, 0, NUM_BLOCKS, "cpu", "float32", 2), 2,
                         RayOptions(transport="gloo"))
    armed: list[bool] = []
    real_connect = remote._connect  # noqa: SLF001

    def hook(self: Any, operation: str, unit: int) -> None:
        if operation == "reference" and not self.restarts[0]:
            armed.append(True)

    def connect() -> None:
        if armed:  # the rebuild meets a dead actor
            armed.clear()
            ray.kill(remote.workers[0])
            _until_dead(remote.workers[0])
            killed.append(True)
        real_connect()

    from ray.experimental import collective

    real_group, groups = collective.create_collective_group, []

    def create_collective_group(actors: Any, backend: str) -> Any:
        groups.append((bool(killed), list(remote.restarts)))
        return real_group(actors, backend)

    killed: list[bool] = []
    monkeypatch.setattr(collective, "create_collective_group", create_collective_group)
    remote.fault_hook = types.MethodType(hook, remote)
    remote._connect = connect  # noqa: SLF001
    try:
        shape = local.workers[0].adapter.shape().blocks
        candidates = [[{n: r for n in blk} for blk in shape] for r in (0.3, 0.6)]
        job = CandidateJob("wanda")
        got = remote.evaluate_candidates(random_ids(), candidates, job, "global")
        want = local.evaluate_candidates(random_ids(), candidates, job, "global")
        assert remote.restarts == [1, 0]
        # no rendezvous with the dead actor: after the kill, only once it was restarted
        assert [g for g in groups if g[0]] and all(g[1] == [1, 0] for g in groups if g[0])
        assert data_programs == ["_reference_program"] * 2  # the pass ran again
        for w_c, g_c in zip(want, got, strict=True):
            for w_b, g_b in zip(w_c, g_c, strict=True):
                assert w_b.na == g_b.na
                assert all(torch.equal(w_b.delta[n], g_b.delta[n]) for n in w_b.delta)
    finally:
        remote.shutdown()
        local.shutdown()
