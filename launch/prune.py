#!/usr/bin/env python
"""Prune a causal LM: see `python launch/prune.py --help`.

One node, one process per block slice: `torchrun --nproc_per_node K launch/prune.py ...
--workers K engine.executor=dist` (or `accelerate launch --num_processes K ...`); rank 0 runs
the pipeline, the other ranks serve their slice (neuroal.engine.dist).
"""

import sys

from neuroal.commands.prune import main

if __name__ == "__main__":
    sys.exit(main())
