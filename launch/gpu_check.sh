#!/usr/bin/env bash
# One prepared device check: a session lent a GPU runs this and nothing else.
#
#   PYTHONPATH=. bash launch/gpu_check.sh          # on the GPU machine (~4-6 min on one H200)
#   PYTHONPATH=. bash launch/gpu_check.sh --cpu    # the same steps on a CPU, tiny width (tests the script)
#   PYTHONPATH=. bash launch/gpu_check.sh --only=1,6,7,8,9     # a subset of the steps (+ summary)
#
# Steps, each bounded by a timeout, results as JSON under $OUT (default ./outputs/gpu_check):
#   1. env.json     torch / CUDA / GPUs; checks importing neuroal's engine pulls in no ray, gguf
#                   or deepspeed (none is needed here)
#   2. pytest.json  the CUDA-marked tests (pytest -m gpu), only if pytest is installed
#   3. nccl.json    2 ranks over NCCL (onload=host) vs one local worker, if 2 GPUs exist;
#                   first the preflight commands (each rank's device and free memory)
#                   (--cpu: the same over gloo)
#   4. onload.json  time per block at Llama-2-70B width in bf16 (4 blocks, 8 x 2048 tokens):
#                   on-device vs onload host with and without prefetch vs disk; overlap, peaks,
#                   bit-identity (--cpu: tiny width, float32)
#   5. recover_memory.json  perp-reconstruct and whole-model PERP: device peak vs the planner at
#                   Llama-2-70B width in bf16 (2 blocks, 8 x 2048 tokens)
#                   (--cpu: tiny width, float32, peak RSS: checks the script only)
#   6. ray_share.json  two Ray actors sharing the one GPU (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1,
#                   ray.init(num_gpus=2)) prune bit-identically to one local worker, at 70B width
#                   in bf16, for every engine.ray.transport the tree has (launch/gpu_check_parallel.py)
#   7. hop.json     one actor-to-actor hop of 256 MiB and 1 GiB per transport (object store, gloo,
#                   nccl via Ray's direct tensor transport), beside the same copy in one process
#   8. parallel.json  engine.parallel data vs pipeline with 2 local workers on the one GPU, vs 1
#                   worker: prune seconds (SparseGPT's per block: the time planner's GPU figures)
#                   and bit-identity, at 70B width in bf16
#   9. dtypes.json  masks of a tiny model pruned in bf16 on the GPU vs bf16 on the CPU (and CPU
#                   fp32 vs bf16 beside it), Wanda and SparseGPT
#  10. memory.json  one pinned onload arena (in place, no power-of-two rounding, exact copies) and
#                   SparseGPT on the device: bit-identical to the frozen pre-change code, device
#                   peak within 3 (cols x cols) squares + the sweep (--cpu: tiny, no peak)
#  11. gpu_check.json + a printed table (launch/gpu_check.py summary); exit 0 = all passed
# Steps 6-9 skip cleanly (recorded as "skipped") where the tree lacks engine.ray.transport or
# engine.parallel, or where Ray is not installed. The lent machines have no Ray: its wheel (79 MB)
# exceeds what one call may carry (64 MiB), so carry the trimmed one `bash launch/gpu_ray_wheels.sh`
# builds under .whl/ (carry: [".whl"]) and start the command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site;
# Needs python3 with torch + transformers + safetensors; no network, no data files.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./outputs/gpu_check}"
PY="${PYTHON:-python3}"
export PYTHONPATH="${PYTHONPATH:-.}"
export NEUROAL_PROGRESS=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
CPU=0
ONLY=""
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    --only=*) ONLY=",${arg#--only=}," ;;
    *) echo "unknown argument $arg (expected --cpu, --only=N,M,...)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
t0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - t0 )) s)" >&2; }
want() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }
# part NAME SECONDS: one step of gpu_check_parallel.py; a kill by timeout is recorded too
part() {
  local arg="" limit="$2"
  # the CPU dry run runs on shared machines: 4x the GPU limit (Ray alone may need minutes there)
  [ "$CPU" = 1 ] && arg=cpu && limit=$(( $2 * 4 ))
  timeout "$limit" "$PY" launch/gpu_check_parallel.py "$1" "$OUT" $arg
  local rc=$?
  if [ "$rc" = 124 ] || [ ! -f "$OUT/${1//-/_}.json" ]; then
    printf '{"error": "step %s stopped (exit %d) after its %d s limit or a crash"}\n' "$1" "$rc" "$limit" \
      > "$OUT/${1//-/_}.json"
  fi
}

if want 1; then
step "1/11 environment"
timeout 120 "$PY" launch/gpu_check.py env "$OUT" || echo '{"failed": true}' > "$OUT/env.json"
fi

if want 2; then
step "2/11 CUDA-marked tests"
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
fi

if want 3; then
step "3/11 two ranks"
if [ "$CPU" = 1 ]; then
  timeout 300 "$PY" launch/gpu_check.py nccl "$OUT" cpu || true
else
  timeout 300 "$PY" launch/gpu_check.py nccl "$OUT" || true
fi
fi

if want 4; then
step "4/11 onload timings"
if [ "$CPU" = 1 ]; then
  timeout 600 "$PY" launch/bench_onload.py --tiny --device cpu --blocks 4 --nsamples 4 \
    --seqlen 128 --micro-batch 2 --repeat 2 --json "$OUT/onload.json" || true
else
  timeout 330 "$PY" launch/bench_onload.py --device cuda --blocks 4 --nsamples 8 --seqlen 2048 \
    --micro-batch 4 --repeat 3 --json "$OUT/onload.json" || true
fi
fi

if want 5; then
step "5/11 recovery memory"
if [ "$CPU" = 1 ]; then
  timeout 600 "$PY" launch/bench_recover_memory.py --device cpu --tiny --dtype float32 \
    --nsamples 4 --seqlen 128 --steps 2 --json "$OUT/recover_memory.json" || true
else
  timeout 300 "$PY" launch/bench_recover_memory.py --device cuda --timeout 120 \
    --json "$OUT/recover_memory.json" || true
fi
fi

want 6 && { step "6/11 two Ray actors on one GPU"; part ray-share 240; }
want 7 && { step "7/11 hop per transport"; part hop 150; }
want 8 && { step "8/11 engine.parallel data vs pipeline"; part parallel 200; }
want 9 && { step "9/11 GPU vs CPU bf16 masks"; part dtypes 90; }

if want 10; then
step "10/11 memory"
if [ "$CPU" = 1 ]; then
  timeout 120 "$PY" launch/gpu_check.py memory "$OUT" cpu || true
else
  timeout 120 "$PY" launch/gpu_check.py memory "$OUT" || true
fi
fi

step "11/11 summary"
"$PY" launch/gpu_check.py summary "$OUT" | tee "$OUT/summary.txt"
rc=${PIPESTATUS[0]}
step "done"
exit "$rc"
