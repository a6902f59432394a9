#!/usr/bin/env python
"""Benchmarks (never timed unit tests): prints a table and writes JSON.

    python launch/bench.py foundation      # SmolLM2 CPU protocol: criteria x {50 %, 70 %} + Wanda 2:4
    python launch/bench.py masks           # threshold selection vs stable argsort on wide rows
    python launch/bench.py allocation      # SmolLM2 CPU protocol: uniform/OWL/Alpha/NeuroAL (+ options)
    python launch/bench.py screen --nsamples 32 --eval-windows 16   # NeuroAL options, cheap protocol
    python launch/bench.py workers --nsamples 32 --eval-windows 16  # 1-3 workers, local and Ray
    python launch/bench.py recovery --nsamples 32 --eval-windows 16 # DSnoT, R2-DSnoT, PERP variants
    python launch/bench.py ood --nsamples 32 --eval-windows 16      # one PERP row, wikitext2 + pydoc
    python launch/bench.py onload [--device cuda]   # time per block: onloading vs on-device
    python launch/bench.py search --nsamples 32 --eval-windows 4    # early-stopped vs full search
    python launch/bench.py unimodal [PATH ...]  # was each recorded NeuroAL score curve unimodal?
    python launch/bench.py parallel --nsamples 32 --seqlen 256  # pipeline vs data mode: threads, ranks
    python launch/bench.py reliability [--only GROUP,CASE]  # hostile inputs: one verdict each
    python launch/bench.py transport [--quick]  # Ray actor-to-actor hops + 2-actor prunes per transport
    python launch/bench.py plan-time --json benchmarks/plan_time.json  # time planner vs SmolLM2 runs

Each pruning run is a separate ``launch/prune.py`` process, so its peak RSS is its own.
Defaults follow the CPU protocol of shared/specs/README.md (128 x 512 calibration, 64 test
windows); shrink with --nsamples / --eval-windows for a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from neuroal.outputs.report_keys import final_ppl, model_ppl

REPO = Path(__file__).resolve().parent.parent
FOUNDATION_RUNS = [
    ("magnitude", "unstructured", 0.5), ("wanda", "unstructured", 0.5),
    ("ria", "unstructured", 0.5), ("sparsegpt", "unstructured", 0.5),
    ("magnitude", "unstructured", 0.7), ("wanda", "unstructured", 0.7),
    ("ria", "unstructured", 0.7), ("sparsegpt", "unstructured", 0.7),
    ("wanda", "2:4", 0.5),
]

C = "configs/smollm2/"
NA60, NA70 = C + "wanda-neuroal-60.yaml", C + "wanda-neuroal-70.yaml"
# (label, config, overrides), in the order they run: the table, headline rows first.
ALLOCATION_RUNS = [
    ("wanda-owl-70", C + "wanda-owl-70.yaml", []),
    ("wanda-alpha-70", C + "wanda-alpha-70.yaml", []),
    ("wanda-uniform-60", C + "wanda-uniform-50.yaml", ["sparsity=0.6"]),
    ("wanda-neuroal-60", NA60, []),
    ("wanda-neuroal-global-70", NA70, ["allocation.reference_stream=global"]),
    ("wanda-neuroal-base_owl-70", NA70, ["allocation.base=owl"]),
    ("wanda-neuroal-base_alpha-70", NA70, ["allocation.base=alpha"]),
    ("wanda-neuroal-lambda0-70", NA70, ["allocation.include_uniform=true"]),
    ("wanda-neuroal-refine-70", NA70, ["allocation.grid_refine=1"]),
    ("magnitude-neuroal-70", NA70, ["criterion.name=magnitude"]),
    ("sparsegpt-neuroal-70", NA70, ["criterion.name=sparsegpt"]),
    ("wanda-owl-60", C + "wanda-owl-60.yaml", []),
    ("wanda-alpha-60", C + "wanda-alpha-60.yaml", []),
    ("wanda-neuroal-global-60", NA60, ["allocation.reference_stream=global"]),
    ("wanda-neuroal-base_owl-60", NA60, ["allocation.base=owl"]),
    ("wanda-neuroal-base_alpha-60", NA60, ["allocation.base=alpha"]),
    ("wanda-neuroal-lambda0-60", NA60, ["allocation.include_uniform=true"]),
    ("wanda-neuroal-refine-60", NA60, ["allocation.grid_refine=1"]),
    ("wanda-neuroal-70", NA70, []),
    # NeuroAL's magnitude masks are chosen per row (mask_group: row), so its
    # uniform baseline must be too (the foundation table's magnitude is per matrix).
    ("magnitude-uniform-row-70", C + "wanda-uniform-50.yaml",
     ["sparsity=0.7", "criterion.name=magnitude", "criterion.group=row"]),
]

# Screening of the NeuroAL options (allocation spec §4): every option beside faithful mode at 70 % and
# 60 %, on a protocol cheap enough to run all of them on 2 cores (about 4 min a row instead of
# 18): 32 calibration windows, 4 search windows, a 6-point block grid and a 6-point row grid, 16
# test windows. The winner is then rerun on the full protocol (``allocation`` suite).
SCREEN_GRID = ["allocation.search_samples=4", "allocation.block_grid=[0.05,0.1,0.15,0.2,0.25,0.3]",
               "allocation.row_grid=[0.0,0.05,0.1,0.15,0.2,0.25]"]
SCREEN_OPTIONS = [("faithful", []), ("global", ["allocation.reference_stream=global"]),
                  ("base_owl", ["allocation.base=owl"]), ("base_alpha", ["allocation.base=alpha"]),
                  ("lambda0", ["allocation.include_uniform=true"]), ("refine", ["allocation.grid_refine=1"])]
SCREEN_RUNS = [
    run
    for pct, na in (("70", NA70), ("60", NA60))
    for run in [
        (f"wanda-uniform-{pct}", C + "wanda-uniform-50.yaml", [f"sparsity=0.{pct[0]}"]),
        (f"wanda-owl-{pct}", C + f"wanda-owl-{pct}.yaml", []),
        (f"wanda-alpha-{pct}", C + f"wanda-alpha-{pct}.yaml", []),
        *[(f"wanda-neuroal-{name}-{pct}", na, SCREEN_GRID + extra) for name, extra in SCREEN_OPTIONS],
    ]
]


def run_prune(name: str, args: list[str], out_root: Path) -> dict:
    """One ``launch/prune.py`` process; returns its report."""
    out = out_root / name
    cmd = [sys.executable, str(REPO / "launch" / "prune.py"), "--no-save", "--overwrite",
           "--output", str(out), *args]
    t0 = time.perf_counter()
    # This checkout's neuroal, not whichever one is installed (launch/ is sys.path[0] there).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
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
            "ppl": model_ppl(ev), "prune_s": report["timings"]["prune"],
            "total_s": report["timings"]["total"], "wall_s": report["bench_wall_seconds"],
            "peak_rss_gb": report["peak_memory_bytes"] / 1e9,
            "command": report["bench_command"],
        })
        print(f"[{i + 1}/{len(FOUNDATION_RUNS)}] {label}: ppl {model_ppl(ev):.3f}",
              file=sys.stderr, flush=True)
    header = f"{'run':<24}{'target':>8}{'achieved':>10}{'ppl':>12}{'prune s':>10}{'total s':>10}{'RSS GB':>8}"
    lines = [f"dense wikitext2 perplexity: {dense:.3f}  ({opts.eval_windows} windows x {opts.seqlen})",
             header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['run']:<24}{r['target']:>8.3f}{r['achieved']:>10.4f}{r['ppl']:>12.3f}"
                     f"{r['prune_s']:>10.1f}{r['total_s']:>10.1f}{r['peak_rss_gb']:>8.2f}")
    print("\n".join(lines))
    return {"dense_ppl": dense, "rows": rows, "settings": vars(opts)}


def _recovery_facts(report: dict) -> dict:
    """The recovery step of a row (at most one here): perplexity after it, its seconds and
    trainable parameters; nothing for rows without ``recover``."""
    steps = (report.get("recovery") or {}).get("steps") or []
    if not steps:
        return {}
    step, ev = steps[0], report["eval"]["wikitext2"]
    return {"recover": step["name"], "recovered_ppl": final_ppl(ev),
            "step_s": step.get("seconds"), "trainable": step.get("trainable"),
            "trainable_fraction": step.get("trainable_fraction"), "tokens": step.get("tokens")}


def _selected(opts: argparse.Namespace, label: str) -> bool:
    """Whether ``--only`` keeps a row: any of its comma-separated keys is a substring of the
    label, or (``--exact``) equals it, e.g. a NeuroAL base without its recovery rows."""
    if not opts.only:
        return True
    keys = opts.only.split(",")
    return label in keys if opts.exact else any(k in label for k in keys)


def allocation(opts: argparse.Namespace, runs: list | None = None) -> dict:
    """The table: one process per row, results saved after every row; rows already in
    the JSON file are kept and skipped, so an interrupted suite resumes where it stopped."""
    runs = ALLOCATION_RUNS if runs is None else runs
    path = Path(opts.json or Path(opts.out) / f"{opts.suite}.json")
    done = json.loads(path.read_text()) if path.exists() else {"rows": []}
    rows = {r["run"]: r for r in done["rows"]}
    dense = done.get("dense_ppl")
    for i, (label, config, overrides) in enumerate(runs):
        if label in rows or not _selected(opts, label):
            continue
        args = ["--config", config, *overrides, f"calib.nsamples={opts.nsamples}",
                f"eval.max_windows={opts.eval_windows}", f"eval.dense={'true' if dense is None else 'false'}"]
        report = run_prune(label, args, Path(opts.out))
        ev = report["eval"]["wikitext2"]
        dense = dense if dense is not None else ev["dense_ppl"]
        policy, t = report["plan"]["policy"], report["timings"]
        rows[label] = {
            "run": label, "criterion": report["criterion"], "allocation": report["allocation"],
            "options": overrides, "target": report["target_sparsity"],
            "achieved": report["achieved_sparsity"], "ppl": model_ppl(ev),
            "lambda_block": policy.get("lambda_block"), "lambda_row": policy.get("lambda_row"),
            "candidates": len((report.get("search") or {}).get("candidates", [])),
            "plan_s": t.get("allocate"), "prune_s": t.get("prune"), "total_s": t.get("total"),
            "wall_s": report["bench_wall_seconds"], "peak_rss_gb": report["peak_memory_bytes"] / 1e9,
            "utilisation": {k[: -len("_utilisation")]: v for k, v in t.items()
                            if k.endswith("_utilisation")},
            "workers": [{"blocks": w["blocks"], "busy_s": w["busy_seconds"],
                         "peak_rss_gb": w.get("peak_memory_bytes", 0) / 1e9}
                        for w in report.get("workers", [])],
            "command": report["bench_command"],
            **_recovery_facts(report),
        }
        print(f"[{i + 1}/{len(runs)}] {label}: ppl {model_ppl(ev):.3f}", file=sys.stderr,
              flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"dense_ppl": dense, "rows": list(rows.values())}, indent=2))
    header = (f"{'run':<30}{'ppl':>10}{'achieved':>10}{'lam_b':>7}{'lam_r':>7}{'plan s':>8}"
              f"{'prune s':>9}{'total s':>9}{'RSS GB':>8}")
    print(f"dense wikitext2 perplexity: {dense}\n{header}\n{'-' * len(header)}")
    for r in rows.values():
        lam = [("-" if v is None else f"{v:.3g}") for v in (r["lambda_block"], r["lambda_row"])]
        print(f"{r['run']:<30}{r['ppl']:>10.2f}{r['achieved']:>10.4f}{lam[0]:>7}{lam[1]:>7}"
              f"{(r['plan_s'] or 0):>8.0f}{(r['prune_s'] or 0):>9.0f}{r['total_s']:>9.0f}"
              f"{r['peak_rss_gb']:>8.2f}")
    return {"dense_ppl": dense, "rows": list(rows.values()), "settings": vars(opts)}


WORKER_GRID = ["allocation.search_samples=4", "allocation.block_grid=[0.05,0.1,0.15]",
               "allocation.row_grid=[0.0,0.05,0.1]"]
WORKER_RUNS = [(f"{executor}-{k}", NA60, [*WORKER_GRID, f"engine.executor={executor}",
                                            f"engine.workers={k}"])
               for executor in ("local", "ray") for k in (1, 2, 3)]
"""The scale-out table: NeuroAL search (3 + 3 candidates on 4 windows) + prune at 60 %
with 1, 2 and 3 workers, in-process and as Ray actors (one actor process per worker)."""


def workers(opts: argparse.Namespace) -> dict:
    """Wall time, pipeline utilisation and per-worker peak RSS for WORKER_RUNS; every run must
    end with the same lambdas and perplexity (the engines are bit-identical)."""
    result = allocation(opts, WORKER_RUNS)
    header = (f"{'run':<10}{'ppl':>10}{'lam_b':>7}{'lam_r':>7}{'search s':>10}{'util':>6}"
              f"{'prune s':>9}{'util':>6}{'total s':>9}  per-worker peak RSS GB (driver)")
    print(f"\n{header}\n{'-' * len(header)}")
    for r in result["rows"]:
        use = r.get("utilisation", {})
        peaks = " ".join(f"{w['peak_rss_gb']:.2f}" for w in r.get("workers", []))
        print(f"{r['run']:<10}{r['ppl']:>10.3f}{r['lambda_block']:>7.3g}{r['lambda_row']:>7.3g}"
              f"{(r['plan_s'] or 0):>10.0f}{use.get('search', 0):>6.2f}{(r['prune_s'] or 0):>9.0f}"
              f"{use.get('prune', 0):>6.2f}{r['total_s']:>9.0f}  {peaks} ({r['peak_rss_gb']:.2f})")
    same = len({(r["ppl"], r["lambda_block"], r["lambda_row"]) for r in result["rows"]}) <= 1
    print(f"identical perplexity and lambdas across engines and worker counts: {same}")
    return {**result, "identical": same}


RECOVERY_STEPS = ("dsnot", "r2dsnot", "perp-reconstruct", "perp-bias-norm", "perp-masklora",
                  "perp-scalelora")
REFINER_STEPS = ("dsnot", "r2dsnot")
REFINER_VARIANTS = {"all": ["layers=all"], "sign": ["sign_check=true"]}
"""Refiner rows beside the faithful defaults, for the uniform Wanda bases: every linear refined
(recovery.md §2.2: "benchmark `all` too") and with the paper's sign check (§1.5; faithful mode
has none)."""
PERP_TOKENS = 32768
"""Fixed token budget of every whole-model PERP row (32 optimiser steps of 2 windows x 512
tokens); the layer-wise reconstruction keeps its per-block default (20 steps of 1 window)."""


def recovery_runs(out: Path) -> list[tuple[str, str, list[str]]]:
    """The table: Wanda and SparseGPT at 60 and 70 %, uniform and NeuroAL (screening
    grid), each pruned once plainly and once per recovery step. The recovery rows reuse the
    plain NeuroAL run's plan (``allocation: file``), so every row of a base prunes with the same
    ratios and only the step differs.

    Order: every base with its in-worker steps (the refiners and ``perp-reconstruct``, a few
    minutes each) first, then the whole-model PERP rows (about 4-5 minutes each on 2 cores), so
    that an interrupted run (the suite resumes from its JSON) covers every base before it covers
    every variant. The REFINER_VARIANTS rows of the uniform
    Wanda bases follow the in-worker rows."""
    cheap, model, variants = [], [], []
    for criterion in ("wanda", "sparsegpt"):
        for pct in ("60", "70"):
            for alloc in ("uniform", "neuroal"):
                base = f"{criterion}-{alloc}-{pct}"
                plain = [f"sparsity=0.{pct[0]}", f"criterion.name={criterion}"]
                if alloc == "neuroal":
                    cheap.append((base, C + f"wanda-neuroal-{pct}.yaml", [*SCREEN_GRID, plain[1]]))
                    plain += ["allocation.name=file", f"allocation.path={out / base}"]
                else:
                    cheap.append((base, C + "wanda-uniform-50.yaml", plain))
                # Whole-model rows: Wanda before SparseGPT (loop order), 70 % before 60 % (where
                # recovery matters most), uniform before NeuroAL (loop order).
                priority = (criterion != "wanda", pct != "70")
                for step in RECOVERY_STEPS:
                    extra = [f"recover.steps=[{step}]"]
                    run = (f"{base}+{step}", C + "wanda-uniform-50.yaml", [*plain, *extra])
                    if step.startswith("perp-") and step != "perp-reconstruct":
                        run[2].append(f"recover.{step}.tokens={PERP_TOKENS}")
                        model.append((priority, run))
                    else:
                        cheap.append(run)
                    if step not in REFINER_STEPS or criterion != "wanda" or alloc != "uniform":
                        continue
                    for variant, options in REFINER_VARIANTS.items():
                        variants.append((f"{base}+{step}-{variant}", C + "wanda-uniform-50.yaml",
                                         [*plain, *extra, *(f"recover.{step}.{o}" for o in options)]))
    # sorted() is stable: the variants of one base stay together, in RECOVERY_STEPS order.
    return cheap + variants + [run for _, run in sorted(model, key=lambda item: item[0])]


def recovery(opts: argparse.Namespace) -> dict:
    """Perplexity before (the base row) and after each recovery step, with the step's time and
    trainable parameters; one process per row, resumable like ``allocation``."""
    result = allocation(opts, recovery_runs(Path(opts.out)))
    rows = {r["run"]: r for r in result["rows"]}
    columns = [*RECOVERY_STEPS, *(f"{s}-{v}" for s in REFINER_STEPS for v in REFINER_VARIANTS)]
    header = f"{'base':<24}{'before':>10}" + "".join(f"{s:>18}" for s in columns)
    print(f"\nperplexity after each step (step seconds)\n{header}\n{'-' * len(header)}")
    for label, row in rows.items():
        if "+" in label:
            continue
        cells = []
        for step in columns:
            r = rows.get(f"{label}+{step}")
            cells.append("-" if r is None else f"{r['recovered_ppl']:.2f} ({r['step_s']:.0f})")
        print(f"{label:<24}{row['ppl']:>10.2f}" + "".join(f"{c:>18}" for c in cells))
    return result


OOD_RUN = ("wanda-uniform-60+perp-masklora+pydoc", C + "wanda-uniform-50.yaml",
           ["sparsity=0.6", "criterion.name=wanda", "recover.steps=[perp-masklora]",
            f"recover.perp-masklora.tokens={PERP_TOKENS}", "eval.datasets=[wikitext2,pydoc]"])
"""One whole-model PERP row of the recovery table (Wanda 60 % uniform,
MaskLoRA, retrained on WikiText-2 validation windows) evaluated in-domain (WikiText-2 test) and
out of domain (``pydoc``: the standard library's help topics)."""


def ood(opts: argparse.Namespace) -> dict:
    """Dense, pruned and PERP-recovered perplexity of OOD_RUN on every evaluation corpus."""
    label, config, overrides = OOD_RUN
    args = ["--config", config, *overrides, f"calib.nsamples={opts.nsamples}",
            f"eval.max_windows={opts.eval_windows}", "eval.dense=true", *opts.override]
    report = run_prune(label, args, Path(opts.out))
    corpora = {spec: {"dense_ppl": ev.get("dense_ppl"), "model_ppl": model_ppl(ev),
                      **{k: ev.get(k) for k in ("recovered_ppl", "windows", "seqlen")}}
               for spec, ev in report["eval"].items()
               if isinstance(ev, dict) and model_ppl(ev) is not None}
    step = report["recovery"]["steps"][0]
    print(f"{label}: {step['name']} ({step.get('seconds', 0):.0f} s; run "
          f"{report['bench_wall_seconds']:.0f} s)\n{'corpus':<12}{'dense':>10}{'pruned':>10}"
          f"{'recovered':>11}")
    for spec, ev in corpora.items():
        print(f"{spec:<12}{ev['dense_ppl']:>10.2f}{ev['model_ppl']:>10.2f}"
              f"{ev['recovered_ppl']:>11.2f}")
    return {"run": label, "eval": corpora, "step": step["name"], "step_s": step.get("seconds"),
            "tokens": step.get("tokens"), "trainable": step.get("trainable"),
            "wall_s": report["bench_wall_seconds"],
            "peak_rss_gb": report["peak_memory_bytes"] / 1e9, "command": report["bench_command"],
            "settings": vars(opts)}


def screen(opts: argparse.Namespace) -> dict:
    """NeuroAL options against faithful mode on the screening protocol (see SCREEN_GRID)."""
    return allocation(opts, SCREEN_RUNS)


def masks(opts: argparse.Namespace) -> dict:
    """Per-row mask selection: threshold (kthvalue + tie fix) vs stable argsort."""
    import torch

    from neuroal.criteria.masking import row_mask

    def argsort_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        """The first int(s * cols) indices of each row's stable ascending argsort."""
        order = torch.sort(scores, dim=1, stable=True).indices[:, :int(sparsity * scores.shape[1])]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)

    torch.manual_seed(0)
    rows = []
    for shape in [(576, 1536), (4096, 11008), (8192, 8192)]:
        scores = torch.rand(shape)
        scores_ties = (scores * 16).floor()  # de-quantised-like ties
        for label, s in (("random", scores), ("ties", scores_ties)):
            seconds, outputs = {}, {}
            for name, fn in (("threshold", row_mask), ("argsort", argsort_row_mask)):
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


