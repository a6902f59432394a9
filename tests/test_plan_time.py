"""The time planner (neuroal.planning.walltime): its arithmetic on hand-made numbers, the
committed throughput figures, and `neuroal plan` printing the phases."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from neuroal.allocation import ALLOCATIONS
from neuroal.commands.plan import main as plan_main
from neuroal.planning.layout import input_leaders
from neuroal.planning.walltime import (
    PHASES,
    THROUGHPUT_FILE,
    Throughput,
    TimeRequest,
    Workload,
    busiest_share,
    eval_pass_seconds,
    forward_seconds,
    load_throughputs,
    makespan,
    mask_seconds,
    measured_phases,
    predict,
    prune_seconds,
    routed_bytes,
    search_seconds,
    stats_seconds,
    throughput,
)

REPO = Path(__file__).resolve().parents[1]

# Round figures so that every expected value below can be checked by hand.
TP = Throughput(name="unit", description="unit figures", forward_flops=1000.0, stats_elems=100.0,
                hessian_flops=200.0, select_weights=10.0, solve_flops=1000.0,
                solve_column_s=0.5, load_bytes=100.0, export_bytes=50.0,
                link_bytes={"direct": 10.0, "object-store": 1.0}, link_latency_s=1.0,
                startup_s=7.0)
# 2 blocks, each one (rows 2, cols 4) and one (rows 4, cols 2) linear: 16 weights per block
W = Workload(hidden=4, vocab=10, blocks=(((2, 4), (4, 2)), ((2, 4), (4, 2))), params=50)
BASE = TimeRequest(workers=1, device="unit", executor="ray", dtype="float32", nsamples=4,
                   seqlen=2, save_model=True)


def test_block_terms_by_hand() -> None:
    linears = W.blocks[0]
    # tokens (2 * 16 weights + 2 * T 2 * h 4) / 1000 = 10 * (32 + 16) / 1000
    assert forward_seconds(linears, 4, 10, 2, TP) == pytest.approx(0.48)
    # 10 tokens * (4 + 2) cols / 100; with Hessians + 2 * 10 * (16 + 4) / 200
    assert stats_seconds([4, 2], 10, False, TP) == pytest.approx(0.6)
    assert stats_seconds([4, 2], 10, True, TP) == pytest.approx(0.6 + 2.0)
    assert mask_seconds(2, 4, False, TP) == pytest.approx(0.8)  # 8 weights / 10
    # (2 * 16 + 64) / 1000 + 4 columns * 0.5
    assert mask_seconds(2, 4, True, TP) == pytest.approx(0.096 + 2.0)


def test_shared_inputs_fold_one_statistic() -> None:
    # q/k/v read one tensor (cols 4), o its own (cols 2): two inputs, as the collector folds
    layout = SimpleNamespace(hidden=4, vocab=10, params=50,
                             linears=({"q": (2, 4), "k": (2, 4), "v": (2, 4), "o": (4, 2)},),
                             input_groups=(("q", "k", "v"), ("gate", "up")))
    w = Workload.from_layout(layout)
    assert w.input_cols(0) == (4, 2)
    assert input_leaders(layout.linears[0], layout.input_groups) == ["q", "o"]
    # 10 tokens: (4 + 2) cols / 100 and Hessians 2 * 10 * (16 + 4) / 200, not 4 linears' worth
    req = replace(BASE, nsamples=5, hessian=True)
    one_each = replace(w, inputs=())
    assert prune_seconds(w, req, TP) < prune_seconds(one_each, req, TP)
    assert prune_seconds(one_each, req, TP) - prune_seconds(w, req, TP) == pytest.approx(
        stats_seconds([4, 4], 10, True, TP))


def test_a_shared_input_is_routed_once_to_one_solver() -> None:
    """Linears (4, 4) and (2, 4) read one input (leaders 0, 0), (4, 8) its own; 4 micro-batches
    on 2 workers, Hessians (4 (cols + cols^2) B: 80 and 288). The pair goes to one worker
    (cost 128 + 96 against 768): each worker receives 2 x its input's sums and sends 2 x the
    other's, 2 x 288 + 2 x 80 = 736 B. Routed per linear, the pair's second 80 B would travel
    too: 896 B. Without Hessians the solves are balanced linear by linear, and a pair split
    over two workers sends its input twice."""
    linears = ((4, 4), (2, 4), (4, 8))
    req = replace(BASE, workers=2, mode="data", micro_batch=1, nsamples=4, hessian=True)
    assert routed_bytes(linears, req, (0, 0, 2)) == 736
    assert routed_bytes(linears, req) == 896
    # norms: costs 32, 32, 16 -> workers 0, 1, 0; the pair is split: 16 B sent for each
    norms = replace(req, hessian=False)
    assert routed_bytes(((8, 4), (8, 4), (2, 8)), norms, (0, 0, 2)) == \
        routed_bytes(((8, 4), (8, 4), (2, 8)), norms) == 2 * (16 + 32) + 2 * 16
    layout = SimpleNamespace(hidden=4, vocab=10, params=50,
                             linears=({"q": (4, 4), "k": (2, 4), "o": (4, 8)},),
                             input_groups=(("q", "k"),))
    assert Workload.from_layout(layout).input_leaders(0) == (0, 0, 2)


def test_makespan_longest_first() -> None:
    assert makespan([3.0, 1.0, 2.0], 1) == 6.0
    assert makespan([3.0, 1.0, 2.0], 2) == 3.0  # {3}, {2, 1}
    assert makespan([5.0, 1.0], 4) == 5.0  # one linear cannot be split


def test_prune_pipeline_by_hand_and_hops() -> None:
    # per block: 2 forwards (8 tokens: 0.384 each) + stats 8 * 6 / 100 + masks 0.8 + 0.8
    block = 2 * 0.384 + 0.48 + 1.6
    assert prune_seconds(W, BASE, TP) == pytest.approx(2 * block)
    # pipeline with 2 workers: the same compute plus one hop of the 4 x 2 x 4 fp32 stream
    two = replace(BASE, workers=2)
    assert prune_seconds(W, two, TP) == pytest.approx(2 * block + 128 / 10.0 + 1.0)


def test_data_mode_divides_forward_and_masks_and_pays_transfers() -> None:
    data = replace(BASE, workers=2, mode="data", micro_batch=1)
    # forwards and stats on 2 of 4 sequences (4 tokens); the 2 linears' masks on 2 workers;
    # weights out and back (16 weights x 4 B each way); the norms routed per micro-batch:
    # worker 0 solves the (2, 4) linear (16 B of sums), worker 1 the (4, 2) one (8 B); each
    # holds 2 of the 4 micro-batches, so worker 0 receives 2 x 16 B and sends 2 x 8 B: 48 B
    compute = 2 * 0.192 + 0.24 + 0.8
    comm = 2 * (64 / 10.0 + 1.0) + (48 / 10.0 + 1.0)
    assert routed_bytes(W.blocks[0], data) == 48
    assert prune_seconds(W, data, TP) == pytest.approx(2 * (compute + comm))
    # one micro-batch of 4 sequences: worker 1 has none and receives its linear's 8 B
    assert routed_bytes(W.blocks[0], replace(data, micro_batch=4)) == 8
    # with free transfers data mode on K workers is faster than pipeline mode on K
    fast = replace(TP, link_bytes={"direct": 1e12}, link_latency_s=0.0)
    assert prune_seconds(W, data, fast) < prune_seconds(W, replace(data, mode="pipeline"), fast)


def test_search_pipelines_candidates_with_concurrent_executors() -> None:
    req = replace(BASE, candidates=3, search_samples=1)
    tokens = 2
    fwd = forward_seconds(W.blocks[0], 4, tokens, 2, TP)
    stat = stats_seconds(W.input_cols(0), tokens, False, TP)
    masks = 1.6
    block0, block1 = fwd + stat + masks, 2 * (fwd + stat) + masks  # block 0: shared reference
    one = search_seconds(W, req, TP)
    assert one == pytest.approx((fwd + stat) + 3 * (block0 + block1))
    # 2 ray workers: (C + K - 1) slice times of half the blocks plus a hop of 1 x 2 x 4 fp32
    two = search_seconds(W, replace(req, workers=2), TP)
    assert two == pytest.approx((fwd + stat) + 4 * ((block0 + block1) / 2 + 32 / 10.0 + 1.0))
    # the local executor runs the slices one after the other
    local = search_seconds(W, replace(req, workers=2, executor="local"), TP)
    assert local == pytest.approx((fwd + stat) + 3 * (block0 + block1 + 32 / 10.0 + 1.0))
    assert search_seconds(W, BASE, TP) == 0.0


def test_eval_load_export_and_total() -> None:
    req = replace(BASE, eval_windows=3, eval_seqlen=2, eval_passes=2, compare=1)
    # 6 tokens: blocks 2 x 6 x 48 / 1000, head 6 x (2 x 10 x 4 / 1000 + 10 / 100)
    one_pass = 2 * 6 * 48 / 1000 + 6 * (0.08 + 0.1)
    assert eval_pass_seconds(W, req, TP) == pytest.approx(one_pass)
    got = predict(W, req, TP)
    assert got["load"] == pytest.approx(7.0 + 2 * 50 * 4 / 100.0)  # startup + 2 loads
    assert got["prune"] == pytest.approx(2 * prune_seconds(W, req, TP))  # run + compare
    assert got["evaluation"] == pytest.approx(3 * one_pass)  # dense, pruned, compare
    assert got["export"] == pytest.approx(50 * 4 / 50.0)
    assert got["total"] == pytest.approx(sum(got[p] for p in PHASES))
    assert predict(W, replace(req, save_model=False), TP)["export"] == 0.0
    # data mode (dist ranks): the busiest of 2 workers evaluates 2 of 3 windows (micro-batches
    # of 1), after the weights arrive
    data = replace(req, workers=2, mode="data", executor="dist", micro_batch=1)
    assert eval_pass_seconds(W, data, TP) == pytest.approx(
        2 * 4 * 48 / 1000 + 4 * 0.18 + 128 / 10.0 + 1.0)
    # with micro-batches of 2 the busiest worker has 2 windows as well, of 3 with one of 4
    assert eval_pass_seconds(W, replace(data, micro_batch=2), TP) == pytest.approx(
        eval_pass_seconds(W, data, TP))
    assert eval_pass_seconds(W, replace(data, micro_batch=4), TP) == pytest.approx(
        one_pass + 128 / 10.0 + 1.0)
    # under Ray both modes pipeline the 3 chunks through 2 slices of 1 block: (3 + 1) stages
    # of one block's and the head's share of a chunk, plus a hop of 1 window (2 x 4 fp32)
    ray = replace(req, workers=2, micro_batch=1)
    stage = (2 * 6 * 48 / 1000 / 2 + 6 * 0.18) / 3 + 32 / 10.0 + 1.0
    assert eval_pass_seconds(W, ray, TP) == pytest.approx(4 * stage)
    assert eval_pass_seconds(W, replace(ray, mode="data"), TP) == pytest.approx(4 * stage)


def test_busiest_share_deals_whole_micro_batches() -> None:
    assert busiest_share(128, 3, 8) == 48  # 16 micro-batches: 6, 5, 5
    assert busiest_share(128, 5, 8) == 32
    assert busiest_share(7, 2, 2) == 4  # [0, 1], [4, 5] against [2, 3], [6]
    assert busiest_share(7, 4, 2) == 2 and busiest_share(4, 2, 8) == 4
    assert busiest_share(0, 2, 8) == 0


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="mode 'tensor'.*pipeline, data"):
        predict(W, replace(BASE, mode="tensor"), TP)
    with pytest.raises(ValueError, match="workers=0"):
        predict(W, replace(BASE, workers=0), TP)
    with pytest.raises(ValueError, match="device class 'tpu'.*h100"):
        throughput("tpu")
    with pytest.raises(ValueError, match="transport 'rdma'"):
        TP.link("rdma")


def test_neuroal_candidate_counts() -> None:
    policy = ALLOCATIONS.get("neuroal")
    quick = {"block_grid": [0.05, 0.1, 0.15, 0.2], "row_grid": [0.0, 0.05, 0.1, 0.15]}
    assert policy.candidate_count(quick, "wanda", 0.6) == 8
    assert policy.candidate_count(quick, "sparsegpt", 0.6) == 4  # no row step
    assert policy.candidate_count({}, "wanda", 0.7) == 14 + 15  # faithful grids
    assert policy.candidate_count({"steps": "block", "grid_refine": 1}, "wanda", 0.7) == 16
    assert getattr(ALLOCATIONS.get("uniform"), "candidate_count", None) is None


def test_measured_phases_from_report_timings() -> None:
    timings = {"resolve": 1.0, "data": 2.0, "load": 3.0, "calibrate": 0.5, "allocate": 10.0,
               "prune": 4.0, "eval_dense": 5.0, "eval_sparse": 5.0, "load[uniform]": 3.0,
               "prune[uniform]": 4.0, "eval_sparse[uniform]": 5.0, "eval_tasks_dense": 9.0,
               "export": 2.0, "total": 99.0, "search_utilisation": 0.9}
    got = measured_phases(timings)
    assert got == {"load": 9.5, "search": 10.0, "prune": 8.0, "evaluation": 15.0,
                   "export": 2.0, "total": 44.5}


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_plan_time",
                                                  REPO / "launch" / "bench_plan_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_figures_have_provenance_and_gpu_ones_are_derived() -> None:
    known = load_throughputs()
    assert {"cpu", "h100", "h200"} <= set(known)
    numeric = ("forward_flops", "stats_elems", "hessian_flops", "select_weights", "solve_flops",
               "load_bytes", "export_bytes")
    for tp in known.values():
        assert all(getattr(tp, k) > 0 for k in numeric), tp.name
        assert set(numeric) <= set(tp.provenance), tp.name
    data = json.loads(THROUGHPUT_FILE.read_text())
    derived = json.loads(json.dumps(_bench_module().gpu_entries()))
    for name in ("h100", "h200"):
        assert data[name] == derived[name], f"rerun: python launch/bench_plan_time.py gpu ({name})"


def test_70b_json_is_the_current_prediction_and_the_doc_shows_it() -> None:
    """benchmarks/plan_time_70b.json is what the time model predicts now (rerun `python
    launch/bench_plan_time.py predict --json benchmarks/plan_time_70b.json` after changing
    it), and docs/planning.md's table is generated from that JSON."""
    committed = json.loads((REPO / "benchmarks" / "plan_time_70b.json").read_text())
    fresh = json.loads(json.dumps(_bench_module().predict_70b(), default=str))
    assert [(r["run"], r["workers"], r["mode"]) for r in committed["rows"]] == \
        [(r["run"], r["workers"], r["mode"]) for r in fresh["rows"]]
    for old, new in zip(committed["rows"], fresh["rows"], strict=True):
        assert old["seconds"] == pytest.approx(new["seconds"], rel=1e-9)
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "readme_figures.py"), "planning",
                           str(REPO / "benchmarks" / "plan_time_70b.json"), "--readme",
                           str(REPO / "docs" / "planning.md"), "--check"])
    assert proc.returncode == 0, "rerun launch/readme_figures.py planning ... --readme docs/planning.md"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "readme_figures.py"), "plancheck",
                           str(REPO / "benchmarks" / "plan_time.json"), "--readme",
                           str(REPO / "docs" / "planning.md"), "--check"])
    assert proc.returncode == 0, "rerun launch/readme_figures.py plancheck ... --readme docs/planning.md"


