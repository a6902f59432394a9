"""Data mode's final prune in the memory planner (neuroal.planning.data_mode), engine.parallel=auto
asking it, and the refusal of an engine.parallel=data that does not fit: pure arithmetic on
hand-made layouts (no model is built), plus one preflight check on the tiny Llama."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from conftest import tiny_cfg

from neuroal.engine.data_parallel import resolve_parallel
from neuroal.planning.checks import MemoryBudgetError, check_fits, data_refusal
from neuroal.planning.data_mode import PHASE, data_prune_steps, guest_bytes, solvers
from neuroal.planning.layout import ModelLayout
from neuroal.planning.memory import MemoryRequest, stat_bytes
from neuroal.planning.plan import choose_parallel, plan_memory

# q and k read the same input (one recorded Hessian for both); up is 32 x 16, down 16 x 32
SMALL = {"q": (16, 16), "k": (16, 16), "o": (16, 16), "up": (32, 16), "down": (16, 32)}


def small_layout(block_params: tuple[int, ...] = (100, 100, 100, 120)) -> ModelLayout:
    """A layout of identical blocks of :data:`SMALL` linears, hidden 16."""
    n = len(block_params)
    return ModelLayout(name="small", hidden=16, vocab=50, tied=False, block_params=block_params,
                       linears=(SMALL,) * n, context_params=0, embed_params=800,
                       final_params=16, head_params=800, fused_params=(0,) * n,
                       input_groups=(("q", "k"),), block_tensors=(5,) * n)


def wide_layout(blocks: int = 8) -> ModelLayout:
    """Llama-2-70B's block shapes (hidden 8192, MLP 28672, 8 KV heads), ``blocks`` of them."""
    linears = {"q": (8192, 8192), "k": (1024, 8192), "v": (1024, 8192), "o": (8192, 8192),
               "gate": (28672, 8192), "up": (28672, 8192), "down": (8192, 28672)}
    params = sum(r * c for r, c in linears.values()) + 2 * 8192
    return ModelLayout(name="wide", hidden=8192, vocab=32000, tied=False,
                       block_params=(params,) * blocks, linears=(linears,) * blocks,
                       context_params=0, embed_params=32000 * 8192, final_params=8192,
                       head_params=32000 * 8192, fused_params=(0,) * blocks,
                       input_groups=(("q", "k", "v"), ("gate", "up")), block_tensors=(9,) * blocks)


SMALL_REQUEST = MemoryRequest(workers=2, dtype="float32", nsamples=4, seqlen=2, micro_batch=1,
                              criterion="sparsegpt", device_type="cpu", parallel="data")


def test_solvers_follow_the_engines_rule_by_hand() -> None:
    """SparseGPT's cost cols^3 + rows cols^2: down 32768 + 16384, up 4096 + 8192, q k o 8192
    each; down goes to worker 0, the rest to the less loaded worker 1."""
    assert solvers(SMALL, frozenset({"hessian"}), 2) == {"down": 0, "up": 1, "q": 1, "k": 1,
                                                         "o": 1}


def test_statistics_terms_by_hand() -> None:
    """fp32 Hessians 4 cols^2: recorded once per distinct input (q/k share: 1024, o 1024, up
    1024, down 4096 = 7168); worker 0 folds down (4096) and receives one down (4096); worker 1
    solves up, q, k and o, folds the input q and k share once (3 x 1024) and receives one
    input's sums at a time (1024)."""
    layout = small_layout()
    slices = ((0, 2), (2, 4))
    assert stat_bytes(SMALL, {"hessian"}, layout.input_groups) == 7168
    zero, one = (data_prune_steps(layout, SMALL_REQUEST, slices, r) for r in (0, 1))
    assert zero["route"].statistics == 7168 + 4096 + 4096
    assert zero["mask"].statistics == 4096
    assert one["route"].statistics == 7168 + 3072 + 1024
    assert one["mask"].statistics == 3072
    assert zero["forward"].statistics == one["forward"].statistics == 0


def test_search_reference_by_hand() -> None:
    """A NeuroAL search's dense reference over 2 windows (more than one micro-batch: data mode)
    with Hessians and sq_norm: recorded 7168 + 320 = 7488 per block (sq_norm 4 cols per
    distinct input: 64 + 64 + 64 + 128); the owner folds every linear, a shared input once
    (7488 again) and receives one down (4096 + 128); ``global`` keeps both owned
    blocks' reference (2 x 7488) throughout, ``local`` block 0's on worker 0 only."""
    search = replace(SMALL_REQUEST, allocation="neuroal", search_samples=2)
    slices = ((0, 2), (2, 4))
    steps = data_prune_steps(small_layout(), replace(search, reference_stream="global"),
                             slices, 0)
    assert steps["reference"].statistics == 2 * 7488 + 7488 + 7488 + 4224
    local = [data_prune_steps(small_layout(), search, slices, r)["reference"] for r in (0, 1)]
    assert local[0].statistics == 7488 + 7488 + 7488 + 4224
    assert local[1].statistics == 7488  # it owns no block the reference covers
    one = replace(search, search_samples=1)  # a single micro-batch: pipelined, no such step
    assert "reference" not in data_prune_steps(small_layout(), one, slices, 0)


