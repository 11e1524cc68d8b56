"""Self-contained inference exports: config, tokenizer, safetensors parameters, StableHLO programs.

  python -m flax_albert_code.export --checkpoint runs/small --out exports/small [--dtype bf16]

deploy/writer.py writes an export (and describes its layout); `flax_albert_code.load_export`
(deploy/runtime.py) runs it with neither flax nor orbax.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from flax_albert_code.deploy.runtime import MANIFEST
from flax_albert_code.deploy.writer import KNOWN_PLATFORMS, PLATFORMS, export
from flax_albert_code.inference.decoding import STRATEGIES
from flax_albert_code import cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m flax_albert_code.export",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="training workdir or checkpoint directory")
  p.add_argument("--out", required=True, help="the export directory to write")
  p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (bf16)")
  p.add_argument("--buckets", default="", help="batch buckets, e.g. 1,8,32 (default: config)")
  p.add_argument("--lengths", default="", help="generation lengths (default: code buckets)")
  p.add_argument("--strategies", default=",".join(STRATEGIES),
                 help=f"comma-separated, of {', '.join(STRATEGIES)}")
  p.add_argument("--platforms", default=",".join(PLATFORMS),
                 help=f"comma-separated, of {', '.join(KNOWN_PLATFORMS)} (falls back to this "
                      "machine's alone where jax.export cannot lower them all)")
  p.add_argument("--no-hf-encoder", action="store_true", help="skip the hf_encoder/ directory")
  p.add_argument("--corpus", default="",
                 help="a retrieval model's corpus to ship as its search index: a data source "
                      "spec (dir:PATH, stdlib, ...) or prepared:SPLIT (default prepared:train)")
  p.add_argument("--no-retrieval-index", action="store_true",
                 help="ship no retrieval index; the export then retrieves only from one it is "
                      "served with (--index) or generates with retrieve=False")
  return p.parse_args(argv)


def _ints(flag: str, text: str) -> list[int] | None:
  """Comma-separated positive whole numbers (None when empty); ValueError naming the flag."""
  try:
    values = [int(x) for x in _names(text)]
  except ValueError:
    raise ValueError(f"{flag} takes comma-separated whole numbers, e.g. 1,8,32; got "
                     f"{text!r}.") from None
  if any(v < 1 for v in values):
    raise ValueError(f"{flag} values must be at least 1, got {text!r}.")
  return values or None


def _names(text: str) -> list[str]:
  return [x.strip() for x in text.split(",") if x.strip()]


def _existing(out: str) -> dict | None:
  """The manifest of an export already at `out`, if there is one."""
  try:
    with open(os.path.join(os.path.expanduser(out), MANIFEST), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  cli.quiet_logs()
  old = _existing(args.out)
  try:
    path = export(args.checkpoint, args.out, dtype=args.dtype,
                  buckets=_ints("--buckets", args.buckets),
                  lengths=_ints("--lengths", args.lengths), strategies=_names(args.strategies),
                  platforms=_names(args.platforms), hf_encoder=not args.no_hf_encoder,
                  progress=cli.progress(), retrieval_index=not args.no_retrieval_index,
                  corpus=args.corpus or None)
  except cli.USER_ERRORS as e:
    return cli.fail(e)
  manifest = _existing(path)
  size = sum(v["size"] for v in manifest["files"].values())
  rag = manifest["inference"].get("retrieval") or {}
  shipped = (f", retrieval index of {rag['corpus']}" if rag.get("index") else
             ", no retrieval index" if rag.get("k") else "")
  print(f"{path}: {len(manifest['programs'])} programs for {', '.join(manifest['platforms'])}, "
        f"{len(manifest['files'])} files, {size / 1e6:.1f} MB, step {manifest.get('step')}"
        f"{shipped}")
  if old is not None:
    print(f"It replaced the export that was there (step {old.get('step')}, made "
          f"{old.get('created', 'at an unknown time')}); a server running from it keeps serving "
          "what it loaded until it is restarted.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
