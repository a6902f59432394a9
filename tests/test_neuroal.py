"""NeuroAL through the real coordinator and executor on tiny models."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model, tiny_cfg
from torch import nn
from transformers import AutoModelForCausalLM

from neuroal.allocation.search import Candidate, Outcome, run_phase
from neuroal.engine.executor import LocalExecutor
from neuroal.engine.worker import CandidateJob
from neuroal.models.loading import resolve_model
from neuroal.pipeline import run

SMALL_GRIDS = {"name": "neuroal", "block_grid": [0.05, 0.1, 0.2], "row_grid": [0.0, 0.05, 0.1]}


def test_coordinator_picks_first_minimum_and_keeps_trail() -> None:
    scores = {0.01: 3.0, 0.02: 1.0, 0.05: 2.0, 0.1: 1.0}
    seen: list[float] = []

    def stub(cands: list[Candidate]) -> list[Outcome]:
        seen.extend(c.value for c in cands)
        return [Outcome(scores[c.value]) for c in cands]

    result = run_phase("block", [Candidate("block", v, []) for v in scores], stub)
    assert result.best.value == 0.02  # 0.1 ties with it but comes later
    assert seen == list(scores)
    assert [e["value"] for e in result.trail] == list(scores)
    assert [e["chosen"] for e in result.trail] == [False, True, False, False]


def _brute_force_block0(model_dir: Path, ids: torch.Tensor, ratio: float) -> dict[str, float]:
    """NA of every linear of block 0 by explicit loops (neuroal.md §A4), Wanda row masks."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    block = model.base_model.layers[0]
    captured = {}

    def grab(_m, args, kwargs):
        captured["x"], captured["kw"] = args[0], kwargs
        raise RuntimeError("stop")

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    with pytest.raises(RuntimeError, match="stop"):
        model(input_ids=ids, use_cache=False)
    handle.remove()

    def input_norms(blk: nn.Module) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        hooks = []
        for name, lin in blk.named_modules():
            if isinstance(lin, nn.Linear):
                def hook(_m, args, _o, name=name):
                    x = args[0].float()
                    sums[name] = sums.get(name, 0) + (x ** 2).sum(dim=(0, 1))
                hooks.append(lin.register_forward_hook(hook))
        with torch.no_grad():
            blk(captured["x"], **captured["kw"])
        for h in hooks:
            h.remove()
        return {n: (v / ids.shape[0]).sqrt() for n, v in sums.items()}

    dense = input_norms(block)
    sparse_block = copy.deepcopy(block)
    with torch.no_grad():
        for name, lin in sparse_block.named_modules():
            if isinstance(lin, nn.Linear):
                score = lin.weight.abs() * dense[name]
                k = int(lin.in_features * ratio)
                for r in range(score.shape[0]):
                    order = sorted(range(score.shape[1]), key=lambda j: (float(score[r, j]), j))
                    lin.weight[r, order[:k]] = 0
    sparse = input_norms(sparse_block)
    out = {}
    for name in dense:
        d = [float(v) for v in dense[name]]
        s = [float(v) for v in sparse[name]]
        sd, ss = sum(d), sum(s)
        out[name] = sum((a / sd - b / ss) ** 2 for a, b in zip(d, s, strict=True)) ** 0.5 / len(d)
    return out


