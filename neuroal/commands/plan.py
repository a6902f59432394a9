"""Plan memory and time before a run (engine.md §7): per-worker table, verdict, alternatives,
then the predicted wall time per phase (neuroal.planning, docs/planning.md).

    neuroal plan --model llama-2-70b --workers 8 --gpu-memory 80GB
    neuroal plan --model qwen2.5-72b --workers 4 --gpu-memory 80GB --criterion sparsegpt
    neuroal plan --model ./my-model --workers 2 --gpu-memory 24GB --json plan.json
    neuroal plan --model llama-2-70b --recover perp-reconstruct,perp-masklora \
        --recover-opt perp-masklora.gradient_checkpointing=true
    neuroal plan --model llama-2-70b --workers 1 --gpu-memory 80GB   # onloading: fits
    neuroal plan --model llama-2-70b --workers 8 --criterion sparsegpt --parallel data \
        --device-class h100 --eval-windows 166     # + predicted wall time per phase

``--model`` takes a known alias (config shipped with neuroal, works offline), a local HF
directory or a hub id. Nothing is loaded but the config; the logic lives in neuroal.planning.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from neuroal import __version__
from neuroal.cli import deprecated_flag
from neuroal.commands.exits import guarded
from neuroal.config.build import ConfigError, config_from_flags
from neuroal.config.inputs import position_errors
from neuroal.models.adapter import ModelAdapter
from neuroal.models.loading import build_skeleton, load_model_config, resolve_model
from neuroal.outputs.guard import check_decoder_lm, check_prunable, check_source
from neuroal.outputs.safety import UnsafeOutputError, check_file_output, write_file
from neuroal.planning import (
    MODES,
    MemoryRequest,
    TimeRequest,
    Workload,
    format_prediction,
    format_summary,
    layout_of,
    parse_bytes,
    predict,
    summarize,
    throughput,
)
from neuroal.planning.walltime import needs_hessian, search_candidates
from neuroal.recovery import RECOVERY_STEPS, chain_errors

TRANSPORTS = {"auto": "direct", "nccl": "direct", "gloo": "direct", "object-store": "object-store"}
"""``engine.ray.transport`` -> the time model's transfer class (direct tensor transport or not)."""

# dotted config key -> flag: the flags are validated by the same config checks as prune.py
FLAGS = {"model.name": "--model", "engine.workers": "--workers", "engine.memory_limit": "--gpu-memory",
         "calib.nsamples": "--nsamples", "calib.seqlen": "--seqlen",
         "engine.micro_batch": "--micro-batch", "criterion.name": "--criterion",
         "allocation.name": "--allocation", "allocation.search_samples": "--search-samples",
         "allocation.reference_stream": "--reference-stream", "eval.seqlen": "--eval-seqlen"}


def validate(args: argparse.Namespace) -> None:
    """The flags as a prune config (same checks and messages as launch/prune.py), then the
    windows against the model's positions; raises ConfigError (exit code 2)."""
    values = {"model.name": args.model, "engine.workers": args.workers,
              "engine.memory_limit": args.gpu_memory, "calib.nsamples": args.nsamples,
              "calib.seqlen": args.seqlen, "engine.micro_batch": args.micro_batch,
              "criterion.name": args.criterion, "allocation.name": args.allocation,
              "eval.seqlen": args.eval_seqlen, "eval.datasets": "wikitext2" if args.eval_seqlen
              else "none"}
    if args.allocation == "neuroal":
        values.update({"allocation.search_samples": args.search_samples,
                       "allocation.reference_stream": args.reference_stream})
    config_from_flags(values, FLAGS)
    source = resolve_model(args.model)
    check_source(source)
    config = load_model_config(source, network=False)
    check_decoder_lm(config, args.model)
    if not args.recover:  # a model with nothing to prune is refused (PERP-only plans aside)
        check_prunable(ModelAdapter(build_skeleton(config, torch.float32)), args.model)
    errors = position_errors(config, {"--seqlen": args.seqlen, "--eval-seqlen": args.eval_seqlen},
                             args.model)
    if errors:
        raise ConfigError(errors)


