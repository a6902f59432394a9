"""Plan memory before a run (engine.md §7): per-worker table, verdict, alternatives.

    neuroal plan --model llama-2-70b --workers 8 --gpu-memory 80GB
    neuroal plan --model qwen2.5-72b --workers 4 --gpu-memory 80GB --criterion sparsegpt
    neuroal plan --model ./my-model --workers 2 --gpu-memory 24GB --json plan.json

``--model`` takes a known alias (config shipped with neuroal, works offline), a local HF
directory or a hub id. Nothing is loaded but the config; the logic lives in neuroal.planner.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from neuroal import __version__
from neuroal.planner import MemoryRequest, format_summary, parse_bytes, summarize


def main(argv: list[str] | None = None) -> int:
    """``neuroal plan`` / ``launch/plan.py``: exit 0 when it fits, 1 when not, 2 on bad input."""
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
    p.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window (last worker)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write JSON (- = stdout)")
    args = p.parse_args(argv)
    request = MemoryRequest(
        workers=args.workers, dtype=args.dtype, nsamples=args.nsamples, seqlen=args.seqlen,
        micro_batch=args.micro_batch, criterion=args.criterion, allocation=args.allocation,
        search_samples=args.search_samples, reference_stream=args.reference_stream,
        offload_activations=args.offload_activations, device_type=args.device_type,
        eval_seqlen=args.eval_seqlen)
    try:
        summary = summarize(args.model, request, parse_bytes(args.gpu_memory))
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
