#!/usr/bin/env python
"""Retrain a pruned model with PERP, masks fixed (recovery.md §3): `python launch/recover.py --help`.

One process:   python launch/recover.py outputs/pruned --output outputs/pruned-perp --variant masklora
DeepSpeed:     accelerate launch --use_deepspeed --deepspeed_config_file configs/deepspeed/zero3.json \\
                   --zero3_init_flag true --num_processes 8 launch/recover.py outputs/pruned ...
(under `accelerate launch --use_deepspeed` the accelerate backend is chosen automatically).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="recover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="pruned Hugging Face model directory (e.g. from launch/prune.py)")
    p.add_argument("--output", required=True, help="directory for the retrained model")
    p.add_argument("--variant", default="masklora",
                   help="bias-norm | masklora | scalelora | full (block weights, re-masked)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default 32)")
    p.add_argument("--head-lora", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA on the head (variant default)")
    p.add_argument("--add-biases", action="store_true", help="add trainable zero biases where the "
                   "architecture has a config flag for them")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, help="token budget (overrides --steps)")
    p.add_argument("--lr", type=float, default=5e-4)
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
                   "neuroal.log)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from neuroal.logging import configure
    from neuroal.recovery.perp import PERP_VARIANTS
    from neuroal.recovery.train import RecoverJob, TrainOptions, recover

    args = parse(argv)
    configure("INFO", args.log_file)
    overrides = {k: v for k, v in (("rank", args.rank), ("alpha", args.alpha),
                                   ("lm_head_lora", args.head_lora)) if v is not None}
    perp = dataclasses.replace(PERP_VARIANTS.get(args.variant), add_biases=args.add_biases, **overrides)
    train = TrainOptions(lr=args.lr, steps=args.steps, tokens=args.tokens, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing)
    job = RecoverJob(model=args.model, output=args.output, variant=PERP_VARIANTS.canonical(args.variant),
                     perp=perp, train=train, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                     seed=args.seed, eval=args.eval, eval_windows=args.eval_windows,
                     data_dir=args.data_dir, device=args.device, dtype=args.dtype, backend=args.backend,
                     shard_size=args.shard_size, overwrite=args.overwrite)
    report = recover(job)
    if report:
        ppl = report["perplexity"]
        sys.stdout.write(f"{args.eval}: perplexity before {ppl['before']}, after {ppl['after']} "
                         f"({report['train']['steps']} steps, {report['train']['tokens']} tokens, "
                         f"sparsity {report['achieved_sparsity']:.4f}) -> {args.output}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
