#!/usr/bin/env python
"""Pipeline vs data mode for a perplexity pass: wall time of SmolLM2's perplexity with 1 and
2 workers, one intra-op thread each, in one process.

    PYTHONPATH=. python launch/bench_passes.py --json benchmarks/passes.json

For each (workers, mode) of (1, pipeline), (2, pipeline), (2, data) a fresh local executor
loads the model (not timed) and computes the per-window NLL of the same windows (WikiText-2,
``--windows`` x ``--seqlen`` tokens, fp32, CPU), timed alone, ``--repeat`` times (the best is
kept). Every run's per-window NLL is compared with the first run's bit for bit.
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
LAYOUTS = [(1, "pipeline"), (2, "pipeline"), (2, "data")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--json", help="where to write the results")
    return p


def windows(opts: argparse.Namespace) -> tuple[Any, Any, int]:
    """(model source, windows ``(k, T)``, block count), as a run resolves them."""
    sys.path.insert(0, str(REPO / "launch"))
    import bench_parallel

    calib = argparse.Namespace(model=opts.model, nsamples=opts.windows, seqlen=opts.seqlen,
                               data_dir=opts.data_dir)
    return bench_parallel.calibration(calib)


def time_once(source: Any, ids: Any, num_blocks: int, workers: int, mode: str,
              opts: argparse.Namespace) -> tuple[float, Any]:
    """Best seconds of ``window_nll`` over ``--repeat`` calls on one fresh executor, and the
    per-window NLL."""
    from neuroal.engine.executor import LocalExecutor

    ex = LocalExecutor(source, num_blocks, workers, ["cpu"], "float32", opts.micro_batch,
                       parallel=mode)
    try:
        best, nll = float("inf"), None
        for _ in range(opts.repeat):
            t0 = time.perf_counter()
            nll = ex.window_nll(ids)
            best = min(best, time.perf_counter() - t0)
        return best, nll
    finally:
        ex.shutdown()


def run(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    source, ids, num_blocks = windows(opts)
    load_before = os.getloadavg()
    rows, first = [], None
    for workers, mode in LAYOUTS:
        seconds, nll = time_once(source, ids, num_blocks, workers, mode, opts)
        first = nll if first is None else first
        rows.append({"workers": workers, "mode": mode, "seconds": seconds,
                     "speedup": rows[0]["seconds"] / seconds if rows else 1.0,
                     "identical": bool(torch.equal(nll.view(torch.uint8),
                                                   first.view(torch.uint8)))})
    return {"rows": rows, "settings": {
        "model": opts.model, "dtype": "float32", "windows": opts.windows,
        "seqlen": opts.seqlen, "micro_batch": opts.micro_batch, "repeat": opts.repeat,
        "threads_per_worker": 1, "cpus": os.cpu_count(),
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}}


def table(result: dict[str, Any]) -> str:
    lines = ["| workers | mode | seconds | speed-up | bit-identical |", "|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['mode']} | {r['seconds']:.2f} | {r['speedup']:.2f}x | "
              f"{'yes' if r['identical'] else 'NO'} |" for r in result["rows"]]
    return "\n".join(lines)


def main() -> int:
    opts = parser().parse_args()
    result = run(opts)
    print(table(result))
    print(json.dumps(result["settings"]))
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(r["identical"] for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
