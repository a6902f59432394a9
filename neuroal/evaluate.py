"""Re-evaluate any model (e.g. an exported pruned directory) with the streamed perplexity."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from neuroal.logging import configure, get_logger

log = get_logger(__name__)

# flag -> dotted config key: the flags are validated by the same config checks as prune.py
FLAGS = {"model.name": "model", "eval.datasets": "--eval", "eval.seqlen": "--seqlen",
         "eval.max_windows": "--windows", "engine.workers": "--workers",
         "engine.device": "--device", "model.dtype": "--dtype",
         "engine.micro_batch": "--micro-batch", "calib.data_dir": "--data-dir"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate", description=main.__doc__)
    p.add_argument("model")
    p.add_argument("--eval", default="wikitext2", help="comma list of wikitext2 | c4 | text:<path>")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=64, help="first k windows (0 = all)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--data-dir")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python launch/evaluate.py MODEL [--eval wikitext2] [--seqlen 512] [--windows 64]``."""
    from neuroal.config import ConfigError, config_from_flags
    from neuroal.data.evaluation import load_eval_windows, perplexity
    from neuroal.engine.executor import LocalExecutor
    from neuroal.inputs import position_errors
    from neuroal.models.adapter import ModelAdapter
    from neuroal.models.loading import (
        SafetensorsCheckpoint,
        build_skeleton,
        load_model_config,
        resolve_dtype,
        resolve_model,
    )
    from neuroal.pipeline import load_tokenizer, pick_device

    args = parser().parse_args(argv)
    configure("INFO")
    try:
        cfg = config_from_flags({
            "model.name": args.model, "eval.datasets": args.eval, "eval.seqlen": args.seqlen,
            "eval.max_windows": args.windows if args.windows != 0 else None,
            "engine.workers": args.workers, "engine.device": args.device,
            "model.dtype": args.dtype, "engine.micro_batch": args.micro_batch,
            "calib.data_dir": args.data_dir}, FLAGS)
        source = resolve_model(cfg.model.name)
        config = load_model_config(source)
        if source.kind == "hf_dir":
            SafetensorsCheckpoint(Path(source.location)).verify()
        device = pick_device(cfg.engine.device)
        dtype = resolve_dtype(cfg.model.dtype, config, device)
        blocks = ModelAdapter(build_skeleton(config, dtype)).num_blocks
        errors = position_errors(config, {"--seqlen": cfg.eval.seqlen}, cfg.model.name)
        if cfg.engine.workers > blocks:
            errors.append(f"--workers={cfg.engine.workers} exceeds the model's {blocks} blocks")
        if errors:
            raise ConfigError(errors)
        tokenizer = load_tokenizer(source, False)
        data = {spec: load_eval_windows(spec, tokenizer, cfg.eval.seqlen, cfg.eval.max_windows,
                                        cfg.calib.data_dir) for spec in cfg.eval.datasets}
        executor = LocalExecutor(source, blocks, cfg.engine.workers, [str(device)],
                                 str(dtype).removeprefix("torch."), cfg.engine.micro_batch)
        for spec, windows in data.items():
            ppl = perplexity(executor.window_nll(windows.windows))
            sys.stdout.write(f"{spec}: perplexity {ppl:.3f} ({windows.windows.shape[0]} windows x "
                             f"{cfg.eval.seqlen} tokens)\n")
    except (ValueError, FileNotFoundError) as exc:  # ConfigError, ModelSourceError included
        log.error("%s", exc)
        return 2
    return 0
