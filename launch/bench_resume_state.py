#!/usr/bin/env python
"""Resume-state figures: two ``launch/bench_scale.py --state`` results -> one JSON.

    nice -n 10 python launch/bench_scale.py --blocks 2 --workers 1 --dtype bfloat16 --state \\
        --json before.json        # on the code before the change (full weights, synchronous)
    nice -n 10 python launch/bench_scale.py --blocks 2 --workers 1 --dtype bfloat16 --state \\
        --json after.json         # on this code (bit-packed masks, background writer)
    python launch/bench_resume_state.py before.json after.json benchmarks/resume_state.json

Bytes and the seconds the prune spent on the state per block, before and after, with the
whole-model figure for Llama-2-70B's 80 blocks (docs/resume.md quotes them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if len(sys.argv) != 4:
    sys.exit(__doc__)
before = json.loads(Path(sys.argv[1]).read_text())
after = json.loads(Path(sys.argv[2]).read_text())
out = Path(sys.argv[3])
BLOCKS_70B = 80
CMD = ("nice -n 10 python launch/bench_scale.py --blocks 2 --workers 1 --dtype bfloat16 "
       "--state --dir <checkpoint dir> --json <file>")


def summary(run: dict, code: str) -> dict:
    """The state facts of a one-worker run."""
    w = run["workers"][0]
    st = w["state"]
    blocks = st["files"] // 2  # a block file and its digest per block
    return {
        "code": code,
        "command": CMD,
        "settings": {k: v for k, v in run["settings"].items() if k not in ("dir", "json")},
        "state_bytes": st["bytes"],
        "state_files": st["files"],
        "blocks": blocks,
        "state_bytes_per_block": st["bytes"] / blocks,
        "state_bytes_80_blocks": st["bytes"] / blocks * BLOCKS_70B,
        "block_seconds": w["block_s"],
        "state_seconds_on_critical_path": st["critical_path_s"],
        "state_seconds_on_critical_path_per_block": st["critical_path_s"] / blocks,
        "sync_write_seconds": st.get("sync_write_s"),
        "writer": st.get("writer"),
        "peak_rss_bytes": w["peak_rss"],
        "achieved_sparsity": w["achieved"],
    }


doc = {
    "what": "Resume state of the final prune at Llama-2-70B block width (hidden 8192, MLP 28672, "
            "64/8 heads), 2 random blocks, bf16, Wanda 50 %, one worker process on the CPU; "
            "before: full weights written synchronously in prune_one; after: bit-packed masks "
            "written by the background StateWriter (flushed after the slice's last block)",
    "machine": "2 shared CPU cores, 24 GiB RAM, shared with other jobs during both runs: block "
               "seconds are dominated by contention and are not comparable between the runs; "
               "bytes are exact",
    "before": summary(before, "e10a78b + launch/bench_scale.py --state (this branch)"),
    "after": summary(after, "this branch"),
}
b, a = doc["before"], doc["after"]
doc["ratio_bytes"] = b["state_bytes"] / a["state_bytes"]
doc["ratio_critical_path_seconds"] = (b["state_seconds_on_critical_path"]
                                      / max(a["state_seconds_on_critical_path"], 1e-9))
out.write_text(json.dumps(doc, indent=2) + "\n")
print(f"state per block {b['state_bytes_per_block'] / 1e6:.1f} MB -> "
      f"{a['state_bytes_per_block'] / 1e6:.1f} MB ({doc['ratio_bytes']:.1f}x); on the critical "
      f"path {b['state_seconds_on_critical_path']:.1f} s -> "
      f"{a['state_seconds_on_critical_path']:.1f} s for {b['blocks']} blocks")
