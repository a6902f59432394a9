"""``neuroal prune`` and ``launch/prune.py``: argv -> config -> pipeline -> exit code.

The flags and their config keys are :mod:`neuroal.cli`'s (shared with the console script's help).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from typing import Any

from neuroal.cli import build_parser, flags_to_tree, split_overrides
from neuroal.commands.evaluate import format_metrics
from neuroal.commands.exits import guarded
from neuroal.config.build import load_config
from neuroal.engine.dist import coordinator, rank_info, serve
from neuroal.outputs.guard import check_writes
from neuroal.outputs.report_keys import model_metrics, model_ppl
from neuroal.pipeline import run
from neuroal.runtime.errors import AdapterError, ConfigError, ModelSourceError, OutputExistsError
from neuroal.runtime.logging import configure, get_logger

log = get_logger("neuroal.cli")


@guarded
def main(argv: Sequence[str] | None = None) -> int:
    """``neuroal prune`` and ``launch/prune.py``: argv -> config -> pipeline -> exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    split_overrides(parser, args)
    configure(args.log_level or "INFO")
    try:
        cfg = load_config(args.config, args.overrides, flags_to_tree(args))
        configure(cfg.log_level)
        info = rank_info(cfg)  # torchrun / accelerate launch (None for one process)
        if info is not None and info.rank > 0:
            return serve(cfg)  # ranks > 0 run rank 0's commands on their own block slice
        check_writes(cfg, [args.config])  # --output / --log-file vs every input, YAML included
        with coordinator(cfg) as session:
            result = run(cfg, command=shlex.join(["python", "launch/prune.py", *argv]),
                         session=session)
    except (ConfigError, ModelSourceError, AdapterError, OutputExistsError,
            FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; no output was written")
        return 130
    summarize(result.report, result.output)
    return 1 if (result.report.get("hub") or {}).get("error") else 0


def summarize(report: dict[str, Any], output: Any) -> None:
    """The headline numbers on stdout (the CLI's result; logs go to stderr)."""
    lines = [f"{report['model']}: {report['criterion']} + {report['allocation']}, "
             f"{report['pattern']}, target sparsity {report['target_sparsity']:.4f}, achieved "
             f"{report['achieved_sparsity']:.4f}, {report['timings'].get('total', 0.0):.1f} s"]
    for name, ev in report.get("eval", {}).items():
        if name == "tasks":
            continue
        dense = ev.get("dense_ppl")
        dense_txt = f"{dense:.3f}" if dense is not None else "n/a"
        lines.append(f"{name} perplexity ({ev['windows']} windows x {ev['seqlen']} tokens): "
                     f"dense {dense_txt}  ->  pruned {model_ppl(ev):.3f}")
    lines += _task_lines(report.get("eval", {}).get("tasks"))
    for step in (report.get("recovery") or {}).get("steps", []):
        lines.append(_recovery_line(step))
    for row in report.get("compare", []):
        for name, ppl in model_ppl(row).items():
            lines.append(f"{name} perplexity with allocation {row['allocation']!r} instead "
                         f"(achieved {row['achieved_sparsity']:.4f}): {ppl:.3f}")
    if output is not None:
        lines.append(f"output: {output}")
        for plot in report.get("plots") or []:
            lines.append(f"plot: {output}/{plot}")
    if (report.get("hub") or {}).get("url"):
        lines.append(f"uploaded: {report['hub']['url']}")
    sys.stdout.write("\n".join(lines) + "\n")


def _recovery_line(step: dict[str, Any]) -> str:
    """One summary line per recovery step: work done and perplexity before -> after."""
    text = f"recovery {step['label']}: "
    if "swaps" in step:
        text += (f"{step['swaps']} swaps in {step['layers_refined']} layers, mean |eps| "
                 f"{step['eps_before']:.4g} -> {step['eps_after']:.4g}, ")
    seconds = step.get("seconds")
    text += f"{seconds:.1f} s" if seconds is not None else "time n/a"
    before, after = step.get("ppl_before") or {}, step.get("ppl_after") or {}
    for name, ppl in after.items():
        prior = before.get(name)
        text += f"; {name} perplexity {'n/a' if prior is None else f'{prior:.3f}'} -> {ppl:.3f}"
    return text


def _task_lines(tasks: dict[str, Any] | None) -> list[str]:
    """One line per zero-shot task: dense -> pruned metrics (``report["eval"]["tasks"]``)."""
    lines = []
    for name, row in (tasks or {}).get("results", {}).items():
        lines.append(f"{name} zero-shot ({row['samples']} documents, {row['n_shot']}-shot): "
                     f"dense {format_metrics(row.get('dense'))}  ->  pruned "
                     f"{format_metrics(model_metrics(row))}")
    return lines
