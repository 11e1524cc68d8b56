#!/usr/bin/env bash
# The quality recipe end to end on one GPU (configs/quality.py): prepare from this machine's
# stdlib + site-packages, train, evaluate on the held-out test split and HumanEval, export bf16,
# generate the source design's example (greedy and beam), then HumanEval. Stages are stamped in
# seconds.
#   bash benchmarks/run_quality.sh [OUTDIR] [--config.train.steps=N ...]
# Environment: QUALITY_EVAL_EXAMPLES (test examples, default 500), QUALITY_HUMANEVAL_STRATEGIES
# (default greedy,sample), QUALITY_WORKDIR (default /tmp/quality_run).
set -euo pipefail
out="${1:-${OUT:-/tmp/quality}}"
mkdir -p "$out"
work="${QUALITY_WORKDIR:-/tmp/quality_run}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/.."
start=$(date +%s)
# Every process after training compiles the same sampling programs: share them on disk.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${work}_jax_cache}"
stamp() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/timeline.txt"; }
python3 -c "import jax, flax, optax, orbax.checkpoint, grain, sentencepiece; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', orbax.checkpoint.__version__, 'grain', grain.__version__ if hasattr(grain, '__version__') else '?', 'sentencepiece', sentencepiece.__version__, jax.devices()[0].device_kind)" \
  | tee "$out/versions.txt"
stamp "train (prepares the data first)"
python3 -m flax_albert_code.train --config "$root/flax_albert_code/configs/quality.py" --workdir "$work" "${@:2}" \
  > "$out/train_full.log" 2>&1 || { tail -30 "$out/train_full.log"; exit 1; }
tr '\r' '\n' < "$out/train_full.log" | grep -v -i "warn" \
  | grep -E "^(Training|Prepared|pairs|  |step|final|checkpoint|#|def |error)|step [0-9]+: \{" \
  | tail -60 | tee "$out/train.log"
cp "$work/metrics.jsonl" "$out/"
cp "$work"/data/*/summary.txt "$out/" 2>/dev/null || true
stamp "evaluate: test split"
python3 -m flax_albert_code.evaluate --checkpoint "$work" --split test \
  --max-examples "${QUALITY_EVAL_EXAMPLES:-500}" --strategies greedy,beam,sample --rerank \
  --num-samples 8 --random-examples 5 --seed 0 --out "$out/test" 2>&1 | grep -v "truncated" | tail -20
stamp "export bf16"
python3 -m flax_albert_code.export --checkpoint "$work" --out "$work/export" --dtype bf16 \
  --platforms cuda --buckets 8 --lengths 256 --no-hf-encoder 2>&1 | grep -v -i "warn" | tail -3 \
  | tee "$out/export.txt"
du -sb "$work/export" | tee -a "$out/export.txt"
stamp "generate: the source design's example"
desc="create a function that takes two integers and returns their sum"
for args in "--strategy greedy" "--strategy beam --num-beams 4"; do
  # shellcheck disable=SC2086
  echo "## $args" && python3 -m flax_albert_code.generate --checkpoint "$work" $args "$desc" 2>&1 \
    | grep -v -i "warn" | tail -20
done | tee "$out/sum_example.txt"
stamp "evaluate: HumanEval"
python3 -m flax_albert_code.evaluate --checkpoint "$work" --data humaneval \
  --strategies "${QUALITY_HUMANEVAL_STRATEGIES:-greedy,sample}" --num-samples 10 \
  --out "$out/humaneval" 2>&1 | grep -v "truncated" | tail -12
stamp "done"
