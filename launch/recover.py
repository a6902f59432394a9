#!/usr/bin/env python
"""Retrain a pruned model with PERP, masks fixed (recovery.md §3): `python launch/recover.py
--help` (= `neuroal recover`).

DeepSpeed:     accelerate launch --use_deepspeed --deepspeed_config_file configs/deepspeed/zero3.json \\
                   --zero3_init_flag true --num_processes 8 launch/recover.py outputs/pruned ...
The command lives in neuroal.commands.recover.
"""

import sys

from neuroal.commands.recover import main

if __name__ == "__main__":
    sys.exit(main())