def test_share_of_the_stream_by_hand() -> None:
    """N = 4 sequences, micro-batch 1, 2 workers: each holds 2 sequences of 2 tokens x 16 x 4 B
    = 256 B per stream; 1 stream while capturing, 2 in the pruned forward."""
    steps = data_prune_steps(small_layout(), SMALL_REQUEST, ((0, 2), (2, 4)), 1)
    assert steps["capture"].activations == steps["mask"].activations == 256
    assert steps["forward"].activations == 512


def test_streams_shrink_with_the_worker_count() -> None:
    """64 sequences in micro-batches of 4 (16 of them): worker 0 of K holds 16 / K of them."""
    layout = wide_layout(8)
    request = MemoryRequest(nsamples=64, seqlen=128, micro_batch=4, criterion="wanda",
                            parallel="data")
    one_stream = 64 * 128 * 8192 * 2
    for k in (1, 2, 4, 8):
        plan = plan_memory(layout, replace(request, workers=k))
        steps = data_prune_steps(layout, plan.request, [(w.start, w.stop) for w in plan.workers],
                                 0)
        assert steps["forward"].activations == 2 * one_stream // k


def test_a_guest_block_is_counted() -> None:
    """Worker 0 owns blocks 0-1 (100 parameters each) and hosts block 3 (120) as a guest:
    data mode's weights are pipeline mode's plus 120 x 4 B; worker 1's guest is 100 x 4 B."""
    layout = small_layout()
    assert guest_bytes(layout, SMALL_REQUEST, 0, 2) == 480
    assert guest_bytes(layout, SMALL_REQUEST, 2, 4) == 400
    data = plan_memory(layout, SMALL_REQUEST)
    pipeline = plan_memory(layout, replace(SMALL_REQUEST, parallel="pipeline"))
    assert [w.phase for w in data.workers] == [PHASE, PHASE]
    assert [d.weights - p.weights for d, p in zip(data.workers, pipeline.workers, strict=True)] \
        == [480, 400]
    assert "engine.parallel=data" in SMALL_REQUEST.describe()


def test_one_worker_hosts_no_guest() -> None:
    layout = small_layout()
    assert guest_bytes(layout, SMALL_REQUEST, 0, 4) == 0


def sparsegpt_squeeze() -> tuple[ModelLayout, MemoryRequest, int, int]:
    """70B-wide blocks, SparseGPT, one micro-batch of 8 sequences on 8 workers: the worker that
    solves down_proj holds its accumulator and a received copy beside the recorded Hessians,
    more than pipeline mode's one stream saves. Returns (layout, request, pipeline peak, data
    peak)."""
    layout = wide_layout(16)
    request = MemoryRequest(workers=8, nsamples=8, seqlen=2048, micro_batch=8,
                            criterion="sparsegpt")
    pipeline = plan_memory(layout, replace(request, parallel="pipeline")).peak
    data = plan_memory(layout, replace(request, parallel="data")).peak
    return layout, request, pipeline, data


def test_auto_keeps_to_pipeline_mode_where_data_mode_does_not_fit() -> None:
    layout, request, pipeline, data = sparsegpt_squeeze()
    assert data > pipeline
    auto = replace(request, parallel="auto")
    assert choose_parallel(layout, auto, pipeline).request.parallel == "pipeline"
    assert choose_parallel(layout, auto, data).request.parallel == "data"
    assert choose_parallel(layout, replace(auto, workers=1), 10**15).request.parallel \
        == "pipeline"
    # the engine's rule, given the planner's verdict
    assert resolve_parallel("auto", 8, fits=False) == "pipeline"
    assert resolve_parallel("auto", 8, fits=True) == "data"


def test_refusal_names_worker_bytes_limit_and_fixes() -> None:
    layout, request, pipeline, data = sparsegpt_squeeze()
    message = data_refusal("wide", layout, replace(request, parallel="data"), pipeline)
    assert message is not None
    worst = max(plan_memory(layout, replace(request, parallel="data")).workers,
                key=lambda w: w.total)
    assert f"worker {worst.rank} needs {worst.total / 1e9:.1f} GB" in message
    assert f"limit is {pipeline / 1e9:.1f} GB" in message
    for fix in ("engine.parallel=pipeline (fits", "(engine.workers=",
                "engine.micro_batch", "engine.onload=host or disk", "Nothing was loaded"):
        assert fix in message
    assert data_refusal("wide", layout, replace(request, parallel="data"), data) is None


