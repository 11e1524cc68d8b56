#!/usr/bin/env bash
# Short runs of configs/quality.py that differ in a few overrides, judged on the VALID split
# (never test): the evidence behind the recipe's learning rate. One prepared dataset is shared.
#   bash benchmarks/sweep_quality.sh OUTDIR STEPS "overrides of run 1" "overrides of run 2" ...
set -euo pipefail
out="$1"; steps="$2"; shift 2
mkdir -p "$out"
data="${SWEEP_DATA_DIR:-/tmp/sweep_data}"
start=$(date +%s)
i=0
for overrides in "$@"; do
  i=$((i + 1))
  work="/tmp/sweep_run_$i"
  rm -rf "$work"
  echo "[$(( $(date +%s) - start ))s] run $i: $overrides"
  # shellcheck disable=SC2086
  python3 -m flax_albert_code.train --config configs/quality.py --workdir "$work" \
    --config.data.data_dir="$data" --config.train.steps="$steps" \
    --config.train.eval_every="$(( steps / 2 ))" --config.train.checkpoint_every=100000 \
    --config.train.samples_at_end=0 --config.train.log_every=50 $overrides 2>&1 \
    | tr '\r' '\n' | grep -E "^(Prepared|final|error|step)|step [0-9]+: \{" | tail -6
  cp "$work/metrics.jsonl" "$out/metrics_$i.jsonl"
  echo "$overrides" > "$out/overrides_$i.txt"
done
echo "[$(( $(date +%s) - start ))s] done"
