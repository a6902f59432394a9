#!/usr/bin/env python
"""Perplexity and lm-eval zero-shot accuracy of a model directory, GGUF file or alias, through
the workers: `python launch/evaluate.py --help` (= `neuroal evaluate`)."""

import sys

from neuroal.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
