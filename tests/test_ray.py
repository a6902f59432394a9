"""RayExecutor (local Ray instance, CPU actors) against LocalExecutor: bit-identical masks,
perplexities, NeuroAL search, exported shards; pipeline utilisation reported (engine.md §3.3-§4).

One Ray instance serves the whole module; models are tiny and samples few, because every
executor starts one Python process per actor.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import ray  # a hard dependency: a broken install must fail the suite, not skip it
import torch
from conftest import save_tiny_model, tiny_cfg
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from neuroal.config.build import ConfigError
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.worker import CandidateJob
from neuroal.models.loading import resolve_model
from neuroal.pipeline import run

pytestmark = pytest.mark.ray

NEUROAL = {"name": "neuroal", "block_grid": [0.05, 0.1], "row_grid": [0.0, 0.05],
           "search_samples": 2}


@pytest.fixture(scope="module")
def ray_instance():
    from neuroal.engine.ray_executor import init_ray

    owned = init_ray(num_cpus=3)
    yield
    if owned:
        ray.shutdown()


@pytest.fixture(scope="module")
def llama4(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("ray") / "llama4", tokenizer_dir,
                           num_layers=4)


# Ray kills both ends of a failed direct transfer (gloo, nccl), so which live actor dies with a
# killed one depends on timing: the restart-count tests run on the object store (the recovery
# logic is the same for every transport; test_ray_transport.py kills an actor under gloo).
FAULTS = "object-store"


def _run(model_dir: Path, out: Path | None, text: Path, executor: str, workers: int,
         transport: str = "auto", parallel: str = "auto", **extra):
    cfg = tiny_cfg(model_dir, out, calib={"source": f"text:{text}"}, sparsity=0.7,
                   engine={"executor": executor, "workers": workers, "parallel": parallel,
                           "ray": {"transport": transport}},
                   eval={"datasets": [f"text:{text}"], "max_windows": 3}, **extra)
    return run(cfg, keep_executor=True)


def _state(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(directory / f))
    assert set(out) == set(index["weight_map"])
    return out


def _check_utilisation(report: dict, phases: tuple[str, ...]) -> None:
    for phase in phases:
        assert 0.0 < report["timings"][f"{phase}_utilisation"] <= 1.0, phase
    assert all(b > 0 for b in report["timings"]["workers_busy"])


def test_neuroal_prune_eval_export_match_local(ray_instance, llama4: Path, small_text: Path,
                                               tmp_path: Path) -> None:
    """Search (lambdas, trail scores), masks, perplexities and exported shards: Local with 1
    worker == Ray with 2 and 3 actors."""
    ref = _run(llama4, tmp_path / "local", small_text, "local", 1, allocation=NEUROAL)
    ref_masks, ref_state = ref.executor.masks(), _state(tmp_path / "local")
    _check_utilisation(ref.report, ("search", "prune", "eval"))
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_logits = ref.executor.logits(ids)
    for workers in (2, 3):
        out = tmp_path / f"ray{workers}"
        result = _run(llama4, out, small_text, "ray", workers, allocation=NEUROAL)
        try:
            plan, report = result.plan, result.report
            assert plan.policy["lambda_block"] == ref.plan.policy["lambda_block"]
            assert plan.policy["lambda_row"] == ref.plan.policy["lambda_row"]
            assert plan.trail["candidates"] == ref.plan.trail["candidates"]
            masks = result.executor.masks()
            assert masks.keys() == ref_masks.keys()
            for name, mask in masks.items():
                assert torch.equal(mask, ref_masks[name]), name
            assert report["eval"] == ref.report["eval"]
            assert report["layers"] == ref.report["layers"]
            assert report["engine"]["transport"] == "gloo"  # auto, between CPU actors
            assert [w["blocks"] for w in report["workers"]] == [list(s) for s in report["slices"]]
            peaks = [w["peak_memory_bytes"] for w in report["workers"]]  # each actor's own
            assert all(0 < p != report["peak_memory_bytes"] for p in peaks), peaks
            _check_utilisation(report, ("search", "prune", "eval"))
            state = _state(out)
            assert state.keys() == ref_state.keys()
            for name, tensor in state.items():
                assert torch.equal(tensor, ref_state[name]), name
            torch.testing.assert_close(result.executor.logits(ids), ref_logits, rtol=0, atol=0)
        finally:
            result.executor.shutdown()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ray3",
                                                  attn_implementation="sdpa").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref_logits, rtol=0, atol=0)


def test_executor_methods_match_local(ray_instance, tiny_models: dict[str, Path]) -> None:
    """Global reference stream with SparseGPT statistics, policy metrics (OWL's outlier ratio,
    AlphaPruning's Hill alpha: the functions the policies ship to the workers), logits."""
    from neuroal.allocation.alpha import layer_alpha
    from neuroal.allocation.owl import outlier_ratio
    from neuroal.engine.ray_executor import RayExecutor, RayOptions
    from neuroal.engine.worker import WorkerSpec

    source = resolve_model(str(tiny_models["llama"]))
    local = LocalExecutor(source, 2, 1, ["cpu"], "float32", 2)
    remote = RayExecutor(WorkerSpec(source, 0, 0, 2, "cpu", "float32", 2), 2,
                         RayOptions(inflight=1))
    try:
        ids = torch.randint(3, 320, (3, 16), generator=torch.Generator().manual_seed(1))
        shape = local.workers[0].adapter.shape()
        cands = [[{n: r for n in blk} for blk in shape.blocks] for r in (0.5, 0.6, 0.7)]
        job = CandidateJob("sparsegpt", group=None)
        for stream in ("local", "global"):
            want = local.evaluate_candidates(ids, cands, job, stream)
            got = remote.evaluate_candidates(ids, cands, job, stream)
            for w_c, g_c in zip(want, got, strict=True):
                for w_b, g_b in zip(w_c, g_c, strict=True):
                    assert w_b.na == g_b.na
                    assert all(torch.equal(w_b.delta[n], g_b.delta[n]) for n in w_b.delta)
        assert remote.weight_metrics(layer_alpha) == local.weight_metrics(layer_alpha)
        lod, needs = functools.partial(outlier_ratio, m=5.0), frozenset({"sq_norm"})
        assert remote.dense_block_metrics(ids, lod, needs) == \
            local.dense_block_metrics(ids, lod, needs)
        assert torch.equal(remote.last_logits(ids), local.last_logits(ids))
        assert torch.equal(remote.window_nll(ids), local.window_nll(ids))
        targets = ids.roll(-1, dims=1)  # zero-shot scoring (neuroal.evaluation.zeroshot)
        for g, w in zip(remote.token_logprobs(ids, targets), local.token_logprobs(ids, targets),
                        strict=True):
            assert torch.equal(g, w)
        assert [remote.block_prefix(b) for b in range(2)] == ["model.layers.0.", "model.layers.1."]
        use = remote.utilisation()["search"]
        assert len(use["busy"]) == 2 and 0.0 < use["utilisation"] <= 1.0
    finally:
        remote.shutdown()
    assert not remote.workers


def test_ray_config_keys() -> None:
    from neuroal.cli import build_parser, flags_to_tree
    from neuroal.config.build import build_config
    from neuroal.engine.ray_executor import RayOptions

    cfg = build_config({"engine": {"executor": "ray", "workers": 2,
                                   "ray": {"placement": "SPREAD", "cpus": 2, "inflight": 3}}})
    assert cfg.engine.executor == "ray" and cfg.engine.ray.placement == "SPREAD"
    assert RayOptions.from_config(cfg.engine.ray) == RayOptions("SPREAD", 2, None, 3, 3, True)
    with pytest.raises(ConfigError) as err:
        build_config({"engine": {"executor": "ray", "ray": {"placement": "NEAR", "cpus": 0,
                                                            "inflight": -1}}})
    assert len(err.value.errors) == 3
    tree = flags_to_tree(build_parser().parse_args(["--engine", "ray", "--workers", "8"]))
    assert tree["engine"] == {"executor": "ray", "workers": 8}


def test_perp_reconstruct_in_actors_matches_local(ray_instance, llama4: Path, small_text: Path,
                                                  tmp_path: Path) -> None:
    """``perp-reconstruct`` runs inside the actors, per block, during the final prune: the
    exported weights (pruned, LoRA merged, biases and norms refitted) are bit-identical to one
    local worker's, and every pruned weight is still zero."""
    recover = {"steps": ["perp-reconstruct"],
               "perp-reconstruct": {"steps": 4, "batch_size": 2, "lr": 1e-2, "rank": 4}}
    local = _run(llama4, tmp_path / "local", small_text, "local", 1, recover=recover)
    result = _run(llama4, tmp_path / "ray", small_text, "ray", 2, recover=recover)
    try:
        got, want = _state(tmp_path / "ray"), _state(tmp_path / "local")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want)
        assert result.report["eval"] == local.report["eval"]
        masks = local.executor.masks()
        assert all((got[n + ".weight"][m] == 0).all() for n, m in masks.items())
        steps = result.report["recovery"]["steps"]
        assert [s["name"] for s in steps] == ["perp-reconstruct"]
    finally:
        result.executor.shutdown()


