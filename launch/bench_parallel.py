#!/usr/bin/env python
"""Pipeline vs data mode: wall time of SmolLM2's final prune with 1 and 2 workers.

    PYTHONPATH=. python launch/bench_parallel.py                       # 16 x 256 calibration
    PYTHONPATH=. python launch/bench_parallel.py --nsamples 128 --seqlen 512   # CPU protocol
    python launch/bench.py parallel                                    # the same, via bench.py

For each criterion (Wanda, SparseGPT; uniform 50 %, fp32, CPU) and each (workers, mode) of
(1, pipeline), (2, pipeline), (1, data), (2, data), a fresh local executor loads SmolLM2 and
runs the final prune on the same calibration windows, timed alone (loading excluded). Every
worker computes with one intra-op thread (``torch.set_num_threads(1)``): the local executor
runs pipeline mode's workers one after the other, data mode's in one thread each, so two
workers can use two cores. Every run's pruned weights are compared with the first run's bit
for bit (the same result on any worker count and in either mode).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = [(1, "pipeline"), (2, "pipeline"), (1, "data"), (2, "data")]
CRITERIA = ("wanda", "sparsegpt")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--json", help="where to write the results")
    return p


def calibration(opts: argparse.Namespace) -> tuple[Any, Any, int]:
    """(model source, calibration windows ``(N, T)``, block count) as a run resolves them."""
    from neuroal.config.build import build_config
    from neuroal.pipeline import prepare
    from neuroal.runtime.process import Timings

    cfg = build_config({"model": {"name": opts.model, "dtype": "float32"},
                        "calib": {"source": "wikitext2", "nsamples": opts.nsamples,
                                  "seqlen": opts.seqlen, "data_dir": opts.data_dir},
                        "eval": {"datasets": []}, "engine": {"device": "cpu"},
                        "output": {"save_model": False}})
    prep = prepare(cfg, Timings())
    return prep.source, prep.calib.windows, prep.shape.num_blocks


def prune_once(source: Any, ids: Any, num_blocks: int, workers: int, mode: str,
               criterion: str, micro_batch: int) -> tuple[float, str, dict[str, Any]]:
    """Seconds of one final prune (fresh executor), the mode that ran, the pruned tensors."""
    from neuroal.allocation.plan import SparsityPlan
    from neuroal.engine.executor import LocalExecutor
    from neuroal.engine.worker import PruneJob

    ex = LocalExecutor(source, num_blocks, workers, ["cpu"], "float32", micro_batch,
                       parallel=mode)
    try:
        blocks = ex.workers[0].adapter.shape().blocks
        plan = SparsityPlan(0.5, "unstructured", [{n: 0.5 for n in blk} for blk in blocks])
        t0 = time.perf_counter()
        ex.run_final_prune(plan, PruneJob(criterion), ids)
        seconds = time.perf_counter() - t0
        tensors: dict[str, Any] = {}
        for w in ex.workers:
            tensors.update({k: v.clone() for k, v in w.state_items().items()})
        return seconds, ex.parallel, tensors
    finally:
        ex.shutdown()


def identical(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bit-identical tensors under the same names."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
                                        for k in a)


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Every criterion x layout; returns the rows and the settings (with the machine's load)."""
    import torch

    torch.set_num_threads(1)
    source, ids, num_blocks = calibration(opts)
    rows = []
    load_before = os.getloadavg()
    for criterion in opts.criteria.split(","):
        reference = None
        for workers, mode in LAYOUTS:
            seconds, ran, tensors = prune_once(source, ids, num_blocks, workers, mode, criterion,
                                               opts.micro_batch)
            reference = reference or (workers, mode, tensors)
            rows.append({"criterion": criterion, "workers": workers, "mode": ran,
                         "seconds": seconds,
                         "identical_to": f"{reference[0]} worker(s), {reference[1]}",
                         "identical": identical(tensors, reference[2])})
            print(f"{criterion:<10}{workers:>3} {ran:<9}{seconds:>9.1f} s  identical "
                  f"{rows[-1]['identical']}", file=sys.stderr)
        base = next(r["seconds"] for r in rows if r["criterion"] == criterion
                    and r["workers"] == 1 and r["mode"] == "pipeline")
        for r in rows:
            if r["criterion"] == criterion:
                r["speedup"] = base / r["seconds"]
    return {"rows": rows, "settings": {
        "model": opts.model, "nsamples": opts.nsamples, "seqlen": opts.seqlen,
        "micro_batch": opts.micro_batch, "dtype": "float32", "sparsity": 0.5,
        "threads_per_worker": 1, "cpus": os.cpu_count(),
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "torch": torch.__version__}}


def table(result: dict[str, Any]) -> str:
    """The Markdown table of a result, as docs/parallelism.md shows it
    (``launch/readme_figures.py parallel``)."""
    sys.path.insert(0, str(REPO / "launch"))
    import readme_figures

    return readme_figures.parallel_text(result)


def main() -> int:
    opts = parser().parse_args()
    result = run(opts)
    print(table(result))
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
