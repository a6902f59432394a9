#!/usr/bin/env python
"""Rewrite the figures of README.md and docs/ from benchmark output, never by hand.

    python launch/readme_figures.py quickstart outputs/smollm2-wanda-neuroal-60/report.json
    python launch/readme_figures.py search            # default JSON: benchmarks/search.json
    python launch/readme_figures.py --all --check     # every block against its committed JSON

Each kind owns the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in one page
(:data:`TARGETS`: README.md or a page under docs/; ``--readme`` for another file) and replaces
only that; the JSON defaults to the committed one under benchmarks/. ``--check`` exits 1 when
the page disagrees with the JSON instead of rewriting it. Bad input exits 2 with a message.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

from neuroal.outputs.report_keys import model_ppl

REPO = Path(__file__).resolve().parent.parent


def _ppl(value: object) -> float:
    """A perplexity entry: a number, or ``{dataset: number}`` (WikiText-2 taken)."""
    if isinstance(value, dict):
        value = value.get("wikitext2", next(iter(value.values())))
    return float(value)  # type: ignore[arg-type]


def quickstart_text(report: dict) -> str:
    """The quickstart sentence from ``make quickstart``'s ``report.json``."""
    ev = report["eval"]["wikitext2"]
    uniform = [c for c in report.get("compare", []) if c["allocation"] == "uniform"]
    if not uniform:
        raise KeyError("compare[allocation=uniform] (run the quickstart config, which compares)")
    policy = report["plan"]["policy"]
    lam = [("-" if v is None else f"{v:.2f}") for v in (policy.get("lambda_block"),
                                                         policy.get("lambda_row"))]
    return (f"It prints dense {_ppl(ev['dense_ppl']):.2f}, uniform Wanda "
            f"{_ppl(model_ppl(uniform[0])):.2f} and Wanda + NeuroAL {_ppl(model_ppl(ev)):.2f}"
            f"\n(lambda_block {lam[0]}, lambda_row {lam[1]}).")


