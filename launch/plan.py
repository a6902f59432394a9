#!/usr/bin/env python
"""Plan memory before a run (engine.md §7): `python launch/plan.py --help` (= `neuroal plan`).

The command lives in neuroal.commands.plan; nothing is loaded but the model config.
"""

import sys

from neuroal.commands.plan import main

if __name__ == "__main__":
    sys.exit(main())
