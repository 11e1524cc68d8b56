"""Serves an export over HTTP: JSON API, dynamic batching, Prometheus metrics, a playground page.

  python -m flax_albert_code.serve --export exports/small --port 8000 [--index INDEX]
  curl -s localhost:8000/v1/generate -H 'Content-Type: application/json' \\
      -d '{"descriptions": "reverse a string", "strategy": "beam", "num_samples": 2}'

INDEX is a search index directory (`python -m flax_albert_code.search` saves them under
<workdir>/search_index/) or a JSON-lines file of {"code", "name", "path", ...} embedded at start.
Open http://localhost:8000/ for the playground, /docs for the API. The logic lives in
`flax_albert_code.server` (the app) and `flax_albert_code.serving` (the export runtime).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  # fastapi (deploy/server.py) and uvicorn are optional dependencies: pip install .[serve].
  from flax_albert_code.deploy.server import Limits  # pylint: disable=import-outside-toplevel
  d = Limits()
  p = argparse.ArgumentParser(prog="python -m flax_albert_code.serve",
                              description=__doc__.split("\n\n")[0])
  arg = p.add_argument
  arg("--export", required=True, help="export directory (python -m flax_albert_code.export)")
  arg("--host", default="127.0.0.1")
  arg("--port", type=int, default=8000)
  arg("--index", default="", help="search index directory or JSON-lines corpus")
  arg("--max-wait-ms", type=float, default=d.max_wait_ms, help="batching window")
  arg("--max-body-bytes", type=int, default=d.max_body_bytes)
  arg("--max-texts", type=int, default=d.max_texts, help="descriptions/texts per request")
  arg("--max-text-chars", type=int, default=d.max_text_chars)
  arg("--max-samples", type=int, default=d.max_samples)
  arg("--request-timeout-s", type=float, default=d.request_timeout_s)
  arg("--warmup", default="greedy",
      help="comma-separated strategies (and 'embed' for the encoders) to compile before "
           "serving; '' for none (programs then compile on first use)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  # uvicorn and deploy/server.py (fastapi) are optional, as above; deploy/runtime.py is imported
  # here, not at the top, because jax would make `--help` take 1.3 s instead of 0.7 s (measured).
  import uvicorn  # pylint: disable=import-outside-toplevel
  from flax_albert_code.deploy import server  # pylint: disable=import-outside-toplevel
  from flax_albert_code.deploy import runtime as serving  # pylint: disable=import-outside-toplevel
  try:
    exp = serving.load_export(args.export, index=args.index or None)
  except (ValueError, OSError) as e:   # ExportError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 1
  warm = {s.strip() for s in args.warmup.split(",")}
  if warm - {""}:
    n = exp.warmup([s for s in exp.strategies if s in warm], embed="embed" in warm)
    logging.info("compiled %d programs", n)
  limits = server.Limits(max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
                         max_texts=args.max_texts, max_text_chars=args.max_text_chars,
                         max_samples=args.max_samples, request_timeout_s=args.request_timeout_s)
  uvicorn.run(server.create_app(exp, limits), host=args.host, port=args.port,
              log_level="warning", timeout_graceful_shutdown=5)
  return 0


if __name__ == "__main__":
  sys.exit(main())