def test_planning_table_is_generated(tmp_path: Path) -> None:
    """The generator writes every row between the markers and a stale table fails --check."""
    figures_spec = importlib.util.spec_from_file_location(
        "readme_figures", REPO / "launch" / "readme_figures.py")
    figures = importlib.util.module_from_spec(figures_spec)
    figures_spec.loader.exec_module(figures)
    secs = {p: 60.0 for p in (*PHASES, "total")}
    rows = [{"run": "R", "workers": k, "mode": m, "seconds": {**secs, "total": t}}
            for k, m, t in ((1, "pipeline", 800.0), (1, "data", 800.0), (8, "pipeline", 400.0),
                            (8, "data", 100.0))]
    text = figures.planning_text({"device": "h100", "eval_windows": 166, "rows": rows})
    assert "| R | 8 x H100 | data | 60 s | 60 s | 60 s | 60 s | 60 s | 100 s |" in text
    assert "R 4.0x faster in total, 8.0x against 1 GPU" in text
    doc = tmp_path / "planning.md"
    doc.write_text("a\n<!-- planning:begin -->\nold\n<!-- planning:end -->\n")
    data = tmp_path / "p.json"
    data.write_text(json.dumps({"device": "h100", "eval_windows": 166, "rows": rows}))
    cmd = [sys.executable, str(REPO / "launch" / "readme_figures.py"), "planning", str(data),
           "--readme", str(doc)]
    assert subprocess.run([*cmd, "--check"], capture_output=True).returncode == 1
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert subprocess.run([*cmd, "--check"], capture_output=True).returncode == 0


def test_plan_prints_every_phase(capsys: pytest.CaptureFixture[str]) -> None:
    code = plan_main(["--model", "llama-2-7b", "--workers", "2", "--device-class", "h100",
                      "--criterion", "sparsegpt", "--eval-windows", "8", "--parallel", "auto"])
    out = capsys.readouterr().out
    assert code == 0
    assert "predicted wall time on 2 x h100" in out
    for phase in (*PHASES, "total"):
        assert f"  {phase}" in out
    assert "engine.parallel=auto chose" in out
    code = plan_main(["--model", "llama-2-7b", "--workers", "2", "--device-type", "cpu",
                      "--gpu-memory", "64GB", "--parallel", "pipeline", "--json", "-"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["time"]["mode"] == "pipeline" and summary["time"]["device_class"] == "cpu"
    assert set(PHASES) <= set(summary["time"]["seconds"]["pipeline"])