def recovery_settings(steps: str, opts: list[str]) -> tuple[tuple[str, ...], dict[str, dict]]:
    """``--recover`` and ``--recover-opt`` as ``MemoryRequest.recover`` / ``recover_options``,
    checked against the registered steps and their options."""
    import yaml

    names = tuple(s.strip() for s in steps.split(",") if s.strip())
    unknown = [s for s in names if s not in RECOVERY_STEPS]
    if unknown:
        raise ValueError(f"--recover: unknown step(s) {unknown}; available: "
                         f"{', '.join(RECOVERY_STEPS.names())}")
    errors = chain_errors(names)
    if errors:
        raise ValueError("; ".join(errors))
    names = tuple(RECOVERY_STEPS.canonical(s) for s in names)
    options: dict[str, dict] = {}
    for item in opts:
        key, sep, value = item.partition("=")
        step, dot, option = key.rpartition(".")
        if not sep or not dot or RECOVERY_STEPS.canonical(step) not in names:
            raise ValueError(f"--recover-opt {item!r}: expected STEP.KEY=VALUE with STEP one of "
                             f"--recover ({', '.join(names) or 'none given'})")
        step = RECOVERY_STEPS.canonical(step)
        if option not in RECOVERY_STEPS.get(step).defaults:
            raise ValueError(f"--recover-opt {item!r}: {step} has no option {option!r}; options: "
                             f"{', '.join(RECOVERY_STEPS.get(step).defaults)}")
        options.setdefault(step, {})[option] = yaml.safe_load(value)
    return names, options


