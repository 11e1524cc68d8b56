"""Generates code from descriptions with a trained checkpoint.

  python -m flax_albert_code.generate --checkpoint runs/small \\
      "create a function that takes two integers and returns their sum"
  python -m flax_albert_code.generate --checkpoint DIR --input descriptions.txt --json
  echo "reverse a string" | python -m flax_albert_code.generate --checkpoint DIR --strategy beam

Descriptions come from the arguments, else `--input FILE` (one a line; `-` is stdin), else stdin.
The logic lives in `flax_albert_code.generator`; this file only wires it to the command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

USER_ERRORS: tuple = (ValueError, OSError, RuntimeError)  # CheckpointError is a RuntimeError


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
  arg("--repetition-penalty", type=float, default=1.0,
      help="greedy, sample: make tokens already emitted less likely (CTRL; 1.0: off)")
  arg("--rerank", action="store_true", help="order candidates by description-code alignment")
  arg("--drop-unparsable", action="store_true", help="drop candidates that do not parse")
  arg("--seed", type=int, default=0)
  arg("--max-new-tokens", type=int, default=None)
  arg("--json", action="store_true", help="one JSON object per description")
  return p.parse_args(argv)


def quiet_logs() -> None:
  """Our warnings as `warning: ...` lines; library chatter (orbax, absl) only when it is an error."""
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("warning: %(message)s"))
  ours = logging.getLogger("flax_albert_code")
  ours.addHandler(handler)
  ours.propagate = False
  logging.getLogger("absl").setLevel(logging.ERROR)


def fail(error: BaseException) -> int:
  """One sentence on stderr, exit status 1."""
  print(f"error: {error}", file=sys.stderr)
  return 1


def _utf8(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{where} is not valid UTF-8 (byte {e.start}).") from None


def read_texts(args: Sequence[str], input_path: str, what: str = "description") -> list[str]:
  """Texts from the arguments, else a file (one a line), else stdin; blank lines skipped."""
  if args:
    texts = []
    for i, a in enumerate(args):   # undecodable argv bytes arrive as lone surrogates
      texts.append(_utf8(a.encode("utf-8", "surrogateescape"), f"Argument {i + 1}"))
  else:
    if input_path and input_path != "-":
      with open(input_path, "rb") as f:
        data = _utf8(f.read(), input_path)
    else:
      if sys.stdin is None or sys.stdin.isatty():
        raise ValueError(f"No {what} given; pass it as an argument, with --input FILE or on stdin.")
      data = _utf8(sys.stdin.buffer.read(), "stdin")
    texts = [line for line in data.splitlines() if line.strip()]
  if not texts:
    raise ValueError(f"No {what} given; the input is empty.")
  return texts


def load_generator(path: str):
  """CodeGenerator over all local devices (the batch sharded over them when there are several)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax_albert_code import sharding  # pylint: disable=import-outside-toplevel
  from flax_albert_code.generator import CodeGenerator  # pylint: disable=import-outside-toplevel
  mesh = None
  if jax.device_count() > 1:
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  return CodeGenerator.from_checkpoint(path, mesh=mesh)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  quiet_logs()
  try:
    from flax_albert_code import sampling  # pylint: disable=import-outside-toplevel
    sampling.check_options(args.strategy, max_new_tokens=args.max_new_tokens or 1,
                           num_beams=args.num_beams, num_samples=args.num_samples,
                           top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                           repetition_penalty=args.repetition_penalty)
    texts = read_texts(args.descriptions, args.input)
    gen = load_generator(args.checkpoint)
    results = gen.generate(
        texts, strategy=args.strategy, num_samples=args.num_samples, num_beams=args.num_beams,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, rerank=args.rerank,
        max_new_tokens=args.max_new_tokens, seed=args.seed,
        length_penalty=args.length_penalty,
        repetition_penalty=args.repetition_penalty, drop_unparsable=args.drop_unparsable)
  except USER_ERRORS as e:
    return fail(e)
  for text, cands in zip(texts, results):
    if args.json:
      print(json.dumps({"description": text, "candidates": cands}))
    elif len(texts) == 1 and len(cands) == 1:
      print(cands[0]["code"])
    else:
      print(f"# {text}")
      for i, c in enumerate(cands):
        if len(cands) > 1:
          align = "" if c["align"] is None else f", align {c['align']:.3f}"
          print(f"# candidate {i + 1} (score {c['score']:.3f}{align})")
        print(c["code"].rstrip("\n") + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
