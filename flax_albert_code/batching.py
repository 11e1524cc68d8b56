"""Text checks and batch-bucket padding shared by CodeGenerator and the export runtime.

Kept free of flax/orbax so that `load_export` stays light.
"""
from __future__ import annotations

from typing import Sequence

from flax_albert_code.config_lib import PAD_ID


def check_texts(texts, what: str, allow_blank: bool = False) -> list[str]:
  """A list of str (UTF-8 bytes decoded); one ValueError sentence for anything else."""
  if isinstance(texts, (str, bytes)):
    raise ValueError(f"Pass a list of {what.lower()}s, not a single string.")
  out = []
  for i, t in enumerate(texts):
    if isinstance(t, bytes):
      try:
        t = t.decode("utf-8")
      except UnicodeDecodeError:
        raise ValueError(f"{what} {i} is not valid UTF-8 text.") from None
    if not isinstance(t, str):
      raise ValueError(f"{what} {i} is a {type(t).__name__}, not a string.")
    if not allow_blank and not t.strip():
      raise ValueError(f"{what} {i} is empty; give it some text.")
    out.append(t)
  return out


def pad(ids: Sequence[int], width: int) -> list[int]:
  ids = list(ids[:width])
  return ids + [PAD_ID] * (width - len(ids))


def chunks(n: int, buckets: Sequence[int]) -> list[tuple[int, int, int]]:
  """(start, size, bucket): the largest bucket at a time, the remainder in the smallest fit."""
  largest, out = buckets[-1], []
  for start in range(0, n, largest):
    size = min(largest, n - start)
    out.append((start, size, next(b for b in buckets if b >= size)))
  return out