def test_alignment_matches_brute_force(tiny_models: dict[str, Path]) -> None:
    model_dir = tiny_models["llama"]
    executor = LocalExecutor(resolve_model(str(model_dir)), 2, 1, ["cpu"], "float32", 2)
    ids = torch.randint(3, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    ratios = [{n: 0.6 for n in blk} for blk in executor.workers[0].adapter.shape().blocks]
    result = executor.evaluate_candidates(ids, [ratios], CandidateJob("wanda"))[0]
    expected = _brute_force_block0(model_dir, ids, 0.6)
    assert set(result[0].na) == set(expected)
    for name, value in expected.items():
        assert result[0].na[name] == pytest.approx(value, rel=1e-4, abs=1e-9), name
    for blk in result:  # neuroal.md §A13: q/k/v see identical inputs in both passes
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            assert blk.na[name] == 0.0 and torch.count_nonzero(blk.delta[name]) == 0
    assert result[0].na["self_attn.o_proj"] > 0


def test_neuroal_plan_gqa_rows_and_target(tiny_models: dict[str, Path],
                                          small_text: Path) -> None:
    cfg = tiny_cfg(tiny_models["llama"], None, calib={"source": f"text:{small_text}"},
                   sparsity=0.6, allocation=SMALL_GRIDS)
    result = run(cfg, keep_executor=True)
    plan = result.plan
    assert plan.granularity == "row"
    block0 = plan.ratios[0]
    assert isinstance(block0["self_attn.q_proj"], torch.Tensor)  # 64 rows = o_proj input
    assert len(set(block0["self_attn.q_proj"].tolist())) > 1
    # GQA guard / no consumer / last block: uniform rows, but as per-row vectors so that the
    # reference's `neuron` rule applies to them too (neuroal.md §A9)
    fallbacks = [block0[n] for n in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
    for vec in fallbacks + list(plan.ratios[-1].values()):
        assert isinstance(vec, torch.Tensor) and len(set(vec.tolist())) == 1
    trail = plan.trail["candidates"]
    assert [e["value"] for e in trail] == [0.05, 0.1, 0.2, 0.0, 0.05, 0.1]
    assert result.report["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert plan.planned_global(result.executor.workers[0].adapter.shape()) == \
        pytest.approx(0.6, abs=1e-6)


def test_search_is_identical_with_one_and_two_workers(tokenizer_dir: Path, tmp_path: Path,
                                                      small_text: Path) -> None:
    model_dir = save_tiny_model("llama", tmp_path / "l4", tokenizer_dir, num_layers=4)
    outcomes = {}
    for workers in (1, 2):
        cfg = tiny_cfg(model_dir, None, calib={"source": f"text:{small_text}"}, sparsity=0.7,
                       allocation=SMALL_GRIDS, engine={"workers": workers})
        result = run(cfg, keep_executor=True)
        outcomes[workers] = (result.plan, result.executor.masks())
    (p1, m1), (p2, m2) = outcomes[1], outcomes[2]
    assert p1.policy["lambda_block"] == p2.policy["lambda_block"]
    assert p1.policy["lambda_row"] == p2.policy["lambda_row"]
    assert [e["score"] for e in p1.trail["candidates"]] == [e["score"] for e in p2.trail["candidates"]]
    for name in m1:
        assert torch.equal(m1[name], m2[name]), name


def _executor(model_dir: Path, workers: int = 1) -> LocalExecutor:
    return LocalExecutor(resolve_model(str(model_dir)), 2, workers, ["cpu"], "float32", 2)


def test_shared_block0_statistics_are_exact(tiny_models: dict[str, Path]) -> None:
    """§B5: reusing block 0's dense statistics across candidates changes no bit."""
    executor = _executor(tiny_models["qwen2"])
    ids = torch.randint(3, 320, (3, 16), generator=torch.Generator().manual_seed(2))
    worker = executor.workers[0]
    ratios = {b: {n: 0.5 for n in blk} for b, blk in enumerate(worker.adapter.shape().blocks)}
    embedded = worker.embed(ids)
    _, fresh = worker.eval_candidate(embedded, ratios, CandidateJob("wanda"))
    shared = executor.dense_reference(embedded, CandidateJob("wanda"), "local")
    _, reused = worker.eval_candidate(embedded, ratios, CandidateJob("wanda"), shared)
    for b in fresh:
        assert fresh[b].na == reused[b].na
        for name in fresh[b].delta:
            assert torch.equal(fresh[b].delta[name], reused[b].delta[name])


def test_global_reference_stream(tiny_models: dict[str, Path]) -> None:
    """§B4: alignment against the dense model; q/k/v terms become non-zero after block 0."""
    executor = _executor(tiny_models["llama"])
    ids = torch.randint(3, 320, (3, 16), generator=torch.Generator().manual_seed(3))
    ratios = [{n: 0.7 for n in blk} for blk in executor.workers[0].adapter.shape().blocks]
    job = CandidateJob("wanda")
    local = executor.evaluate_candidates(ids, [ratios], job, "local")[0]
    glob = executor.evaluate_candidates(ids, [ratios], job, "global")[0]
    assert local[0].na == glob[0].na  # block 0 sees the same inputs either way
    assert glob[1].na["self_attn.q_proj"] > 0 and local[1].na["self_attn.q_proj"] == 0


@pytest.mark.parametrize("options", [
    {"base": "alpha", "base_options": {"epsilon": 0.1}, "include_uniform": True},
    {"reference_stream": "global", "steps": "block"},
    {"grid_refine": 1, "steps": "block"},
])
def test_options_run_and_keep_the_target(options: dict, tiny_models: dict[str, Path],
                                         small_text: Path) -> None:
    cfg = tiny_cfg(tiny_models["llama"], None, calib={"source": f"text:{small_text}"},
                   sparsity=0.6, allocation={**SMALL_GRIDS, **options})
    result = run(cfg, keep_executor=True)
    shape = result.executor.workers[0].adapter.shape()
    assert result.plan.planned_global(shape) == pytest.approx(0.6, abs=1e-6)
    trail = result.plan.trail["candidates"]
    if options.get("grid_refine"):
        values = [e["value"] for e in trail if e["phase"] == "block"]
        assert len(values) > 3 and set(values) - {0.05, 0.1, 0.2}
    if options.get("base"):
        assert trail[0]["value"] == 0.0


def test_base_plan_with_zero_ramp_is_the_base_plan(tiny_models: dict[str, Path],
                                                   small_text: Path) -> None:
    """NeuroAL on top of OWL: the lambda = 0 candidate is exactly OWL's plan."""
    common = dict(calib={"source": f"text:{small_text}"}, sparsity=0.6)
    owl = run(tiny_cfg(tiny_models["llama"], None, allocation={"name": "owl", "lam": 0.05},
                       **common)).plan
    neuro = run(tiny_cfg(tiny_models["llama"], None, allocation={
        "name": "neuroal", "base": "owl", "base_options": {"lam": 0.05}, "steps": "block",
        "block_grid": [0.0]}, **common)).plan
    assert neuro.ratios == owl.ratios
    assert len({r for blk in owl.ratios for r in blk.values()}) > 1  # really non-uniform


def test_grid_refine_breaks_ties_by_the_smaller_value() -> None:
    """A refined midpoint that ties with the grid winner wins when it is smaller
    (§A8: ties go to the smaller lambda), although it was evaluated later."""
    from neuroal.allocation.neuroal import refine

    scores = {0.1: 3.0, 0.2: 1.0, 0.3: 2.0, 0.15: 1.0, 0.25: 5.0}

    def stub(cands: list[Candidate]) -> list[Outcome]:
        return [Outcome(scores[round(c.value, 6)]) for c in cands]

    def make(v: float) -> Candidate:
        return Candidate("block", v, [])

    first = run_phase("block", [make(v) for v in (0.1, 0.2, 0.3)], stub)
    assert first.best.value == 0.2
    refined = refine(first, make, 1, stub)
    assert refined.best.value == pytest.approx(0.15)
    assert [e["value"] for e in refined.trail] == pytest.approx([0.1, 0.15, 0.2, 0.25, 0.3])


def test_search_masks_follow_mask_exact_count(tiny_models: dict[str, Path]) -> None:
    """``mask.exact_count=false`` reaches the search candidates (the policy's job
    and the worker's masks), not only the final prune."""
    from neuroal.allocation.base import PlanRequest
    from neuroal.allocation.neuroal import NeuroALPolicy

    executor = _executor(tiny_models["llama"])
    shape = executor.workers[0].adapter.shape()
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(5))
    jobs: list[CandidateJob] = []

    class Spy:
        def evaluate_candidates(self, ids, ratios, job, stream, **kwargs):
            jobs.append(job)
            return executor.evaluate_candidates(ids, ratios, job, stream, **kwargs)

    request = PlanRequest(shape, 0.6, "unstructured", (0.01, 0.99),
                          options={"steps": "block", "block_grid": [0.1]}, executor=Spy(),
                          calibration=ids, exact_count=False)
    loose = NeuroALPolicy().plan(request)
    assert jobs and all(not job.exact_count for job in jobs)
    exact = NeuroALPolicy().plan(replace(request, exact_count=True))
    assert jobs[-1].exact_count
    # the inclusive threshold prunes at least one more weight per row: another objective
    assert loose.trail["candidates"][0]["score"] != exact.trail["candidates"][0]["score"]


@pytest.mark.parametrize(("weights", "stat"), [("reference", "sq_norm_windowed"),
                                               ("uniform", "sq_norm")])
def test_sparsegpt_search_weights_windows_like_the_reference(weights: str, stat: str,
                                                              tiny_models: dict[str, Path]) -> None:
    """Faithful NeuroAL + SparseGPT measures alignment with the reference wrapper's
    1/k-weighted norm (``window_weights: uniform`` opts out); both stay exact on the q/k/v
    inputs and the objective differs between the two."""
    from neuroal.allocation.base import PlanRequest
    from neuroal.allocation.neuroal import NeuroALPolicy

    executor = _executor(tiny_models["llama"])
    shape = executor.workers[0].adapter.shape()
    ids = torch.randint(3, 320, (3, 16), generator=torch.Generator().manual_seed(6))
    jobs: list[CandidateJob] = []
    results: list = []

    class Spy:
        def evaluate_candidates(self, ids, ratios, job, stream, **kwargs):
            jobs.append(job)
            results.append(executor.evaluate_candidates(ids, ratios, job, stream, **kwargs))
            return results[-1]

    request = PlanRequest(shape, 0.6, "unstructured", (0.01, 0.99), criterion="sparsegpt",
                          options={"steps": "block", "block_grid": [0.1],
                                   "window_weights": weights}, executor=Spy(), calibration=ids)
    NeuroALPolicy().plan(request)
    assert {job.alignment_stat for job in jobs} == {stat}
    other = "uniform" if weights == "reference" else "reference"
    NeuroALPolicy().plan(replace(request, options={**request.options, "window_weights": other}))
    first, second = results[0][0][0], results[-1][0][0]
    assert first.na["self_attn.q_proj"] == second.na["self_attn.q_proj"] == 0.0
    assert first.na["self_attn.o_proj"] != second.na["self_attn.o_proj"]
