"""Prints the no_repeat_ngram_size whose VALID-split greedy run scored best: the highest BLEU
among settings with at most 2% degenerate outputs (else the least degenerate).

  python benchmarks/pick_decoding.py OUTDIR 0 4      # reads OUTDIR/valid_ngram{0,4}/report.json
"""
import json
import os
import sys


def main(out: str, values: list[str]) -> str:
  rows = {}
  for v in values:
    with open(os.path.join(out, f"valid_ngram{v}", "report.json"), encoding="utf-8") as f:
      gen = [r for r in json.load(f)["rows"] if r["kind"] == "generation"]
    rows[v] = gen[0]
  ok = [v for v, r in rows.items() if r["degenerate_rate"] <= 2.0]
  if ok:
    return max(ok, key=lambda v: rows[v]["bleu"])
  return min(rows, key=lambda v: rows[v]["degenerate_rate"])


if __name__ == "__main__":
  print(main(sys.argv[1], sys.argv[2:]))
