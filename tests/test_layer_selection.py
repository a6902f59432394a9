"""Layer selection (``targets`` / ``ignore``, llm-compressor's spelling): ignored linears stay
bit-for-bit dense for every criterion, allocation and executor; the target applies to the
pruned linears or to the whole model (``sparsity_scope``); everything is recorded per linear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg
from safetensors.torch import load_file

from neuroal.models.selection import LayerSelection, matches
from neuroal.pipeline import run
from neuroal.runtime.errors import ConfigError

IGNORE = ["re:.*down_proj$", "model.layers.0.self_attn.q_proj"]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _ignored(name: str) -> bool:
    return name.endswith("down_proj.weight") or name == "model.layers.0.self_attn.q_proj.weight"


def test_patterns_follow_llm_compressor() -> None:
    assert matches("re:.*down_proj$", "model.layers.3.mlp.down_proj", "Linear")
    assert not matches("re:down_proj", "model.layers.3.mlp.down_proj", "Linear")  # re.match
    assert matches("Linear", "model.layers.3.mlp.down_proj", "Linear")
    assert matches("model.layers.3.mlp.down_proj", "model.layers.3.mlp.down_proj", "Linear")
    sel = LayerSelection(targets=("re:.*mlp\\.",), ignore=("re:.*layers\\.1\\.",))
    assert sel.selects("model.layers.0.mlp.up_proj")
    assert not sel.selects("model.layers.0.self_attn.q_proj")
    assert not sel.selects("model.layers.1.mlp.up_proj")
    assert sel.unused([("model.layers.0.mlp.up_proj", "Linear")]) == ["re:.*layers\\.1\\."]


@pytest.mark.parametrize("criterion, allocation", [
    ("wanda", "uniform"), ("sparsegpt", "uniform"), ("magnitude", "uniform"), ("ria", "uniform"),
    ("wanda", "owl"), ("wanda", "alpha"), ("wanda", "neuroal"), ("sparsegpt", "neuroal")])
def test_ignored_linears_stay_dense(tiny_models: dict[str, Path], tmp_path: Path, criterion: str,
                                    allocation: str) -> None:
    alloc = {"name": allocation}
    if allocation == "neuroal":
        alloc.update(search_samples=2, block_grid=[0.0, 0.1], row_grid=[0.0, 0.1])
    out = tmp_path / "out"
    report = run(tiny_cfg(tiny_models["llama"], out, sparsity=0.6, ignore=IGNORE,
                          criterion={"name": criterion}, allocation=alloc)).report
    dense, pruned = _weights(tiny_models["llama"]), _weights(out)
    for name, weight in pruned.items():
        if _ignored(name):
            assert torch.equal(weight, dense[name]), name
    assert all(torch.equal(pruned[n], dense[n]) for n in dense if not n.endswith("proj.weight"))
    selection = report["selection"]
    assert sorted(selection["ignored"]) == sorted(
        [n.removesuffix(".weight") for n in dense if _ignored(n)])
    assert not any(_ignored(n + ".weight") for n in report["layers"])
    # the target holds over the pruned linears (OWL may miss it by its own clipping, recorded)
    assert report["achieved_sparsity"] == pytest.approx(report["planned_sparsity"], abs=0.01)
    assert report["planned_sparsity"] == pytest.approx(0.6, abs=0.02)
    assert selection["achieved_sparsity_model"] < report["achieved_sparsity"]


def test_model_scope_reaches_the_target_over_every_linear(tiny_models: dict[str, Path],
                                                         tmp_path: Path) -> None:
    report = run(tiny_cfg(tiny_models["llama"], None, sparsity=0.5, ignore=IGNORE,
                          sparsity_scope="model")).report
    selection = report["selection"]
    assert selection["achieved_sparsity_model"] == pytest.approx(0.5, abs=0.01)
    assert selection["planned_target"] > 0.5 and report["achieved_sparsity"] > 0.5


@pytest.mark.parametrize("workers", [2])
def test_executors_agree_with_a_selection(tiny_models: dict[str, Path], workers: int) -> None:
    cfg = dict(sparsity=0.5, ignore=IGNORE)
    one = run(tiny_cfg(tiny_models["llama"], None, **cfg), keep_executor=True).executor.masks()
    many = run(tiny_cfg(tiny_models["llama"], None, engine={"workers": workers, "device": "cpu",
                                                            "micro_batch": 2}, **cfg),
               keep_executor=True).executor.masks()
    assert one.keys() == many.keys() and not any("down_proj" in n for n in one)
    assert all(torch.equal(one[n], many[n]) for n in one)


@pytest.mark.ray
def test_ray_actors_honour_the_selection(tiny_models: dict[str, Path]) -> None:
    import ray

    from neuroal.engine.ray_executor import init_ray

    owned = init_ray(num_cpus=2)
    cfg = dict(sparsity=0.5, ignore=IGNORE)
    local = run(tiny_cfg(tiny_models["llama"], None, **cfg), keep_executor=True).executor.masks()
    ray_run = run(tiny_cfg(tiny_models["llama"], None, engine={
        "workers": 2, "device": "cpu", "micro_batch": 2, "executor": "ray",
        "ray": {"cpus": 1}}, **cfg), keep_executor=True)
    try:
        remote = ray_run.executor.masks()
    finally:
        ray_run.executor.shutdown()
        if owned:
            ray.shutdown()
    assert local.keys() == remote.keys()
    assert all(torch.equal(local[n], remote[n]) for n in local)


def test_a_whole_block_can_stay_dense(tiny_models: dict[str, Path]) -> None:
    for alloc in ({"name": "uniform"}, {"name": "neuroal", "search_samples": 2,
                                         "block_grid": [0.0, 0.1], "row_grid": [0.0, 0.1]}):
        report = run(tiny_cfg(tiny_models["llama"], None, sparsity=0.5,
                              ignore=["re:model\\.layers\\.0\\."], allocation=alloc)).report
        assert not any(n.startswith("model.layers.0.") for n in report["layers"])
        assert all(n.startswith("model.layers.0.") for n in report["selection"]["ignored"])


def test_bad_selections_are_refused_before_loading(tiny_models: dict[str, Path], no_loading,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="leave no linear to prune"):
        run(tiny_cfg(tiny_models["llama"], None, targets=["re:nothing"]))
    with pytest.raises(ConfigError, match="sparsity_scope=model"):
        run(tiny_cfg(tiny_models["llama"], None, sparsity=0.8, sparsity_scope="model",
                     ignore=["re:.*mlp"]))
    with pytest.raises(ConfigError, match="N:M pattern"):
        tiny_cfg(tiny_models["llama"], None, pattern="2:4", sparsity_scope="model")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        tiny_cfg(tiny_models["llama"], None, ignore=["re:(("])
