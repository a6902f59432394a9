#!/usr/bin/env python
"""Recovery memory: the planner's recovery terms against real runs.

    python launch/bench_recover_memory.py --device cuda           # GPU: Llama-2-70B width, bf16
    python launch/bench_recover_memory.py --device cpu --tiny     # checks the script itself

Each arm runs the real pipeline (:func:`neuroal.prune`) in a fresh subprocess on a random
checkpoint with Llama-2-70B's block geometry (``launch/bench_scale.py``'s builder, ``--blocks``
blocks) and calibration windows given as a token file (no data files needed):

* ``prune``        Wanda 50 %, no recovery: the workers' prune phase;
* ``reconstruct``  the same plus ``perp-reconstruct`` (recovery.md §3.6): the reconstruct phase
  (targets stream, MaskLoRA state, autograd's saved tensors);
* ``retrain``      the same plus whole-model PERP (``perp-masklora``, recovery.md §3.3-3.5):
  the plan's ``retrain`` row, one process holding the whole model.

The measured figure is the device peak of the process: ``torch.cuda.max_memory_allocated``
on CUDA, compared with the planner's prediction for the same config (``request_from_config``
+ ``plan_memory``: the largest worker total or retrain row) minus its overhead constant (the
CUDA context, which the allocator does not count); on CPU the process's peak resident set
(``VmHWM``) against the whole prediction (the constant stands for the runtime, as in
``launch/bench_scale.py``). The issue's bar: within 25 %, and never
below the measurement by more than that (an under-prediction is a run the pre-load check lets
through that then runs out of memory). Table on stdout, JSON in ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "launch"))
sys.path.insert(0, str(REPO))

from bench_scale import TOLERANCE, proc_status  # noqa: E402 - the scale check's bar and /proc reader

TINY = {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 8,
        "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
ARMS = {"prune": (), "reconstruct": ("perp-reconstruct",), "retrain": ("perp-masklora",)}


def _overrides(job: dict[str, Any]) -> dict[str, Any]:
    """The config of one arm (sections for :func:`neuroal.prune`)."""
    steps = list(ARMS[job["arm"]])
    options: dict[str, Any] = {}
    if "perp-reconstruct" in steps:
        options["perp-reconstruct"] = {"steps": job["steps"], "batch_size": job["batch_size"]}
    if "perp-masklora" in steps:
        options["perp-masklora"] = {"steps": job["steps"], "batch_size": job["batch_size"],
                                    "eval_batch_size": job["batch_size"]}
    return {"calib": {"source": f"tokens:{job['ids']}", "nsamples": job["nsamples"],
                      "seqlen": job["seqlen"]},
            "eval": {"datasets": []},
            "engine": {"device": job["device"], "micro_batch": job["micro_batch"],
                       "onload": "device"},
            "recover": {"steps": steps, "options": options}}


def child(job: dict[str, Any]) -> dict[str, Any]:
    """One arm in this process: run the pipeline, measure the device peak, plan the same."""
    import torch

    import neuroal
    from neuroal.config.build import build_config
    from neuroal.planning import OVERHEAD_BYTES, plan_memory
    from neuroal.planning.checks import request_from_config

    cuda = job["device"].startswith("cuda")
    baseline = proc_status("VmRSS")  # after the imports
    if not cuda:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current resident set
    else:
        torch.cuda.reset_peak_memory_stats()
    sections = _overrides(job)
    t0 = time.perf_counter()
    neuroal.prune(job["model"], 0.5, "wanda", save=False, output=job["output"],
                  overrides=["output.plots=false", f"model.dtype={job['dtype']}"], **sections)
    seconds = time.perf_counter() - t0
    # CUDA: allocated bytes against the terms (the context is the overhead constant); CPU: the
    # whole process against the total (the constant stands for the runtime, as bench_scale does)
    measured = torch.cuda.max_memory_allocated() if cuda else proc_status("VmHWM")
    cfg = build_config({"model": {"name": job["model"], "dtype": job["dtype"]}, "sparsity": 0.5,
                        **{k: v for k, v in sections.items() if k != "model"}})
    plan = plan_memory(job["model"], request_from_config(cfg, job["dtype"],
                                                         "cuda" if cuda else "cpu"))
    overhead = OVERHEAD_BYTES["cuda"] if cuda else 0
    worker = max(plan.workers, key=lambda w: w.total)
    rows = [worker] + ([plan.retrain] if plan.retrain is not None else [])
    peak = max(rows, key=lambda w: w.total)
    return {"arm": job["arm"], "seconds": seconds, "measured_bytes": int(measured),
            "predicted_bytes": int(peak.total - overhead), "predicted_phase": peak.phase,
            "components": {k: int(getattr(peak, k)) for k in
                           ("weights", "activations", "statistics", "transients", "masked_block")},
            "worker_phase": worker.phase, "worker_bytes": int(worker.total - overhead),
            "retrain_bytes": int(plan.retrain.total - overhead) if plan.retrain else None,
            "baseline_bytes": baseline}


def build(directory: Path, opts: argparse.Namespace) -> Path:
    """The checkpoint and the calibration token file."""
    import bench_scale
    import torch

    if opts.tiny:
        bench_scale.WIDTH = TINY
    directory.mkdir(parents=True, exist_ok=True)
    bench_scale.build_checkpoint(directory, opts.blocks, "bfloat16", 0)
    ids = torch.randint(3, 512, (opts.nsamples, opts.seqlen),
                        generator=torch.Generator().manual_seed(0))
    torch.save(ids, directory / "calib.pt")
    return directory / "calib.pt"


def run(opts: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="neuroal-recover-mem-", dir=opts.tmp))
    try:
        return _arms(work, opts)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _arms(work: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Build the checkpoint under ``work`` and run every arm in its own process."""
    model = work / "model"
    t0 = time.perf_counter()
    ids = build(model, opts)
    build_s = time.perf_counter() - t0
    rows = []
    for arm in opts.arms:
        job = {"arm": arm, "model": str(model), "ids": str(ids), "output": str(work / f"out-{arm}"),
               "device": opts.device, "dtype": opts.dtype, "nsamples": opts.nsamples,
               "seqlen": opts.seqlen, "micro_batch": opts.micro_batch, "steps": opts.steps,
               "batch_size": opts.batch_size}
        env = {**os.environ, "NEUROAL_PROGRESS": "0", "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env,
                              capture_output=True, text=True, timeout=opts.timeout)
        if proc.returncode != 0:
            rows.append({"arm": arm, "failed": proc.stderr[-2000:]})
            print(f"{arm}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["ratio"] = row["measured_bytes"] / row["predicted_bytes"]
        row["within"] = abs(row["ratio"] - 1) <= TOLERANCE
        rows.append(row)
        print(f"{arm:<12} measured {row['measured_bytes'] / 1e9:7.2f} GB, predicted "
              f"{row['predicted_bytes'] / 1e9:7.2f} GB ({row['predicted_phase']}), ratio "
              f"{row['ratio']:.3f}, {row['seconds']:.1f} s", file=sys.stderr, flush=True)
    return {"settings": {k: v for k, v in vars(opts).items() if k != "child"},
            "build_s": build_s, "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"{'arm':<12}{'phase':<13}{'measured GB':>12}{'predicted GB':>13}{'ratio':>7}"
             f"{'within 25%':>11}{'seconds':>9}"]
    for r in result["rows"]:
        if "failed" in r:
            lines.append(f"{r['arm']:<12}FAILED")
            continue
        lines.append(f"{r['arm']:<12}{r['predicted_phase']:<13}{r['measured_bytes'] / 1e9:>12.2f}"
                     f"{r['predicted_bytes'] / 1e9:>13.2f}{r['ratio']:>7.3f}"
                     f"{'yes' if r['within'] else 'NO':>11}{r['seconds']:>9.1f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="tiny width (script check)")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="optimiser steps per recovery step")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--timeout", type=int, default=400)
    p.add_argument("--tmp", default=None)
    p.add_argument("--json", default=str(REPO / "outputs" / "bench" / "recover_memory.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child:
        print(json.dumps(child(json.loads(opts.child))))
        return 0
    result = run(opts)
    print(table(result))
    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r.get("within") for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
