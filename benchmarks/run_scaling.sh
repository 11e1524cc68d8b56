#!/usr/bin/env bash
# Multi-GPU scaling (issue 10) on every GPU of this host, then its section of RESULTS.md.
#   bash benchmarks/run_scaling.sh [OUTDIR [bench_scaling.py args...]]   (repository root)
# One process measures every part within its time budget (bench_scaling.py --time-budget,
# 400 s by default) and writes OUTDIR/scaling.json after each part; `timeout` bounds the whole
# (SCALING_TIMEOUT, 450 s; killed 30 s after that), and the section is written from whatever
# the JSON holds.
set -uo pipefail
out="${1:-${OUT:-/tmp/scaling}}"
mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
# NCCL without NVLink SHARP (multicast), which the lent multi-GPU machines must leave off.
export NCCL_NVLS_ENABLE=0
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  | head -1)"
echo "GPU: ${gpu:-none}" | tee "$out/gpu.txt"
timeout -k 30 "${SCALING_TIMEOUT:-450}" python3 "$here/bench_scaling.py" --out "$out/scaling.json" \
  "${@:2}" 2>&1 | tee "$out/scaling.log"
status=${PIPESTATUS[0]}
if [ -f "$out/scaling.json" ]; then
  python3 "$here/write_scaling.py" "$out/scaling.json" --gpu "$gpu" --out "$here/RESULTS.md"
  cp "$here/RESULTS.md" "$out/RESULTS.md"
fi
echo "bench_scaling.py exited $status; results in $out"
exit "$status"