def onload(opts: argparse.Namespace) -> dict:
    """Sequential onloading vs on-device, ms per block (``launch/bench_onload.py``): on a CPU
    at a reduced width (``--tiny``, or 70B width with ``--seqlen``/``--nsamples`` small), on a
    GPU at Llama-2-70B width in bf16 with and without the prefetch of the next block."""
    sys.path.insert(0, str(REPO / "launch"))
    import bench_onload

    args = ["--device", opts.device, "--blocks", str(opts.blocks), "--repeat", str(opts.repeat)]
    if opts.device == "cpu":
        args += ["--tiny", "--nsamples", "4", "--seqlen", "128", "--micro-batch", "2"]
    result = bench_onload.run(bench_onload.finish(bench_onload.parser().parse_args(args)))
    print(bench_onload.table(result))
    return result


def parallel(opts: argparse.Namespace) -> dict:
    """Pipeline vs data mode (``launch/bench_parallel.py``): SmolLM2's Wanda and SparseGPT
    final prune with 1 and 2 workers, one thread each, in one process (threads) and as whole
    runs in separate processes (two torch.distributed ranks); checks bit-identity."""
    sys.path.insert(0, str(REPO / "launch"))
    import bench_parallel

    args = ["--model", opts.model, "--nsamples", str(opts.nsamples), "--seqlen", str(opts.seqlen),
            "--dist"]
    if opts.only:
        args += ["--criteria", opts.only]
    result = bench_parallel.run(bench_parallel.parser().parse_args(args))
    print(bench_parallel.table(result))
    return result


