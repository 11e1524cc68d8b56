"""What every command shares: one-line errors, quiet logs, progress bars, reading texts, loading a
model. A layer of its own under the commands, so that no command imports another."""
from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from flax_albert_code import config as config_lib
from flax_albert_code.inference import options

USER_ERRORS: tuple = (ValueError, OSError, RuntimeError)  # CheckpointError is a RuntimeError


class _AboveBars(logging.StreamHandler):
  """Lines written through tqdm, so that a progress bar on the terminal is not broken."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      tqdm.write(self.format(record), file=self.stream)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def quiet_logs() -> None:
  """Our warnings as `warning: ...` lines; library chatter (absl) only when it is an error."""
  handler = _AboveBars()
  handler.setFormatter(logging.Formatter("warning: %(message)s"))
  ours = logging.getLogger("flax_albert_code")
  ours.addHandler(handler)
  ours.propagate = False
  logging.getLogger("absl").setLevel(logging.ERROR)


def config_argv(argv: Sequence[str]) -> list[str]:
  """argv with each `--config X` resolved; an unknown one exits with one `error:` line."""
  out = config_lib.with_shipped_configs(list(argv))
  for i, arg in enumerate(out):
    spec = (arg[len("--config="):] if arg.startswith("--config=") else
            out[i + 1] if arg == "--config" and i + 1 < len(out) else None)
    if spec is not None and not os.path.isfile(spec.partition(":")[0]):
      given = argv[i + 1] if arg == "--config" else argv[i][len("--config="):]
      sys.exit(f"error: --config {given}: no such config file; give a path or a shipped config "
               f"({', '.join(config_lib.shipped_names())}).")
  return out


def progress() -> bool:
  """Whether to draw progress bars: when stderr is a terminal."""
  return bool(sys.stderr and sys.stderr.isatty())


def fail(error: BaseException | str) -> int:
  """One sentence on stderr, exit status 1; an option is named by its flag (--num-beams)."""
  text = error.for_flags() if isinstance(error, options.OptionError) else str(error)
  print(f"error: {text}", file=sys.stderr)
  return 1


def _utf8(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{where} is not valid UTF-8 (byte {e.start}).") from None


def read_texts(args: Sequence[str], input_path: str, what: str = "description") -> list[str]:
  """Texts from the arguments, else a file (one a line), else stdin; blank lines skipped."""
  if args:   # undecodable argv bytes arrive as lone surrogates
    texts = [_utf8(a.encode("utf-8", "surrogateescape"), f"Argument {i + 1}")
             for i, a in enumerate(args)]
  else:
    if input_path and input_path != "-":
      try:
        with open(input_path, "rb") as f:
          data = _utf8(f.read(), input_path)
      except OSError as e:
        raise ValueError(f"Cannot read --input {input_path} ({e.strerror or e}).") from None
    else:
      if sys.stdin is None or sys.stdin.isatty():
        raise ValueError(f"No {what} given; pass it as an argument, with --input FILE or on stdin.")
      data = _utf8(sys.stdin.buffer.read(), "stdin")
    texts = [line for line in data.splitlines() if line.strip()]
  if not texts:
    raise ValueError(f"No {what} given; the input is empty.")
  return texts


def check_decoding(path: str, strategies: Sequence[str], **decode) -> None:
  """Before the model of checkpoint `path` loads: `memory.check` for each of `strategies`."""
  # Here, not at the top: orbax would make the commands' `--help` slow.
  from flax_albert_code.inference import generator, memory  # pylint: disable=import-outside-toplevel
  from flax_albert_code.model import checkpoint_io  # pylint: disable=import-outside-toplevel
  config = generator.full_config(checkpoint_io.read_config(path))
  for strategy in strategies:
    memory.check(config, strategy=strategy, **decode)


def load_generator(path: str):
  """CodeGenerator over all local devices (the batch sharded over them when there are several)."""
  # Here, not at the top: flax and orbax would make the commands' `--help` slow.
  import jax  # pylint: disable=import-outside-toplevel
  from flax_albert_code.model import sharding  # pylint: disable=import-outside-toplevel
  from flax_albert_code.inference import generator  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)) if jax.device_count() > 1 else None
  return generator.CodeGenerator.from_checkpoint(path, mesh=mesh)


def embedder(config, params, prepared, mesh):
  """`(texts, kind) -> [N, A]` aligned vectors through CodeGenerator, for training's mining."""
  from flax_albert_code.inference import generator  # pylint: disable=import-outside-toplevel
  gen = generator.CodeGenerator(config, params, prepared.tokenizer, prepared=prepared, mesh=mesh)
  gen.warn_long = False   # long descriptions are cut as training cuts them: no warning each
  return gen.embed
