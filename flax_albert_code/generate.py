"""Generates code from descriptions with a trained checkpoint.

  echo "reverse a string" | python -m flax_albert_code.generate --checkpoint DIR --strategy beam
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from flax_albert_code.inference import options
from flax_albert_code import cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m flax_albert_code.generate",
                              description=__doc__.split("\n\n")[0])
  arg = p.add_argument
  arg("descriptions", nargs="*", help="descriptions (else --input or stdin, one a line)")
  arg("--checkpoint", required=True, help="training workdir (latest checkpoint) or checkpoint dir")
  arg("--input", default="", help="file of descriptions, one a line; '-' for stdin")
  arg("--strategy", default="greedy", help="greedy, beam or sample")
  arg("--num-beams", type=int, default=4)
  arg("--num-samples", type=int, default=1, help="candidates per description (sample, beam)")
  arg("--temperature", type=float, default=1.0)
  arg("--top-k", type=int, default=0)
  arg("--top-p", type=float, default=1.0)
  arg("--length-penalty", type=float, default=1.0)
  arg("--repetition-penalty", type=float, default=None,
      help="make tokens already emitted less likely (CTRL; 1.0: off; default: the model's "
      "config.sample)")
  arg("--no-repeat-ngram-size", type=int, default=None,
      help="never repeat an n-gram of the output (0: off; default: the model's config.sample)")
  arg("--rerank", action="store_true", help="order candidates by description-code alignment")
  arg("--drop-unparsable", action="store_true", help="drop candidates that do not parse")
  arg("--seed", type=int, default=0)
  arg("--max-new-tokens", type=int, default=None)
  arg("--json", action="store_true", help="one JSON object per description")
  arg("--corpus", default="", help="a retrieval model's corpus: a data source spec such as "
      "dir:~/src/myrepo (default: the run's train split)")
  arg("--no-retrieve", action="store_true",
      help="a retrieval model generates from the description alone")
  return p.parse_args(argv)


def _print_neighbours(cands: list[dict]) -> None:
  # Here, not at the top: scipy (BM25) would slow `--help`.
  from flax_albert_code.retrieval import retriever  # pylint: disable=import-outside-toplevel
  for line in retriever.neighbour_lines(cands[0].get("neighbours", []) if cands else []):
    print(line)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  cli.quiet_logs()
  try:
    # Here, not at the top: jax would make `--help` slow.
    from flax_albert_code.inference import decoding  # pylint: disable=import-outside-toplevel
    decode = {k: getattr(args, k) for k in (
        "strategy", "max_new_tokens", "num_beams", "num_samples", "top_k", "top_p", "temperature",
        "length_penalty", "seed")}   # as generate() and options.check name them
    options.check(strategies=decoding.STRATEGIES, **decode,
                  repetition_penalty=1.0 if args.repetition_penalty is None
                  else args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size or 0)
    texts = cli.read_texts(args.descriptions, args.input)
    if args.corpus:
      from flax_albert_code.retrieval import index  # pylint: disable=import-outside-toplevel
      index.check_corpus(args.corpus)
    cli.check_decoding(args.checkpoint, [args.strategy], num_texts=len(texts),
                       num_samples=args.num_samples, num_beams=args.num_beams,
                       max_new_tokens=args.max_new_tokens)
    gen = cli.load_generator(args.checkpoint)
    results = gen.generate(
        texts, **decode, rerank=args.rerank, repetition_penalty=args.repetition_penalty,
        drop_unparsable=args.drop_unparsable, no_repeat_ngram_size=args.no_repeat_ngram_size,
        retrieve=False if args.no_retrieve else (True if args.corpus else None),
        corpus=args.corpus or None)
  except cli.USER_ERRORS as e:
    return cli.fail(e)
  for text, cands in zip(texts, results):
    if args.json:
      print(json.dumps({"description": text, "candidates": cands}))
    elif len(texts) == 1 and len(cands) == 1:
      _print_neighbours(cands)
      print(cands[0]["code"])
    else:
      print(f"# {text}")
      _print_neighbours(cands)
      for i, c in enumerate(cands):
        if len(cands) > 1:
          align = "" if c["align"] is None else f", align {c['align']:.3f}"
          print(f"# candidate {i + 1} (score {c['score']:.3f}{align}, {c['finish_reason']})")
        print(c["code"].rstrip("\n") + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
