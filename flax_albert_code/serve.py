"""Serves an export over HTTP: JSON API, dynamic batching, Prometheus metrics, a playground page.

  pip install -e ".[serve]"      # FastAPI, uvicorn, prometheus-client
  python -m flax_albert_code.serve --export exports/small --port 8000 [--index INDEX]
  curl -s localhost:8000/v1/generate -H 'Content-Type: application/json' \\
      -d '{"descriptions": "reverse a string", "strategy": "beam", "num_samples": 2}'

INDEX (a search index directory or a JSON-lines corpus) is also the corpus a retrieval model's
/v1/generate draws neighbours from. The app is `flax_albert_code.deploy.server`.
"""
from __future__ import annotations

import argparse
import socket
import sys
from typing import Sequence

from flax_albert_code.deploy.limits import Limits
from flax_albert_code import cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  d = Limits()
  p = argparse.ArgumentParser(prog="python -m flax_albert_code.serve",
                              description=__doc__.split("\n\n")[0],
                              epilog="Needs the [serve] extra: "
                                     "pip install 'flax_albert_code[serve]'.")
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
  arg("--docs", action="store_true",
      help="also serve /docs (Swagger UI; the browser loads it from a CDN)")
  return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
  """ValueError (one sentence naming the flag) for a limit out of range or a port in use."""
  for flag, value, low in (("--max-wait-ms", args.max_wait_ms, 0),
                           ("--max-body-bytes", args.max_body_bytes, 1),
                           ("--max-texts", args.max_texts, 1),
                           ("--max-text-chars", args.max_text_chars, 1),
                           ("--max-samples", args.max_samples, 1)):
    if not value >= low:
      raise ValueError(f"{flag} must be at least {low}, got {value:g}.")
  if not args.request_timeout_s > 0:
    raise ValueError(f"--request-timeout-s must be positive, got {args.request_timeout_s:g}.")
  if not 0 <= args.port <= 65535:
    raise ValueError(f"--port must be in 0..65535, got {args.port}.")
  try:
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
      s.bind((args.host, args.port))
  except OSError as e:
    raise ValueError(f"Cannot listen on {args.host}:{args.port} ({e.strerror or e}); pass "
                     "another --port or --host.") from None


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  cli.quiet_logs()
  try:
    check_args(args)
  except ValueError as e:
    return cli.fail(e)
  try:
    import uvicorn  # pylint: disable=import-outside-toplevel
    from flax_albert_code.deploy import server  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return cli.fail(f"Serving needs the [serve] extra ({e}); pip install "
                    "'flax_albert_code[serve]' (or -e \".[serve]\" in a checkout).")
  from flax_albert_code.deploy import runtime  # pylint: disable=import-outside-toplevel
  try:
    exp = runtime.load_export(args.export, index=args.index or None)
  except (ValueError, OSError) as e:   # ExportError is a ValueError
    return cli.fail(e)
  if exp.retrieval_k and exp.index is None:
    print("warning: this export retrieves neighbours but ships no index (--no-retrieval-index) "
          "and none was given with --index; /v1/generate then needs \"retrieve\": false.",
          file=sys.stderr, flush=True)
  warm = {s.strip() for s in args.warmup.split(",")} - {""}
  if warm - {*exp.strategies, "embed"}:
    return cli.fail(f"--warmup names {', '.join(sorted(warm - {*exp.strategies, 'embed'}))}, "
                    f"which this export has no programs for; use {', '.join(exp.strategies)} "
                    "or embed.")
  if warm:
    n = exp.warmup([s for s in exp.strategies if s in warm], embed="embed" in warm)
    print(f"compiled {n} programs", file=sys.stderr, flush=True)
  limits = Limits(max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
                  max_texts=args.max_texts, max_text_chars=args.max_text_chars,
                  max_samples=args.max_samples, request_timeout_s=args.request_timeout_s)

  class Server(uvicorn.Server):
    """Says where it listens once it does (the port is bound)."""

    async def startup(self, sockets=None):
      await super().startup(sockets)
      if self.started:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(f"serving {exp.path} on http://{host}:{port}/ (playground /, API /v1/generate, "
              "/v1/embed, /v1/search, /openapi.json, metrics /metrics); Ctrl-C stops",
              flush=True)

  config = uvicorn.Config(server.create_app(exp, limits, docs=args.docs), host=args.host,
                          port=args.port, log_level="warning", timeout_graceful_shutdown=5)
  Server(config).run()
  return 0


if __name__ == "__main__":
  sys.exit(main())
