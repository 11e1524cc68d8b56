"""Evaluates a checkpoint: generation, retrieval and baselines, or HumanEval; writes
report.json/.md.

--data: `prepared` (the checkpoint's prepared data), a data source spec (`jsonl:PATH`, ...; one
with partitions keeps `--split`), or `humaneval`. Every flag is checked before the model loads;
an earlier report in the same directory is kept as report.N.json/.md.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import os
import sys
from typing import Sequence

from flax_albert_code.data import mining, sources, splits
from flax_albert_code.evaluation import harness
from flax_albert_code.evaluation import humaneval, report, sandbox
from flax_albert_code.inference import decoding, options
from flax_albert_code import cli


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
  pairs = [pr for spec_ in sources.parse_specs(spec, "--data")
           for unit in sources.units(spec_, "--data")
           for pr in unit.read(mining.Filters(), skipped)]
  if any(pr.partition for pr in pairs):
    pairs = [pr for pr in pairs if pr.partition == split]
  return [{k: getattr(pr, k) for k in _FIELDS} for pr in pairs[:max_examples or None]]


def check_args(args: argparse.Namespace) -> list[str]:
  """The strategies; ValueError naming the flag for any flag out of range."""
  strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
  if not strategies:
    raise ValueError("--strategies is empty; give one or more of greedy, beam, sample.")
  decode = dict(num_beams=args.num_beams, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                repetition_penalty=1.0 if args.repetition_penalty is None
                else args.repetition_penalty,
                no_repeat_ngram_size=args.no_repeat_ngram_size or 0)
  # Every decoding flag's range, whichever strategies use it, then the strategies' names: greedy
  # asks for one candidate, beam for all its beams without a repetition penalty; nothing else fails.
  options.check(strategies=("sample",), strategy="sample", num_samples=args.num_samples,
                **decode)
  for s in strategies:
    options.check(strategies=decoding.STRATEGIES, strategy=s, num_beams=args.num_beams)
  for flag, value, low in (("--max-examples", args.max_examples, 0),
                           ("--batch-size", args.batch_size, 1),
                           ("--max-candidates", args.max_candidates, 1),
                           ("--workers", args.workers, 0), ("--show", args.show, 0),
                           ("--random-examples", args.random_examples, 0)):
    if value < low:
      all_ = " (0: all)" if flag == "--max-examples" else ""
      raise ValueError(f"{flag} must be at least {low}{all_}, got {value}.")
  if not args.timeout > 0:
    raise ValueError(f"--timeout must be positive, got {args.timeout:g}.")
  if args.corpus:
    from flax_albert_code.retrieval import index  # pylint: disable=import-outside-toplevel
    index.check_corpus(args.corpus)
  if args.data != "humaneval":
    splits.canonical_split(args.split)
  out = args.out or args.checkpoint
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"{'--out' if args.out else '--checkpoint'} {out} is a file; the report "
                     "(report.json, report.md) needs a directory.")
  return strategies


def main(argv: Sequence[str] | None = None) -> dict | int:
  """The results (what report.json holds), or 1 after one `error:` line for a user mistake."""
  args = parse_args(argv)
  cli.quiet_logs()
  try:
    strategies = check_args(args)
    problems = examples = None
    if args.data == "humaneval":
      problems = humaneval.load_problems()[:args.max_examples or None]
    elif args.data != "prepared":
      examples = load_examples(args.data, args.split, None, args.max_examples)
      if not examples:
        raise ValueError(f"--data {args.data} holds no {args.split} examples.")
    # One decoding call takes --batch-size descriptions.
    cli.check_decoding(args.checkpoint, strategies, num_texts=args.batch_size,
                       num_samples=args.num_samples, num_beams=args.num_beams,
                       max_new_tokens=args.max_new_tokens)
    # Here, not at the top: importing flax and orbax would slow `--help`.
    from flax_albert_code.inference import generator  # pylint: disable=import-outside-toplevel
    gen = generator.CodeGenerator.from_checkpoint(args.checkpoint)
    decode = harness.DecodeSettings(**{f.name: getattr(args, f.name)
                                       for f in dataclasses.fields(harness.DecodeSettings)})
    if not args.no_baselines and gen.prepared is None:
      raise ValueError("The baselines need the run's prepared train split, which was not found "
                       "beside the checkpoint; pass --no-baselines.")
    train = [] if args.no_baselines else load_examples("prepared", "train", gen.prepared)
    progress = cli.progress() or "lines"   # bars on a terminal, else a line now and then
    if problems is not None:
      results = harness.evaluate_humaneval(
          gen, problems, strategies, args.rerank, decode, train,
          sandbox.Limits(timeout_s=args.timeout), args.workers or None, args.show,
          progress=progress)
    else:
      if examples is None:
        if gen.prepared is None:
          raise ValueError("--data prepared needs the run's prepared data, which was not found "
                           "beside the checkpoint; pass --data SOURCE.")
        examples = load_examples("prepared", args.split, gen.prepared, args.max_examples)
      results = harness.evaluate(gen, examples, train, strategies, args.rerank, decode,
                                 not args.no_retrieval, args.max_candidates, args.show,
                                 args.random_examples, args.seed, progress=progress,
                                 retrieve=False if args.no_retrieve else None,
                                 corpus=args.corpus or None)
    results.update(title=f"{args.data} ({args.split})" if args.data != "humaneval" else "HumanEval",
                   checkpoint=args.checkpoint, data=args.data, split=args.split)
    kept = report.keep_earlier(args.out or args.checkpoint)
    json_path, md_path = report.write(results, args.out or args.checkpoint)
  except (*cli.USER_ERRORS, ImportError) as e:
    return cli.fail(e)
  print(report.table(results["rows"]))
  print(f"\nWrote {json_path} and {md_path}"
        + (f" (the earlier report kept as {' and '.join(map(os.path.basename, kept))})"
           if kept else ""))
  return results


if __name__ == "__main__":
  sys.exit(1 if main() == 1 else 0)
