#!/usr/bin/env bash
# The quality recipe end to end (configs/quality.py, retrieval-augmented): prepare from this
# machine's stdlib + site-packages, train, choose the decoding on the VALID split, evaluate the
# held-out test split (with and without retrieval, beside BM25 / dense nearest neighbours), run
# the source design's example in the sandbox; optionally export and HumanEval. Stages are
# stamped in seconds; each stage can run in its own call (the workdir persists):
#   bash benchmarks/run_quality.sh [OUTDIR] [--config.train.steps=N ...]
#   QUALITY_STAGES=train bash benchmarks/run_quality.sh OUT; QUALITY_STAGES=eval bash ... OUT
# Environment: QUALITY_STAGES (default "train eval"; also export, humaneval),
# QUALITY_EVAL_EXAMPLES (test examples, default 500), QUALITY_VALID_EXAMPLES (300),
# QUALITY_NGRAMS (no_repeat_ngram_size values tried on valid, default "0 4"),
# QUALITY_TEST_STRATEGIES (default greedy,beam),
# QUALITY_WORKDIR (default /tmp/quality_run), QUALITY_JSONL (an extra jsonl: set to evaluate),
# QUALITY_HELDOUT (a data source spec of a project absent from the corpus, e.g.
# dir:/path/to/project, evaluated like the test split), QUALITY_CONFIG (default
# configs/quality.py; e.g. configs/quality.py:scale), QUALITY_TRAIN_SECONDS (stop training with
# SIGTERM after this many seconds: the trainer saves a checkpoint and the next call resumes),
# QUALITY_GPUS (GPUs the run trains on, for the curve's GPU-minutes; default all visible).
# Stage "curve": every kept checkpoint on QUALITY_CURVE_EXAMPLES valid examples (default 200),
# then benchmarks/quality_curve.py writes the quality-vs-compute table and plot.
set -euo pipefail
out="${1:-${OUT:-/tmp/quality}}"
mkdir -p "$out"
work="${QUALITY_WORKDIR:-/tmp/quality_run}"
here="$(cd "$(dirname "$0")" && pwd)"
stages=" ${QUALITY_STAGES:-train eval} "
config="${QUALITY_CONFIG:-configs/quality.py}"
start=$(date +%s)
# Every process after training compiles the same sampling programs: share them on disk.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${work}_jax_cache}"
stamp() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/timeline.txt"; }
python3 - <<'PY' | tee "$out/versions.txt"
import flax, grain, jax, optax, orbax.checkpoint, sentencepiece
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax",
      orbax.checkpoint.__version__, "sentencepiece", sentencepiece.__version__,
      jax.device_count(), "x", jax.devices()[0].device_kind)
PY
if [[ $stages == *" train "* ]]; then
  stamp "train (prepares the data first)"
  guard=()
  [[ -n "${QUALITY_TRAIN_SECONDS:-}" ]] \
    && guard=(timeout --preserve-status -s TERM "$QUALITY_TRAIN_SECONDS")
  "${guard[@]}" python3 -m flax_albert_code.train --config "$config" \
    --workdir "$work" "${@:2}" > "$out/train_full.log" 2>&1 \
    || { tail -30 "$out/train_full.log"; exit 1; }
  shown="^(Training|Prepared|pairs|  |step|final|checkpoint|#|def |error)|step [0-9]+: \{"
  shown+="|[Mm]ined|Compiled|done .* after the process|Received|Resumed"
  tr '\r' '\n' < "$out/train_full.log" | grep -v -i "warn" | grep -E "$shown" \
    | tail -60 | tee "$out/train.log"
  cp "$work/metrics.jsonl" "$out/"
  stamp "trained"
fi
if [[ $stages == *" curve "* ]]; then
  for ckpt in $(find "$work/checkpoints" -maxdepth 1 -regex ".*/[0-9]+" | sort -V); do
    step=$(basename "$ckpt")
    [[ -f "$out/curve/step$step/report.json" ]] && continue
    stamp "curve: step $step on ${QUALITY_CURVE_EXAMPLES:-200} valid examples"
    python3 -m flax_albert_code.evaluate --checkpoint "$ckpt" --split valid --strategies greedy \
      --max-examples "${QUALITY_CURVE_EXAMPLES:-200}" --no-baselines --show 0 \
      --random-examples 0 --out "$out/curve/step$step" 2>&1 | grep "^|" | tail -8
  done
  python3 "$here/quality_curve.py" --metrics "$work/metrics.jsonl" --curve "$out/curve" \
    --gpus "${QUALITY_GPUS:-$(python3 -c 'import jax; print(jax.device_count())')}" \
    --results "$here/RESULTS.md" --plot "$here/quality_vs_compute.png" | tee "$out/curve.txt"
  cp "$here/quality_vs_compute.png" "$out/" 2>/dev/null || true
