#!/usr/bin/env python
"""Perplexity of a model directory, GGUF file or alias: `python launch/evaluate.py --help`."""

import sys

from neuroal.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