def time_prediction(args: argparse.Namespace, fitting: list[str] | None = None,
                    refusal: str | None = None, runnable: list[str] | None = None) -> dict:
    """Predicted seconds per phase (neuroal.planning.walltime) for the flags; ``--parallel auto``
    predicts both modes and picks the faster among those that can run (``runnable``) and whose
    memory fits (``fitting``, from the memory summary; none fitting: the faster runnable one),
    saying so when memory ruled data mode out (``refusal``)."""
    device = args.device_class or {"cpu": "cpu", "cuda": "h100"}[args.device_type]
    tp = throughput(device)
    workload = Workload.from_layout(layout_of(args.model))
    base = TimeRequest(
        workers=args.workers, device=device, executor=args.engine,
        transport=TRANSPORTS[args.transport], dtype=args.dtype, nsamples=args.nsamples,
        seqlen=args.seqlen, micro_batch=args.micro_batch, hessian=needs_hessian(args.criterion),
        candidates=search_candidates(args.allocation, {"search_samples": args.search_samples,
                                                       "reference_stream": args.reference_stream},
                                     args.criterion, args.sparsity),
        search_samples=min(args.search_samples, args.nsamples),
        eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen or args.seqlen)
    modes = MODES if args.parallel == "auto" else (args.parallel,)
    seconds = {m: predict(workload, replace(base, mode=m), tp) for m in modes}
    can = [m for m in modes if runnable is None or m in runnable] or list(modes)
    allowed = [m for m in can if fitting is None or m in fitting] or can
    chosen = min(allowed, key=lambda m: (seconds[m]["total"], MODES.index(m)))
    text = format_prediction(seconds[chosen], replace(base, mode=chosen), tp)
    if len(modes) > 1:
        other = next(m for m in modes if m != chosen)
        why = ""
        if other not in allowed:
            why = (", but it does not fit the memory" if other != "data" or refusal
                   else ", but it needs two or more workers")
        text += (f"\n  (engine.parallel=auto chose {chosen}; {other}: "
                 f"{seconds[other]['total'] / 60:.1f} min in total{why})")
    return {"device_class": device, "mode": chosen, "seconds": seconds, "text": text,
            "provenance": dict(tp.provenance)}


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``neuroal plan`` (spelled as ``prune``'s where they mean the same)."""
    p = argparse.ArgumentParser(prog="neuroal plan", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"neuroal {__version__}")
    p.add_argument("--model", default="llama-2-70b", help="alias, HF directory or hub id")
    p.add_argument("--workers", type=int, default=8, help="workers, one device each")
    p.add_argument("--gpu-memory", default="80GB", help="memory per device, e.g. 80GB, 24GiB")
    p.add_argument("--device-type", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--criterion", default="wanda")
    p.add_argument("--allocation", default="uniform")
    p.add_argument("--search-samples", type=int, default=8, help="NeuroAL search windows")
    p.add_argument("--reference-stream", default="local", choices=["local", "global"])
    p.add_argument("--offload-activations", action="store_true")
    p.add_argument("--onload", default="auto", choices=["auto", "device", "host", "disk"],
                   help="where blocks live between uses (auto: the first mode that fits)")
    p.add_argument("--no-prefetch", action="store_true", help="onloading without read-ahead")
    p.add_argument("--host-memory", default=None,
                   help="host memory of the node, e.g. 512GB (checked under onloading)")
    p.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window (last worker)")
    p.add_argument("--recover", default="", metavar="STEPS",
                   help="recovery steps, comma-separated as recover.steps (e.g. "
                        "perp-reconstruct,perp-masklora)")
    p.add_argument("--recover-opt", action="append", default=[], metavar="STEP.KEY=VALUE",
                   help="a recovery step option (YAML value), e.g. perp-reconstruct.batch_size=2")
    p.add_argument("--device-class", default=None,
                   help="throughput figures for the time prediction (cpu, h100, h200; default: "
                        "cpu for --device-type cpu, h100 for cuda)")
    p.add_argument("--parallel", default="auto", choices=["auto", *MODES],
                   help="engine.parallel of the final prune (auto: the faster prediction)")
    p.add_argument("--engine", default="ray", choices=["local", "ray", "dist"],
                   help="executor of the final prune (engine.executor; prune's --engine)")
    deprecated_flag(p, "--executor", "--engine", choices=["local", "ray", "dist"])
    p.add_argument("--transport", default="auto", choices=sorted(TRANSPORTS),
                   help="engine.ray.transport (nccl/gloo/auto: direct, or the object store)")
    p.add_argument("--sparsity", type=float, default=0.5, help="target (sizes the search grid)")
    p.add_argument("--eval-windows", type=int, default=0,
                   help="perplexity windows per pass (time only; 0: no evaluation)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write JSON (- = stdout); "
                   "an existing file is replaced only if neuroal wrote it")
    p.add_argument("--allow-existing", action="store_true",
                   help="let --json replace an existing file neuroal did not write")
    return p


@guarded
def main(argv: list[str] | None = None) -> int:
    """``neuroal plan`` / ``launch/plan.py``: exit 0 when it fits, 1 when not, 2 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        if args.json and args.json != "-":  # the write guard, before any work
            local = [args.model] if Path(args.model).expanduser().exists() else []
            args.json = str(check_file_output(args.json, local, args.allow_existing))
        validate(args)
        steps, options = recovery_settings(args.recover, args.recover_opt)
    except (ValueError, OSError) as exc:  # ConfigError, ModelSourceError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    request = MemoryRequest(
        workers=args.workers, dtype=args.dtype, nsamples=args.nsamples, seqlen=args.seqlen,
        micro_batch=args.micro_batch, criterion=args.criterion, allocation=args.allocation,
        search_samples=args.search_samples, reference_stream=args.reference_stream,
        offload_activations=args.offload_activations, device_type=args.device_type,
        eval_seqlen=args.eval_seqlen, recover=steps, recover_options=options,
        onload=args.onload, prefetch=not args.no_prefetch, parallel=args.parallel,
        eval_windows=args.eval_windows or None)
    try:
        host, limit = (parse_bytes(args.host_memory) if args.host_memory else None,
                       parse_bytes(args.gpu_memory))
        summary = summarize(args.model, request, limit, host)
        fitting = summary["parallel_fits"] if args.parallel == "auto" else None
        summary["time"] = time_prediction(args, fitting, summary["data_refusal"],
                                          summary["parallel_runnable"])
        chosen = summary["time"]["mode"]
        if args.parallel == "auto" and chosen != summary["parallel"]:  # the faster that fits
            summary = {**summarize(args.model, replace(request, parallel=chosen), limit, host),
                       "data_refusal": summary["data_refusal"], "time": summary["time"]}
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        print("\n" + summary["time"]["text"])
        if args.json:
            try:
                write_file(args.json, json.dumps({"neuroal": __version__, **summary}, indent=2) + "\n")
            except UnsafeOutputError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
    return 0 if summary["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
