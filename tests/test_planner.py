"""Memory planner: predictions from the config alone, checked against what workers allocate."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from neuroal.config.build import ConfigError, load_config
from neuroal.criteria.base import STAT_HESSIAN, STAT_SQ_NORM
from neuroal.engine.arena import PAGE, arena_bound
from neuroal.engine.executor import split_blocks
from neuroal.engine.worker import CandidateJob, PruneJob, Worker, WorkerSpec
from neuroal.models.known import KNOWN, KNOWN_DIR, known_config
from neuroal.models.loading import load_model_config, resolve_model
from neuroal.planning import (
    GB,
    MemoryBudgetError,
    MemoryRequest,
    ModelLayout,
    check_fits,
    largest_fit,
    layout_of,
    min_workers,
    parse_bytes,
    plan_memory,
    summarize,
)
from neuroal.planning.checks import request_from_config
from neuroal.planning.memory import prune_steps, worker_phases

LLAMA2_70B_BLOCK = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192


def _tensor_bytes(tensors) -> int:
    """Bytes of distinct materialised tensors (a tied tensor counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type != "meta":
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


# --------------------------------------------------------------------------- Llama-2-70B


def test_llama2_70b_fits_on_8_by_80gb() -> None:
    request = MemoryRequest(workers=8, dtype="bfloat16", nsamples=128, seqlen=2048)
    plan = plan_memory("llama-2-70b", request)
    assert plan.params == pytest.approx(68.98e9, rel=1e-3)
    middle = plan.workers[1]
    assert middle.weights == 10 * LLAMA2_70B_BLOCK * 2  # 17.1 GB, engine.md §10
    assert middle.activations == 2 * 128 * 2048 * 8192 * 2  # in + out, 4.29 GB each
    assert plan.workers[0].weights == middle.weights + 32000 * 8192 * 2  # embedding
    assert plan.workers[-1].weights == middle.weights + (32000 + 1) * 8192 * 2  # head + norm
    assert plan.fits(80 * GB) and 25 * GB < plan.peak < 45 * GB  # engine.md §7: ≈ 30-40 GB
    for criterion, allocation in [("sparsegpt", "uniform"), ("wanda", "neuroal")]:
        assert plan_memory("llama-2-70b", replace(request, criterion=criterion,
                                                  allocation=allocation)).fits(80 * GB)


def test_sparsegpt_holds_one_hessian_per_distinct_input() -> None:
    plan = plan_memory("llama-2-70b", MemoryRequest(workers=8, criterion="sparsegpt"))
    per_input = 4 * (3 * 8192**2 + 28672**2)  # q/k/v, o, gate/up: h^2; down: I^2
    assert plan.workers[0].statistics == per_input  # 4.1 GB, not 4.9 (one per linear)
    assert layout_of("llama-2-70b").input_groups == (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"))


def test_llama2_70b_sparsegpt_fits_on_2_by_24gb() -> None:
    """``plan.py --model llama-2-70b --workers 2 --gpu-memory 24GB --criterion sparsegpt
    --seqlen 2048`` fits (onload auto -> host): one Hessian per distinct input, the in-place
    factorisation (2 working squares on CUDA), one stream while capturing and masking."""
    from neuroal.commands.plan import main

    request = MemoryRequest(workers=2, criterion="sparsegpt", seqlen=2048, onload="auto")
    summary = summarize("llama-2-70b", request, 24 * GB)
    assert summary["fits"] and summary["onload"] == "host"
    square = 4 * 28672**2
    worker = summary["plan"]["workers"][0]
    assert worker["statistics"] == 4 * (3 * 8192**2 + 28672**2)
    steps = prune_steps(layout_of("llama-2-70b"), replace(request, onload="host"), range(40),
                        False)
    # down_proj: the larger of the working square + cusolver's copy and the sweep
    assert steps["mask"].transients == max(2 * square, square + 12 * 8192 * 28672 + 28 * 128 * 8192)
    # pinned host copies counted as allocated: one arena per block (9 tensors), no rounding
    assert worker["host_weights"] == 40 * arena_bound(LLAMA2_70B_BLOCK * 2, 9)
    assert worker["host_weights"] <= 40 * (LLAMA2_70B_BLOCK * 2 + 2 * PAGE)  # 1632 MiB, not 1824
    assert steps["mask"].activations == steps["capture"].activations == 128 * 2048 * 8192 * 2
    assert steps["forward"].activations == 2 * steps["mask"].activations
    assert steps["forward"].statistics == 0
    assert worker["total"] < 24 * GB < worker["total"] + 5 * square  # the old 7 squares: no fit
    assert main(["--model", "llama-2-70b", "--workers", "2", "--gpu-memory", "24GB",
                 "--criterion", "sparsegpt", "--seqlen", "2048"]) == 0


def test_min_workers_and_largest_fit_are_consistent() -> None:
    request = MemoryRequest(workers=2, dtype="bfloat16", nsamples=128, seqlen=512)
    fewest = min_workers("llama-2-70b", request, 24 * GB)
    assert fewest is not None and fewest > 2
    assert plan_memory("llama-2-70b", replace(request, workers=fewest)).fits(24 * GB)
    assert not plan_memory("llama-2-70b", replace(request, workers=fewest - 1)).fits(24 * GB)
    best = largest_fit(MemoryRequest(workers=8), 80 * GB)
    assert best is not None and best.fits(80 * GB) and best.params > 68e9
    small = largest_fit(MemoryRequest(workers=1, seqlen=512), 24 * GB,
                        candidates=["phi-3-mini", "llama-2-7b", "llama-2-13b"])
    assert small is not None and small.model == "llama-2-7b"


def test_offloaded_streams_move_to_host() -> None:
    request = MemoryRequest(workers=8, offload_activations=True, micro_batch=4)
    row = plan_memory("llama-2-70b", request).workers[1]
    assert row.host_activations == 2 * 128 * 2048 * 8192 * 2  # the pruned forward's 2 streams
    assert row.activations == 2 * 4 * 2048 * 8192 * 2


# --------------------------------------------------------------------------- refusal


def test_cli_refuses_before_loading(monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """Llama-2-70B on 2 x 24 GB: exit 2 before the tokenizer or any weight is loaded."""
    import neuroal.pipeline as pipeline
    from neuroal.cli import main

    def never(*_args, **_kwargs):
        raise AssertionError("the refusal must come before the tokenizer and the weights")

    monkeypatch.setattr(pipeline, "load_tokenizer", never)
    monkeypatch.setattr(pipeline, "build_executor", never)
    cfg = load_config(None, ["model.name=llama-2-70b", "model.dtype=bfloat16", "engine.workers=2",
                             "engine.device=cpu", "eval.datasets=none", "engine.onload=device"])
    fewest = min_workers("llama-2-70b", request_from_config(cfg, "bfloat16", "cpu"), 24 * GB)
    argv = ["--model", "llama-2-70b", "--workers", "2", "--device", "cpu", "--dtype", "bfloat16",
            "--no-save", "--eval", "none", "engine.memory_limit=24GB", "engine.onload=device"]
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="neuroal"):
        logging.getLogger("neuroal").addHandler(caplog.handler)
        try:
            assert main(argv) == 2
        finally:
            logging.getLogger("neuroal").removeHandler(caplog.handler)
    message = caplog.text
    assert "does not fit" in message and "24.0 GB per worker" in message
    assert f"smallest worker count that fits is {fewest}" in message
    assert "2 worker(s), bfloat16, 128 x 512" in message


def test_check_fits_names_the_fix() -> None:
    cfg = load_config(None, ["model.name=llama-2-70b", "engine.workers=2", "calib.seqlen=2048",
                             "engine.onload=device"])
    config = known_config("llama-2-70b")
    with pytest.raises(MemoryBudgetError, match=r"smallest worker count that fits is \d+"):
        check_fits(cfg, config, 24 * GB, dtype="bfloat16")
    with pytest.raises(MemoryBudgetError, match="No worker count fits.*micro_batch"):
        check_fits(cfg, config, 4 * GB, dtype="bfloat16")
    assert check_fits(cfg, config, 200 * GB, dtype="bfloat16").fits(200 * GB)


def test_cuda_budget_is_the_free_memory_shared_by_its_workers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroal.models.adapter import ModelAdapter
    from neuroal.models.loading import build_skeleton
    from neuroal.planning.preflight import check_memory

    cfg = load_config(None, ["model.name=llama-2-7b", "engine.workers=2", "model.dtype=bfloat16",
                             "engine.onload=device"])
    config = known_config("llama-2-7b")
    adapter = ModelAdapter(build_skeleton(known_config("llama-2-7b"), torch.bfloat16))
    need = plan_memory("llama-2-7b", request_from_config(cfg, "bfloat16", "cuda")).peak
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _device: (2 * need + 2, 80 * GB))
    check_memory(cfg, config, adapter, torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _device: (2 * need - 2, 80 * GB))
    with pytest.raises(MemoryBudgetError):
        check_memory(cfg, config, adapter, torch.device("cuda"), torch.bfloat16)


def test_memory_limit_is_validated() -> None:
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes(1024) == 1024
    assert load_config(None, ["engine.memory_limit=24GB"]).engine.memory_limit == "24GB"
    with pytest.raises(ConfigError, match="engine.memory_limit"):
        load_config(None, ["engine.memory_limit=lots"])
    with pytest.raises(ConfigError, match="engine.memory_limit"):
        load_config(None, ["engine.memory_limit=-3"])


# --------------------------------------------------------------------------- tiny models


TINY = MemoryRequest(workers=2, dtype="bfloat16", nsamples=4, seqlen=16, micro_batch=3,
                     criterion="wanda", device_type="cpu")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "opt", "phi"])