def transport(opts: argparse.Namespace) -> dict:
    """Streams between Ray actors per transport (``launch/bench_transport.py``): hops of 256 MiB
    and 1 GiB (``--quick``: 64 and 256 MiB) and a 2-actor SmolLM2 prune each, in one run."""
    sys.path.insert(0, str(REPO / "launch"))
    import bench_transport

    result = bench_transport.run(opts)
    print(bench_transport.table(result))
    return result


SEARCH_RUNS = [("wanda-neuroal-70-grid-order", NA70, [*SCREEN_GRID, "allocation.early_stop=false"]),
               ("wanda-neuroal-70-early-stop", NA70, [*SCREEN_GRID, "allocation.early_stop=true"])]
"""Today's search against exact early stopping (middle-out order), Wanda 70 %
on the screening protocol (32 calibration windows, 4 search windows, 6 + 6 candidates)."""


def _unimodal(scores: list[float]) -> bool:
    """Non-increasing then non-decreasing (one valley, plateaus allowed)."""
    i = 0
    while i + 1 < len(scores) and scores[i + 1] <= scores[i]:
        i += 1
    return all(scores[j + 1] >= scores[j] for j in range(i, len(scores) - 1))


def _search_facts(report: dict) -> dict:
    """Candidates fully evaluated, blocks evaluated, winner and score curves from a trail."""
    trail = (report.get("search") or report["plan"].get("trail") or {}).get("candidates", [])
    num_blocks = max((w["blocks"][1] for w in report.get("workers", [])), default=30)
    full = [e for e in trail if e.get("stopped_at_block") is None]
    curves = {ph: [e["score"] for e in trail if e["phase"] == ph] for ph in ("block", "row")}
    return {
        "candidates": len(trail), "fully_evaluated": len(full),
        "blocks_evaluated": sum(num_blocks if e.get("stopped_at_block") is None
                                else e["stopped_at_block"] + 1 for e in trail),
        "blocks_total": num_blocks * len(trail),
        "winner": [(e["phase"], e["value"], e["score"]) for e in trail if e["chosen"]],
        "trail": trail,
        "unimodal": {ph: _unimodal(c) for ph, c in curves.items()
                     if c and all(v is not None for v in c)},
    }


