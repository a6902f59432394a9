"""Command line: argv -> config (YAML + flags + key=value overrides) -> pipeline -> exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from neuroal import __version__
from neuroal.config.schema import set_dotted
from neuroal.runtime.logging import get_logger

log = get_logger("neuroal.cli")

EPILOG = """examples:
  neuroal prune                                           # Wanda 50 % on the embedded SmolLM2
  neuroal prune --model ./Llama-2-7b-hf --sparsity 0.6 --criterion sparsegpt
  neuroal prune --pattern 2:4 calib.nsamples=32 --criterion wanda --workers 3
  neuroal prune --config configs/smollm2/wanda-uniform-50.yaml eval.max_windows=16
  neuroal prune --sparsity 0.6 --recover dsnot recover.baseline=true
  neuroal prune --sparsity 0.6 --tasks neuroal_tiny_qa,hellaswag eval.limit=200
(`python launch/prune.py ...` takes the same arguments.)

key=value overrides address any config key (e.g. engine.micro_batch=4, criterion.percdamp=0.1)
and may stand anywhere among the flags.
"""

# flag -> dotted config key
FLAG_KEYS = {
    "model": "model.name", "sparsity": "sparsity", "criterion": "criterion.name",
    "allocation": "allocation.name", "pattern": "pattern", "calib": "calib.source",
    "nsamples": "calib.nsamples", "seqlen": "calib.seqlen", "data_dir": "calib.data_dir",
    "eval": "eval.datasets", "eval_windows": "eval.max_windows", "eval_seqlen": "eval.seqlen",
    "workers": "engine.workers", "targets": "targets", "ignore": "ignore",
    "dtype": "model.dtype", "device": "engine.device", "output": "output.dir",
    "micro_batch": "engine.micro_batch", "seed": "seed", "compare": "compare",
    "recover": "recover.steps",
    "engine": "engine.executor",
    "tasks": "eval.tasks", "include_path": "eval.include_path",
    "log_file": "log.file", "push_to_hub": "output.push_to_hub",
}

COMMANDS = {
    "prune": ("neuroal.commands.prune", "main", "prune a model block by block (the default command)"),
    "plan": ("neuroal.commands.plan", "main", "memory plan per worker before a run"),
    "evaluate": ("neuroal.commands.evaluate", "main", "perplexity and lm-eval zero-shot accuracy"),
    "recover": ("neuroal.commands.recover", "main", "retrain a pruned model with PERP"),
    "recipes": ("neuroal.commands.recipes", "main", "list the YAML recipes shipped with neuroal"),
}


def _names(registry_path: str, skip: tuple[str, ...] = ()) -> str:
    """``a | b | c`` from a registry (``module:NAME``), so help lists never go stale."""
    import importlib

    module, _, attr = registry_path.partition(":")
    names = getattr(importlib.import_module(module), attr).names()
    return " | ".join("text:<path>" if n == "text" else n for n in names if n not in skip)


def build_parser(prog: str = "neuroal prune") -> argparse.ArgumentParser:
    """The ``prune`` argument parser; every flag maps onto one config key."""
    p = argparse.ArgumentParser(
        prog=prog, description="Prune a Hugging Face causal LM block by block.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"neuroal {__version__}")
    p.add_argument("--model", help="local HF dir, hub id, .gguf file or alias (smollm2-135m)")
    p.add_argument("--sparsity", type=float, help="target fraction of zeros, in (0, 1)")
    p.add_argument("--criterion", help=_names("neuroal.criteria:CRITERIA"))
    p.add_argument("--allocation", help=_names("neuroal.allocation:ALLOCATIONS") +
                   " (file: allocation.path=<earlier output dir>)")
    p.add_argument("--pattern", help="unstructured | N:M (N kept of every M), e.g. 2:4")
    p.add_argument("--calib", help=_names("neuroal.data:SOURCES"))
    p.add_argument("--nsamples", type=int, help="calibration windows")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window")
    p.add_argument("--data-dir", help="folder with wikitext2/ (and c4 json.gz) files")
    p.add_argument("--eval", help="comma list of " + _names("neuroal.data:SOURCES", ("self",))
                   .replace(" | ", ", ") + "; or none")
    p.add_argument("--eval-windows", type=int, help="first k perplexity windows")
    p.add_argument("--eval-seqlen", type=int, help="tokens per perplexity window (default: "
                   "--seqlen)")
    p.add_argument("--tasks", help="comma list of lm-eval tasks, dense and pruned "
                   "(e.g. hellaswag,arc_easy; neuroal ships neuroal_tiny_qa; needs "
                   "pip install 'neuroal[eval]'); eval.limit=<k> keeps k documents per task")
    deprecated_flag(p, "--eval-tasks", "--tasks")
    p.add_argument("--include-path", "--include_path", dest="include_path",
                   help="folder of extra lm-eval task YAMLs")
    p.add_argument("--targets", help="comma list of patterns of the linears to prune "
                   "(re:<regex>, a module or class name; default: every prunable linear)")
    p.add_argument("--ignore", help="comma list of patterns of linears kept dense, e.g. "
                   "'re:.*down_proj$'")
    p.add_argument("--workers", type=int, help="block slices (one worker each)")
    p.add_argument("--engine", help="executor: " + _names("neuroal.engine:EXECUTORS"))
    p.add_argument("--micro-batch", type=int, help="sequences per forward call")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--output", help="output directory (default outputs/<model>-<recipe>)")
    p.add_argument("--seed", type=int, help="run seed")
    p.add_argument("--compare", help="comma list of allocations also pruned, side by side")
    p.add_argument("--recover", help="comma list of recovery steps, run in order (mask "
                   "refiners and perp-reconstruct inside the prune, one whole-model perp-* "
                   "last): " + _names("neuroal.recovery:RECOVERY_STEPS").replace(" | ", ", ") +
                   "; or none; options: recover.<step>.<key>=...")
    p.add_argument("--config", help="YAML recipe (flags and overrides win over it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-save", action="store_true", help="report only, no model files")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <output>.neuroal-tmp/state (same config)")
    p.add_argument("--log-level", default=None, help="DEBUG | INFO | WARNING")
    p.add_argument("--log-file", help="also append the log to this file (every run writes "
                   "neuroal.log into its output directory); an existing file is appended to "
                   "only if neuroal wrote it")
    p.add_argument("--allow-existing", action="store_true",
                   help="let --log-file append to an existing file neuroal did not write")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the finished output to this "
                   "Hugging Face repo (network and a token needed)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def deprecated_flag(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """``old`` still works as ``new`` (one name per concept across the commands), with a
    warning naming the new spelling; hidden from ``--help``."""
    dest = new.lstrip("-").replace("-", "_")

    class _Deprecated(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                     values: Any, option_string: str | None = None) -> None:
            import logging

            logging.getLogger("neuroal.cli").warning("%s is deprecated and will be removed; "
                                                     "use %s", option_string, new)
            setattr(namespace, dest, values)

    parser.add_argument(old, action=_Deprecated, help=argparse.SUPPRESS, **kwargs)


def split_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject positional words that are not ``key=value`` (a usage error, exit 2)."""
    stray = [o for o in args.overrides if "=" not in o]
    if stray:
        parser.error(f"unexpected argument(s) {stray}: overrides are key=value, e.g. "
                     "calib.nsamples=32")