def test_tiny_weights_and_streams_match_the_workers(tiny_models: dict[str, Path],
                                                    model_type: str) -> None:
    model_dir = tiny_models[model_type]
    layout = ModelLayout.from_config(load_model_config(resolve_model(str(model_dir))))
    plan = plan_memory(layout, TINY)
    ids = torch.randint(0, layout.vocab, (TINY.nsamples, TINY.seqlen))
    stream = None
    for row, (start, stop) in zip(plan.workers, split_blocks(layout.num_blocks, 2), strict=True):
        worker = Worker(WorkerSpec(resolve_model(str(model_dir)), start, stop, layout.num_blocks,
                                   "cpu", TINY.dtype, TINY.micro_batch, rank=row.rank))
        assert _tensor_bytes(worker.adapter.model.parameters()) == row.weights
        if stream is None:
            stream = worker.embed(ids)
        out = worker.forward(stream)
        assert stream.nbytes + out.nbytes == row.activations
        stream = out


@pytest.mark.parametrize("criterion,stat", [("wanda", STAT_SQ_NORM), ("sparsegpt", STAT_HESSIAN)])
def test_tiny_statistics_and_masked_block_match(tiny_models: dict[str, Path], criterion: str,
                                                stat: str) -> None:
    model_dir = tiny_models["llama"]
    layout = layout_of(load_model_config(resolve_model(str(model_dir))))
    request = replace(TINY, workers=1, dtype="float32", criterion=criterion, allocation="neuroal")
    phases = worker_phases(layout, request, 0, 0, layout.num_blocks)
    worker = Worker(WorkerSpec(resolve_model(str(model_dir)), 0, layout.num_blocks,
                               layout.num_blocks, "cpu", "float32", TINY.micro_batch))
    stream = worker.embed(torch.randint(0, layout.vocab, (TINY.nsamples, TINY.seqlen)))
    stats, _ = worker.collect_stats(0, stream, PruneJob(criterion))
    held = _tensor_bytes(getattr(s, stat) for s in stats.values())
    captured = prune_steps(layout, request, range(layout.num_blocks), True)["capture"]
    groups = layout.input_groups
    assert groups  # the tiny Llama shares q/k/v and gate/up inputs
    sq_norms = sum(4 * c for n, (_, c) in layout.linears[0].items()
                   if not any(n in g[1:] for g in groups))
    assert held == captured.statistics - (0 if stat == STAT_SQ_NORM else sq_norms)
    assert phases["prune"].statistics in (0, captured.statistics)
    linears = worker.adapter.prunable_linears(worker.adapter.blocks[0])
    from neuroal.criteria import CRITERIA

    crit = CRITERIA.get(criterion)
    masked = worker._masked_weights(linears, stats, {n: 0.5 for n in linears},
                                    CandidateJob(criterion, group=None), crit, dict(crit.defaults))
    assert _tensor_bytes(masked.values()) == phases["search"].masked_block


