#!/usr/bin/env python
"""Plan memory and wall time before a run (engine.md §7; time: docs/planning.md):
`python launch/plan.py --help` (= `neuroal plan`).

The command lives in neuroal.commands.plan; nothing is loaded but the model config.
"""

import sys

from neuroal.commands.plan import main

if __name__ == "__main__":
    sys.exit(main())
