"""Whether a decoding call fits in memory, checked before it runs (and before the commands load
a model): a lower bound of what it allocates (each decoded row's KV cache and two vocabulary-wide
float32 buffers) against what is free, so a call refused here would have run out of memory."""
from __future__ import annotations

import os

import numpy as np

from flax_albert_code.inference import decoding, options


def bytes_per_row(config, max_new_tokens: int) -> int:
  """A lower bound of the bytes one decoded row holds: its KV cache and logits."""
  m = config.model
  cache = 2 * int(m.decoder_layers) * int(max_new_tokens) * int(m.hidden_size)
  return cache * np.dtype(str(m.dtype)).itemsize + 2 * 4 * int(m.vocab_size)


def buckets(config, divisor: int = 1) -> list[int]:
  """config.sample.batch_buckets rounded up to multiples of `divisor` (the mesh's batch axes)."""
  return sorted({-(-int(b) // divisor) * divisor for b in config.sample.batch_buckets})


def rows(config, num_texts: int, candidates: int, divisor: int = 1) -> int:
  """Rows decoded at once: the batch bucket of the largest chunk times the candidates of each."""
  sizes = buckets(config, divisor)
  largest = min(max(int(num_texts), 1), sizes[-1])
  return next(b for b in sizes if b >= largest) * int(candidates)


def free_bytes() -> int | None:
  """Bytes free on the first device (as its allocator reports) or the host; None if unknown."""
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    return None


def check(config, *, num_texts: int, strategy: str, num_samples: int = 1, num_beams: int = 4,
          max_new_tokens: int | None = None, free: int | None = None, divisor: int = 1) -> None:
  """OptionError when `max_new_tokens` exceeds the positions or the rows cannot fit in `free`."""
  positions = int(config.model.max_position_embeddings)
  new = min(int(config.sample.max_new_tokens), positions) if max_new_tokens is None else int(
      max_new_tokens)
  if new > positions:
    raise options.OptionError(lambda n: f"{n('max_new_tokens')} must be at most {positions} (the "
                                        f"model's positions), got {new}.")
  if strategy not in decoding.STRATEGIES:
    return
  k = decoding.num_candidates(strategy, num_beams, num_samples)
  need = rows(config, num_texts, k, divisor) * bytes_per_row(config, new)
  free = free_bytes() if free is None else free
  if free is None or need <= free:
    return
  per_candidate = rows(config, num_texts, 1, divisor) * bytes_per_row(config, new)
  name = {"greedy": "max_new_tokens", "beam": "num_beams", "sample": "num_samples"}[strategy]
  most = free // per_candidate if k > 1 else 0
  raise options.OptionError(
      lambda n: f"{n(name)} {k if k > 1 else new} needs at least {need / 1e9:.1f} GB to decode, "
                f"more than the {free / 1e9:.1f} GB free here; "
                + (f"ask for at most {most}." if most else f"lower {n(name)}."))