# --------------------------------------------------------------------------- aliases


def test_aliases_resolve_offline() -> None:
    source = resolve_model("llama-70b")
    assert (source.kind, source.location) == ("hub", "meta-llama/Llama-2-70b-hf")
    config = load_model_config(source)  # HF_HUB_OFFLINE=1 (conftest): the shipped config
    assert (config.hidden_size, config.num_key_value_heads, config.vocab_size) == (8192, 8, 32000)
    assert load_model_config(resolve_model("meta-llama/Llama-2-70b-hf")).num_hidden_layers == 80
    for alias, (hub, filename) in KNOWN.items():
        assert (KNOWN_DIR / filename).is_file()
        assert known_config(alias).name_or_path == hub


@pytest.mark.parametrize("alias,billions", [("llama-2-7b", 6.738), ("llama-2-13b", 13.016),
                                            ("llama-3-8b", 8.030), ("mistral-7b", 7.242),
                                            ("qwen2.5-7b", 7.616), ("qwen2.5-72b", 72.706),
                                            ("opt-13b", 12.853), ("phi-3-mini", 3.821)])
def test_known_models_have_their_public_sizes(alias: str, billions: float) -> None:
    assert layout_of(alias).params == pytest.approx(billions * 1e9, rel=1e-3)


def test_repeated_block_layout_is_exact() -> None:
    config = known_config("phi-3-mini")
    assert ModelLayout.from_config(config, "phi-3-mini") == layout_of("phi-3-mini")


