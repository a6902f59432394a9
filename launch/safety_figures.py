#!/usr/bin/env python
"""Rewrite the verdict table of docs/safety.md from the reliability catalogue, never by hand.

    python launch/safety_figures.py                       # benchmarks/reliability.json -> docs
    python launch/safety_figures.py --check               # exit 1 if the doc disagrees

The table lives between ``<!-- reliability:begin -->`` and ``<!-- reliability:end -->`` (the
convention of ``launch/readme_figures.py``); only that block is replaced. The JSON is written by
``python launch/bench.py reliability``. Bad input exits 2 with a message.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VERDICTS = ("clear error before loading", "unclear", "error after work", "traceback", "silent",
            "data loss", "ran")


def reliability_text(result: dict) -> str:
    """Counts per verdict, then each group's cases with their verdicts."""
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


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the block between the ``name`` markers replaced by ``body``."""
    pattern = re.compile(rf"(<!-- {name}:begin -->\n)(.*?)(<!-- {name}:end -->)", re.DOTALL)
    if not pattern.search(text):
        raise KeyError(f"markers <!-- {name}:begin --> / <!-- {name}:end --> not found")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text, count=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", nargs="?", default=str(REPO / "benchmarks" / "reliability.json"))
    p.add_argument("--doc", default=str(REPO / "docs" / "safety.md"))
    p.add_argument("--check", action="store_true", help="exit 1 if the doc disagrees")
    args = p.parse_args(argv)
    try:
        result = json.loads(Path(args.json).read_text())
        doc = Path(args.doc)
        old = doc.read_text()
        new = replace_block(old, "reliability", reliability_text(result))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        return 0 if new == old else 1
    doc.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