# --------------------------------------------------------------------------- actor failures


def _killer(kills: dict[str, tuple[int, int]], after_prune: tuple[str, ...] = ("perplexity",)):
    """A ``RayExecutor.fault_hook`` that, once per operation in ``kills`` (``operation ->
    (unit, rank)``), queues ``os._exit(1)`` on actor ``rank`` right behind the work of ``unit``:
    the actor process dies inside Ray after finishing that unit. Operations in ``after_prune``
    fire only once the final prune has been submitted (the dense evaluation comes first)."""
    fired: set[str] = set()

    def hook(self, operation: str, unit: int) -> None:  # noqa: ANN001
        if operation == "prune":
            fired.add("prune-seen")
        if operation in fired or operation not in kills or kills[operation][0] != unit:
            return
        if operation in after_prune and "prune-seen" not in fired:
            return
        fired.add(operation)
        self.workers[kills[operation][1]].__ray_call__.remote(lambda _worker: os._exit(1))

    return hook, fired


@pytest.fixture(scope="module")
def local_ref(llama4: Path, small_text: Path, tmp_path_factory: pytest.TempPathFactory):
    """Uninterrupted LocalExecutor runs: NeuroAL with output, uniform without output."""
    base = tmp_path_factory.mktemp("ref")
    neuroal = _run(llama4, base / "local", small_text, "local", 1, allocation=NEUROAL)
    uniform = _run(llama4, None, small_text, "local", 1)
    return {"neuroal": (neuroal, base / "local"), "uniform": uniform}


