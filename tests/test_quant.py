"""Quantized and huge checkpoints: FP8 checkpoints (block tiles, per channel) load de-quantized
in every worker and prune end to end with a report that says so; other quantization methods
are refused before any weight is read; skeletons are built without host allocations, so the
planner handles DeepSeek-V3, and refuses its SparseGPT statistics with the figure."""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import assert_rejected_before_loading, save_tiny_model, tiny_cfg
from quant_fixture import BLOCK, FP8_MAX, quantize, to_fp8, with_quantization
from test_moe import save_moe

from neuroal.models.adapter import ModelAdapter
from neuroal.models.known import known_config
from neuroal.models.loading import (
    build_skeleton,
    load_model_config,
    materialise,
    open_checkpoint,
    resolve_model,
)
from neuroal.models.quant import (
    DequantizingCheckpoint,
    QuantizationError,
    dequantize,
    quantization_scheme,
)
from neuroal.pipeline import run
from neuroal.planning import GB, MemoryRequest, choose_onload, plan_memory, statistics_refusal

LAYOUTS = ("block", "channel")


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path,
               ) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """``layout -> (directory, true weights)`` for a tiny Llama and a tiny DeepSeek-V3 MoE."""
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for layout in LAYOUTS:
        llama = save_tiny_model("llama", root / f"llama-{layout}", tokenizer_dir)
        out[f"llama-{layout}"] = (llama, to_fp8(llama, layout))
    moe = save_moe("deepseek_v3", root / "deepseek-block", tokenizer_dir)
    out["deepseek-block"] = (moe, to_fp8(moe, "block"))
    return out


# --------------------------------------------------------------------------- maths


def test_dequantize_every_layout_within_fp8_error() -> None:
    """Partial edge tiles included (40 x 72 with 16 x 16 tiles); the reference is the scale
    map built tile by tile in the fixture."""
    torch.manual_seed(0)
    w = torch.randn(40, 72) * 0.02
    w[3, 5] = 0.5  # one outlier: only its tile's (or row's) scale grows
    for layout in LAYOUTS:
        q, scale = quantize(w, layout)
        dense = dequantize(q, scale, BLOCK if layout == "block" else None)
        assert dense.dtype == torch.float32 and dense.shape == w.shape
        err = (dense - w).abs()
        assert float(err.max()) <= 0.07 * float(w.abs().max())
        assert float((err / w.abs().clamp_min(1e-3)).median()) < 0.04
        # the raw FP8 values are far from the weights: without scales |w| would reach 448
        assert float(q.float().abs().max()) == pytest.approx(FP8_MAX, rel=0.01)
    q, scale = quantize(w, "block")
    assert torch.equal(dequantize(q, scale[:1, :1].reshape(()), None), q.float() * scale[0, 0])
    with pytest.raises(ValueError, match="fits no FP8 layout"):
        dequantize(q, scale[:, :2], BLOCK)


# --------------------------------------------------------------------------- loading


def _load_all(model_dir: Path, dtype: torch.dtype) -> tuple[ModelAdapter, DequantizingCheckpoint]:
    source = resolve_model(str(model_dir))
    config = load_model_config(source)
    adapter = ModelAdapter(build_skeleton(config, dtype))
    checkpoint = open_checkpoint(source, config)
    assert isinstance(checkpoint, DequantizingCheckpoint)
    modules = adapter.owned_module_names(0, adapter.num_blocks, True, True)
    materialise(adapter, modules, checkpoint, dtype, torch.device("cpu"))
    return adapter, checkpoint