def find_trails(obj: object, where: str = "") -> list[tuple[str, list[dict]]]:
    """Every NeuroAL search trail inside a JSON value: a list of candidate entries (``phase``,
    ``value``, ``score``), as in ``plan.json``'s ``trail.candidates``, ``report.json`` and the
    ``search`` suite's rows; with the JSON path where each was found."""
    found: list[tuple[str, list[dict]]] = []
    if isinstance(obj, list):
        if obj and all(isinstance(e, dict) and {"phase", "value", "score"} <= e.keys() for e in obj):
            return [(where, obj)]
        for i, v in enumerate(obj):
            found += find_trails(v, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            found += find_trails(v, f"{where}/{k}")
    return found


def curve_verdicts(trail: list[dict]) -> dict[str, dict]:
    """Per phase (``block``: λ, ``row``: μ): the score curve in grid order and whether it is
    unimodal; ``None`` when a candidate was stopped early (its score is only bounded below)."""
    out = {}
    for phase in dict.fromkeys(e["phase"] for e in trail):
        entries = sorted((e for e in trail if e["phase"] == phase), key=lambda e: e["value"])
        scores = [e["score"] for e in entries]
        known = all(v is not None for v in scores)
        out[phase] = {"values": [e["value"] for e in entries], "scores": scores,
                      "points": len(entries), "unimodal": _unimodal(scores) if known else None}
    return out


def unimodal(opts: argparse.Namespace) -> dict:
    """From every recorded trail under ``opts.paths`` (JSON files or folders
    searched for ``*.json``), whether the alignment score over the λ grid and the μ grid had one
    valley. Identical trails (a run's ``report.json``, ``plan.json`` and bench row) count once;
    curves of fewer than 3 points are unimodal by definition and counted apart."""
    files: list[Path] = []
    for p in map(Path, opts.paths or [REPO / "outputs", REPO / "benchmarks"]):
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p] if p.exists() else []
    trails: dict[str, dict] = {}
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for where, trail in find_trails(data):
            key = json.dumps([[e["phase"], e["value"], e["score"]] for e in trail])
            trails.setdefault(key, {"source": f"{f}{where}", "phases": curve_verdicts(trail)})
    rows = list(trails.values())
    summary = {}
    for phase in ("block", "row"):
        curves = [r["phases"][phase] for r in rows if phase in r["phases"]]
        judged = [c for c in curves if c["unimodal"] is not None and c["points"] >= 3]
        summary[phase] = {"curves": len(curves), "judged": len(judged),
                          "unimodal": sum(c["unimodal"] for c in judged),
                          "trivial": sum(c["points"] < 3 for c in curves),
                          "undetermined": sum(c["unimodal"] is None for c in curves)}
    for r in rows:
        print(r["source"], {ph: v["unimodal"] for ph, v in r["phases"].items()})
    for phase, s in summary.items():
        print(f"{phase}: {s['unimodal']} of {s['judged']} curves (>= 3 points, every score known) "
              f"unimodal; {s['trivial']} with < 3 points, {s['undetermined']} with stopped "
              "candidates", file=sys.stderr)
    return {"trails": len(rows), "files": len(files), "summary": summary, "rows": rows}


