"""Code search by description: encode a corpus once into an index, then rank it for queries.

  python -m flax_albert_code.search --checkpoint DIR --corpus dir:~/src/repo --top-k 5 --json "..."
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from flax_albert_code.retrieval import index as index_lib
from flax_albert_code import cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m flax_albert_code.search",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("queries", nargs="*", help="descriptions to search for (else stdin, one a line)")
  p.add_argument("--checkpoint", required=True, help="training workdir or checkpoint directory")
  p.add_argument("--corpus", required=True, help="data source spec or prepared[:SPLIT]")
  p.add_argument("--top-k", type=int, default=10)
  p.add_argument("--index-dir", default="", help="default: <workdir>/search_index")
  p.add_argument("--json", action="store_true", help="JSON lines, one per query")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  cli.quiet_logs()
  try:
    if args.top_k < 1:
      raise ValueError(f"--top-k must be at least 1, got {args.top_k}.")
    queries = cli.read_texts(args.queries, "", "query")
    index_lib.check_corpus(args.corpus)
    gen = cli.load_generator(args.checkpoint)
    examples, fingerprint, skipped = index_lib.corpus(args.corpus, gen.prepared,
                                                      progress=cli.progress())
    if not examples:
      raise ValueError(f"The corpus {args.corpus} holds no functions to index (skipped: "
                       f"{index_lib.describe_skipped(skipped)}).")
    index = index_lib.load_or_build(gen, examples, fingerprint,
                                    args.index_dir or index_lib.default_root(gen),
                                    progress=cli.progress())
    results = index_lib.query(gen, index, queries, args.top_k)
  except cli.USER_ERRORS as e:
    return cli.fail(e)
  print(f"index: {index.directory} ({len(index.items)} functions, "
        f"{'reused' if index.reused else 'built'}; skipped: "
        f"{index_lib.describe_skipped(skipped)})", file=sys.stderr)
  for q, hits in zip(queries, results):
    if args.json:
      print(json.dumps({"query": q, "results": [{k: h[k] for k in (
          "rank", "score", "name", "path", "lineno", "description")} for h in hits]}))
      continue
    print(f"# {q}")
    for h in hits:
      first = h["description"].strip().splitlines()[0] if h["description"].strip() else ""
      print(f"{h['rank']:3d}. {h['score']:.3f}  {h['path']}:{h['lineno']}  {h['name']}  {first}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