def test_known_configs_ship_as_package_data() -> None:
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert "models/known/*.json" in pyproject


# --------------------------------------------------------------------------- recovery


def test_reconstruction_adds_the_target_stream_and_the_block_fit() -> None:
    """perp-reconstruct keeps the dense block's outputs (one more 4.29 GB stream at 70B bf16,
    128 x 2048) and trains one block's MaskLoRA; every worker's peak grows accordingly."""
    request = MemoryRequest(workers=8, dtype="bfloat16", nsamples=128, seqlen=2048)
    plain = plan_memory("llama-2-70b", request)
    recon = plan_memory("llama-2-70b", replace(request, recover=("perp-reconstruct",)))
    stream = 128 * 2048 * 8192 * 2
    for before, after in zip(plain.workers, recon.workers, strict=True):
        assert after.phase == "reconstruct"
        assert after.activations == before.activations + stream
        assert after.transients > before.transients  # adapters, Adam, masks, effective weights
        assert after.total > before.total + stream
    assert recon.retrain is None and plain.retrain is None
    small = plan_memory("llama-2-70b", replace(request, recover=("perp-reconstruct",),
                                               recover_options={"perp-reconstruct": {"rank": 4}}))
    assert small.workers[1].transients < recon.workers[1].transients


def test_whole_model_perp_is_planned_and_refused_before_loading() -> None:
    """A config that passes the pre-load check without whole-model PERP is refused with it
    (one process holds the whole model, its adapters and a full backward); checkpointing
    shrinks the saved activations."""
    cfg = load_config(None, ["model.name=llama-2-7b", "engine.workers=2", "calib.seqlen=2048"])
    config = known_config("llama-2-7b")
    assert check_fits(cfg, config, 24 * GB, dtype="bfloat16").retrain is None
    perp = load_config(None, ["model.name=llama-2-7b", "engine.workers=2", "calib.seqlen=2048",
                              "recover.steps=perp-masklora"])
    with pytest.raises(MemoryBudgetError, match="whole-model PERP"):
        check_fits(perp, config, 24 * GB, dtype="bfloat16")
    request = request_from_config(perp, "bfloat16", "cuda")
    row = plan_memory("llama-2-7b", request).retrain
    assert row is not None and row.weights >= 6.7e9 * 2
    ckpt = replace(request, recover_options={"perp-masklora": {"gradient_checkpointing": True}})
    assert plan_memory("llama-2-7b", ckpt).retrain.activations < row.activations / 4
    alias = load_config(None, ["model.name=llama-2-7b", "recover.steps=perp_reconstruct"])
    assert request_from_config(alias, "bfloat16", "cuda").recover == ("perp-reconstruct",)
    full = replace(request, recover=("perp-full",))
    assert plan_memory("llama-2-7b", full).retrain.transients > 6e9 * 12  # fp32 weights + Adam


def test_plan_cli_recover_option() -> None:
    from neuroal.commands.plan import recovery_settings

    steps, opts = recovery_settings("perp-reconstruct, perp-masklora",
                                    ["perp-masklora.gradient_checkpointing=true",
                                     "perp-reconstruct.batch_size=2"])
    assert steps == ("perp-reconstruct", "perp-masklora")
    assert opts == {"perp-masklora": {"gradient_checkpointing": True},
                    "perp-reconstruct": {"batch_size": 2}}
    for bad in (("bogus", []), ("perp-masklora", ["perp-masklora.nope=1"]),
                ("perp-masklora", ["dsnot.max_cycles=3"]),
                ("perp-masklora,perp-reconstruct", [])):
        with pytest.raises(ValueError):
            recovery_settings(*bad)