def flags_to_tree(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, as a nested config dict."""
    tree: dict[str, Any] = {}
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            set_dotted(tree, key, value)
    if args.overwrite:
        set_dotted(tree, "output.overwrite", True)
    if args.no_save:
        set_dotted(tree, "output.save_model", False)
    if args.resume:
        set_dotted(tree, "output.resume", True)
    if args.log_level:
        tree["log_level"] = args.log_level
    if getattr(args, "allow_existing", False):
        set_dotted(tree, "log.allow_existing", True)
    return tree


def main(argv: Sequence[str] | None = None) -> int:
    """The ``neuroal`` console script: ``neuroal prune|plan|evaluate|recover ...``; without a
    command name the arguments are those of ``prune`` (as for ``launch/prune.py``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        sys.stdout.write(f"neuroal {__version__}\n")
        return 0
    if argv and argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0
    if argv and argv[0] in COMMANDS:
        return _command(argv[0])(argv[1:])
    return prune_main(argv)


def usage() -> str:
    """Top-level help: the commands and where their flags are listed."""
    width = max(len(n) for n in COMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items())
    return (f"usage: neuroal [--version] <command> [flags and key=value overrides]\n\n"
            f"commands:\n{rows}\n\n`neuroal <command> --help` lists a command's flags; "
            "without a command, the arguments are prune's.\n")


def prune_main(argv: Sequence[str] | None = None) -> int:
    """``neuroal prune`` (:func:`neuroal.commands.prune.main`), loaded like every command."""
    return _command("prune")(argv)


def _command(name: str) -> Any:
    """The ``main`` of command ``name``, imported only when it runs: ``neuroal plan --help`` must
    not pay for the pipeline's imports (torch, transformers, every plug-in)."""
    import importlib

    module, func, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), func)