def test_preflight_refuses_data_mode_and_tells_auto(tiny_models: dict[str, Path]) -> None:
    """check_fits on a validated config: engine.parallel=data above the limit is refused with
    data mode's message; auto gets pipeline mode's plan in the same limit."""
    layout, request, pipeline, _ = sparsegpt_squeeze()
    overrides = {"criterion": {"name": "sparsegpt"},
                 "calib": {"nsamples": 8, "seqlen": 2048},
                 "engine": {"workers": 8, "micro_batch": 8, "parallel": "data",
                            "onload": "device"}}
    cfg = tiny_cfg(tiny_models["llama"], None, **overrides)
    with pytest.raises(MemoryBudgetError, match="engine.parallel=data"):
        check_fits(cfg, None, pipeline, dtype="bfloat16", layout=layout)
    auto = replace(cfg, engine=replace(cfg.engine, parallel="auto"))
    assert check_fits(auto, None, pipeline, dtype="bfloat16", layout=layout
                      ).request.parallel == "pipeline"


def test_memory_choice_tells_the_executor(tiny_models: dict[str, Path]) -> None:
    """The run's preflight on the tiny Llama: with the limit at pipeline mode's peak, data mode
    (its guest block and solver statistics) does not fit, so ``data_fits`` is False and the
    executor's engine.parallel=auto keeps to pipeline mode; at data mode's peak it is True."""
    import torch

    from neuroal.models.adapter import ModelAdapter
    from neuroal.models.loading import build_skeleton, load_model_config, resolve_model
    from neuroal.planning.checks import request_from_config
    from neuroal.planning.preflight import memory_choice

    base = tiny_cfg(tiny_models["llama"], None, criterion={"name": "sparsegpt"},
                    engine={"workers": 2, "parallel": "auto", "onload": "device",
                            "device": "cpu"})
    config = load_model_config(resolve_model(base.model.name), False)
    adapter = ModelAdapter(build_skeleton(config, torch.float32))
    layout = ModelLayout.from_adapter(adapter, base.model.name)
    request = request_from_config(base, "float32", "cpu")
    peaks = {m: plan_memory(layout, replace(request, parallel=m)).peak
             for m in ("pipeline", "data")}
    assert peaks["data"] > peaks["pipeline"]
    cpu = torch.device("cpu")
    for mode, fits in (("pipeline", False), ("data", True)):
        cfg = replace(base, engine=replace(base.engine, memory_limit=str(peaks[mode])))
        choice = memory_choice(cfg, config, adapter, cpu, torch.float32)
        assert (choice.onload, choice.data_fits) == ("device", fits)


def test_the_executor_follows_the_verdict(tiny_models: dict[str, Path]) -> None:
    """engine.parallel=auto on 2 local workers: the final prune and the passes run in data mode
    while the memory plan says it fits (the default), in pipeline mode once it does not."""
    import torch

    from neuroal.allocation.plan import SparsityPlan
    from neuroal.engine.executor import LocalExecutor
    from neuroal.models.loading import load_model_config, resolve_model
    from neuroal.runtime.jobs import PruneJob

    source = resolve_model(str(tiny_models["llama"]))
    blocks = int(load_model_config(source, False).num_hidden_layers)
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    modes = []
    for fits in (True, False):
        ex = LocalExecutor(source, blocks, 2, ["cpu"], "float32", 2, parallel="auto")
        ex.data_fits = fits
        entries = [dict.fromkeys(b, 0.5) for b in ex.workers[0].adapter.shape().blocks]
        ex.run_final_prune(SparsityPlan(0.5, "unstructured", entries), PruneJob("wanda"), ids)
        modes.append((ex.parallel, ex._data_pass(8)))  # noqa: SLF001
    assert modes == [("data", True), ("pipeline", False)]


def test_the_ray_executor_follows_the_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Ray executor's mode (no cluster started): auto is data mode unless the memory plan
    said data mode does not fit."""
    from neuroal.engine.ray_executor import RayExecutor

    executor = RayExecutor.__new__(RayExecutor)
    executor._requested, executor.workers = "auto", [None, None]  # noqa: SLF001
    monkeypatch.setattr(executor, "_retrying", lambda attempt: False)  # no experts
    assert executor._prune_mode() == "data"  # noqa: SLF001
    executor.data_fits = False
    assert executor._prune_mode() == "pipeline"  # noqa: SLF001
