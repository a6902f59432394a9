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

With ``--dist`` the same prunes also run as whole ``neuroal`` runs in separate processes: one
local process, then two torch.distributed ranks (``torchrun --nproc_per_node 2``, gloo) in
pipeline and in data mode, one thread each (``engine.threads=1``). Their final prune seconds are
the report's ``prune`` timing (loading excluded, as above), and their saved weights are compared
with the one-process run's bit for bit. Processes do not share an interpreter, so this is the
speed-up a multi-GPU node's ranks get from data mode, measured on CPU cores. The runs' folders
stay under ``--out`` (a later benchmark overwrites them, as neuroal's own outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = [(1, "pipeline"), (2, "pipeline"), (1, "data"), (2, "data")]
CRITERIA = ("wanda", "sparsegpt")
PROCESS_LAYOUTS = [("local", 1, "pipeline"), ("dist", 2, "pipeline"), ("dist", 2, "data")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--dist", action="store_true",
                   help="also time whole runs: one process, then two torch.distributed ranks")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench" / "parallel"),
                   help="--dist: where the runs write their models (a folder per run)")
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


def process_command(opts: argparse.Namespace, engine: str, workers: int, mode: str,
                    criterion: str, out: Path) -> list[str]:
    """The command line of one whole run (``torchrun`` for the dist engine)."""
    launcher = [sys.executable, str(REPO / "launch" / "prune.py")]
    if engine == "dist":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={workers}", str(REPO / "launch" / "prune.py")]
    return launcher + [
        "--config", str(REPO / "configs" / "smollm2" / "wanda-uniform-50.yaml"),
        "--output", str(out), "--overwrite", f"model.name={opts.model}",
        f"criterion.name={criterion}", f"calib.nsamples={opts.nsamples}",
        f"calib.seqlen={opts.seqlen}", f"calib.data_dir={opts.data_dir}", "eval.datasets=[]",
        f"engine.micro_batch={opts.micro_batch}", f"engine.executor={engine}",
        f"engine.workers={workers}", f"engine.parallel={mode}", "engine.threads=1"]


def saved_weights(folder: Path) -> dict[str, Any]:
    """Every tensor of a saved model's safetensors shards."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def process_rows(opts: argparse.Namespace) -> list[dict[str, Any]]:
    """Whole runs in separate processes (module docstring): one row per criterion x
    :data:`PROCESS_LAYOUTS`, with the speed-up against the one-process run."""
    rows: list[dict[str, Any]] = []
    root = Path(opts.out)
    env = {**os.environ, "NEUROAL_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p)}
    for criterion in opts.criteria.split(","):
        reference = None
        for engine, workers, mode in PROCESS_LAYOUTS:
            out = root / f"{criterion}-{engine}-{workers}-{mode}"
            cmd = process_command(opts, engine, workers, mode, criterion, out)
            subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
            report = json.loads((out / "report.json").read_text())
            tensors = saved_weights(out)
            reference = reference or (engine, workers, mode, tensors)
            rows.append({"criterion": criterion, "engine": engine, "workers": workers,
                         "mode": report["engine"]["parallel"],
                         "seconds": report["timings"]["prune"],
                         "identical_to": f"{reference[1]} {reference[0]} process(es), "
                                         f"{reference[2]}",
                         "identical": identical(tensors, reference[3]),
                         "command": " ".join(["python" if c == sys.executable else c
                                              for c in cmd]).replace(str(REPO) + "/", "")
                                    .replace(str(REPO.parent), "..")})
            print(f"{criterion:<10}{engine:<6}{workers:>3} {mode:<9}"
                  f"{rows[-1]['seconds']:>9.1f} s  identical {rows[-1]['identical']}",
                  file=sys.stderr)
        base = rows[-len(PROCESS_LAYOUTS)]["seconds"]
        for r in rows[-len(PROCESS_LAYOUTS):]:
            r["speedup"] = base / r["seconds"]
    return rows


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
    processes = process_rows(opts) if opts.dist else []
    return {"rows": rows, "process_rows": processes, "settings": {
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
