#!/usr/bin/env python
"""Benchmarks (never timed unit tests): prints a table and writes JSON.

    python launch/bench.py foundation      # SmolLM2 CPU protocol: criteria x {50 %, 70 %} + Wanda 2:4
    python launch/bench.py masks           # threshold selection vs stable argsort on wide rows

Each pruning run is a separate ``launch/prune.py`` process, so its peak RSS is its own.
Defaults follow the CPU protocol of shared/specs/README.md (128 x 512 calibration, 64 test
windows); shrink with --nsamples / --eval-windows for a quick look.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOUNDATION_RUNS = [
    ("magnitude", "unstructured", 0.5), ("wanda", "unstructured", 0.5),
    ("ria", "unstructured", 0.5), ("sparsegpt", "unstructured", 0.5),
    ("magnitude", "unstructured", 0.7), ("wanda", "unstructured", 0.7),
    ("ria", "unstructured", 0.7), ("sparsegpt", "unstructured", 0.7),
    ("wanda", "2:4", 0.5),
]


def run_prune(name: str, args: list[str], out_root: Path) -> dict:
    """One ``launch/prune.py`` process; returns its report."""
    out = out_root / name
    cmd = [sys.executable, str(REPO / "launch" / "prune.py"), "--no-save", "--overwrite",
           "--output", str(out), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"run {name} failed ({proc.returncode}): {' '.join(cmd)}")
    report = json.loads((out / "report.json").read_text())
    report["bench_wall_seconds"] = wall
    report["bench_command"] = " ".join(["python", "launch/prune.py", *cmd[2:]])
    return report


def foundation(opts: argparse.Namespace) -> dict:
    """Dense perplexity once, then every (criterion, pattern, sparsity) of the issue's table."""
    common = ["--model", opts.model, "--nsamples", str(opts.nsamples), "--seqlen",
              str(opts.seqlen), "--eval-windows", str(opts.eval_windows), "--device", "cpu",
              "--dtype", "float32"]
    rows = []
    dense = None
    for i, (criterion, pattern, sparsity) in enumerate(FOUNDATION_RUNS):
        if opts.only and criterion not in opts.only.split(","):
            continue
        label = f"{criterion}-{pattern.replace(':', 'of')}-{sparsity:g}"
        extra = ["--criterion", criterion, "--pattern", pattern, "--sparsity", str(sparsity),
                 f"eval.dense={'true' if dense is None else 'false'}"]
        report = run_prune(label, common + extra, Path(opts.out))
        ev = report["eval"]["wikitext2"]
        dense = dense if dense is not None else ev["dense_ppl"]
        rows.append({
            "run": label, "criterion": criterion, "pattern": pattern,
            "target": report["target_sparsity"], "achieved": report["achieved_sparsity"],
            "ppl": ev["sparse_ppl"], "prune_s": report["timings"]["prune"],
            "total_s": report["timings"]["total"], "wall_s": report["bench_wall_seconds"],
            "peak_rss_gb": report["peak_memory_bytes"] / 1e9,
            "command": report["bench_command"],
        })
        print(f"[{i + 1}/{len(FOUNDATION_RUNS)}] {label}: ppl {ev['sparse_ppl']:.3f}",
              file=sys.stderr, flush=True)
    header = f"{'run':<24}{'target':>8}{'achieved':>10}{'ppl':>12}{'prune s':>10}{'total s':>10}{'RSS GB':>8}"
    lines = [f"dense wikitext2 perplexity: {dense:.3f}  ({opts.eval_windows} windows x {opts.seqlen})",
             header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['run']:<24}{r['target']:>8.3f}{r['achieved']:>10.4f}{r['ppl']:>12.3f}"
                     f"{r['prune_s']:>10.1f}{r['total_s']:>10.1f}{r['peak_rss_gb']:>8.2f}")
    print("\n".join(lines))
    return {"dense_ppl": dense, "rows": rows, "settings": vars(opts)}


def masks(opts: argparse.Namespace) -> dict:
    """Per-row mask selection: threshold (kthvalue + tie fix) vs stable argsort."""
    import torch

    from neuroal.masking import reference_row_mask, row_mask

    torch.manual_seed(0)
    rows = []
    for shape in [(576, 1536), (4096, 11008), (8192, 8192)]:
        scores = torch.rand(shape)
        scores_ties = (scores * 16).floor()  # de-quantised-like ties
        for label, s in (("random", scores), ("ties", scores_ties)):
            seconds, outputs = {}, {}
            for name, fn in (("threshold", row_mask), ("argsort", reference_row_mask)):
                t0 = time.perf_counter()
                for _ in range(opts.repeat):
                    outputs[name] = fn(s, 0.5)
                seconds[name] = (time.perf_counter() - t0) / opts.repeat
            same = bool(torch.equal(outputs["threshold"], outputs["argsort"]))
            rows.append({"shape": list(shape), "scores": label, "threshold_s": seconds["threshold"],
                         "argsort_s": seconds["argsort"], "identical": same})
    header = (f"{'shape':<16}{'scores':<8}{'threshold s':>13}{'argsort s':>11}{'speed-up':>10}"
              f"{'identical':>11}")
    print(header)
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):<16}{r['scores']:<8}{r['threshold_s']:>13.4f}"
              f"{r['argsort_s']:>11.4f}{r['argsort_s'] / r['threshold_s']:>10.2f}{str(r['identical']):>11}")
    return {"rows": rows, "threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=["foundation", "masks"], nargs="?", default="foundation")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--only", help="comma list of criteria to run")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "outputs" / "bench"))
    p.add_argument("--json", help="where to write the results (default <out>/<suite>.json)")
    opts = p.parse_args()
    result = {"foundation": foundation, "masks": masks}[opts.suite](opts)
    path = Path(opts.json or Path(opts.out) / f"{opts.suite}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
