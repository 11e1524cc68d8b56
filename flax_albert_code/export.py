"""Self-contained inference exports: config, tokenizer, safetensors parameters, StableHLO programs.

  python -m flax_albert_code.export --checkpoint runs/small --out exports/small [--dtype bf16]

Layout of an export directory (every file's sha256 and size are in the manifest):

  manifest.json           format, versions, training step, validation metrics, programs, files
  config.json             the run's config, model section as exported (dtype, attention_impl)
  spm.model               the tokenizer
  params.safetensors      the inference variables, keys "params/encoder/..." (no pickle anywhere)
  programs/*.jaxexport    `jax.export.Exported.serialize()`: StableHLO plus calling convention
  hf_encoder/             the encoder as a Hugging Face ALBERT directory (hf.save_hf_encoder)

Programs take the variables as their first argument: `encode_b{B}_w{W}(variables, ids[B, W])`
gives L2-normalised alignment vectors; `generate_{strategy}_b{B}_t{T}(variables, desc_ids[B, L],
rng, temperature, top_p, length_penalty)` gives (tokens [B, K, T], scores [B, K]), for every
batch bucket B of `config.sample.batch_buckets`, code width W (the code buckets and the
description length) and length T (the code buckets up to `config.sample.max_new_tokens`).
`sample` programs draw one candidate per row (serving tiles a description num_samples times)
with top_k off; `beam` programs keep `config.sample.num_beams` beams. Programs are lowered for
CPU and CUDA at once where `jax.export` can (the manifest's `platforms` says which).
The directory is written beside the target and renamed into place when complete.
`flax_albert_code.load_export` (deploy/runtime.py) runs it with neither flax nor orbax.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from flax_albert_code.deploy.runtime import MANIFEST
from flax_albert_code.deploy.writer import PLATFORMS, export
from flax_albert_code.inference.decoding import STRATEGIES


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m flax_albert_code.export",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="training workdir or checkpoint directory")
  p.add_argument("--out", required=True, help="the export directory to write")
  p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (bf16)")
  p.add_argument("--buckets", default="", help="batch buckets, e.g. 1,8,32 (default: config)")
  p.add_argument("--lengths", default="", help="generation lengths (default: code buckets)")
  p.add_argument("--strategies", default=",".join(STRATEGIES))
  p.add_argument("--platforms", default=",".join(PLATFORMS))
  p.add_argument("--no-hf-encoder", action="store_true", help="skip the hf_encoder/ directory")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)

  def ints(s: str) -> list[int] | None:
    return [int(x) for x in s.split(",") if x.strip()] or None

  try:
    path = export(args.checkpoint, args.out, dtype=args.dtype, buckets=ints(args.buckets),
                  lengths=ints(args.lengths),
                  strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
                  platforms=[s.strip() for s in args.platforms.split(",") if s.strip()],
                  hf_encoder=not args.no_hf_encoder)
  except (ValueError, OSError, RuntimeError) as e:   # CheckpointError is a RuntimeError
    print(f"error: {e}", file=sys.stderr)
    return 1
  with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
    manifest = json.load(f)
  size = sum(v["size"] for v in manifest["files"].values())
  print(f"{path}: {len(manifest['programs'])} programs for {', '.join(manifest['platforms'])}, "
        f"{len(manifest['files'])} files, {size / 1e6:.1f} MB, step {manifest.get('step')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
