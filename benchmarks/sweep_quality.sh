#!/usr/bin/env bash
# Short runs of configs/quality.py that differ in a few overrides, judged on the VALID split
# (never test): the evidence behind the recipe's choices. One prepared dataset is shared; runs
# go one after another (SWEEP_PARALLEL > 1 runs that many side by side on the one GPU: six
# base-sized runs on an H100 thrashed and ran out of memory, so keep it at 1 for this config).
#   bash benchmarks/sweep_quality.sh OUTDIR STEPS "name: [VAR=value ...] overrides" ...
# (VAR=value words set that run's environment, e.g. XLA_FLAGS.)
# Environment: SWEEP_COMMON (overrides of every run and of the data, e.g.
# "--config.data.max_examples=50000"), SWEEP_PARALLEL, SWEEP_EVAL_EXAMPLES (after training,
# `evaluate` greedy decoding and retrieval on that many valid examples; 0: skip),
# SWEEP_DATA_DIR. The table: python benchmarks/summarize_sweep.py OUTDIR.
set -euo pipefail
out="$1"; steps="$2"; shift 2
mkdir -p "$out"
data="${SWEEP_DATA_DIR:-/tmp/sweep_data}"
read -r -a common <<< "${SWEEP_COMMON:-}"
parallel="${SWEEP_PARALLEL:-1}"
n_eval="${SWEEP_EVAL_EXAMPLES:-0}"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/timeline.txt"; }
[ "$parallel" -gt 1 ] && export XLA_PYTHON_CLIENT_PREALLOCATE=false   # runs share the GPU
stamp "prepare"
python3 -m flax_albert_code.prepare --config configs/quality.py --workdir /tmp/sweep_prepare \
  --config.data.data_dir="$data" "${common[@]}" 2>&1 | tail -4 | tee "$out/prepare.txt"

one() {   # name, overrides...
  local name="$1"; shift
  local work="/tmp/sweep_run_$name"
  local env=()
  while [ $# -gt 0 ] && [[ "$1" =~ ^[A-Z_][A-Z0-9_]*= ]]; do env+=("$1"); shift; done
  rm -rf "$work"
  stamp "start $name: $*"
  env "${env[@]}" python3 -m flax_albert_code.train --config configs/quality.py --workdir "$work" \
    --config.data.data_dir="$data" --config.train.steps="$steps" \
    --config.train.eval_every="$(( steps / 2 ))" --config.train.checkpoint_every="$steps" \
    --config.train.samples_at_end=0 --config.train.log_every=50 "${common[@]}" "$@" \
    > "$out/train_$name.log" 2>&1 || { stamp "FAILED $name"; tail -5 "$out/train_$name.log"; }
  cp "$work/metrics.jsonl" "$out/metrics_$name.jsonl" 2>/dev/null || true
  echo "${env[*]} $*" > "$out/overrides_$name.txt"
  stamp "trained $name"
  if [ "$n_eval" -gt 0 ] && [ -d "$work/checkpoints" ]; then
    env "${env[@]}" python3 -m flax_albert_code.evaluate --checkpoint "$work" --split valid \
      --max-examples "$n_eval" --strategies greedy --out "$out/eval_$name" \
      > "$out/eval_$name.log" 2>&1 || stamp "FAILED evaluate $name"
    stamp "evaluated $name"
  fi
}

for spec in "$@"; do
  name="${spec%%:*}"
  # shellcheck disable=SC2206
  overrides=(${spec#*:})
  while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n || true; done
  one "$name" "${overrides[@]}" &
done
wait
stamp "done"
