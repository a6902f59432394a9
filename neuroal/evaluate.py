"""Re-evaluate any model (e.g. an exported pruned directory) with the streamed perplexity."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from neuroal.logging import configure, get_logger

log = get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """``python launch/evaluate.py MODEL [--eval wikitext2] [--seqlen 512] [--windows 64]``."""
    from neuroal.data.evaluation import load_eval_windows, perplexity
    from neuroal.engine.executor import LocalExecutor
    from neuroal.models.adapter import ModelAdapter
    from neuroal.models.loading import (
        ModelSourceError,
        build_skeleton,
        load_model_config,
        resolve_dtype,
        resolve_model,
    )
    from neuroal.pipeline import load_tokenizer, pick_device

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
    args = p.parse_args(argv)
    configure("INFO")
    try:
        source = resolve_model(args.model)
        config = load_model_config(source)
        device = pick_device(args.device)
        dtype = resolve_dtype(args.dtype, config, device)
        blocks = ModelAdapter(build_skeleton(config, dtype)).num_blocks
        tokenizer = load_tokenizer(source, False)
        executor = LocalExecutor(source, blocks, args.workers, [str(device)],
                                 str(dtype).removeprefix("torch."), args.micro_batch)
    except (ModelSourceError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    for spec in args.eval.split(","):
        data = load_eval_windows(spec, tokenizer, args.seqlen, args.windows or None, args.data_dir)
        ppl = perplexity(executor.window_nll(data.windows))
        sys.stdout.write(f"{spec}: perplexity {ppl:.3f} ({data.windows.shape[0]} windows x "
                         f"{args.seqlen} tokens)\n")
    return 0
