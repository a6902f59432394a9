#!/usr/bin/env python
"""The measured memory table of docs/memory.md, generated from committed JSON, never typed.

    # 1. measure (CPU, Llama-2-70B block width, SparseGPT, bf16; about 13 GB of RAM):
    nice -n 10 python launch/bench_scale.py --blocks 1 --workers 1 --dtype bfloat16 \\
        --criterion sparsegpt --json outputs/bench/scale_sparsegpt.json
    # 2. record it with the planner's answer for two 24 GB GPUs:
    python launch/memory_figures.py record outputs/bench/scale_sparsegpt.json \\
        benchmarks/memory_sparsegpt.json
    # 3. rewrite the doc's block (--check: exit 1 when the doc disagrees with the JSON):
    python launch/memory_figures.py doc benchmarks/memory_sparsegpt.json [--check]

The doc block lies between ``<!-- memory:begin -->`` and ``<!-- memory:end -->``. Bad input
exits 2 with a message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "launch"))

from readme_figures import replace_block  # noqa: E402 - the launch folder's shared helper

DOC = REPO / "docs" / "memory.md"
PLAN_ARGS = ["--model", "llama-2-70b", "--workers", "2", "--gpu-memory", "24GB",
             "--criterion", "sparsegpt", "--seqlen", "2048", "--parallel", "pipeline"]
PARTS = ("weights", "activations", "statistics", "transients", "overhead")


def record(bench: dict[str, Any], command: str) -> dict[str, Any]:
    """The committed figures: each measured worker against its prediction, and the planner's
    answer for ``plan.py`` :data:`PLAN_ARGS`."""
    from neuroal.planning import GB, MemoryRequest, summarize

    request = MemoryRequest(workers=2, criterion="sparsegpt", seqlen=2048, onload="auto",
                            parallel="pipeline")
    plan = summarize("llama-2-70b", request, 24 * GB)
    workers = [{k: w[k] for k in ("rank", "blocks", "baseline_rss", "peak_rss", "predicted",
                                  "predicted_parts", "error", "error_above_baseline",
                                  "total_s")} for w in bench["workers"]]
    return {"command": command, "settings": bench["settings"], "workers": workers,
            "pass": bench["pass"], "tolerance": 0.25,
            "plan_24gb": {"command": "python launch/plan.py " + " ".join(PLAN_ARGS),
                          "fits": plan["fits"], "onload": plan["onload"],
                          "limit_bytes": plan["limit_bytes"],
                          "workers": [{k: w[k] for k in (*PARTS, "total", "host_weights")}
                                      for w in plan["plan"]["workers"]]}}


def memory_text(result: dict[str, Any]) -> str:
    """The doc block: the measured table, then the planner's 2 x 24 GB answer."""
    s = result["settings"]
    width = ("Llama-3-8B width, 4096 / 14336" if s.get("half_width")
             else "Llama-2-70B width, 8192 / 28672")
    lines = [f"Measured with `{result['command']}` ({s['blocks']} block(s) of {width}, "
             f"{s['workers']} worker(s), SparseGPT, {s['dtype']}, {s['nsamples']} x "
             f"{s['seqlen']} calibration tokens, micro-batch {s['micro_batch']}, CPU: the "
             "process's peak resident set against the planner):", "",
             "| worker | blocks | weights | streams | statistics | transients | overhead | "
             "predicted | measured peak | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for w in result["workers"]:
        p = {k: w["predicted_parts"][k] / 1e9 for k in PARTS}
        lines.append(f"| {w['rank']} | {w['blocks'][0]}-{w['blocks'][1] - 1} | "
                     f"{p['weights']:.2f} | {p['activations']:.3f} | {p['statistics']:.2f} | "
                     f"{p['transients']:.2f} | {p['overhead']:.2f} | {w['predicted'] / 1e9:.2f} | "
                     f"{w['peak_rss'] / 1e9:.2f} | {w['error']:+.1%} |")
    within = all(abs(w["error"]) <= result["tolerance"] for w in result["workers"])
    lines += ["", f"All GB (1e9 bytes). Every worker within {result['tolerance']:.0%} of the "
              f"planner: {'yes' if within else 'NO'}.", ""]
    plan = result["plan_24gb"]
    w = plan["workers"][0]
    parts = ", ".join(f"{k} {w[k] / 1e9:.2f}" for k in PARTS)
    lines.append(f"`{plan['command']}` answers **{'fits' if plan['fits'] else 'does not fit'}** "
                 f"with `engine.onload={plan['onload']}`: {w['total'] / 1e9:.2f} GB per worker "
                 f"({parts}) against {plan['limit_bytes'] / 1e9:.0f} GB, and "
                 f"{w['host_weights'] / 1e9:.2f} GB of pinned host memory per worker for its "
                 "40 blocks.")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    rec = sub.add_parser("record", help="bench_scale JSON -> benchmarks/memory_sparsegpt.json")
    rec.add_argument("bench")
    rec.add_argument("out")
    rec.add_argument("--command", default="nice -n 10 python launch/bench_scale.py --blocks 1 "
                     "--workers 1 --dtype bfloat16 --criterion sparsegpt")
    doc = sub.add_parser("doc", help="rewrite the measured block of docs/memory.md")
    doc.add_argument("json")
    doc.add_argument("--doc", default=str(DOC))
    doc.add_argument("--check", action="store_true", help="exit 1 if the doc is out of date")
    opts = p.parse_args()
    try:
        if opts.what == "record":
            data = record(json.loads(Path(opts.bench).read_text()), opts.command)
            Path(opts.out).write_text(json.dumps(data, indent=2) + "\n")
            return 0
        body = memory_text(json.loads(Path(opts.json).read_text()))
        path = Path(opts.doc)
        old = path.read_text()
        new = replace_block(old, "memory", body)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: missing or bad {exc}", file=sys.stderr)
        return 2
    if opts.check:
        return 0 if new == old else 1
    if new != old:
        path.write_text(new)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
