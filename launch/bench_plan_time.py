#!/usr/bin/env python
"""The time planner against real runs: measure the CPU throughput figures, then check.

    PYTHONPATH=. python launch/bench_plan_time.py calibrate   # CPU figures -> planning/throughput.json
    PYTHONPATH=. python launch/bench_plan_time.py check       # 3 SmolLM2 runs vs the prediction
    PYTHONPATH=. python launch/bench_plan_time.py gpu         # H100/H200 figures -> throughput.json
    PYTHONPATH=. python launch/bench_plan_time.py predict     # Llama-2-70B table -> JSON
    python launch/bench.py plan-time --json benchmarks/plan_time.json   # = check

``calibrate`` times the engine's own pieces on SmolLM2-135M in fp32 on this CPU, in-process: the
load of the model, block forwards, statistics forwards (Wanda norms, SparseGPT Hessians), the
masks of a block (Wanda selection, SparseGPT solve), the per-column cost of SparseGPT's loop on a
thin matrix, a shard write, and the resolve + data preparation; then turns them into the
throughput figures of :mod:`neuroal.planning.walltime` and writes the ``cpu`` entry with its provenance.

``check`` runs, each as its own ``launch/prune.py`` process on the same CPU: the quickstart
(``configs/smollm2/quickstart.yaml``: Wanda + NeuroAL search, a uniform comparison, zero-shot
tasks, export) and a uniform Wanda and a uniform SparseGPT prune with 1 worker; it compares the
measured phases (``report.json`` timings) with the prediction from the config and writes one row
per run with every phase's relative error. The zero-shot tasks are outside the model and are
listed apart. Runs whose ``report.json`` exists under ``--out`` are reused with ``--reuse``.

``predict`` writes the Llama-2-70B predictions (1 and 8 H100, Wanda + NeuroAL and SparseGPT,
pipeline and data mode) that ``launch/readme_figures.py planning`` turns into docs/planning.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
THROUGHPUT = REPO / "neuroal" / "planning" / "throughput.json"
TOLERANCE = 0.30
MIN_SECONDS = 5.0
"""Phases shorter than this, predicted and measured, are not compared (a relative error of a
0.1 s phase means nothing)."""
CHECK_RUNS = [
    # (label, config, overrides); the quickstart as `make quickstart` runs it
    ("quickstart", "configs/smollm2/quickstart.yaml", []),
    ("wanda-uniform-60", "configs/smollm2/wanda-uniform-50.yaml",
     ["sparsity=0.6", "calib.nsamples=8", "eval.max_windows=4", "output.save_model=false"]),
    ("sparsegpt-uniform-60", "configs/smollm2/sparsegpt-uniform-70.yaml",
     ["sparsity=0.6", "calib.nsamples=8", "eval.max_windows=4", "output.save_model=false"]),
]
H100_70B = [
    # (label, config, overrides): the paper protocol's configs at 70 %
    ("Wanda + NeuroAL", "configs/llama-2-70b/wanda-neuroal-70.yaml", []),
    ("SparseGPT (uniform)", "configs/llama-2-70b/wanda-uniform-50.yaml",
     ["criterion.name=sparsegpt", "sparsity=0.7"]),
]
WIKITEXT2_TEST_WINDOWS_2048 = 166
"""Perplexity windows of 2048 tokens in the WikiText-2 test split with the Llama-2 tokenizer
(about 341k tokens), the evaluation of the paper protocol (``eval.max_windows: null``)."""


def _env() -> dict[str, str]:
    """This checkout's neuroal first on the path, no progress bars."""
    return {**os.environ, "NEUROAL_PROGRESS": "0", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def loadavg() -> float:
    """The 1-minute load average (the machine is shared; recorded beside every timing)."""
    return os.getloadavg()[0]


# --------------------------------------------------------------------------- calibrate


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def _median(repeats: int, fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """``fn(*args, **kwargs)`` run ``repeats`` times: the median seconds and the last result
    (one slow run on a shared machine does not move the figure)."""
    runs = [_timed(fn, *args, **kwargs) for _ in range(max(1, repeats))]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def _thin_stats(cols: int, rows: int = 8) -> tuple[Any, Any]:
    """A ``(rows, cols)`` weight and its SparseGPT statistics on random inputs."""
    import torch

    from neuroal.capture.collector import StatsCollector
    from neuroal.criteria import CRITERIA

    torch.manual_seed(0)
    linear = torch.nn.Linear(cols, rows, bias=False)
    collector = StatsCollector({"x": linear}, CRITERIA.get("sparsegpt").needs)
    with collector.attached(), torch.no_grad():
        collector.begin_batch(1)
        linear(torch.randn(1, 2 * cols, cols))
        collector.end_batch()
    return linear.weight.data, collector.stats()["x"]


def _solve_fit(cases: list[tuple[Any, Any]], repeats: int) -> tuple[float, float, int]:
    """SparseGPT's two constants from timed solves: each case ``(weight (rows, cols), its
    statistics)`` is pruned (a copy, the median of ``repeats``) and ``seconds = flops /
    solve_flops + cols * solve_column_s`` with ``flops = rows cols^2 + cols^3`` is fitted by
    least squares. Returns ``(solve_flops, solve_column_s, cases)``."""
    import torch

    from neuroal.criteria import CRITERIA
    from neuroal.criteria.base import LayerTarget

    criterion = CRITERIA.get("sparsegpt")
    rows_x, times = [], []
    for weight, stats in cases:
        r, c = weight.shape
        seconds, _ = _median(repeats, lambda w=weight, st=stats: criterion.prune(
            w.clone(), st, LayerTarget(ratio=0.6), dict(criterion.defaults)))
        rows_x.append([float(r * c * c + c ** 3), float(c)])
        times.append(seconds)
    x = torch.tensor(rows_x, dtype=torch.float64)
    y = torch.tensor(times, dtype=torch.float64)
    scale = x.abs().max(dim=0).values  # conditioned columns
    coef = torch.linalg.lstsq(x / scale, y.unsqueeze(1)).solution.squeeze(1) / scale
    per_flop, per_column = float(coef[0]), float(coef[1])
    if per_flop <= 0 or per_column < 0:
        raise SystemExit(f"SparseGPT fit failed (seconds per flop {per_flop:.3g}, per column "
                         f"{per_column:.3g}): rerun on an idle machine")
    return 1.0 / per_flop, per_column, len(cases)


def calibrate(opts: argparse.Namespace) -> dict[str, Any]:
    """Measure the CPU figures on SmolLM2 (fp32) and write the ``cpu`` entry."""
    import torch

    from neuroal.config.build import build_config
    from neuroal.engine.executor import LocalExecutor
    from neuroal.engine.worker import PruneJob
    from neuroal.pipeline import prepare
    from neuroal.planning import layout_of
    from neuroal.planning.walltime import DTYPE_BYTES, Workload, stream_bytes  # noqa: F401
    from neuroal.runtime.process import Timings

    load0 = loadavg()
    cfg = build_config({"model": {"name": opts.model, "dtype": "float32"}, "sparsity": 0.6,
                        "calib": {"nsamples": opts.nsamples, "seqlen": opts.seqlen},
                        "eval": {"datasets": ["wikitext2"], "max_windows": 4},
                        "engine": {"device": "cpu"}, "output": {"save_model": False}})
    timings = Timings()
    prep = prepare(cfg, timings)
    startup = timings.phases["resolve"] + timings.phases["data"]
    w = Workload.from_layout(layout_of(opts.model))
    load_s, ex = _timed(LocalExecutor, prep.source, w.num_blocks, 1, ["cpu"], "float32",
                        cfg.engine.micro_batch)
    worker = ex.workers[0]
    n, seqlen = opts.nsamples, opts.seqlen
    tokens = n * seqlen
    stream = worker.embed(torch.randint(0, w.vocab, (n, seqlen), generator=torch.Generator()
                                        .manual_seed(0)))
    blocks = list(range(opts.blocks))
    reps = opts.repeats
    fwd = stats_w = stats_h = select = 0.0
    st_by_block: dict[int, Any] = {}
    for i in blocks:
        fwd += _median(reps, worker.forward_blocks, stream, [i])[0]
        dt, (st_w, order_w) = _median(reps, worker.collect_stats, i, stream, PruneJob("wanda"))
        stats_w += dt
        dt, (st_h, order_h) = _median(reps, worker.collect_stats, i, stream, PruneJob("sparsegpt"))
        stats_h += dt
        st_by_block[i] = st_h
        entries = {name: 0.6 for name in order_w}
        select += _median(reps, worker.prune_block, i, st_w, entries, PruneJob("wanda"),
                          order_w)[0]
    cases = [(lin.weight.data, st_by_block[i][name]) for i in blocks
             for name, lin in worker.adapter.prunable_linears(worker.adapter.blocks[i]).items()]
    cases += [_thin_stats(cols) for cols in (1024, 2048)]
    solve_flops, column_s, solve_cases = _solve_fit(cases, reps)
    with tempfile.TemporaryDirectory(prefix="neuroal-plan-time-") as tmp:
        write_s, files = _timed(worker.write_shards, tmp, "float32", 2 * 10 ** 9)
    written = sum(f["bytes"] for f in files)
    ex.shutdown()

    linears = [w.blocks[i] for i in blocks]
    inputs = [w.input_cols(i) for i in blocks]  # one statistic per distinct input, as folded
    flops = sum(tokens * (2 * sum(r * c for r, c in b) + 2 * seqlen * w.hidden) for b in linears)
    elems = sum(tokens * sum(cols) for cols in inputs)
    hflops = sum(2 * tokens * sum(c * c for c in cols) for cols in inputs)
    weights = sum(r * c for b in linears for r, c in b)
    floor = 0.05  # a statistics term below 5 % of the forward is noise: clamp there
    entry = {
        "description": f"this project's shared {os.cpu_count()}-core CPU, fp32, "
                       f"{torch.get_num_threads()} threads",
        "forward_flops": flops / fwd,
        "stats_elems": elems / max(stats_w - fwd, floor * fwd),
        "hessian_flops": hflops / max(stats_h - fwd, floor * fwd),
        "select_weights": weights / select,
        "solve_flops": solve_flops,
        "solve_column_s": column_s,
        "load_bytes": w.params * DTYPE_BYTES["float32"] / load_s,
        "export_bytes": written / write_s,
        "link_bytes": {"direct": 512 * 2 ** 20 / 0.64, "object-store": 512 * 2 ** 20 / 7.6},
        "link_latency_s": 0.0,
        "startup_s": startup,
    }
    stamp = datetime.date.today().isoformat()
    entry["provenance"] = {
        "measured": f"python launch/bench_plan_time.py calibrate "
                    f"--nsamples {n} --seqlen {seqlen} --blocks {opts.blocks} --repeats {reps} ({stamp}; "
                    f"SmolLM2-135M fp32, blocks {blocks}, {n} x {seqlen} tokens, the median of "
                    f"{reps} runs per step; 1-min load average "
                    f"{load0:.1f} before, {loadavg():.1f} after: the machine is shared)",
        "forward_flops": f"block forward {fwd / len(blocks) * 1e3:.0f} ms per block",
        "stats_elems": "Wanda statistics forward minus the plain forward",
        "hessian_flops": "SparseGPT statistics forward (Hessians) minus the plain forward",
        "select_weights": "Worker.prune_block with Wanda on the same blocks",
        "solve_flops": f"least-squares fit of seconds = (rows cols^2 + cols^3) / solve_flops "
                       f"+ cols solve_column_s to {solve_cases} timed SparseGPT solves (every "
                       "linear of the blocks above, after Wanda, and thin 8 x 1024, 8 x 2048 "
                       "matrices)",
        "solve_column_s": "the same fit (the per-column loop's fixed cost)",
        "load_bytes": f"LocalExecutor load of SmolLM2 (GGUF, dequantised to fp32): "
                      f"{load_s:.1f} s for {w.params * 4 / 1e9:.2f} GB",
        "export_bytes": f"Worker.write_shards, {written / 1e9:.2f} GB in {write_s:.1f} s",
        "link_bytes": "the measurement on this CPU: one 512 MiB hop in-process 0.64 s "
                      "(direct), actor to actor through Ray's object store 7.6 s",
        "startup_s": "resolve + data phases (tokenizer, calibration and evaluation windows)",
    }
    data = json.loads(THROUGHPUT.read_text()) if THROUGHPUT.exists() else {}
    data["cpu"] = entry
    THROUGHPUT.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(entry, indent=1))
    return entry


# --------------------------------------------------------------------------- GPU figures

README_H200 = {"tokens": 8 * 2048, "seqlen": 2048, "forward_ms": 48.6, "wanda_prune_ms": 199.2,
               "disk_block_ms": 175.1}
"""The README's H200 block timings (``PYTHONPATH=. bash launch/gpu_check.sh``, torch 2.11 + CUDA
13.0): one Llama-2-70B-width block in bf16, 8 x 2048 tokens, ``engine.onload=device`` forward
and Wanda prune ms per block; ``disk`` onloading's block copy (a bf16 block read from the
safetensors file)."""
SPEC = {"bf16_flops": 989e12, "fp32_flops": 67e12, "h200_bytes": 4.8e12, "h100_bytes": 3.35e12}
"""Public datasheet figures of the H100 SXM and H200: the same tensor-core peaks (dense bf16,
fp32 without TF32), HBM bandwidth 3.35 vs 4.8 TB/s."""
ASSUMED = {"stats_bytes_per_elem": 10, "solve_column_s": 40e-6, "export_bytes": 2e9,
           "direct_bytes": 150e9, "object_store_bytes": 80 * 4 * 2 ** 30 / 420,
           "link_latency_s": 1e-4, "startup_s": 60.0}
"""Unmeasured figures, to be replaced by a lent GPU's measurements (``launch/gpu_check.sh``
records the hop time per transport and SparseGPT's seconds per block): the hooks' statistics
read the bf16 input and write and read an fp32 copy (10 B per element at HBM bandwidth); 40 us
of kernel launches per column of SparseGPT's loop; a 2 GB/s NVMe for the export; NCCL over
NVLink at 150 GB/s; the object store at the optimistic projection (80 hops of 4 GiB in
7 min); 60 s of tokenisation and data preparation."""


def gpu_entries() -> dict[str, dict[str, Any]]:
    """The ``h200`` and ``h100`` entries, derived from :data:`README_H200`, :data:`SPEC` and
    :data:`ASSUMED` (a unit test checks the committed file against this)."""
    from neuroal.planning import layout_of
    from neuroal.planning.walltime import Workload

    w = Workload.from_layout(layout_of("llama-2-70b"))
    linears, n, seqlen = w.blocks[0], README_H200["tokens"], README_H200["seqlen"]
    weights = sum(r * c for r, c in linears)
    forward_s = README_H200["forward_ms"] / 1e3
    forward_flops = n * (2 * weights + 2 * seqlen * w.hidden) / forward_s
    efficiency = forward_flops / SPEC["bf16_flops"]
    elems = n * sum(w.input_cols(0))  # one statistic per distinct input
    out = {}
    for name, bandwidth in (("h200", SPEC["h200_bytes"]), ("h100", SPEC["h100_bytes"])):
        stats_elems = bandwidth / ASSUMED["stats_bytes_per_elem"]
        # the Wanda prune is 2 forwards, the statistics and the selection (README: H200)
        select_s = (README_H200["wanda_prune_ms"] / 1e3 - 2 * forward_s
                    - elems / (SPEC["h200_bytes"] / ASSUMED["stats_bytes_per_elem"]))
        select_s *= SPEC["h200_bytes"] / bandwidth  # memory-bound: scaled by bandwidth
        fp32 = SPEC["fp32_flops"] * efficiency
        out[name] = {
            "description": f"one NVIDIA {name.upper()}, bf16",
            "forward_flops": forward_flops, "stats_elems": stats_elems, "hessian_flops": fp32,
            "select_weights": weights / select_s, "solve_flops": fp32,
            "solve_column_s": ASSUMED["solve_column_s"],
            "load_bytes": 2 * (weights + 2 * w.hidden) / (README_H200["disk_block_ms"] / 1e3),
            "export_bytes": ASSUMED["export_bytes"],
            "link_bytes": {"direct": ASSUMED["direct_bytes"],
                           "object-store": ASSUMED["object_store_bytes"]},
            "link_latency_s": ASSUMED["link_latency_s"], "startup_s": ASSUMED["startup_s"],
            "provenance": {
                "forward_flops": f"README H200 table: {README_H200['forward_ms']} ms per 70B-width "
                                 f"bf16 block forward at {n} tokens ({efficiency:.0%} of the "
                                 "989 TFLOP/s bf16 peak); H100: the same tensor-core peak",
                "select_weights": f"README H200 table: Wanda prune {README_H200['wanda_prune_ms']}"
                                  " ms per block minus 2 forwards and the statistics"
                                  + ("" if name == "h200" else
                                     "; H100: scaled by HBM bandwidth 3.35 / 4.8 TB/s"),
                "stats_elems": "assumed: 10 B per element at HBM bandwidth (unmeasured)",
                "hessian_flops": "assumed: the fp32 peak (67 TFLOP/s, no TF32) at the forward's "
                                 "measured efficiency (unmeasured)",
                "solve_flops": "assumed: as hessian_flops (unmeasured; gpu_check.sh step 8 "
                               "times SparseGPT per block)",
                "solve_column_s": "assumed: 40 us of kernel launches per column (unmeasured)",
                "load_bytes": f"README H200 table: disk onloading reads a 70B bf16 block in "
                              f"{README_H200['disk_block_ms']} ms (file likely page-cached: a "
                              "cold read is slower)",
                "export_bytes": "assumed: 2 GB/s NVMe write (unmeasured)",
                "link_bytes": "assumed: NCCL over NVLink 150 GB/s; object store: an optimistic "
                              "projection, 80 hops of 4 GiB in 7 min (unmeasured; "
                              "gpu_check.sh step 8 times the hop per transport)",
                "startup_s": "assumed: 60 s of tokenisation and data preparation",
            },
        }
    return out


def write_gpu_entries() -> dict[str, Any]:
    """Rewrite the GPU entries of the throughput file from :func:`gpu_entries`."""
    data = json.loads(THROUGHPUT.read_text()) if THROUGHPUT.exists() else {}
    data.update(gpu_entries())
    THROUGHPUT.write_text(json.dumps(data, indent=1) + "\n")
    return data


# --------------------------------------------------------------------------- check


def run_config(label: str, config: str, overrides: list[str], out_root: Path,
               reuse: bool) -> dict[str, Any]:
    """One ``launch/prune.py`` process (export included unless the overrides turn it off);
    returns its report with the command and wall seconds (kept in ``<label>.bench.json`` beside
    the run's folder: a run's own files are never edited, so the next run may replace them)."""
    out = out_root / label
    cmd = [sys.executable, str(REPO / "launch" / "prune.py"), "--config", config, "--overwrite",
           "--output", str(out), *overrides]
    command = " ".join(["python", "launch/prune.py", *cmd[2:]])
    facts = out_root / f"{label}.bench.json"  # beside the run: its folder stays neuroal's own
    if reuse and (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
        if facts.is_file():
            report.update(json.loads(facts.read_text()))
        report.setdefault("bench_command", command)
        return report
    load0 = loadavg()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"run {label} failed ({proc.returncode}): {command}")
    report = json.loads((out / "report.json").read_text())
    bench = {"bench_wall_seconds": wall, "bench_command": command,
             "bench_loadavg": [load0, loadavg()], "bench_cpu_seconds": cpu_s}
    facts.write_text(json.dumps(bench, indent=1))
    report.update(bench)
    return report


def compare_row(label: str, report: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Measured phases of one run against the prediction from its resolved config."""
    from neuroal.config.build import build_config
    from neuroal.planning import layout_of
    from neuroal.planning.walltime import (
        PHASES,
        Workload,
        measured_phases,
        predict,
        relative_error,
        request_from_config,
        throughput,
    )

    cfg = build_config(report["config"])
    windows = max((e.get("windows", 0) for e in report.get("eval", {}).values()
                   if isinstance(e, dict)), default=0)
    req = request_from_config(cfg, device, windows)
    predicted = predict(Workload.from_layout(layout_of(cfg.model.name)), req, throughput(device))
    measured = measured_phases(report["timings"])
    errors = {p: relative_error(predicted[p], measured[p]) for p in (*PHASES, "total")
              if max(measured[p], predicted[p]) >= MIN_SECONDS}
    unmodelled = {k: v for k, v in report["timings"].items()
                  if k.startswith("eval_tasks") and isinstance(v, (int, float))}
    return {"run": label, "command": report.get("bench_command"),
            "loadavg": report.get("bench_loadavg"), "cpu_seconds": report.get("bench_cpu_seconds"),
            "wall_seconds": report.get("bench_wall_seconds"), "request": vars(req),
            "predicted": predicted, "measured": measured, "relative_error": errors,
            "within": all(abs(e) <= TOLERANCE for e in errors.values()),
            "outside_model_s": unmodelled, "run_total_s": report["timings"].get("total")}


def predicted_only(label: str, config: str, overrides: list[str]) -> dict[str, Any]:
    """The prediction of a check run left out (``--only``), from its config alone."""
    from neuroal.config.build import load_config
    from neuroal.planning import layout_of
    from neuroal.planning.walltime import Workload, predict, request_from_config, throughput

    cfg = load_config(REPO / config, overrides)
    req = request_from_config(cfg, "cpu", cfg.eval.max_windows or 0)
    return {"run": label, "config": config, "overrides": overrides,
            "predicted": predict(Workload.from_layout(layout_of(cfg.model.name)), req,
                                 throughput("cpu"))}


def table(result: dict[str, Any]) -> str:
    """Predicted / measured seconds per phase and the relative error, one line per run."""
    from neuroal.planning.walltime import PHASES

    cols = (*PHASES, "total")
    lines = [f"{'run':<22}" + "".join(f"{c:>22}" for c in cols)]
    for r in result["rows"]:
        cells = []
        for c in cols:
            p, m = r["predicted"][c], r["measured"][c]
            e = r["relative_error"].get(c)
            cells.append(f"{p:7.1f}/{m:7.1f} {'' if e is None else f'{e:+.0%}':>5}")
        lines.append(f"{r['run']:<22}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def check(opts: argparse.Namespace) -> dict[str, Any]:
    """Every run of :data:`CHECK_RUNS`, against the prediction."""
    calibrated = calibrate(opts) if opts.calibrate else None
    rows, skipped = [], []
    for label, config, overrides in CHECK_RUNS:
        if opts.only and label not in opts.only.split(","):
            skipped.append(predicted_only(label, config, overrides))
            continue
        report = run_config(label, config, overrides, Path(opts.out), opts.reuse)
        rows.append(compare_row(label, report))
        print(f"{label}: {json.dumps(rows[-1]['relative_error'])}", file=sys.stderr, flush=True)
    result = {"note": getattr(opts, "note", ""), "rows": rows, "not_run": skipped,
              "tolerance": TOLERANCE,
              "calibrated_in_this_run": calibrated is not None,
              "within": all(r["within"] for r in rows),
              "throughput": json.loads(THROUGHPUT.read_text())["cpu"]}
    print(table(result))
    print(f"every phase within {TOLERANCE:.0%}: {result['within']}")
    return result


# --------------------------------------------------------------------------- 70B


def predict_70b() -> dict[str, Any]:
    """Llama-2-70B on 1 and 8 H100 (ray executor), Wanda + NeuroAL and SparseGPT, both modes."""
    from neuroal.config.build import load_config
    from neuroal.planning import layout_of
    from neuroal.planning.walltime import (
        Workload,
        predict,
        request_from_config,
        throughput,
    )

    tp = throughput("h100")
    w = Workload.from_layout(layout_of("llama-2-70b"))
    rows = []
    for label, config, overrides in H100_70B:
        cfg = load_config(REPO / config, overrides)
        base = request_from_config(cfg, "h100", WIKITEXT2_TEST_WINDOWS_2048)
        for workers in (1, 8):
            for mode in ("pipeline", "data"):
                req = replace(base, workers=workers, mode=mode, executor="ray")
                rows.append({"run": label, "config": config, "overrides": overrides,
                             "workers": workers, "mode": mode, "request": vars(req),
                             "seconds": predict(w, req, tp)})
    return {"model": "llama-2-70b", "device": "h100", "eval_windows": WIKITEXT2_TEST_WINDOWS_2048,
            "throughput": json.loads(THROUGHPUT.read_text())["h100"], "rows": rows,
            "command": "python launch/bench_plan_time.py predict --json "
                       "benchmarks/plan_time_70b.json"}


def parser() -> argparse.ArgumentParser:
    """The command line (also used by ``launch/bench.py plan-time``)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["calibrate", "gpu", "check", "predict"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=8, help="calibrate: windows")
    p.add_argument("--seqlen", type=int, default=512, help="calibrate: tokens per window")
    p.add_argument("--blocks", type=int, default=3, help="calibrate: blocks timed")
    p.add_argument("--repeats", type=int, default=3,
                   help="calibrate: runs of each step (the median is kept)")
    p.add_argument("--only", help="check: comma list of run labels")
    p.add_argument("--reuse", action="store_true", help="check: reuse existing report.json")
    p.add_argument("--calibrate", action="store_true",
                   help="check: measure the CPU figures first (same load as the runs)")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench" / "plan_time"))
    p.add_argument("--json", help="where to write the result (check, predict)")
    p.add_argument("--note", default="", help="check: a sentence kept in the JSON (conditions)")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    if opts.what == "calibrate":
        calibrate(opts)
        return 0
    if opts.what == "gpu":
        print(json.dumps(write_gpu_entries(), indent=1))
        return 0
    result = check(opts) if opts.what == "check" else predict_70b()
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {opts.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