def _true_value(adapter: ModelAdapter, name: str, true: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense value of a parameter: fused experts are stacked from the per-expert tensors."""
    key = adapter.stored_key(name, set(true))  # a tied head reads the embedding
    if key in true:
        return true[key].float()
    stem, _, kind = name.rpartition(".")
    experts = int(adapter.model.get_submodule(stem).num_experts)
    if kind == "down_proj":
        return torch.stack([true[f"{stem}.{e}.down_proj.weight"] for e in range(experts)]).float()
    return torch.stack([torch.cat([true[f"{stem}.{e}.gate_proj.weight"],
                                   true[f"{stem}.{e}.up_proj.weight"]]) for e in range(experts)
                        ]).float()


@pytest.mark.parametrize("model", ["llama-block", "llama-channel", "deepseek-block"])
def test_fp8_weights_load_within_fp8_error(model: str, fp8_models) -> None:
    model_dir, true = fp8_models[model]
    adapter, checkpoint = _load_all(model_dir, torch.float32)
    quantized = [n for n in true if n.endswith("_proj.weight") and true[n].dim() == 2]
    assert checkpoint.dequantized == len(quantized)  # every FP8 tensor, experts included
    checked = 0
    for name, param in adapter.model.named_parameters():
        want = _true_value(adapter, name, true)
        assert param.dtype == torch.float32 and param.shape == want.shape, name
        err = float((param.data - want).abs().max())
        assert err <= 0.07 * float(want.abs().max()), (name, err)
        checked += int(err > 0)
    assert checked >= 2 * len(quantized) // 3 or "deepseek" in model  # FP8 error is visible


def test_scaled_weights_are_refused_when_they_contradict_the_config(fp8_models, tmp_path) -> None:
    """A scale of another layout than the declared one is named, with its shard."""
    model_dir, _ = fp8_models["llama-channel"]
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    target = tmp_path / "wrong"
    shutil.copytree(model_dir, target)
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"_proj\.weight' in shard .* has a channel scale, but "
                                         "the quantization_config declares block"):
        _load_all(target, torch.float32)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("model", ["llama-block", "llama-channel", "deepseek-block"])
def test_fp8_prune_end_to_end(model: str, fp8_models, tmp_path: Path, small_text: Path) -> None:
    """The prune runs; the report and card say the source was FP8 and de-quantized; the export
    is dense (no quantization_config, no FP8 tensor, no scale) and its kept weights are the
    de-quantized values."""
    from safetensors import safe_open

    model_dir, true = fp8_models[model]
    out = tmp_path / "out"
    report = run(tiny_cfg(model_dir, out, calib={"source": f"text:{small_text}"},
                          model={"dtype": "float32"}, output={"dtype": "float32"})).report
    quant = report["source"]["quantization"]
    layout = model.split("-")[1]
    assert quant["layouts"] == [layout] and quant["dequantized_to"] == "float32"
    assert quant["block"] == (list(BLOCK) if layout == "block" else None)
    assert quant["method"] == ("fp8" if layout == "block" else "compressed-tensors")
    assert 0.45 < report["achieved_sparsity"] < 0.55
    assert "FP8" in (out / "README.md").read_text()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    exported = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                assert f.get_slice(key).get_dtype() == "F32", key
                exported[key] = f.get_tensor(key)
    assert not [k for k in exported if k.endswith(("_scale", "_scale_inv"))]
    name = next(n for n in true if n.endswith("self_attn.o_proj.weight"))
    kept = exported[name] != 0
    q, scale = quantize(true[name], layout)
    dense = dequantize(q, scale, BLOCK if layout == "block" else None)
    torch.testing.assert_close(exported[name][kept], dense[kept], rtol=0, atol=0)


# --------------------------------------------------------------------------- refusals

REFUSED = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "awq": {"quant_method": "awq", "bits": 4, "version": "gemm"},
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True},
    "compressed-tensors (pack-quantized)": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}},
}


@pytest.mark.parametrize("method", list(REFUSED))
def test_other_quantization_methods_are_refused_before_loading(
        method: str, tiny_models: dict[str, Path], tmp_path: Path, no_loading: None,
        caplog: pytest.LogCaptureFixture) -> None:
    model_dir = with_quantization(tiny_models["llama"], tmp_path / "q", REFUSED[method])
    assert_rejected_before_loading(model_dir, [], [f"quantized with {method}",
                                                   "unquantized (bf16/fp16) checkpoint",
                                                   "nothing was loaded"], tmp_path, caplog)


def test_recover_refuses_a_quantized_source(fp8_models, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """recover retrains a dense pruned export; an FP8 directory is named before any loading."""
    from neuroal.commands.recover import main

    model_dir, _ = fp8_models["llama-channel"]
    out = tmp_path / "r"
    logger = logging.getLogger("neuroal")
    with caplog.at_level(logging.ERROR, logger="neuroal"):
        logger.addHandler(caplog.handler)
        try:
            code = main([str(model_dir), "--output", str(out), "--steps", "1", "--device", "cpu"])
        finally:
            logger.removeHandler(caplog.handler)
    assert code == 2 and "is quantized" in caplog.text and "launch/prune.py" in caplog.text
    assert not out.exists()


def test_plan_refuses_a_quantized_checkpoint(tiny_models: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from neuroal.commands.plan import main

    model_dir = with_quantization(tiny_models["llama"], tmp_path / "q", REFUSED["gptq"])
    assert main(["--model", str(model_dir), "--workers", "1", "--seqlen", "32"]) == 2
    assert "quantized with gptq" in capsys.readouterr().err


def test_quantization_config_parsing() -> None:
    class Config:
        quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 64]}

    scheme = quantization_scheme(Config(), "m")
    assert scheme is not None and (scheme.layouts, scheme.block) == (("block",), (128, 64))
    Config.quantization_config = {"quant_method": "fp8", "activation_scheme": "static"}
    assert quantization_scheme(Config(), "m").layouts == ("tensor",)  # AutoFP8: one per tensor
    Config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128]}
    with pytest.raises(QuantizationError, match="weight_block_size is \\[128\\]"):
        quantization_scheme(Config(), "m")
    Config.quantization_config = {"load_in_8bit": True}  # old bitsandbytes configs
    with pytest.raises(QuantizationError, match="quantized with bitsandbytes"):
        quantization_scheme(Config(), "m")
    Config.quantization_config = {"quant_method": "gguf"}  # de-quantized by the GGUF reader
    assert quantization_scheme(Config(), "m") is None
    Config.quantization_config = {}
    assert quantization_scheme(Config(), "m") is None


# --------------------------------------------------------------------------- huge skeletons


class _HostAllocations(torch.overrides.TorchFunctionMode):
    """Largest tensor (elements) that a factory call put on the CPU."""

    largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type == "cpu":
            self.largest = max(self.largest, out.numel())
        return out


def test_deepseek_v3_skeleton_takes_no_host_memory() -> None:
    """DeepSeek-V3's fused experts are 256 x 4096 x 7168 (30 GB in fp32): the skeleton is built
    with no tensor of more than 10 M elements on the CPU (the router, 256 x 7168 made with
    ``zeros``, is the largest), every parameter on meta."""
    config = known_config("deepseek-v3")
    config.num_hidden_layers = 4  # 3 dense blocks, then one MoE block
    with _HostAllocations() as seen:
        model = build_skeleton(config, torch.float32)
    assert seen.largest < 10**7
    assert all(p.is_meta for p in model.parameters())
    experts = model.model.layers[3].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (256, 2 * 2048, 7168)
    rotary = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    assert rotary and not any(b.is_meta for b in rotary)


def test_deepseek_v3_plans_offline_and_sparsegpt_is_refused_with_the_figure() -> None:
    """671 B parameters (the model card's figure, MTP layer apart); Wanda fits 8 x 80 GB with
    host onloading; the
    SparseGPT Hessians of one MoE block alone exceed a device, and the refusal says so."""
    config = load_model_config(resolve_model("deepseek-v3"))  # shipped config (offline)
    assert config.quantization_config["weight_block_size"] == [128, 128]
    request = MemoryRequest(workers=8, dtype="bfloat16", onload="auto")
    plan = choose_onload("deepseek-v3", request, 80 * GB)  # blocks onloaded from the host
    assert plan.params == pytest.approx(671.0e9, rel=1e-3) and plan.num_blocks == 61
    assert plan.request.onload == "host" and plan.fits(80 * GB)
    assert statistics_refusal(plan, 80 * GB) is None
    sparse = plan_memory("deepseek-v3", replace(request, criterion="sparsegpt", onload="disk"))
    assert not sparse.fits(80 * GB)
    hessians = 256 * 4 * (2 * 7168**2 + 2048**2)  # per MoE block: every expert's gate, up, down
    assert max(w.statistics for w in sparse.workers) > hessians > 100 * GB
    text = statistics_refusal(sparse, 80 * GB)
    stats = max(w.statistics for w in sparse.workers)
    assert text is not None and f"need {stats / GB:.1f} GB" in text and "80.0 GB" in text
    assert "wanda" in text and "sparsegpt" not in text.split("(", 2)[-1]
    assert statistics_refusal(sparse, math.ceil(stats * 1.1)) is None


def test_dequantization_is_logged(fp8_models, caplog: pytest.LogCaptureFixture) -> None:
    model_dir, _ = fp8_models["llama-block"]
    source = resolve_model(str(model_dir))
    with caplog.at_level(logging.INFO, logger="neuroal"):
        logging.getLogger("neuroal").addHandler(caplog.handler)
        try:
            open_checkpoint(source, load_model_config(source))
        finally:
            logging.getLogger("neuroal").removeHandler(caplog.handler)
    assert "de-quantized as they load" in caplog.text and "16x16 tiles" in caplog.text


def test_pipeline_refuses_deepseek_v3_sparsegpt_before_loading() -> None:
    """The pre-load memory check (engine.memory_limit given) raises the statistics figure."""
    from neuroal.config.build import load_config
    from neuroal.planning import MemoryBudgetError, check_fits

    cfg = load_config(None, ["model.name=deepseek-v3", "criterion.name=sparsegpt",
                             "engine.workers=8", "engine.onload=auto"])
    with pytest.raises(MemoryBudgetError, match=r"statistics of one block alone .* need 1\d\d\.\d "
                                                 r"GB with criterion sparsegpt"):
        check_fits(cfg, known_config("deepseek-v3"), 80 * GB, dtype="bfloat16")


# --------------------------------------------------------------------------- every executor


def _export(model_dir: Path, out: Path, text: Path, **engine) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    run(tiny_cfg(model_dir, out, calib={"source": f"text:{text}"}, model={"dtype": "float32"},
                 output={"dtype": "float32"}, engine={"device": "cpu", "micro_batch": 2,
                                                      **engine}))
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_disk_onloading_reads_blocks_dequantized(fp8_models, tmp_path: Path,
                                                 small_text: Path) -> None:
    """engine.onload=disk re-reads each block from the checkpoint: the same FP8 wrapper."""
    model_dir, _ = fp8_models["llama-block"]
    _assert_same(_export(model_dir, tmp_path / "a", small_text),
                 _export(model_dir, tmp_path / "b", small_text, onload="disk"))


@pytest.mark.ray
def test_ray_actors_load_fp8_like_the_local_executor(fp8_models, tmp_path: Path,
                                                     small_text: Path) -> None:
    """Two Ray actors (other processes) de-quantize their slices: the export is bit-identical
    to the local executor's."""
    import ray

    from neuroal.engine.ray_executor import init_ray

    model_dir, _ = fp8_models["deepseek-block"]
    local = _export(model_dir, tmp_path / "local", small_text)
    owned = init_ray(num_cpus=2)
    try:
        _assert_same(local, _export(model_dir, tmp_path / "ray", small_text, executor="ray",
                                    workers=2))
    finally:
        if owned:
            ray.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_dequantizes_on_cuda_like_on_cpu(fp8_models) -> None:
    """Run by launch/gpu_check.sh (pytest -m gpu): a worker on a GPU de-quantizes on the
    device; the tiny MoE's weights equal the CPU load in bfloat16."""
    model_dir, _ = fp8_models["deepseek-block"]
    source = resolve_model(str(model_dir))
    config = load_model_config(source)
    loaded = {}
    for device in ("cpu", "cuda"):
        adapter = ModelAdapter(build_skeleton(config, torch.bfloat16))
        modules = adapter.owned_module_names(0, adapter.num_blocks, True, True)
        materialise(adapter, modules, open_checkpoint(source, config), torch.bfloat16,
                    torch.device(device))
        loaded[device] = {n: p.detach().cpu() for n, p in adapter.model.named_parameters()}
    _assert_same(loaded["cpu"], loaded["cuda"])