def search_text(result: dict) -> str:
    """The early-stopping table from ``launch/bench.py search``'s JSON."""
    lines = ["| search | search s | candidates in full | blocks evaluated | lambda (block / row) "
             "| winner's score (block / row step) |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        scores = " / ".join(f"{w[2]:.10g}" for w in r["winner"])
        lines.append(f"| {r['run']} | {r['search_s']:.0f} | {r['fully_evaluated']} / "
                     f"{r['candidates']} | {r['blocks_evaluated']} / {r['blocks_total']} | "
                     f"{r['lambda_block']} / {r['lambda_row']} | {scores} |")
    winners = {json.dumps(r["winner"]) for r in result["rows"]}
    lines.append("")
    lines.append(f"Winners and their full scores identical across the rows: "
                 f"{'yes' if len(winners) == 1 else 'NO'}.")
    return "\n".join(lines)


def _trail(row: dict) -> list[dict]:
    """A search row's trail (the suite writes it as a Python literal or a list)."""
    import ast

    trail = row["trail"]
    return ast.literal_eval(trail) if isinstance(trail, str) else trail


def early_stop_text(result: dict) -> str:
    """What early stopping saved, and how far the candidates' full scores lie from the best
    one, from ``launch/bench.py search``'s JSON (docs/allocation.md)."""
    grid, stop = (next(r for r in result["rows"] if r["run"].endswith(end))
                  for end in ("grid-order", "early-stop"))
    stopped = [c for c in _trail(stop) if c.get("stopped_at_block") is not None]
    at = sorted({c["stopped_at_block"] for c in stopped})
    blocks = stop["blocks_total"] // stop["candidates"]
    saved = stop["blocks_total"] - stop["blocks_evaluated"]
    gaps = []
    for phase in ("block", "row"):
        scores = [c["score"] for c in _trail(grid) if c["phase"] == phase]
        gaps += [x / min(scores) - 1 for x in scores if x != min(scores)]
    return (f"Early stopping is exact but barely cheaper on this protocol: the {len(stopped)} "
            f"stopped candidates stopped at block {', '.join(map(str, at))} of {blocks} "
            f"({saved} of {stop['blocks_total']} block evaluations saved, "
            f"{saved / stop['blocks_total']:.1%}). In the grid-order run the other candidates' "
            f"full scores lie {min(gaps):.1%} to {max(gaps):.0%} above the best of their step.")


def unimodal_text(result: dict) -> str:
    """The unimodality sentence from ``launch/bench.py unimodal``'s JSON."""
    s = result["summary"]
    names = {"block": "lambda", "row": "mu"}
    parts = [f"over {names[ph]} {s[ph]['unimodal']} of {s[ph]['judged']}"
             for ph in ("block", "row")]
    others = sum(s[ph]["trivial"] + s[ph]["undetermined"] for ph in ("block", "row"))
    return (f"Of the {result['trails']} distinct search trails recorded so far, the score curve was "
            f"unimodal {parts[0]} and {parts[1]} curves of 3 or more fully evaluated points "
            f"({others} curves with fewer points or stopped candidates not judged).")



BASES = [f"{c}-{a}-{p}" for c in ("wanda", "sparsegpt") for p in ("60", "70")
         for a in ("uniform", "neuroal")]
"""Rows of the recovery table, in its order."""


def _base_name(label: str, base_row: dict | None) -> str:
    """``wanda-neuroal-70`` -> ``Wanda 70 % NeuroAL, lambda 0.15 / 0.15`` (lambdas from the
    base's own row when the JSON holds it)."""
    criterion, alloc, pct = label.split("-")
    name = f"{'Wanda' if criterion == 'wanda' else 'SparseGPT'} {pct} % " \
           f"{'uniform' if alloc == 'uniform' else 'NeuroAL'}"
    if alloc == "neuroal" and base_row is not None:
        lam = [("-" if v is None else f"{v:g}") for v in (base_row.get("lambda_block"),
                                                         base_row.get("lambda_row"))]
        name += f", lambda {lam[0]} / {lam[1]}"
    return name


def scalelora_text(result: dict) -> str:
    """The ``perp-scalelora`` table from ``launch/bench.py recovery``'s JSON: per base, the
    pruned perplexity measured in the same run, after ScaleLoRA, and the seconds. A JSON that
    carries ``stale`` (the figure before the learning-rate fix) or ``masklora`` (MaskLoRA's
    figure on the same protocol) per base gets a column for each, the latter with ScaleLoRA's
    change against it."""
    rows = {r["run"]: r for r in result["rows"]}
    stale, masklora = result.get("stale"), result.get("masklora")
    head = ["base", "before (same run)", "perp-scalelora (step s / run wall s)"]
    if stale:
        head.append("before the learning-rate fix (lr 5e-4)")
    if masklora:
        head += ["perp-masklora", "ScaleLoRA vs MaskLoRA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for base in BASES:
        r = rows.get(f"{base}+perp-scalelora")
        cells = [_base_name(base, rows.get(base))]
        cells += (["not rerun", "not rerun"] if r is None else
                  [f"{r['ppl']:.2f}", f"{r['recovered_ppl']:.2f} ({r['step_s']:.0f} s / "
                   f"{r['wall_s']:.0f} s)"])
        if stale:
            cells.append(f"{stale[base]:.2f}" if base in stale else "-")
        if masklora:
            mask = masklora.get(base)
            cells.append("-" if mask is None else f"{mask:.2f}")
            cells.append("-" if mask is None or r is None
                         else f"{r['recovered_ppl'] / mask - 1:+.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trainable_text(result: dict) -> str:
    """The trainable parameters of whole-model PERP from ``benchmarks/recovery_scalelora.json``
    (ScaleLoRA) and ``benchmarks/ood.json`` (MaskLoRA), as a share of the model."""
    scale = next(r for r in result["recovery_scalelora"]["rows"] if "trainable" in r)
    total = scale["trainable"] / scale["trainable_fraction"]
    mask = result["ood"]
    return (f"Trainable parameters of SmolLM2-135M ({total / 1e6:.1f} M parameters): "
            f"`{mask['step']}` {mask['trainable']:,} ({mask['trainable'] / total:.2%}: rank-16 "
            f"MaskLoRA on every block linear plus a LoRA on the untied head), `{scale['recover']}` "
            f"{scale['trainable']:,} ({scale['trainable_fraction']:.2%}: a row and a column scale "
            f"per block linear, plus the head LoRA).")


def magnitude_text(result: dict) -> str:
    """Per-row uniform magnitude against NeuroAL's per-row magnitude, from
    ``launch/bench.py allocation``'s JSON (``magnitude-uniform-row-70`` and
    ``magnitude-neuroal-70``; the latter's optional ``before_row_step_fix`` is the first
    figure it replaces)."""
    rows = {r["run"]: r for r in result["rows"]}
    uniform, neuroal = rows["magnitude-uniform-row-70"], rows["magnitude-neuroal-70"]
    text = (f"Uniform magnitude with per-row masks (`criterion.group=row`, the grouping NeuroAL's "
            f"magnitude masks use) measures {uniform['ppl']:.1f} at 70 % on the same protocol, so "
            f"NeuroAL ({neuroal['ppl']:.0f}) improves magnitude "
            f"{uniform['ppl'] / neuroal['ppl']:.2f}x with the grouping held fixed.")
    if "before_row_step_fix" in neuroal:
        lam = " / ".join(f"{neuroal[k]:g}" for k in ("lambda_block", "lambda_row"))
        text += (f" The NeuroAL figure is a rerun after the row-step fix ("
                 f"{neuroal['wall_s']:.0f} s): lambda {lam} now scores {neuroal['ppl']:.0f}, "
                 f"{neuroal['before_row_step_fix']:.0f} before the fix.")
    return text


def ood_text(result: dict) -> str:
    """One whole-model PERP row on every evaluation corpus, from
    ``launch/bench.py ood``'s JSON."""
    budget = f" ({result['tokens']:,} tokens)" if result.get("tokens") else ""
    lines = [f"| corpus | dense | pruned | after {result['step']}{budget} | change by PERP |",
             "|---|---|---|---|---|"]
    for spec, ev in result["eval"].items():
        change = ev["recovered_ppl"] / model_ppl(ev) - 1
        lines.append(f"| {spec} ({ev['windows']} x {ev['seqlen']}) | {ev['dense_ppl']:.2f} | "
                     f"{model_ppl(ev):.2f} | {ev['recovered_ppl']:.2f} | {change:+.1%} |")
    return "\n".join(lines)


def results_text(result: dict) -> str:
    """The README's one results table, from ``launch/bench.py recovery``'s JSON: per criterion
    and sparsity, uniform against NeuroAL, pruned and after whole-model PERP (ScaleLoRA), all
    measured on one protocol."""
    rows = {r["run"]: r for r in result["rows"]}
    lines = ["| criterion, sparsity | uniform | NeuroAL (lambda block / row) | uniform + PERP | "
             "NeuroAL + PERP |", "|---|---|---|---|---|"]
    for criterion in ("wanda", "sparsegpt"):
        for pct in ("60", "70"):
            cells = []
            for alloc in ("uniform", "neuroal"):
                r = rows.get(f"{criterion}-{alloc}-{pct}+perp-scalelora")
                cells.append(None if r is None else (r["ppl"], r["recovered_ppl"]))
            if None in cells:
                continue
            base = rows.get(f"{criterion}-neuroal-{pct}")
            lam = ""
            if base is not None:
                lam = " (" + " / ".join("-" if base.get(k) is None else f"{base[k]:g}"
                                        for k in ("lambda_block", "lambda_row")) + ")"
            name = f"{'Wanda' if criterion == 'wanda' else 'SparseGPT'} {pct} %"
            lines.append(f"| {name} | {cells[0][0]:.2f} | {cells[1][0]:.2f}{lam} | "
                         f"{cells[0][1]:.2f} | {cells[1][1]:.2f} |")
    return "\n".join(lines)


def parallel_text(result: dict) -> str:
    """The pipeline vs data mode table from ``launch/bench.py parallel``'s JSON
    (docs/parallelism.md)."""
    lines = ["| criterion | workers | mode | final prune (s) | speed-up | bit-identical |",
             "|---|---:|---|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['criterion']} | {r['workers']} | {r['mode']} | {r['seconds']:.1f} | "
                     f"{r['speedup']:.2f}x | {'yes' if r['identical'] else 'NO'} |")
    st = result["settings"]
    load = " / ".join(f"{a:.1f} -> {b:.1f}" for a, b in zip(st["loadavg_before"][:1],
                                                             st["loadavg_after"][:1], strict=True))
    lines += ["", f"{st['model']}, {st['dtype']}, {st['sparsity']:.0%} uniform, "
              f"{st['nsamples']} x {st['seqlen']} calibration tokens, micro-batch "
              f"{st['micro_batch']}, {st['threads_per_worker']} thread per worker on a "
              f"{st['cpus']}-core CPU shared with other jobs (1-minute load average {load}). "
              "Speed-up against one worker in pipeline mode; bit-identical: the pruned "
              "weights equal the first row's bit for bit."]
    processes = result.get("process_rows") or []
    if processes:
        lines += ["", "Whole runs in separate processes (one thread each; torch.distributed "
                  "ranks over gloo for `dist`):", "",
                  "| criterion | engine | processes | mode | final prune (s) | speed-up | "
                  "bit-identical |", "|---|---|---:|---|---:|---:|---|"]
        lines += [f"| {r['criterion']} | {r['engine']} | {r['workers']} | {r['mode']} | "
                  f"{r['seconds']:.1f} | {r['speedup']:.2f}x | "
                  f"{'yes' if r['identical'] else 'NO'} |" for r in processes]
        lines += ["", "Speed-up against the one-process run; bit-identical: the saved weights "
                  "equal the one-process run's bit for bit. Command of each run: "
                  f"`{processes[-1]['command']}` (engine, workers and mode vary)."]
    return "\n".join(lines)


def transport_text(result: dict) -> str:
    """The transport tables of docs/transport.md from ``launch/bench.py transport``'s JSON."""
    settings = result["settings"]
    lines = ["| transport | stream | one hop | GB/s | in-process copy |", "|---|---|---|---|---|"]
    for r in result["hops"]:
        lines.append(f"| {r['transport']} | {r['mib']} MiB | {r['seconds']:.3f} s | "
                     f"{r['gb_per_s']:.2f} | {r['copy_seconds']:.3f} s |")
    lines += ["", f"2-actor Wanda prune of SmolLM2-135M in pipeline mode (fp32, uniform 50 %, "
              f"{settings['nsamples']} x {settings['seqlen']} calibration tokens):", "",
              "| transport | final prune | whole run | pruned perplexity |", "|---|---|---|---|"]
    for r in result["prunes"]:
        lines.append(f"| {r['transport']} | {r['prune_s']:.1f} s | {r['total_s']:.1f} s | "
                     f"{r['ppl']:.4f} |")
    lines += ["", f"Same perplexity for every transport: {'yes' if result['identical'] else 'NO'}."
              f" Measured with `{settings['command']}` (Ray {settings['ray']}, torch "
              f"{settings['torch']}, {settings['threads']} threads)."]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    """``42 s``, ``12.5 min``, ``3.2 h`` (as ``neuroal plan`` prints them)."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


PLAN_PHASES = ("load", "search", "prune", "evaluation", "export", "total")


def planning_text(result: dict) -> str:
    """The 70B wall-time table of docs/planning.md from ``launch/bench_plan_time.py
    predict``'s JSON: one row per (run, GPUs, engine.parallel), seconds per phase."""
    lines = ["| run | GPUs | `engine.parallel` | " + " | ".join(PLAN_PHASES) + " |",
             "|---|---|---|" + "---|" * len(PLAN_PHASES)]
    for r in result["rows"]:
        cells = " | ".join(_duration(r["seconds"][p]) for p in PLAN_PHASES)
        lines.append(f"| {r['run']} | {r['workers']} x {result['device'].upper()} | "
                     f"{r['mode']} | {cells} |")
    by = {(r["run"], r["workers"], r["mode"]): r["seconds"]["total"] for r in result["rows"]}
    runs = list(dict.fromkeys(r["run"] for r in result["rows"]))
    lines.append("")
    lines.append("On 8 GPUs, data mode against pipeline mode: " + "; ".join(
        f"{run} {by[(run, 8, 'pipeline')] / by[(run, 8, 'data')]:.1f}x faster in total, "
        f"{by[(run, 1, 'pipeline')] / by[(run, 8, 'data')]:.1f}x against 1 GPU" for run in runs)
        + f" (WikiText-2 evaluation: {result['eval_windows']} windows of 2048 tokens).")
    return "\n".join(lines)


def prediction_text(result: dict) -> str:
    """The README's 70B wall-time summary from the same JSON as :func:`planning_text`: per run,
    the predicted total on 1 GPU and on 8 in each ``engine.parallel`` mode."""
    by = {(r["run"], r["workers"], r["mode"]): r["seconds"]["total"] for r in result["rows"]}
    gpu = result["device"].upper()
    lines = [f"| {result['model']}, predicted wall time | 1 x {gpu} | 8 x {gpu}, pipeline | "
             f"8 x {gpu}, data |", "|---|---|---|---|"]
    for run in dict.fromkeys(r["run"] for r in result["rows"]):
        one = by.get((run, 1, "pipeline"), by.get((run, 1, "data")))
        lines.append(f"| {run} | {_duration(one)} | {_duration(by[(run, 8, 'pipeline')])} | "
                     f"{_duration(by[(run, 8, 'data')])} |")
    return "\n".join(lines)


def plancheck_text(result: dict) -> str:
    """The CPU check of the time planner from ``launch/bench.py plan-time``'s JSON: per run
    and phase, predicted and measured seconds (phases under 5 s both ways left out)."""
    lines = ["| run | phase | predicted s | measured s | error |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        for phase, error in r["relative_error"].items():
            lines.append(f"| {r['run']} | {phase} | {r['predicted'][phase]:.0f} | "
                         f"{r['measured'][phase]:.0f} | {error:+.0%} |")
    verdict = "within" if result["within"] else "NOT within"
    lines.append("")
    lines.append(f"Every compared phase {verdict} {result['tolerance']:.0%}.")
    return "\n".join(lines)


def memory_text(result: dict) -> str:
    """docs/memory.md's measured block: ``launch/memory_figures.py`` renders it (beside its
    ``record`` step, which turns a bench_scale run into the committed JSON)."""
    spec = importlib.util.spec_from_file_location("memory_figures",
                                                  Path(__file__).with_name("memory_figures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.memory_text(result)


VERDICTS = ("clear error before loading", "unclear", "error after work", "traceback", "silent",
            "data loss", "ran")
"""The reliability catalogue's verdicts, in the table's order (launch/bench_reliability.py)."""


def reliability_text(result: dict) -> str:
    """docs/safety.md's verdict table from ``launch/bench.py reliability``'s JSON: counts per
    verdict, then each group's cases with their verdicts."""
    rows = result["cases"]
    lines = [f"{result['total']} hostile cases, {result['expected_met']} with the verdict they "
             f"should get (`{result['command']}`, {result['wall_s']:.0f} s).", "",
             "| verdict | cases |", "|---|---|"]
    lines += [f"| {v} | {result['summary'].get(v, 0)} |" for v in VERDICTS]
    lines += ["", "| group | case | expected | verdict |", "|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['id']} | {r['expected']} | {r['verdict']} |" for r in rows]
    notes = [f"`{r['id']}`: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines)


PLAN_JSON = "benchmarks/plan_examples.json"
"""Where :func:`record_plans` writes by default."""

PLAN_EXAMPLES = {
    "70b-8x80": "--model llama-2-70b --workers 8 --gpu-memory 80GB",
    "70b-2x24-sparsegpt-neuroal": "--model llama-2-70b --workers 2 --gpu-memory 24GB --seqlen 512 "
                                  "--criterion sparsegpt --allocation neuroal",
    "70b-recover": "--model llama-2-70b --workers 8 --gpu-memory 80GB "
                   "--recover perp-reconstruct,perp-masklora",
    "70b-recover-checkpointing": "--model llama-2-70b --workers 8 --gpu-memory 80GB "
                                 "--recover perp-reconstruct,perp-masklora "
                                 "--recover-opt perp-masklora.gradient_checkpointing=true",
    "70b-1x80": "--model llama-2-70b --workers 1 --gpu-memory 80GB",
    "70b-2x24": "--model llama-2-70b --workers 2 --gpu-memory 24GB",
    "70b-2x24-host64": "--model llama-2-70b --workers 2 --gpu-memory 24GB --host-memory 64GB",
    "70b-sparsegpt-2x24": "--model llama-2-70b --workers 2 --gpu-memory 24GB --criterion sparsegpt",
    "70b-sparsegpt-1x80": "--model llama-2-70b --workers 1 --gpu-memory 80GB --criterion sparsegpt",
    "qwen3-30b-a3b-1x80": "--model qwen3-30b-a3b --workers 1 --gpu-memory 80GB",
    "llama-3.3-70b-4x80": "--model llama-3.3-70b --workers 4 --gpu-memory 80GB",
    "deepseek-v3-wanda": "--model deepseek-v3 --workers 8 --gpu-memory 80GB",
    "deepseek-v3-sparsegpt": "--model deepseek-v3 --workers 8 --gpu-memory 80GB "
                             "--criterion sparsegpt",
    "70b-sparsegpt-8-time": "--model llama-2-70b --workers 8 --criterion sparsegpt --sparsity 0.7 "
                            "--device-class h100 --eval-windows 166",
}
"""The ``neuroal plan`` examples the docs quote, by name (arguments as typed)."""

PRUNE_REFUSAL = ("--model llama-2-70b --workers 2 --dtype bfloat16 --device cpu --no-save "
                 "engine.memory_limit=24GB engine.onload=device")
"""A prune the pre-load memory check refuses (docs/scale-out.md quotes its message)."""


def record_plans(path: Path) -> None:
    """Run every :data:`PLAN_EXAMPLES` plan (config only, offline) and :data:`PRUNE_REFUSAL`,
    and write ``{"plans": {name: {"args", "exit", "output", "summary"}}, "refusal": {...}}``
    to ``path``: ``python launch/readme_figures.py --record-plans`` (benchmarks/plan_examples.json,
    about 5 minutes on 2 CPU cores; rerun it whenever the planner changes)."""
    import contextlib
    import io
    import os
    import shlex
    import subprocess
    import tempfile

    sys.path.insert(0, str(REPO))
    from neuroal import __version__
    from neuroal.commands.plan import main as plan_main
    from neuroal.planning import format_summary

    plans = {}
    for name, args in PLAN_EXAMPLES.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = plan_main([*shlex.split(args), "--json", "-"])
        print(f"{name}: exit {code} {err.getvalue().strip()}", file=sys.stderr)
        if code == 2:
            plans[name] = {"args": args, "exit": code, "error": err.getvalue().strip()}
            continue
        summary = json.loads(out.getvalue())
        summary["time"].pop("provenance", None)
        plans[name] = {"args": args, "exit": code, "summary": summary,
                       "output": format_summary(summary) + "\n\n" + summary["time"]["text"]}
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "prune.py"),
                               *shlex.split(PRUNE_REFUSAL)], capture_output=True, text=True,
                              cwd=scratch, env=env)
    message = [line.split(": ", 1)[1] for line in proc.stderr.splitlines() if " ERROR " in line]
    refusal = {"args": PRUNE_REFUSAL, "exit": proc.returncode, "message": message[-1]}
    path.write_text(json.dumps({"neuroal": __version__, "command": "python launch/"
                                "readme_figures.py --record-plans", "plans": plans,
                                "refusal": refusal}, indent=2) + "\n")


EVALUATE_EXAMPLE = "smollm2-135m --eval-windows 4 --tasks neuroal_tiny_qa"
"""The ``neuroal evaluate`` run docs/evaluation.md quotes (the embedded model, dense)."""


def record_evaluate(path: Path) -> None:
    """Run :data:`EVALUATE_EXAMPLE` and write its printed result lines to ``path``:
    ``python launch/readme_figures.py --record-evaluate`` (benchmarks/evaluate_example.json,
    a few minutes on 2 CPU cores)."""
    import os
    import shlex
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"),
                               *shlex.split(EVALUATE_EXAMPLE)], capture_output=True, text=True,
                              cwd=scratch, env=env)
    if proc.returncode:
        raise SystemExit(f"error: neuroal evaluate {EVALUATE_EXAMPLE} exited {proc.returncode}:"
                         f"\n{proc.stderr[-2000:]}")
    path.write_text(json.dumps({"command": "python launch/readme_figures.py --record-evaluate",
                                "args": EVALUATE_EXAMPLE, "exit": proc.returncode,
                                "stdout": proc.stdout.splitlines()}, indent=2) + "\n")


def evaluate_text(result: dict) -> str:
    """docs/evaluation.md's example: the command and the lines it printed."""
    return "\n".join(["```", f"$ neuroal evaluate {result['args']}", *result["stdout"], "```"])


GB = 1e9


def _plan(result: dict, name: str) -> dict:
    """One recorded plan example (``plans.<name>``), with its command as typed."""
    plan = dict(result["plans"][name])
    plan["command"] = f"python launch/plan.py {plan['args']}"
    return plan


def _output_lines(plan: dict, prefixes: tuple[str, ...]) -> list[str]:
    """The lines of a plan's printed output that start with one of ``prefixes``."""
    return [line for line in plan["output"].splitlines() if line.startswith(prefixes)]


def _commands_block(result: dict, names: tuple[str, ...],
                    prefixes: tuple[str, ...] = ("verdict:",)) -> str:
    """A bash block: per example its command, then the chosen output lines as comments."""
    lines = ["```bash"]
    for name in names:
        plan = _plan(result, name)
        lines.append(plan["command"])
        lines += [f"# {line}" for line in _output_lines(plan, prefixes)]
    return "\n".join([*lines, "```"])


def plan_memory_text(result: dict) -> str:
    """docs/scale-out.md's first planner examples, from ``benchmarks/plan_examples.json``
    (written by ``python launch/readme_figures.py --record-plans``)."""
    return _commands_block(result, ("70b-8x80", "70b-2x24-sparsegpt-neuroal"),
                           ("verdict:", "largest known model", "fewest workers"))


def plan_recover_text(result: dict) -> str:
    """The whole-model PERP memory of Llama-2-70B, without and with gradient checkpointing."""
    need = [_plan(result, n)["summary"]["plan"]["retrain"]["total"] / GB
            for n in ("70b-recover", "70b-recover-checkpointing")]
    limit = _plan(result, "70b-recover")["summary"]["limit_bytes"] / GB
    verdict = "refuses" if need[0] > limit else "accepts"
    return (f"Llama-2-70B with `perp-masklora` needs about {need[0]:.0f} GB there ({need[1]:.0f} GB "
            f"with checkpointing), so the check {verdict} it on one {limit:.0f} GB device before "
            "anything loads:\n\n" + _commands_block(result, ("70b-recover-checkpointing",),
                                                     ("whole-model PERP",)))


def plan_refusal_text(result: dict) -> str:
    """A prune that the pre-load memory check refuses, with its message."""
    import textwrap

    refusal = result["refusal"]
    wrapped = textwrap.wrap(f"ERROR {refusal['message']}", 95)
    return "\n".join(["```bash", f"python launch/prune.py {refusal['args']}",
                      *(f"# {line}" for line in wrapped), f"# (exit code {refusal['exit']})",
                      "```"])


def plan_onload_text(result: dict) -> str:
    """The onloading examples: 70B on one 80 GB GPU, on two 24 GB GPUs, and with less host
    memory."""
    return _commands_block(result, ("70b-1x80", "70b-2x24", "70b-2x24-host64"),
                           ("verdict:", "host memory needed:"))


def _verdict(plan: dict) -> str:
    """``fits`` / ``does not fit`` with the peak and the onload mode of one plan example."""
    summary = plan["summary"]
    req = summary["plan"]["request"]
    return (f"{'fits' if summary['fits'] else 'does not fit'} on {req['workers']} x "
            f"{summary['limit_bytes'] / GB:.0f} GB (peak {summary['plan']['peak_bytes'] / GB:.1f} "
            f"GB per worker, `engine.onload={req['onload']}`, "
            f"`engine.parallel={req.get('parallel', 'pipeline')}`)")


def plan_sparsegpt_text(result: dict) -> str:
    """SparseGPT at 70B on two 24 GB devices and on one 80 GB device."""
    small, large = (_plan(result, n) for n in ("70b-sparsegpt-2x24", "70b-sparsegpt-1x80"))
    worker = max(small["summary"]["plan"]["workers"], key=lambda w: w["total"])
    return (f"With SparseGPT (`--criterion sparsegpt`) Llama-2-70B {_verdict(small)}: of that, "
            f"its statistics (the Hessians) take {worker['statistics'] / GB:.1f} GB and its transients "
            f"(the short-lived buffers of its largest step) {worker['transients'] / GB:.1f} "
            f"GB. It {_verdict(large)}.")


PLAN_COLUMNS = ("weights", "activations", "statistics", "transients", "masked_block", "overhead",
                "total")


def plan_table_text(result: dict) -> str:
    """The per-worker table of a mixture of experts and a 70B dense model (GB)."""
    lines = ["| model | params | worker | blocks | " + " | ".join(
        c.replace("_", " ") for c in PLAN_COLUMNS) + " | verdict |",
        "|---|---|---|---|" + "---|" * len(PLAN_COLUMNS) + "---|"]
    for name in ("qwen3-30b-a3b-1x80", "llama-3.3-70b-4x80"):
        summary = _plan(result, name)["summary"]
        plan = summary["plan"]
        groups: list[tuple[list[dict], tuple[float, ...]]] = []
        for w in plan["workers"]:
            cells = tuple(round(w[c] / GB, 2) for c in PLAN_COLUMNS)
            if groups and groups[-1][1] == cells:
                groups[-1][0].append(w)
            else:
                groups.append(([w], cells))
        verdict = (f"{'fits' if summary['fits'] else 'does not fit'} on "
                   f"{plan['request']['workers']} x {summary['limit_bytes'] / GB:.0f} GB "
                   f"(fewest: {summary['min_workers']})")
        for i, (workers, cells) in enumerate(groups):
            head = (f"{plan['model']} | {plan['params'] / 1e9:.2f} B" if i == 0 else " | ")
            ranks = ", ".join(str(w["rank"]) for w in workers)
            blocks = ", ".join(f"{w['start']}-{w['stop'] - 1}" for w in workers)
            lines.append(f"| {head} | {ranks} | {blocks} | "
                         + " | ".join(f"{c:.2f}" for c in cells)
                         + f" | {verdict if i == 0 else ''} |")
    return "\n".join(lines)


def plan_time_text(result: dict) -> str:
    """docs/planning.md's opening example: the command and its predicted wall time."""
    plan = _plan(result, "70b-sparsegpt-8-time")
    return "\n".join(["```bash", plan["command"].replace("python launch/plan.py", "neuroal plan"),
                      "```", "", "After the memory table it prints one line per phase and the "
                      "total:", "", "```", plan["summary"]["time"]["text"], "```"])


def deepseek_plan_text(result: dict) -> str:
    """docs/quantized.md's DeepSeek-V3 figures (Wanda on 8 x 80 GB)."""
    summary = _plan(result, "deepseek-v3-wanda")["summary"]
    plan = summary["plan"]
    return (f"- The model has {plan['params'] / 1e9:.2f} B parameters in {plan['num_blocks']} "
            "blocks.\n"
            f"- Wanda {_verdict(_plan(result, 'deepseek-v3-wanda'))}. The node needs about "
            f"{plan['host_total_bytes'] / GB:.0f} GB of host memory for the onloaded "
            f"{plan['request']['dtype']} blocks.")


def deepseek_refusal_text(result: dict) -> str:
    """docs/quantized.md's SparseGPT refusal for DeepSeek-V3, with the planner's reason."""
    summary = _plan(result, "deepseek-v3-sparsegpt")["summary"]
    worker = max(summary["plan"]["workers"], key=lambda w: w["statistics"])
    import textwrap

    why = textwrap.wrap(f"why: {summary['statistics_refusal']}", 95)
    verdict = "fits" if summary["fits"] else "does not fit"
    return "\n".join([f"The statistics of one DeepSeek-V3 MoE block need "
                      f"{worker['statistics'] / GB:.1f} GB (`statistics` in the SparseGPT plan) "
                      f"against {summary['limit_bytes'] / GB:.0f} GB per device. The plan's verdict is "
                      f"\"{verdict}\" (exit code {_plan(result, 'deepseek-v3-sparsegpt')['exit']}"
                      "), with this reason:", "", "```", *why, "```"])


RECOVER_ARMS = {"prune": "Wanda 50 %, no recovery", "reconstruct": "+ `perp-reconstruct`",
                "retrain": "+ `perp-masklora` (whole model)"}
"""``launch/bench_recover_memory.py``'s arms, as the table names them."""


def recover_memory_text(result: dict) -> str:
    """docs/scale-out.md's recovery memory table from ``launch/bench_recover_memory.py``'s
    JSON (``benchmarks/recover_memory_cpu.json``)."""
    lines = ["| arm | phase | measured GB | predicted GB | ratio |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {RECOVER_ARMS.get(r['arm'], r['arm'])} | {r['predicted_phase']} | "
                     f"{r['measured_bytes'] / GB:.2f} | {r['predicted_bytes'] / GB:.2f} | "
                     f"{r['ratio']:.2f} |")
    within = all(r["within"] for r in result["rows"])
    above = [r for r in result["rows"] if r["arm"] != "prune"]
    lines += ["", f"Every arm within the 25 % bar: {'yes' if within else 'NO'}. Recovery "
              f"predictions above the measurement (the safe side): "
              f"{sum(r['predicted_bytes'] >= r['measured_bytes'] for r in above)} of {len(above)}."]
    return "\n".join(lines)


def resume_state_text(result: dict) -> str:
    """docs/resume.md's state-size table and write times from ``launch/bench_scale.py
    --state``'s JSON (``benchmarks/resume_state.json``)."""
    before, after = result["before"], result["after"]

    def size(n: float) -> str:
        return f"{n / GB:.2f} GB" if n >= GB else f"{n / 1e6:.0f} MB"

    return "\n".join([
        "| | per block | 80 blocks (Llama-2-70B) |", "|---|---|---|",
        f"| weights (before: every criterion) | {size(before['state_bytes_per_block'])} | "
        f"{before['state_bytes_80_blocks'] / GB:.0f} GB |",
        f"| bit-packed masks (now: mask-only criteria) | {size(after['state_bytes_per_block'])} | "
        f"{after['state_bytes_80_blocks'] / GB:.1f} GB |", "",
        f"Time on the prune's critical path, {before['blocks']} blocks: "
        f"{before['state_seconds_on_critical_path']:.1f} s before (a synchronous write and SHA-256 "
        f"of each block's weights), {after['state_seconds_on_critical_path']:.1f} s now, all of it "
        f"waiting for the last block's write (the writer thread itself took "
        f"{after['writer']['write_seconds']:.1f} s for all {after['writer']['blocks']} blocks)."])


def onload_scale_text(result: dict) -> str:
    """docs/results.md's sequential-onloading memory check from ``launch/bench_scale.py
    --onload host|disk``'s JSON (``benchmarks/scale_onload_host.json`` and ``_disk.json``)."""
    lines = ["| `--onload` | device-equivalent peak, measured / predicted | host copies, measured "
             "/ predicted | process peak, measured / predicted |", "|---|---|---|---|"]
    for stem in sorted(result):
        w = result[stem]["workers"][0]
        lines.append(
            f"| `{w['onload']['mode']}` | {w['measured_device_equiv'] / GB:.2f} / "
            f"{w['predicted_device'] / GB:.2f} GB ({w['device_error']:+.1%}) | "
            f"{w['measured_host'] / GB:.2f} / {w['predicted_host'] / GB:.2f} GB | "
            f"{w['peak_rss'] / GB:.2f} / {w['predicted'] / GB:.2f} GB ({w['error']:+.1%}) |")
    own = all(set(r["workers"][0]["opened"]) <= set(r["workers"][0]["owned_shards"])
              for r in result.values())
    lines += ["", f"Each worker opened only its own shards: {'yes' if own else 'NO'}."]
    return "\n".join(lines)


KINDS = {"quickstart": quickstart_text, "results": results_text, "search": search_text,
         "unimodal": unimodal_text, "scalelora": scalelora_text,
         "magnitude": magnitude_text, "ood": ood_text, "parallel": parallel_text,
         "reliability": reliability_text,
         "transport": transport_text,
         "planning": planning_text, "plancheck": plancheck_text, "prediction": prediction_text,
         "memory": memory_text, "early-stop": early_stop_text, "results-docs": results_text,
         "trainable": trainable_text, "evaluate": evaluate_text,
         "plan-memory": plan_memory_text, "plan-recover": plan_recover_text,
         "plan-refusal": plan_refusal_text, "plan-onload": plan_onload_text,
         "plan-sparsegpt": plan_sparsegpt_text, "plan-table": plan_table_text,
         "plan-time": plan_time_text, "deepseek-plan": deepseek_plan_text,
         "deepseek-refusal": deepseek_refusal_text, "recover-memory": recover_memory_text,
         "resume-state": resume_state_text, "onload-scale": onload_scale_text}

TARGETS = {"quickstart": ("benchmarks/quickstart.json", "README.md"),
           "results": ("benchmarks/recovery_scalelora.json", "README.md"),
           "search": ("benchmarks/search.json", "docs/allocation.md"),
           "unimodal": ("benchmarks/unimodal.json", "docs/allocation.md"),
           "scalelora": ("benchmarks/recovery_scalelora.json", "docs/results.md"),
           "magnitude": ("benchmarks/magnitude_row.json", "docs/results.md"),
           "ood": ("benchmarks/ood.json", "docs/results.md"),
           "parallel": ("benchmarks/parallel.json", "docs/parallelism.md"),
           "reliability": ("benchmarks/reliability.json", "docs/safety.md"),
           "transport": ("benchmarks/transport.json", "docs/transport.md"),
           "planning": ("benchmarks/plan_time_70b.json", "docs/planning.md"),
           "plancheck": ("benchmarks/plan_time.json", "docs/planning.md"),
           "prediction": ("benchmarks/plan_time_70b.json", "README.md"),
           "memory": ("benchmarks/memory_sparsegpt.json", "docs/memory.md"),
           "early-stop": ("benchmarks/search.json", "docs/allocation.md"),
           "evaluate": ("benchmarks/evaluate_example.json", "docs/evaluation.md"),
           "results-docs": ("benchmarks/recovery_scalelora.json", "docs/results.md"),
           "trainable": ("benchmarks/recovery_scalelora.json,benchmarks/ood.json",
                         "docs/results.md"),
           "plan-memory": (PLAN_JSON, "docs/scale-out.md"),
           "plan-recover": (PLAN_JSON, "docs/scale-out.md"),
           "plan-refusal": (PLAN_JSON, "docs/scale-out.md"),
           "plan-onload": (PLAN_JSON, "docs/scale-out.md"),
           "plan-sparsegpt": (PLAN_JSON, "docs/scale-out.md"),
           "plan-table": (PLAN_JSON, "docs/scale-out.md"),
           "plan-time": (PLAN_JSON, "docs/planning.md"),
           "deepseek-plan": (PLAN_JSON, "docs/quantized.md"),
           "deepseek-refusal": (PLAN_JSON, "docs/quantized.md"),
           "recover-memory": ("benchmarks/recover_memory_cpu.json", "docs/scale-out.md"),
           "resume-state": ("benchmarks/resume_state.json", "docs/resume.md"),
           "onload-scale": ("benchmarks/scale_onload_host.json,benchmarks/scale_onload_disk.json",
                            "docs/results.md")}
"""Per kind: its committed JSON and the page (relative to the repository) holding its block."""


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the region between the markers of ``name`` replaced by ``body``."""
    pattern = re.compile(rf"(<!-- {name}:begin -->\n)(.*?)(\n<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise KeyError(f"markers <!-- {name}:begin --> / <!-- {name}:end -->")
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text, count=1)


def _load(json_path: str) -> dict:
    """One JSON file, or for comma-separated paths ``{file stem: data}`` of each."""
    paths = [Path(p) if Path(p).exists() else REPO / p for p in json_path.split(",")]
    if len(paths) == 1:
        return json.loads(paths[0].read_text())
    return {p.stem: json.loads(p.read_text()) for p in paths}


def render(kind: str, json_path: str | None = None, page: str | None = None,
           check: bool = False) -> tuple[int, str]:
    """Write (or with ``check`` compare) one kind's block; returns ``(exit code, message)``."""
    default_json, default_page = TARGETS[kind]
    json_path = json_path or default_json
    page = page or str(REPO / default_page)
    try:
        body = KINDS[kind](_load(json_path))
        old = Path(page).read_text()
        new = replace_block(old, kind, body)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return 2, (f"error: cannot write the {kind} figures from {json_path!r} into {page!r}: "
                   f"missing or bad {exc}")
    if check:
        return (0, "") if new == old else (1, f"{page}: the {kind} block differs from {json_path}")
    if new != old:
        Path(page).write_text(new)
    return 0, body


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", nargs="?", choices=sorted(KINDS))
    p.add_argument("json", nargs="?", help="report.json (quickstart) or the bench suite's JSON "
                   "(default: the committed one under benchmarks/)")
    p.add_argument("--readme", help="the page to write (default: the kind's own page)")
    p.add_argument("--all", action="store_true", help="every kind, from its committed JSON")
    p.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    p.add_argument("--record-plans", nargs="?", const=PLAN_JSON, metavar="JSON",
                   help="rerun the planner examples the docs quote into JSON "
                   f"(default {PLAN_JSON}), then stop")
    p.add_argument("--record-evaluate", nargs="?", const="benchmarks/evaluate_example.json",
                   metavar="JSON", help="rerun the evaluate example docs/evaluation.md quotes "
                   "into JSON (default benchmarks/evaluate_example.json), then stop")
    opts = p.parse_args()
    if opts.record_evaluate:
        record_evaluate(REPO / opts.record_evaluate)
        return 0
    if opts.record_plans:
        record_plans(REPO / opts.record_plans)
        return 0
    if opts.all == bool(opts.kind):
        p.error("give one KIND, or --all")
    worst = 0
    for kind in (sorted(KINDS) if opts.all else [opts.kind]):
        code, message = render(kind, opts.json, opts.readme, opts.check)
        if message:
            print(message, file=sys.stderr if code else sys.stdout)
        worst = max(worst, code)
    return worst


if __name__ == "__main__":
    sys.exit(main())
