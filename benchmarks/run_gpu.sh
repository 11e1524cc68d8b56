#!/usr/bin/env bash
# BENCH-A on one GPU: the Hugging Face PyTorch peer and ours in one run, then RESULTS.md.
#   bash benchmarks/run_gpu.sh [OUTDIR]      (from the repository root, on the GPU machine)
# The peer script is copied beside ours from ../shared/bench/peer_torch.py when present.
set -euo pipefail
out="${1:-${OUT:-/tmp/bench}}"
mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
if [ -f "$here/../../shared/bench/peer_torch.py" ]; then
  cp "$here/../../shared/bench/peer_torch.py" "$here/peer_torch.py"
fi
[ -f "$here/peer_torch.py" ] || { echo "benchmarks/peer_torch.py is missing: copy ../shared/bench/peer_torch.py there" >&2; exit 1; }
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
(cd "$out" && OUT="$out" python3 "$here/peer_torch.py") 2>&1 | grep -v Warning | tail -5
python3 "$here/bench_model.py" --mode all --out "$out/ours.json" "${@:2}"
python3 "$here/write_results.py" --peer "$out/peer_torch.json" --ours "$out/ours.json" \
  --gpu "$(head -1 "$out/gpu.txt")" --out "$here/RESULTS.md"
cp "$here/RESULTS.md" "$out/RESULTS.md"
