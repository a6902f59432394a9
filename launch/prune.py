#!/usr/bin/env python
"""Prune a causal LM: see `python launch/prune.py --help`."""

import sys

from neuroal.cli import main

if __name__ == "__main__":
    sys.exit(main())