def search(opts: argparse.Namespace) -> dict:
    """Search seconds, candidates and blocks evaluated, winner, with and
    without early stopping; rows already in the JSON are kept (resumable)."""
    path = Path(opts.json or Path(opts.out) / "search.json")
    done = json.loads(path.read_text()) if path.exists() else {"rows": []}
    rows = {r["run"]: r for r in done["rows"]}
    for label, config, overrides in SEARCH_RUNS:
        if label in rows:
            continue
        args = ["--config", config, *overrides, f"calib.nsamples={opts.nsamples}",
                f"eval.max_windows={opts.eval_windows}", "eval.dense=false", *opts.override]
        report = run_prune(label, args, Path(opts.out))
        policy = report["plan"]["policy"]
        rows[label] = {"run": label, "search_s": report["timings"].get("allocate"),
                       "lambda_block": policy.get("lambda_block"),
                       "lambda_row": policy.get("lambda_row"),
                       "ppl": model_ppl(report["eval"]["wikitext2"]),
                       "command": report["bench_command"], **_search_facts(report)}
        print(f"{label}: search {rows[label]['search_s']:.0f} s, "
              f"{rows[label]['fully_evaluated']}/{rows[label]['candidates']} candidates in full, "
              f"{rows[label]['blocks_evaluated']}/{rows[label]['blocks_total']} blocks",
              file=sys.stderr, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": list(rows.values())}, indent=2, default=str))
    return {"rows": list(rows.values()), "settings": vars(opts)}


def reliability(opts: argparse.Namespace) -> dict:
    """The hostile-input catalogue (``launch/bench_reliability.py``): one verdict per case,
    the verdict table on stdout; JSON to benchmarks/reliability.json unless --json says."""
    sys.path.insert(0, str(REPO / "launch"))
    import bench_reliability

    result = bench_reliability.run(opts.only, Path(opts.out) / "reliability")
    print(bench_reliability.table(result["cases"]))
    if not opts.json:
        opts.json = str(REPO / "benchmarks" / "reliability.json")
    return result


def plan_time(opts: argparse.Namespace) -> dict:
    """The time planner's CPU figures measured, then its predictions against the quickstart and
    a Wanda and a SparseGPT prune (``launch/bench_plan_time.py check --calibrate``)."""
    sys.path.insert(0, str(REPO / "launch"))
    import bench_plan_time

    args = ["check", "--calibrate", "--out", str(Path(opts.out) / "plan_time")]
    return bench_plan_time.check(bench_plan_time.parser().parse_args(
        args + (["--only", opts.only] if opts.only else [])))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=["foundation", "masks", "allocation", "screen", "workers",
                                          "recovery", "ood", "onload", "search", "unimodal",
                                          "parallel", "reliability", "transport",
                                          "plan-time"],
                   nargs="?", default="foundation")
    p.add_argument("paths", nargs="*", help="unimodal suite: JSON files or folders holding "
                   "NeuroAL trails (default: outputs/ and benchmarks/)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--only", help="comma list of criteria (allocation: label substrings) to run")
    p.add_argument("--exact", action="store_true",
                   help="allocation-like suites: --only keys name rows exactly, not substrings")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu", help="onload suite: cpu or cuda")
    p.add_argument("--blocks", type=int, default=4, help="onload suite: blocks of the checkpoint")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench"))
    p.add_argument("--override", action="append", default=[],
                   help="search and ood suites: an extra key=value override (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help="transport suite: 64 and 256 MiB hops instead of 256 MiB and 1 GiB")
    p.add_argument("--json", help="where to write the results (default <out>/<suite>.json)")
    opts = p.parse_args()
    result = {"foundation": foundation, "masks": masks, "allocation": allocation,
              "screen": screen, "workers": workers,
              "recovery": recovery, "ood": ood, "onload": onload,
              "search": search, "unimodal": unimodal, "parallel": parallel,
              "reliability": reliability, "transport": transport,
              "plan-time": plan_time}[opts.suite](opts)
    path = Path(opts.json or Path(opts.out) / f"{opts.suite}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
