#!/usr/bin/env bash
# The quality recipe end to end on one GPU (configs/quality.py): prepare from this machine's
# stdlib + site-packages, train, evaluate on the held-out test split and HumanEval, export bf16.
#   bash benchmarks/run_quality.sh [OUTDIR] [--config.train.steps=N ...]
set -euo pipefail
out="${1:-${OUT:-/tmp/quality}}"
mkdir -p "$out"
work="${QUALITY_WORKDIR:-/tmp/quality_run}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/.."
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }
stamp "train (prepares the data first)"
python3 -m flax_albert_code.train --config "$root/configs/quality.py" --workdir "$work" "${@:2}" \
  2>&1 | tr '\r' '\n' | grep -v -i "warn" | grep -E "^(Training|Prepared|pairs|  |step|final|checkpoint|#|def |error)|valid_|train:.*(000|00)/" \
  | tail -60 | tee "$out/train.log"
cp "$work/metrics.jsonl" "$out/" 2>/dev/null || true
cp "$work"/data/*/summary.txt "$out/" 2>/dev/null || true
stamp "evaluate: test split"
python3 -m flax_albert_code.evaluate --checkpoint "$work" --split test --max-examples "${QUALITY_EVAL_EXAMPLES:-1000}" \
  --strategies greedy,beam,sample --rerank --num-samples 8 --out "$out/test" 2>&1 \
  | grep -v "truncated" | tail -20
stamp "evaluate: HumanEval"
python3 -m flax_albert_code.evaluate --checkpoint "$work" --data humaneval \
  --strategies "${QUALITY_HUMANEVAL_STRATEGIES:-greedy,sample}" --num-samples 10 --out "$out/humaneval" 2>&1 | grep -v "truncated" | tail -12
stamp "export"
if python3 -c "import flax_albert_code.export" 2>/dev/null; then
  python3 -m flax_albert_code.export --checkpoint "$work" --out "$work/export" --dtype bf16 \
    --platforms cuda 2>&1 | grep -v -i "warn" | tail -3
  du -sh "$work/export" | tee "$out/export_size.txt"
fi
stamp "done"
