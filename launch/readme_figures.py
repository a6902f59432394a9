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

from neuroal.report_keys import model_ppl

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


STALE_SCALELORA = {"wanda-uniform-60": 112.39, "wanda-neuroal-60": 102.03,
                   "wanda-uniform-70": 297.68, "wanda-neuroal-70": 261.81,
                   "sparsegpt-uniform-60": 87.28, "sparsegpt-neuroal-60": 83.94,
                   "sparsegpt-uniform-70": 171.50, "sparsegpt-neuroal-70": 166.72}
"""The ``perp-scalelora`` column measured before the learning-rate fix (lr x sqrt(r))."""

TABLE_MASKLORA = {"wanda-uniform-60": 92.22, "wanda-neuroal-60": 85.95,
                  "wanda-uniform-70": 233.78, "wanda-neuroal-70": 216.07,
                  "sparsegpt-uniform-60": 77.31, "sparsegpt-neuroal-60": 74.65,
                  "sparsegpt-uniform-70": 149.80, "sparsegpt-neuroal-70": 147.35}
"""The recovery table's ``perp-masklora`` column (its own base runs, not rerun since)."""


def scalelora_text(result: dict) -> str:
    """The ``perp-scalelora`` table from ``launch/bench.py recovery``'s JSON: per base, the
    pruned perplexity measured in the same run, after ScaleLoRA, and the seconds; the figure
    before the learning-rate fix (``stale`` in the JSON, else :data:`STALE_SCALELORA`) and the
    recovery table's MaskLoRA figure (``masklora``, else :data:`TABLE_MASKLORA`) with
    ScaleLoRA's change against it."""
    rows = {r["run"]: r for r in result["rows"]}
    stale = result.get("stale", STALE_SCALELORA)
    masklora = result.get("masklora", TABLE_MASKLORA)
    lines = ["| base | before (same run) | perp-scalelora (step s / run wall s) | "
             "before the learning-rate fix (lr 5e-4) | perp-masklora (table above) | ScaleLoRA vs MaskLoRA |",
             "|---|---|---|---|---|---|"]
    for base in BASES:
        r = rows.get(f"{base}+perp-scalelora")
        old = f"{stale[base]:.2f}" if base in stale else "-"
        mask = f"{masklora[base]:.2f}" if base in masklora else "-"
        if r is None:
            cells, change = "not rerun | not rerun", "-"
        else:
            cells = (f"{r['ppl']:.2f} | {r['recovered_ppl']:.2f} ({r['step_s']:.0f} s / "
                     f"{r['wall_s']:.0f} s)")
            change = f"{r['recovered_ppl'] / masklora[base] - 1:+.1%}" if base in masklora else "-"
        lines.append(f"| {_base_name(base, rows.get(base))} | {cells} | {old} | {mask} | {change} |")
    return "\n".join(lines)


def magnitude_text(result: dict) -> str:
    """Issue 16 item 8: per-row uniform magnitude against NeuroAL's per-row magnitude, from
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
    """Issue 16 item 12: one whole-model PERP row on every evaluation corpus, from
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
    return "\n".join(lines)


def transport_text(result: dict) -> str:
    """The transport tables of docs/transport.md from ``launch/bench.py transport``'s JSON."""
    settings = result["settings"]
    lines = ["| transport | stream | one hop | GB/s | in-process copy |", "|---|---|---|---|---|"]
    for r in result["hops"]:
        lines.append(f"| {r['transport']} | {r['mib']} MiB | {r['seconds']:.3f} s | "
                     f"{r['gb_per_s']:.2f} | {r['copy_seconds']:.3f} s |")
    lines += ["", f"2-actor Wanda prune of SmolLM2-135M (fp32, uniform 50 %, "
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


KINDS = {"quickstart": quickstart_text, "results": results_text, "search": search_text,
         "unimodal": unimodal_text, "scalelora": scalelora_text,
         "magnitude": magnitude_text, "ood": ood_text, "parallel": parallel_text,
         "reliability": reliability_text,
         "transport": transport_text,
         "planning": planning_text, "plancheck": plancheck_text, "prediction": prediction_text,
         "memory": memory_text}

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
           "memory": ("benchmarks/memory_sparsegpt.json", "docs/memory.md")}
"""Per kind: its committed JSON and the page (relative to the repository) holding its block."""


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the region between the markers of ``name`` replaced by ``body``."""
    pattern = re.compile(rf"(<!-- {name}:begin -->\n)(.*?)(\n<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise KeyError(f"markers <!-- {name}:begin --> / <!-- {name}:end -->")
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text, count=1)


def render(kind: str, json_path: str | None = None, page: str | None = None,
           check: bool = False) -> tuple[int, str]:
    """Write (or with ``check`` compare) one kind's block; returns ``(exit code, message)``."""
    default_json, default_page = TARGETS[kind]
    json_path = json_path or str(REPO / default_json)
    page = page or str(REPO / default_page)
    try:
        body = KINDS[kind](json.loads(Path(json_path).read_text()))
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
    opts = p.parse_args()
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
