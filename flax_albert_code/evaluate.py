"""Evaluates a checkpoint: generation, retrieval and baselines, or HumanEval; writes report.json/.md.

  python -m flax_albert_code.evaluate --checkpoint DIR [--data SOURCE] [--split test] \\
      [--strategies greedy,beam,sample] [--rerank] [--max-examples N] [--out DIR]

SOURCE: `prepared` (default: the checkpoint's prepared data), any data source spec
(`jsonl:PATH`, `csn:PATH`, `dir:PATH`, ...; a source with partitions keeps `--split`), or
`humaneval`. Baselines use the prepared train split. The logic lives in
`flax_albert_code.evaluation`; this file only wires it to a checkpoint.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import sys
from typing import Sequence

from flax_albert_code.data import mining, sources, splits
from flax_albert_code.evaluation import harness
from flax_albert_code.evaluation import humaneval, report, sandbox


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m flax_albert_code.evaluate",
                              description=__doc__.split("\n\n")[0])
  arg = p.add_argument
  arg("--checkpoint", required=True, help="checkpoint directory")
  arg("--data", default="prepared", help="prepared | humaneval | a data source spec")
  arg("--split", default="test")
  arg("--strategies", default="greedy", help="comma-separated: greedy, beam, sample")
  arg("--rerank", action="store_true", help="also rerank beams/samples by alignment")
  arg("--max-examples", "--max_examples", type=int, default=0, help="0: all")
  arg("--out", default="", help="report directory (default: the checkpoint's)")
  arg("--num-samples", type=int, default=10)
  arg("--num-beams", type=int, default=4)
  arg("--temperature", type=float, default=0.8)
  arg("--repetition-penalty", type=float, default=None,
      help="CTRL repetition penalty (1.0: off; default: the checkpoint's config.sample)")
  arg("--no-repeat-ngram-size", type=int, default=None,
      help="never repeat an n-gram (0: off; default: the checkpoint's config.sample)")
  arg("--top-k", type=int, default=0)
  arg("--top-p", type=float, default=0.95)
  arg("--max-new-tokens", type=int, default=None)
  arg("--seed", type=int, default=0)
  arg("--batch-size", type=int, default=64)
  arg("--max-candidates", type=int, default=1000, help="retrieval: target + distractors")
  arg("--no-retrieval", action="store_true", help="skip the retrieval (MRR) rows")
  arg("--no-retrieve", action="store_true",
      help="a retrieval model generates from the description alone (no neighbours)")
  arg("--corpus", default="", help="retrieval corpus (default: the run's train split)")
  arg("--no-baselines", action="store_true")
  arg("--timeout", type=float, default=5.0, help="HumanEval: seconds per candidate")
  arg("--workers", type=int, default=0, help="HumanEval: parallel sandboxes (0: CPU count)")
  arg("--show", type=int, default=3, help="best and worst examples in the report")
  arg("--random-examples", type=int, default=5,
      help="examples drawn at random (with --seed) for the report")
  return p.parse_args(argv)


_FIELDS = ("description", "code", "path", "name")


def load_examples(spec: str, split: str, prepared, max_examples: int = 0) -> list[dict]:
  """The first `max_examples` (0: all) examples of a data source spec as dicts of text;
  `prepared` reads the checkpoint's prepared data."""
  if spec == "prepared":
    return [{k: e[k] for k in _FIELDS if k in e}
            for e in itertools.islice(prepared.source(split), max_examples or None)]
  split = splits.canonical_split(split)
  skipped: collections.Counter = collections.Counter()
  pairs = [pr for spec_ in sources.parse_specs(spec) for unit in sources.units(spec_)
           for pr in unit.read(mining.Filters(), skipped)]
  if any(pr.partition for pr in pairs):
    pairs = [pr for pr in pairs if pr.partition == split]
  return [{k: getattr(pr, k) for k in _FIELDS} for pr in pairs[:max_examples or None]]


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  try:  # here, not at the top: flax and orbax would make `--help` take 2.6 s, not 1.1 s
    from flax_albert_code.inference.generator import CodeGenerator  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    sys.exit(f"Cannot import flax_albert_code.generator ({e}); evaluation needs the sampler.")
  gen = CodeGenerator.from_checkpoint(args.checkpoint)
  decode = harness.DecodeSettings(
      num_samples=args.num_samples, num_beams=args.num_beams, temperature=args.temperature,
      top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
      batch_size=args.batch_size, repetition_penalty=args.repetition_penalty,
      no_repeat_ngram_size=args.no_repeat_ngram_size)
  strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
  train = [] if args.no_baselines else load_examples("prepared", "train", gen.prepared)
  if args.data == "humaneval":
    problems = humaneval.load_problems()[:args.max_examples or None]
    results = harness.evaluate_humaneval(
        gen, problems, strategies, args.rerank, decode, train,
        sandbox.Limits(timeout_s=args.timeout), args.workers or None, args.show)
  else:
    examples = load_examples(args.data, args.split, gen.prepared, args.max_examples)
    results = harness.evaluate(gen, examples, train, strategies, args.rerank, decode,
                                  not args.no_retrieval, args.max_candidates, args.show,
                                  args.random_examples, args.seed,
                                  retrieve=False if args.no_retrieve else None,
                                  corpus=args.corpus or None)
  results.update(title=f"{args.data} ({args.split})" if args.data != "humaneval" else "HumanEval",
                 checkpoint=args.checkpoint, data=args.data, split=args.split)
  json_path, md_path = report.write(results, args.out or args.checkpoint)
  print(report.table(results["rows"]))
  print(f"\nWrote {json_path} and {md_path}")
  return results


if __name__ == "__main__":
  main()
