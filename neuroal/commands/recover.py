"""Retrain a pruned model with PERP, masks fixed (recovery.md §3): `python launch/recover.py --help`.

One process:   python launch/recover.py outputs/pruned --output outputs/pruned-perp --variant perp-masklora
DeepSpeed:     accelerate launch --use_deepspeed --deepspeed_config_file configs/deepspeed/zero3.json \\
                   --zero3_init_flag true --num_processes 8 launch/recover.py outputs/pruned ...
(under `accelerate launch --use_deepspeed` the accelerate backend is chosen automatically).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from neuroal import __version__
from neuroal.commands.exits import guarded
from neuroal.config.build import ConfigError, config_from_flags
from neuroal.config.inputs import position_errors, positive_int, positive_number
from neuroal.data import parse_source
from neuroal.models.loading import input_paths, load_model_config, resolve_model
from neuroal.models.quant import quantization_config
from neuroal.outputs.export import OutputDir, OutputExistsError
from neuroal.outputs.safety import check_file_output
from neuroal.recovery import variant_train_defaults
from neuroal.recovery.perp import PERP_VARIANTS
from neuroal.recovery.train import RecoverJob, TrainOptions, recover
from neuroal.runtime.logging import add_log_file, configure, get_logger


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="neuroal recover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"neuroal {__version__}")
    p.add_argument("model", help="pruned Hugging Face model directory (e.g. from launch/prune.py)")
    p.add_argument("--output", required=True, help="directory for the retrained model")

    p.add_argument("--variant", default="perp-masklora",
                   help=" | ".join(f"perp-{n}" for n in PERP_VARIANTS.names()) +
                   " (the step names of prune's --recover; perp-full: block weights, re-masked)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default 32)")
    p.add_argument("--head-lora", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA on the head (variant default)")
    p.add_argument("--add-biases", action="store_true", help="add trainable zero biases where the "
                   "architecture has a config flag for them")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, help="token budget (overrides --steps)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the variant's, as the "
                   "pipeline's perp-<variant> step: 5e-4 for adapters, 2e-5 for full)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--calib", default="wikitext2")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="calibration draw seed")
    p.add_argument("--eval", default="wikitext2")
    p.add_argument("--eval-windows", type=int, default=16, help="0 = no perplexity")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backend", choices=("torch", "accelerate"),
                   default="accelerate" if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" else "torch")
    p.add_argument("--shard-size", default="2GB")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--log-file", help="also append the log to this file (the output always gets "
                   "neuroal.log); an existing file is appended to only if neuroal wrote it")
    p.add_argument("--allow-existing", action="store_true",
                   help="let --log-file append to an existing file neuroal did not write")
    p.add_argument("--allow-unpruned", action="store_true",
                   help="retrain a model that is not a pruned output of neuroal prune (a dense "
                        "or foreign model: its zeros are kept fixed, whatever they are)")
    return p.parse_args(argv)


# dotted config key -> flag: shared flags are validated by the same config checks as prune.py
FLAGS = {"model.name": "model", "output.dir": "--output", "calib.source": "--calib",
         "calib.nsamples": "--nsamples", "calib.seqlen": "--seqlen", "calib.seed": "--seed",
         "calib.data_dir": "--data-dir", "eval.datasets": "--eval",
         "eval.max_windows": "--eval-windows", "engine.device": "--device",
         "model.dtype": "--dtype", "output.shard_size": "--shard-size"}


def validate(args: argparse.Namespace) -> None:
    """Every flag checked before the model is loaded, all errors at once; raises ConfigError
    (exit code 2). Model, output and windows are checked against the model's config."""
    errors = []
    if args.variant in PERP_VARIANTS and not args.variant.startswith("perp-"):
        get_logger("neuroal.recover").warning(
            "--variant %s is deprecated and will be removed; use perp-%s (the step name of "
            "prune's --recover)", args.variant, PERP_VARIANTS.canonical(args.variant))
    if args.variant not in PERP_VARIANTS:
        errors.append(f"--variant={args.variant!r} is unknown; available: "
                      f"{', '.join(PERP_VARIANTS.names())}")
    errors += positive_int("--steps", args.steps) + positive_int("--batch-size", args.batch_size)
    errors += positive_int("--grad-accum", args.grad_accum)
    errors += positive_number("--lr", args.lr) if args.lr is not None else []
    errors += positive_int("--tokens", args.tokens) if args.tokens is not None else []
    errors += positive_int("--rank", args.rank) if args.rank is not None else []
    errors += positive_number("--alpha", args.alpha) if args.alpha is not None else []
    try:
        config_from_flags({
            "model.name": args.model, "output.dir": args.output, "calib.source": args.calib,
            "calib.nsamples": args.nsamples, "calib.seqlen": args.seqlen, "calib.seed": args.seed,
            "calib.data_dir": args.data_dir, "eval.datasets": args.eval if args.eval_windows
            else "none", "eval.max_windows": args.eval_windows or None,
            "engine.device": args.device, "model.dtype": args.dtype,
            "output.shard_size": args.shard_size}, FLAGS)
    except ConfigError as exc:
        errors += exc.errors
    if errors:
        raise ConfigError(errors)
    source = resolve_model(args.model)
    if source.kind != "hf_dir":
        raise ConfigError([f"model={args.model!r}: recover reads a local Hugging Face directory "
                           "(a pruned export of launch/prune.py)"])
    inputs = [*input_paths(source), *(p for p in (args.data_dir,) if p),
              *(str(parse_source(spec).arg) for spec in [args.calib, *[args.eval][:bool(args.eval_windows)]]
                if parse_source(spec).name in ("text", "tokens"))]
    if args.log_file:  # the write guard of --log-file, before anything is appended to it
        check_file_output(args.log_file, inputs, args.allow_existing, kind="log",
                          flag="--log-file")
    OutputDir(Path(args.output)).check(args.overwrite, inputs=inputs)
    config = load_model_config(source)
    if quantization_config(config) is not None:
        raise ConfigError([f"model={args.model!r} is quantized (its config.json has a "
                           "quantization_config); recover reads a dense pruned export: prune it "
                           "with launch/prune.py first (FP8 is de-quantized there)"])
    errors = position_errors(config, {"--seqlen": args.seqlen}, args.model)
    if errors:
        raise ConfigError(errors)
    if not args.allow_unpruned:
        check_pruned_input(Path(source.location), args.model)


