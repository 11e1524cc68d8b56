"""Time of `prepare` per phase, and of BM25 neighbour mining (issue 20: <= 60 s for ~100k pairs
and the unlabelled set on a 16-core host).

  python benchmarks/bench_prepare.py --sources stdlib --max_examples 5000
  python benchmarks/bench_prepare.py --sources stdlib,site-packages --max_examples 100000

Prepares into a fresh temporary directory (never reused), with configs/default.py and the given
sources, unlabelled code on (`--unlabelled false` for pairs only); then mines k BM25 neighbours
of every train/valid/test example (`retrieval.neighbours.mine`, as training does). Prints a table of
the phase seconds (meta.json "timing") and adds or replaces this host's row (same CPU count,
sources, max_examples, unlabelled) in the "## Prepare time" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from importlib import metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench_pipeline import cpu_name  # noqa: E402  (this directory)
from flax_albert_code.configs import default  # noqa: E402
from flax_albert_code.data import prepared as prepared_lib  # noqa: E402
from flax_albert_code.retrieval import neighbours  # noqa: E402

HEADING = "## Prepare time"
PHASES = ("mine", "tokenizer", "encode", "write", "total")
COLUMNS = ("host", "sources", "max_examples", "unlabelled", "date", "pairs", "unlabelled code",
           *PHASES, "TFDS (in a thread)", "neighbours", "versions")


def versions() -> str:
  names = {"numpy": "numpy", "scipy": "scipy", "sentencepiece": "spm",
           "tensorflow-datasets": "tfds", "array_record": "array_record"}
  return f"Python {platform.python_version()}, " + ", ".join(
      f"{short} {metadata.version(p)}" for p, short in names.items())


def run(args) -> dict:
  config = default.get_config()
  workdir = tempfile.mkdtemp(prefix="bench_prepare_")
  try:
    config.data.update(sources=args.sources, max_examples=args.max_examples,
                       unlabelled=args.unlabelled, max_unlabelled=args.max_unlabelled,
                       data_dir=os.path.join(workdir, "data"))
    t = time.perf_counter()
    prep = prepared_lib.prepare(config, workdir, progress=True)
    wall = time.perf_counter() - t
    print(prepared_lib.summary(prep, config.data))
    t = time.perf_counter()
    nb = neighbours.mine(prep, args.k, "bm25")
    nb_s = time.perf_counter() - t
    sizes = prep.split_sizes
    return dict(timing=prep.meta["timing"], wall=wall, neighbours=nb_s,
                pairs=sum(sizes.get(s, 0) for s in ("train", "valid", "test")),
                unlabelled=sizes.get("unlabelled", 0),
                queries=sum(len(v) for v in nb.ids.values()))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def update_results(path: str, row: list[str]) -> None:
  """Adds `row` to the section's table, replacing a row of the same host and settings."""
  old = open(path).read() if os.path.exists(path) else ""
  start = old.find(HEADING)
  end = old.find("\n## ", start + len(HEADING)) if start >= 0 else -1
  section = old[start:end if end >= 0 else len(old)] if start >= 0 else ""
  rows = [line for line in section.splitlines()   # the data rows: not the header, not ---
          if line.startswith("| ") and not line.startswith("| host ") and "---" not in line]
  key = lambda line: [c.strip() for c in line.strip("|").split("|")][:4]  # noqa: E731
  new_row = "| " + " | ".join(row) + " |"
  rows = [r for r in rows if key(r) != key(new_row)] + [new_row]
  text = "\n".join([
      HEADING,
      "",
      "`python benchmarks/bench_prepare.py --sources S --max_examples N`: `prepare` into a fresh "
      "directory with configs/default.py (its tokenizer vocabulary: 4000) and the unlabelled "
      "code set, seconds per "
      "phase from meta.json: mining (worker processes), tokenizer training (a fixed 3 M-char "
      "sample of the train texts + 1 M of unlabelled code), encoding (sentencepiece threads), "
      "writing the token store and waiting for the TFDS dataset (written in a thread from the "
      "end of mining on; its own seconds in the next column). Neighbours: BM25 top-2 of every "
      "train/valid/test example among the train split (`retrieval.neighbours.mine`), own file "
      "excluded. Target (issue 20): total <= 60 s for ~100k pairs on a 16-core host.",
      "",
      "| " + " | ".join(COLUMNS) + " |",
      "|" + "|".join(" --- " for _ in COLUMNS) + "|",
      *rows,
      ""])
  if start < 0:
    new = old.rstrip("\n") + "\n\n" + text
  else:
    new = old[:start] + text + (old[end:] if end >= 0 else "")
  with open(path, "w") as f:
    f.write(new)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--sources", default="stdlib")
  ap.add_argument("--max_examples", type=int, default=5000)
  ap.add_argument("--unlabelled", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
  ap.add_argument("--max_unlabelled", type=int, default=0)
  ap.add_argument("--k", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "RESULTS.md"))
  args = ap.parse_args()
  r = run(args)
  t = r["timing"]
  print(f"\n{'phase':<28}{'seconds':>9}")
  for name in PHASES:
    print(f"  {name:<26}{t[name]:>9.1f}")
  print(f"  {'(TFDS, in a thread)':<26}{t.get('tfds', 0):>9.1f}")
  print(f"  {f'neighbours (BM25, k={args.k})':<26}{r['neighbours']:>9.1f}"
        f"   ({r['queries']:,} queries over the train split)")
  print(f"{r['pairs']:,} pairs, {r['unlabelled']:,} unlabelled code examples; prepare() wall "
        f"{r['wall']:.1f} s")
  host = re.sub(r"\s+", " ", f"{cpu_name()}, {os.cpu_count()} cores").replace("|", "/")
  row = [host, args.sources, str(args.max_examples), "on" if args.unlabelled else "off",
         datetime.date.today().isoformat(), f"{r['pairs']:,}", f"{r['unlabelled']:,}",
         *(f"{t[p]:.1f}" for p in PHASES), f"{t.get('tfds', 0):.1f}",
         f"{r['neighbours']:.1f} (k={args.k})", versions()]
  if args.out:
    update_results(args.out, row)
    print(f"wrote the prepare-time row of {args.out}")


if __name__ == "__main__":
  main()