fi
if [[ $stages == *" eval "* ]]; then
  stamp "reading: teacher-forced nll with own / another / own code as first neighbour (valid)"
  python3 "$here/check_generation.py" --checkpoint "$work" --n 256 \
    --json "$out/check_generation.json" 2>&1 | grep -v -i "warn" | head -12 \
    | tee "$out/check_generation.txt"
  ngrams=()
  read -r -a ngrams <<< "${QUALITY_NGRAMS:-0 4}"
  for n in "${ngrams[@]}"; do
    stamp "evaluate: valid split, greedy, no_repeat_ngram_size $n"
    python3 -m flax_albert_code.evaluate --checkpoint "$work" --split valid --strategies greedy \
      --max-examples "${QUALITY_VALID_EXAMPLES:-300}" --no-retrieval --no-baselines --show 0 \
      --random-examples 0 --no-repeat-ngram-size "$n" --out "$out/valid_ngram$n" 2>&1 \
      | grep -v "truncated" | grep "^|" | tee -a "$out/valid_sweep.txt"
  done
  # The best valid BLEU among the settings with at most 2% degenerate outputs (else the least
  # degenerate).
  best=$(python3 - "$out" "${ngrams[@]}" <<'PY'
import json, sys
out, values = sys.argv[1], sys.argv[2:]
rows = {v: [r for r in json.load(open(f"{out}/valid_ngram{v}/report.json"))["rows"]
            if r["kind"] == "generation"][0] for v in values}
ok = [v for v, r in rows.items() if r["degenerate_rate"] <= 2.0]
print(max(ok, key=lambda v: rows[v]["bleu"]) if ok
      else min(rows, key=lambda v: rows[v]["degenerate_rate"]))
PY
)
  stamp "chosen on valid: no_repeat_ngram_size $best"
  stamp "evaluate: test split"
  python3 -m flax_albert_code.evaluate --checkpoint "$work" --split test \
    --max-examples "${QUALITY_EVAL_EXAMPLES:-500}" \
    --strategies "${QUALITY_TEST_STRATEGIES:-greedy,beam}" \
    --no-repeat-ngram-size "$best" --random-examples 5 --seed 0 --out "$out/test" 2>&1 \
    | grep -v "truncated" | tail -24
  if [[ -n "${QUALITY_HELDOUT:-}" ]]; then
    stamp "evaluate: held-out project $QUALITY_HELDOUT"
    python3 -m flax_albert_code.evaluate --checkpoint "$work" --data "$QUALITY_HELDOUT" \
      --max-examples "${QUALITY_EVAL_EXAMPLES:-500}" --strategies greedy \
      --no-repeat-ngram-size "$best" --random-examples 5 --seed 0 --out "$out/heldout" 2>&1 \
      | grep -v "truncated" | tail -20
  fi
  if [[ -n "${QUALITY_JSONL:-}" ]]; then
    stamp "evaluate: $QUALITY_JSONL"
    python3 -m flax_albert_code.evaluate --checkpoint "$work" --data "jsonl:$QUALITY_JSONL" \
      --max-examples "${QUALITY_EVAL_EXAMPLES:-500}" --strategies greedy \
      --no-repeat-ngram-size "$best" --random-examples 5 --seed 0 --out "$out/jsonl" 2>&1 \
      | grep -v "truncated" | tail -20
  fi
  stamp "the source design's example"
  python3 "$here/design_example.py" --checkpoint "$work" --no-repeat-ngram-size "$best" \
    2>&1 | grep -v -i "warn" | tee "$out/sum_example.txt"
fi
if [[ $stages == *" export "* ]]; then
  stamp "export bf16"
  python3 -m flax_albert_code.export --checkpoint "$work" --out "$work/export" --dtype bf16 \
    --platforms cuda --buckets 8 --lengths 256 --no-hf-encoder 2>&1 | grep -v -i "warn" | tail -3 \
    | tee "$out/export.txt"
fi
if [[ $stages == *" humaneval "* ]]; then
  stamp "evaluate: HumanEval"
  python3 -m flax_albert_code.evaluate --checkpoint "$work" --data humaneval \
    --strategies "${QUALITY_HUMANEVAL_STRATEGIES:-greedy,sample}" --num-samples 10 \
    --out "$out/humaneval" 2>&1 | grep -v "truncated" | tail -12
fi
stamp "done"
