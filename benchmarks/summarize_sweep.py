"""The table of a `sweep_quality.sh` directory: each run's last validation metrics, its
steady-state speed and first-step time, and (with SWEEP_EVAL_EXAMPLES) greedy decoding and
retrieval on the valid examples beside BM25 on the same ones.

  python benchmarks/summarize_sweep.py OUTDIR [> table.md]
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys


def _last(rows: list[dict], key: str):
  vals = [r[key] for r in rows if key in r]
  return vals[-1] if vals else None


def _eval_rows(path: str) -> dict[str, dict]:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return {r["method"]: r for r in json.load(f)["rows"]}


def summarize(out_dir: str) -> str:
  lines = ["| run | overrides | steps | compile s | valid gen_loss | valid tok acc | valid InfoNCE "
           "| valid retrieval acc | tok/s | greedy BLEU | greedy parses % | MRR d->c "
           "| BM25 MRR d->c | BM25 NN BLEU |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for path in sorted(glob.glob(os.path.join(out_dir, "metrics_*.jsonl"))):
    name = os.path.basename(path)[len("metrics_"):-len(".jsonl")]
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
    over_path = os.path.join(out_dir, f"overrides_{name}.txt")
    overrides = open(over_path, encoding="utf-8").read().strip() if os.path.exists(over_path) else ""
    overrides = overrides.replace("--config.", "")
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]   # skip compile
    ev = _eval_rows(os.path.join(out_dir, f"eval_{name}", "report.json"))
    fmt = lambda v, f="{:.3f}": "" if v is None else f.format(v)
    get = lambda method, key: ev.get(method, {}).get(key)
    log_path = os.path.join(out_dir, f"train_{name}.log")
    log = open(log_path, encoding="utf-8", errors="replace").read() if os.path.exists(
        log_path) else ""
    compiled = re.findall(r"Compiled \d+ step programs in ([\d.]+) s", log)
    cells = [name, overrides, fmt(_last(rows, "step"), "{}"),
             fmt(float(compiled[-1]) if compiled else None, "{:.0f}"),
             fmt(_last(rows, "valid_gen_loss")), fmt(_last(rows, "valid_token_accuracy")),
             fmt(_last(rows, "valid_infonce_loss")), fmt(_last(rows, "valid_retrieval_accuracy")),
             fmt(sum(rates) / len(rates) if rates else None, "{:.0f}"),
             fmt(get("greedy", "bleu"), "{:.2f}"), fmt(get("greedy", "parse_rate"), "{:.1f}"),
             fmt(get("alignment desc→code", "mrr")), fmt(get("BM25 desc→code", "mrr")),
             fmt(get("BM25 nearest neighbour", "bleu"), "{:.2f}")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(summarize(sys.argv[1] if len(sys.argv) > 1 else "."))
