"""Generates the source design's example with a checkpoint (greedy and beam 4) and runs it in
the sandbox: does `f(2, 3) == 5`? Prints the code and the neighbours it drew on.

  python benchmarks/design_example.py --checkpoint runs/quality [--no-repeat-ngram-size N]
"""
import argparse
import json
import sys

from flax_albert_code.evaluation import design_example
from flax_albert_code.inference.generator import CodeGenerator


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--no-repeat-ngram-size", type=int, default=None)
  p.add_argument("--json", default="", help="also write the results here")
  args = p.parse_args()
  gen = CodeGenerator.from_checkpoint(args.checkpoint)
  results = design_example.run(gen, no_repeat_ngram_size=args.no_repeat_ngram_size)
  print(design_example.format_results(results))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