def check_pruned_input(directory: Path, name: str) -> None:
    """Refuse a ``recover`` input that is not a pruned output of neuroal (no neuroal report or
    marker) or whose report says it is dense; ``--allow-unpruned`` skips this check."""
    report = None
    for fname in ("report.json", "recovery.json"):
        try:
            report = json.loads((directory / fname).read_text())
            break
        except (OSError, ValueError):
            continue
    hint = ("; recover retrains a model pruned by `neuroal prune` (its output folder); pass "
            "--allow-unpruned to retrain this one anyway")
    if not isinstance(report, dict):
        raise ConfigError([f"model={name!r} is not an output of neuroal prune (no report.json "
                           f"or recovery.json in {str(directory)!r}){hint}"])
    sparsity = report.get("achieved_sparsity")
    if not isinstance(sparsity, (int, float)) or sparsity <= 0:
        raise ConfigError([f"model={name!r}: its report records achieved_sparsity="
                           f"{sparsity!r}, a dense model with no zeros to keep{hint}"])


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    configure("INFO")
    log = get_logger("neuroal.recover")
    try:
        validate(args)
        if args.log_file:
            add_log_file(args.log_file)
        report = run(args)
    except (ValueError, FileNotFoundError, OutputExistsError) as exc:  # ConfigError, ModelSourceError
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; no output was written")
        return 130
    if report:
        ppl = report["perplexity"]
        sys.stdout.write(f"{args.eval}: perplexity before {ppl['before']}, after {ppl['after']} "
                         f"({report['train']['steps']} steps, {report['train']['tokens']} tokens, "
                         f"sparsity {report['achieved_sparsity']:.4f}) -> {args.output}\n")
    return 0


def run(args: argparse.Namespace) -> dict:
    """The validated flags as a RecoverJob, run; returns its report (empty on other ranks)."""
    return recover(build_job(args))


def build_job(args: argparse.Namespace) -> object:
    """The :class:`~neuroal.recovery.train.RecoverJob` of the parsed arguments; unset options take
    the variant's defaults, the same as the pipeline's ``perp-<variant>`` step."""
    overrides = {k: v for k, v in (("rank", args.rank), ("alpha", args.alpha),
                                   ("lm_head_lora", args.head_lora)) if v is not None}
    perp = dataclasses.replace(PERP_VARIANTS.get(args.variant), add_biases=args.add_biases, **overrides)
    lr = args.lr if args.lr is not None else variant_train_defaults(args.variant)["lr"]
    train = TrainOptions(lr=lr, steps=args.steps, tokens=args.tokens, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing)
    return RecoverJob(model=args.model, output=args.output, variant=PERP_VARIANTS.canonical(args.variant),
                      perp=perp, train=train, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                      seed=args.seed, eval=args.eval, eval_windows=args.eval_windows,
                      data_dir=args.data_dir, device=args.device, dtype=args.dtype, backend=args.backend,
                      shard_size=args.shard_size, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
