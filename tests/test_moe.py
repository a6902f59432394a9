"""Mixture of experts: each expert's slice of the fused 3-D parameters is a
prunable matrix with statistics from its routed tokens only; routers are never pruned; the
export writes exact zeros that ``from_pretrained`` loads; an expert no token reaches falls back
to magnitude; NeuroAL and the memory planner see every expert."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, save_random_model

from neuroal.capture.collector import StatsCollector
from neuroal.criteria import CRITERIA
from neuroal.criteria.base import LayerTarget
from neuroal.models.adapter import ModelAdapter
from neuroal.models.moe import ExpertLinear, expert_linears
from neuroal.pipeline import run

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE = {  # 4 experts of 32 (gate, up) x 64, top-2
    "mixtral": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, shared_expert_intermediate_size=48),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, head_dim=16),
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                        num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                        first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
}
EXPERTS, INTER, HIDDEN = 4, 32, 64


def moe_config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **COMMON, **MOE[model_type])


def save_moe(model_type: str, directory: Path, tokenizer_dir: Path, dead_expert: int | None = None,
             ) -> Path:
    """A random tiny MoE model saved as ``save_pretrained`` writes it (one tensor per expert),
    in several shards (:func:`conftest.save_random_model`)."""
    return save_random_model(moe_config(model_type), directory, tokenizer_dir, shard="100KB",
                             dead_expert=dead_expert)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {mt: save_moe(mt, root / mt, tokenizer_dir) for mt in ("mixtral", "qwen2_moe")}


def _cfg(model_dir: Path, out: Path | None, text: Path, **overrides):
    from conftest import tiny_cfg

    return tiny_cfg(model_dir, out, calib={"source": f"text:{text}"}, **overrides)


def _assert_exact(name: str, mask: torch.Tensor, criterion: str, sparsity: float) -> None:
    rows, cols = mask.shape
    if criterion == "wanda":
        assert torch.all(mask.sum(1) == int(sparsity * cols)), name
    else:  # sparsegpt: per 128-column block (one block here)
        assert int(mask.sum()) == int(sparsity * rows * cols), name


# --------------------------------------------------------------------------- views and statistics


@pytest.mark.parametrize("model_type", list(MOE))
def test_expert_views_write_into_the_fused_parameters(model_type: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(model_type)).eval()
    block = model.model.layers[0]
    linears = ModelAdapter.prunable_linears(block)
    assert not any(n in linears for n in ("mlp.gate", "mlp.shared_expert_gate"))
    assert len([n for n in linears if ".experts." in n]) == EXPERTS * 3
    experts = block.mlp.experts
    assert list(linears)[4:7] == ["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj",
                                  "mlp.experts.0.down_proj"]
    gate, up, down = (linears[f"mlp.experts.2.{k}"] for k in ("gate_proj", "up_proj", "down_proj"))
    assert (gate.out_features, gate.in_features, down.out_features) == (INTER, HIDDEN, HIDDEN)
    assert torch.equal(gate.weight.data, experts.gate_up_proj.data[2, :INTER])
    assert torch.equal(up.weight.data, experts.gate_up_proj.data[2, INTER:])
    up.weight.data.masked_fill_(torch.ones(INTER, HIDDEN, dtype=torch.bool), 0.0)
    assert not experts.gate_up_proj.data[2, INTER:].any() and experts.gate_up_proj.data[2, :INTER].all()
    assert experts.gate_up_proj.data[1].all()


def test_expert_statistics_come_from_routed_tokens_only() -> None:
    """Per expert: s, H, m, v and z on exactly the tokens routed to it (N = sequences); an expert
    without a token has zero statistics and ``tokens == 0``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config("mixtral")).eval()
    experts = model.model.layers[0].mlp.experts
    linears = expert_linears("mlp.experts", experts)
    needs = frozenset({"sq_norm", "hessian", "mean", "var", "out_sq_norm"})
    collector = StatsCollector(linears, needs)
    sequences, seqlen = 2, 5
    hidden = torch.randn(sequences * seqlen, HIDDEN)
    index = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 0], [1, 0]] * 2)  # expert 3: no token
    weights = torch.full(index.shape, 0.5)
    with torch.no_grad(), collector.attached():
        collector.begin_batch(sequences)
        experts(hidden, index, weights)
        collector.end_batch()
    stats = collector.stats()
    for e in range(EXPERTS):
        rows = (index == e).any(1).nonzero().squeeze(1)
        x = hidden[rows]
        w = experts.gate_up_proj.data[e]
        g, u = (x @ w.t()).chunk(2, dim=-1)
        inner = experts.act_fn(g) * u
        got = stats[f"mlp.experts.{e}.gate_proj"]
        assert got.tokens == rows.numel() and got.nsamples == sequences
        torch.testing.assert_close(got.sq_norm, x.pow(2).sum(0) / sequences)
        torch.testing.assert_close(got.hessian, 2 * x.t() @ x / sequences)
        torch.testing.assert_close(got.mean, x.sum(0) / sequences)
        torch.testing.assert_close(got.out_sq_norm, g.pow(2).sum(0) / sequences)
        var = sum(x[(rows // seqlen) == s].var(0, unbiased=False) for s in range(sequences)
                  if ((rows // seqlen) == s).any()) if rows.numel() else torch.zeros(HIDDEN)
        torch.testing.assert_close(got.var, var / sequences)
        down = stats[f"mlp.experts.{e}.down_proj"]
        torch.testing.assert_close(down.sq_norm, inner.pow(2).sum(0) / sequences)
        torch.testing.assert_close(stats[f"mlp.experts.{e}.up_proj"].out_sq_norm,
                                   u.pow(2).sum(0) / sequences)
    assert stats["mlp.experts.3.down_proj"].tokens == 0
    assert not stats["mlp.experts.3.down_proj"].sq_norm.any()
    assert set(collector.order) == set(linears)


# --------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_prune_experts_exactly_and_export(model_type: str, criterion: str,
                                          moe_models: dict[str, Path], small_text: Path,
                                          tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = moe_models[model_type]
    out = tmp_path / "pruned"
    result = run(_cfg(source, out, small_text, criterion={"name": criterion}), keep_executor=True)
    masks = result.executor.masks()
    expert_names = [n for n in masks if ".mlp.experts." in n]
    assert len(expert_names) == 2 * EXPERTS * 3
    for name, mask in masks.items():
        _assert_exact(name, mask, criterion, 0.5)
    layers = result.report["layers"]
    assert set(layers) == set(masks)
    assert not any(n.endswith((".mlp.gate", ".shared_expert_gate")) for n in layers)
    if model_type == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert.down_proj" in layers
    assert result.report["achieved_sparsity"] == pytest.approx(0.5)

    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for name, param in loaded.named_parameters():  # routers and gates untouched
        if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
            assert torch.equal(param, dense.get_parameter(name)), name
    for name, mask in masks.items():
        if ".mlp.experts." in name:
            prefix, e, kind = name.rsplit(".", 2)
            fused = loaded.get_parameter(f"{prefix}.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}")
            rows = {"gate_proj": slice(0, INTER), "up_proj": slice(INTER, None)}.get(kind, slice(None))
            weight = fused[int(e)][rows]
        else:
            weight = loaded.get_parameter(name + ".weight")
        assert torch.equal(weight == 0, mask), name
        assert not torch.signbit(weight[mask]).any(), "pruned weights must be +0.0"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == {n for n in json.loads((source / "model.safetensors.index.json")
                                                .read_text())["weight_map"]}
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.executor.logits(ids),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("criterion", ["magnitude", "ria"])
def test_per_matrix_criteria_on_expert_slices(criterion: str, moe_models: dict[str, Path],
                                              small_text: Path) -> None:
    result = run(_cfg(moe_models["mixtral"], None, small_text, criterion={"name": criterion}),
                 keep_executor=True)
    masks = result.executor.masks()
    assert len([n for n in masks if ".experts." in n]) == 2 * EXPERTS * 3
    for name, mask in masks.items():  # per-matrix group: each expert matrix on its own
        assert int(mask.sum()) == int(0.5 * mask.numel()), name


def test_expert_without_tokens_falls_back_to_magnitude(tokenizer_dir: Path, small_text: Path,
                                                       tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """DeepSeek-V3 layout (shared experts, biased router): expert 3 never routed to."""
    source = save_moe("deepseek_v3", tmp_path / "dsv3", tokenizer_dir, dead_expert=3)
    with caplog.at_level(logging.WARNING, logger="neuroal"):
        logging.getLogger("neuroal").addHandler(caplog.handler)
        try:
            result = run(_cfg(source, None, small_text, criterion={"name": "wanda"}),
                         keep_executor=True)
        finally:
            logging.getLogger("neuroal").removeHandler(caplog.handler)
    layers = result.report["layers"]
    dead = [n for n in layers if ".mlp.experts.3." in n]
    assert len(dead) == 2 * 3
    for name in dead:
        assert layers[name]["info"]["fallback"] == "magnitude", name
        assert layers[name]["info"]["routed_tokens"] == 0
    warned = {r.getMessage().split(":")[0] for r in caplog.records
              if "no calibration token was routed" in r.getMessage()}
    assert warned == {f"block {n.split('.')[2]} {n.split('.', 3)[3]}" for n in dead}
    live = layers["model.layers.0.mlp.experts.0.gate_proj"]["info"]
    assert "fallback" not in live and live["routed_tokens"] > 0
    assert "model.layers.1.mlp.shared_experts.up_proj" in layers
    # The fallback is magnitude in Wanda's per-row group, on the dense weights.
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    weight = dense.model.layers[1].mlp.experts.down_proj.data[3]
    expected = CRITERIA.get("magnitude").prune(weight, None, LayerTarget(0.5, group="row"), {}).mask
    assert torch.equal(result.executor.masks()["model.layers.1.mlp.experts.3.down_proj"], expected)


def test_neuroal_allocates_over_experts(moe_models: dict[str, Path], small_text: Path) -> None:
    grids = {"name": "neuroal", "block_grid": [0.05, 0.1], "row_grid": [0.0, 0.05],
             "search_samples": 2}
    result = run(_cfg(moe_models["mixtral"], None, small_text, sparsity=0.6, allocation=grids),
                 keep_executor=True)
    plan = result.plan
    block0 = plan.ratios[0]
    assert "mlp.experts.3.down_proj" in block0 and "mlp.gate" not in block0
    shape = ModelAdapter(result.executor.workers[0].adapter.model).shape()
    assert shape.consumers["mlp.experts.2.gate_proj"] == "mlp.experts.2.down_proj"
    assert plan.planned_global(shape) == pytest.approx(0.6, abs=1e-6)
    assert result.report["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    if plan.policy["lambda_row"]:
        assert any(isinstance(r, torch.Tensor) for n, r in block0.items() if ".experts." in n)


# --------------------------------------------------------------------------- shapes and planner


def test_shape_and_planner_count_every_expert() -> None:
    from neuroal.planning import MemoryRequest, ModelLayout, plan_memory
    from neuroal.planning.memory import stat_bytes

    config = moe_config("qwen2_moe")
    layout = ModelLayout.from_config(config)
    block = layout.linears[0]
    experts = {n: s for n, s in block.items() if ".experts." in n}
    assert len(experts) == EXPERTS * 3
    assert experts["mlp.experts.1.up_proj"] == (INTER, HIDDEN)
    assert experts["mlp.experts.1.down_proj"] == (HIDDEN, INTER)
    assert "mlp.shared_expert_gate" not in block and "mlp.shared_expert.up_proj" in block
    expert_params = EXPERTS * 3 * INTER * HIDDEN
    shared = 3 * 48 * HIDDEN
    attention = 64 * 64 * 2 + 2 * 32 * 64
    assert sum(r * c for r, c in block.values()) == expert_params + shared + attention
    router = EXPERTS * HIDDEN + HIDDEN  # gate + shared_expert_gate: loaded, never pruned
    biases = 64 + 2 * 32
    assert layout.block_params[0] == expert_params + shared + attention + router + biases + 2 * 64
    assert stat_bytes(block, {"sq_norm"}) == 4 * sum(c for _, c in block.values())
    assert stat_bytes(block, {"hessian"}) == 4 * sum(c * c for _, c in block.values())
    assert layout.fused_params == (expert_params,) * 2  # the search's masked 3-D copies
    request = MemoryRequest(dtype="float32", nsamples=4, seqlen=32, micro_batch=2,
                            allocation="neuroal", device_type="cpu")
    search = plan_memory(layout, request).workers[0]
    assert search.phase == "search"
    assert search.masked_block == 4 * (sum(r * c for r, c in block.values()) + expert_params)


def test_worker_loads_only_its_experts(moe_models: dict[str, Path]) -> None:
    from neuroal.engine.worker import Worker, WorkerSpec
    from neuroal.models.loading import resolve_model

    source = moe_models["mixtral"]
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    worker = Worker(WorkerSpec(resolve_model(str(source)), 1, 2, 2, "cpu", "float32", 2, rank=1))
    model = worker.adapter.model
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
    assert model.model.layers[1].mlp.experts.gate_up_proj.device.type == "cpu"
    needed = {f for n, f in weight_map.items() if n.startswith("model.layers.1.")
              or n in ("model.norm.weight", "lm_head.weight")}
    assert worker.checkpoint.opened == needed
    assert set(weight_map.values()) - needed, "fixture should spread tensors over several shards"
    linears = worker.adapter.prunable_linears(model.model.layers[1])
    assert all(isinstance(linears[f"mlp.experts.{e}.up_proj"], ExpertLinear) for e in range(4))


def test_perp_refused_before_loading(moe_models: dict[str, Path], small_text: Path,
                                     no_loading: None) -> None:
    from neuroal.config.build import ConfigError

    cfg = _cfg(moe_models["qwen2_moe"], None, small_text,
               recover={"steps": ["perp-reconstruct"]})
    with pytest.raises(ConfigError, match="PERP does not support mixture-of-experts"):
        run(cfg)


def test_hub_download_fetches_the_owned_expert_shards(moe_models: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from neuroal.models.loading import ModelSource, _hub_checkpoint, build_skeleton

    source = moe_models["mixtral"]
    fetched: list[str] = []

    def fake_download(repo: str, fname: str, revision: str | None = None) -> str:
        fetched.append(fname)
        return str(source / fname)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    adapter = ModelAdapter(build_skeleton(moe_config("mixtral"), torch.float32))
    modules = adapter.owned_module_names(1, 2, False, True)
    needed = {adapter.checkpoint_key(n) for n, _ in adapter.named_owned_parameters(modules)}
    _hub_checkpoint(ModelSource("hub", "org/tiny-mixtral", "org/tiny-mixtral"), needed,
                    adapter.model)
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    expected = {f for n, f in weight_map.items() if n.startswith("model.layers.1.")
                or n in ("model.norm.weight", "lm_head.weight")}
    assert set(fetched) - {"model.safetensors.index.json"} == expected


def test_interrupted_moe_prune_resumes_to_identical_output(moe_models: dict[str, Path],
                                                           small_text: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Resume stores each expert matrix (a view into the fused parameter) and replays it into
    the 3-D parameter bit for bit."""
    from safetensors.torch import load_file

    from neuroal.engine.worker import Worker

    source = moe_models["qwen2_moe"]
    over = {"criterion": {"name": "sparsegpt"}}
    ref = run(_cfg(source, tmp_path / "ref", small_text, **over))
    out = tmp_path / "out"
    original = Worker.prune_one
    calls = {"n": 0}

    def crash_second(self, *args, **kwargs):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Worker, "prune_one", crash_second)
        with pytest.raises(KeyboardInterrupt):
            run(_cfg(source, out, small_text, **over))
    res = run(_cfg(source, out, small_text, **over, output={"dir": str(out), "resume": True}))
    assert res.report["layers"] == ref.report["layers"]

    def shards(directory: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(directory.glob("*.safetensors"))
                for k, v in load_file(str(f)).items()}

    a, b = shards(out), shards(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_swapped_weights_restore_the_dense_experts() -> None:
    from transformers import AutoModelForCausalLM

    from neuroal.models.moe import swapped_weights

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config("qwen2_moe")).eval()
    block = model.model.layers[0]
    linears = ModelAdapter.prunable_linears(block)
    dense = {n: m.weight.data.clone() for n, m in linears.items()}
    fused = block.mlp.experts.gate_up_proj.data
    masked = {n: torch.zeros_like(w) for n, w in dense.items()}
    with swapped_weights(linears, masked):
        assert not block.mlp.experts.gate_up_proj.data.any()
        assert not block.mlp.shared_expert.up_proj.weight.data.any()
        assert fused.all(), "the dense 3-D tensor is never written"
    assert block.mlp.experts.gate_up_proj.data.data_ptr() == fused.data_ptr()
    assert all(torch.equal(m.weight.data, dense[n]) for n, m in linears.items())