def test_killed_actors_restart_and_match_local(ray_instance, llama4: Path, small_text: Path,
                                               tmp_path: Path, local_ref,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An actor killed during the search, the final prune (after block 2) and the sparse
    evaluation: each time restarted (slice reloaded, pruned blocks replayed or restored from the
    resume state), and the run ends exactly as an uninterrupted local run."""
    from neuroal.engine.ray_executor import RayExecutor

    ref, ref_dir = local_ref["neuroal"]
    hook, fired = _killer({"candidate": (0, 1), "prune": (2, 1), "perplexity": (0, 0)})
    monkeypatch.setattr(RayExecutor, "fault_hook", hook)
    out = tmp_path / "ray"
    # restarts mid-prune are pipeline mode's (data mode stops: test_ray_data_parallel.py)
    result = _run(llama4, out, small_text, "ray", 2, FAULTS, "pipeline", allocation=NEUROAL)
    try:
        assert {"candidate", "prune", "perplexity"} <= fired
        assert [w["restarts"] for w in result.report["workers"]] == [1, 2]
        assert result.plan.policy["lambda_block"] == ref.plan.policy["lambda_block"]
        assert result.plan.policy["lambda_row"] == ref.plan.policy["lambda_row"]
        assert result.plan.trail["candidates"] == ref.plan.trail["candidates"]
        assert result.report["eval"] == ref.report["eval"]
        assert result.report["layers"] == ref.report["layers"]
        ref_masks, masks = ref.executor.masks(), result.executor.masks()
        assert masks.keys() == ref_masks.keys()
        assert all(torch.equal(masks[n], ref_masks[n]) for n in masks)
        state, ref_state = _state(out), _state(ref_dir)
        assert state.keys() == ref_state.keys()
        assert all(torch.equal(state[n], ref_state[n]) for n in state)
        assert not (tmp_path / "ray.neuroal-tmp").exists()
    finally:
        result.executor.shutdown()


def test_restart_without_output_prunes_again(ray_instance, llama4: Path, small_text: Path,
                                             local_ref, monkeypatch: pytest.MonkeyPatch) -> None:
    """No output directory, so no resume state: the restarted actor's blocks are pruned again
    from its reloaded dense slice (during the prune and, for worker 0, after it)."""
    from neuroal.engine.ray_executor import RayExecutor

    ref = local_ref["uniform"]
    hook, fired = _killer({"prune": (2, 1), "perplexity": (0, 0)})
    monkeypatch.setattr(RayExecutor, "fault_hook", hook)
    result = _run(llama4, None, small_text, "ray", 2, FAULTS, "pipeline")
    try:
        assert {"prune", "perplexity"} <= fired
        assert [w["restarts"] for w in result.report["workers"]] == [1, 1]
        assert result.report["eval"] == ref.report["eval"]
        assert result.report["layers"] == ref.report["layers"]
        ref_masks, masks = ref.executor.masks(), result.executor.masks()
        assert masks.keys() == ref_masks.keys()
        assert all(torch.equal(masks[n], ref_masks[n]) for n in masks)
    finally:
        result.executor.shutdown()


def test_actor_killed_while_loading_restarts(ray_instance, llama4: Path, small_text: Path,
                                            local_ref, monkeypatch: pytest.MonkeyPatch) -> None:
    """An actor that dies right after construction, before the executor has seen it load, is
    restarted in its bundle like one that dies later; the run matches the local one."""
    from neuroal.engine.ray_executor import RayExecutor

    ref = local_ref["uniform"]
    hook, fired = _killer({"load": (1, 1)})
    monkeypatch.setattr(RayExecutor, "fault_hook", hook)
    result = _run(llama4, None, small_text, "ray", 2, FAULTS)
    try:
        assert "load" in fired
        assert [w["restarts"] for w in result.report["workers"]] == [0, 1]
        assert result.report["eval"] == ref.report["eval"]
        ref_masks, masks = ref.executor.masks(), result.executor.masks()
        assert all(torch.equal(masks[n], ref_masks[n]) for n in ref_masks)
    finally:
        result.executor.shutdown()


def test_constructor_error_is_not_retried() -> None:
    """A Python exception in a worker's constructor (``actor_init_failed``) would recur on every
    restart: it is raised at once, before any actor is pinged or restarted."""
    from neuroal.engine.ray_executor import RayExecutor

    class InitFailedError(RuntimeError):
        actor_init_failed = True

    executor = RayExecutor.__new__(RayExecutor)
    executor._dead_ranks = lambda: pytest.fail("pinged the actors")  # noqa: SLF001
    error = InitFailedError("no such shard")
    with pytest.raises(InitFailedError) as err:
        executor._recover(error)  # noqa: SLF001
    assert err.value is error


def test_restarts_exhausted_stop_with_clear_error(ray_instance, llama4: Path, small_text: Path,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``engine.ray.max_restarts=0``: the first death stops the run naming the worker, its blocks
    and the kept resume state; the blocks finished before it stay saved."""
    from neuroal.engine.ray_executor import RayExecutor

    hook, _ = _killer({"prune": (2, 1)})
    monkeypatch.setattr(RayExecutor, "fault_hook", hook)
    out = tmp_path / "out"
    cfg = tiny_cfg(llama4, out, calib={"source": f"text:{small_text}"}, sparsity=0.7,
                   engine={"executor": "ray", "workers": 2, "parallel": "pipeline",
                           "ray": {"max_restarts": 0, "transport": FAULTS}})
    with pytest.raises(RuntimeError) as err:
        run(cfg)
    message = str(err.value)
    state = tmp_path / "out.neuroal-tmp" / "state"
    for part in ("Ray worker 1", "blocks [2, 4)", "after 0 restart(s)", "engine.ray.max_restarts=0",
                 f"resume state is kept at {state}", "--resume"):
        assert part in message, (part, message)
    assert not out.exists()
    # the actor dies behind its whole slice (one call per actor): every block was saved
    assert sorted(p.name for p in (state / "prune").glob("*.safetensors")) == \
        [f"block_{b:04d}.safetensors" for b in range(4)]
    with pytest.raises(ConfigError, match="max_restarts"):
        tiny_cfg(llama4, None, engine={"ray": {"max_restarts": -1}})


def test_restart_after_perp_reconstruct_restores_norms(ray_instance, llama4: Path,
                                                       small_text: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An actor killed after a final prune with ``perp-reconstruct`` (during the sparse
    evaluation) is restored from the resume state, which after a reconstruction also holds
    the refitted norms and biases: the restarted actor must load them too (through the same
    ``Worker.load_block_state`` as a resume replay), and the run ends exactly as a local one."""
    from neuroal.engine.ray_executor import RayExecutor

    recover = {"steps": ["perp-reconstruct"],
               "perp-reconstruct": {"steps": 4, "batch_size": 2, "lr": 1e-2, "rank": 4}}
    local = _run(llama4, tmp_path / "local", small_text, "local", 1, recover=recover)
    hook, fired = _killer({"perplexity": (0, 0)})
    monkeypatch.setattr(RayExecutor, "fault_hook", hook)
    result = _run(llama4, tmp_path / "ray", small_text, "ray", 2, FAULTS, recover=recover)
    try:
        assert "perplexity" in fired
        assert [w["restarts"] for w in result.report["workers"]] == [1, 0]
        assert result.report["eval"] == local.report["eval"]
        got, want = _state(tmp_path / "ray"), _state(tmp_path / "local")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want)
    finally:
        result.executor.shutdown()
