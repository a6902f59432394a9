#!/usr/bin/env bash
# One prepared device check (issue 14): a session lent a GPU runs this and nothing else.
#
#   PYTHONPATH=. bash launch/gpu_check.sh          # on the GPU machine (~4-6 min on one H200)
#   PYTHONPATH=. bash launch/gpu_check.sh --cpu    # the same steps on a CPU, tiny width (tests the script)
#
# Steps, each bounded by a timeout, results as JSON under $OUT (default ./outputs/gpu_check):
#   1. env.json     torch / CUDA / GPUs; checks importing neuroal's engine pulls in no ray, gguf
#                   or deepspeed (none is needed here)
#   2. pytest.json  the CUDA-marked tests (pytest -m gpu), only if pytest is installed
#   3. nccl.json    2 ranks over NCCL (onload=host) vs one local worker, if 2 GPUs exist
#                   (--cpu: the same over gloo)
#   4. onload.json  time per block at Llama-2-70B width in bf16 (4 blocks, 8 x 2048 tokens):
#                   on-device vs onload host with and without prefetch vs disk; overlap, peaks,
#                   bit-identity (--cpu: tiny width, float32)
#   5. recover_memory.json  perp-reconstruct and whole-model PERP: device peak vs the planner at
#                   Llama-2-70B width in bf16 (2 blocks, 8 x 2048 tokens; issue 16 item 3)
#                   (--cpu: tiny width, float32, peak RSS: checks the script only)
#   6. memory.json  one pinned onload arena (in place, no power-of-two rounding, exact copies) and
#                   SparseGPT on the device: bit-identical to the frozen pre-change code, device
#                   peak within 3 (cols x cols) squares + the sweep (--cpu: tiny, no peak)
#   7. gpu_check.json + a printed table (launch/gpu_check.py summary); exit 0 = all passed
# Needs python3 with torch + transformers + safetensors; no network, no data files.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./outputs/gpu_check}"
PY="${PYTHON:-python3}"
export PYTHONPATH="${PYTHONPATH:-.}"
export NEUROAL_PROGRESS=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
CPU=0
[ "${1:-}" = "--cpu" ] && CPU=1
mkdir -p "$OUT"
t0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - t0 )) s)" >&2; }

step "1/7 environment"
timeout 120 "$PY" launch/gpu_check.py env "$OUT" || echo '{"failed": true}' > "$OUT/env.json"

step "2/7 CUDA-marked tests"
if "$PY" -c "import pytest" 2>/dev/null; then
  files="tests/test_onload.py"
  "$PY" -c "import gguf" 2>/dev/null && files="$files tests/test_gguf.py"
  timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider $files > "$OUT/pytest.log" 2>&1
  rc=$?
  tail -3 "$OUT/pytest.log" >&2
  printf '{"rc": %d, "files": "%s", "tail": %s}\n' "$rc" "$files" \
    "$("$PY" -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read()[-600:]))' "$OUT/pytest.log")" \
    > "$OUT/pytest.json"
else
  echo '{"skipped": "pytest is not installed"}' > "$OUT/pytest.json"
fi

step "3/7 two ranks"
if [ "$CPU" = 1 ]; then
  timeout 300 "$PY" launch/gpu_check.py nccl "$OUT" cpu || true
else
  timeout 300 "$PY" launch/gpu_check.py nccl "$OUT" || true
fi

step "4/7 onload timings"
if [ "$CPU" = 1 ]; then
  timeout 600 "$PY" launch/bench_onload.py --tiny --device cpu --blocks 4 --nsamples 4 \
    --seqlen 128 --micro-batch 2 --repeat 2 --json "$OUT/onload.json" || true
else
  timeout 330 "$PY" launch/bench_onload.py --device cuda --blocks 4 --nsamples 8 --seqlen 2048 \
    --micro-batch 4 --repeat 3 --json "$OUT/onload.json" || true
fi

step "5/7 recovery memory"
if [ "$CPU" = 1 ]; then
  timeout 600 "$PY" launch/bench_recover_memory.py --device cpu --tiny --dtype float32 \
    --nsamples 4 --seqlen 128 --steps 2 --json "$OUT/recover_memory.json" || true
else
  timeout 300 "$PY" launch/bench_recover_memory.py --device cuda --timeout 120 \
    --json "$OUT/recover_memory.json" || true
fi

step "6/7 memory"
if [ "$CPU" = 1 ]; then
  timeout 120 "$PY" launch/gpu_check.py memory "$OUT" cpu || true
else
  timeout 120 "$PY" launch/gpu_check.py memory "$OUT" || true
fi

step "7/7 summary"
"$PY" launch/gpu_check.py summary "$OUT" | tee "$OUT/summary.txt"
rc=${PIPESTATUS[0]}
step "done"
exit "$rc"
