#!/usr/bin/env bash
# Greedy decoding with CTRL's repetition penalty, chosen on the VALID split and then reported on
# test beside plain greedy, all from one checkpoint:
#   bash benchmarks/sweep_penalty.sh WORKDIR OUTDIR "1.0 1.1 1.2 1.5" [VALID_N] [TEST_N]
# Picks the penalty with the highest valid greedy parse rate (ties: the smaller penalty).
set -euo pipefail
work="$1"; out="$2"; n_valid="${4:-300}"; n_test="${5:-500}"
read -r -a penalties <<< "$3"
mkdir -p "$out"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${work}_jax_cache}"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/timeline.txt"; }
for p in "${penalties[@]}"; do
  stamp "valid, greedy, repetition penalty $p"
  python3 -m flax_albert_code.evaluate --checkpoint "$work" --split valid --max-examples "$n_valid" \
    --strategies greedy --repetition-penalty "$p" --no-baselines --no-retrieval --show 0 \
    --out "$out/valid_$p" > "$out/valid_$p.log" 2>&1 || { tail -5 "$out/valid_$p.log"; exit 1; }
done
best=$(python3 - "$out" "${penalties[@]}" <<'PY'
import json, sys
out, penalties = sys.argv[1], sys.argv[2:]
rate = {p: json.load(open(f"{out}/valid_{p}/report.json"))["rows"][0]["parse_rate"] for p in penalties}
for p in penalties:
  print(f"valid greedy parse rate at penalty {p}: {rate[p]:.1f}%", file=sys.stderr)
print(max(penalties, key=lambda p: (rate[p], -float(p))))
PY
)
stamp "chosen on valid: $best"
for p in 1.0 "$best"; do
  [ "$p" = "1.0" ] && [ -d "$out/test_1.0" ] && continue
  stamp "test, greedy, repetition penalty $p"
  python3 -m flax_albert_code.evaluate --checkpoint "$work" --split test --max-examples "$n_test" \
    --strategies greedy --repetition-penalty "$p" --no-baselines --no-retrieval --show 0 \
    --random-examples 5 --seed 0 --out "$out/test_$p" > "$out/test_$p.log" 2>&1 \
    || { tail -5 "$out/test_$p.log"; exit 1; }
done
python3 - "$out" "${penalties[@]}" "$best" <<'PY'
import json, os, sys
out, penalties, best = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
print("| split | repetition penalty | greedy BLEU | greedy parses % | examples |")
print("|---|---:|---:|---:|---:|")
for split, ps in (("valid", penalties), ("test", sorted({"1.0", best}, key=float))):
  for p in ps:
    path = f"{out}/{split}_{p}/report.json"
    if os.path.exists(path):
      r = json.load(open(path))["rows"][0]
      print(f"| {split} | {p}{' (chosen)' if p == best else ''} | {r['bleu']:.2f} "
            f"| {r['parse_rate']:.1f} | {r['examples']} |")
PY
stamp "done"
