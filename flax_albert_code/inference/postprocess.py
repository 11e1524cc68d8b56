"""What CodeGenerator and the export runtime share around the model: text checks, batch-bucket
padding, and `parses`, the one meaning of "this candidate is code" (generation's "parses"
field, `drop_unparsable` and the evaluation parse rate all use it).

Kept free of flax/orbax so that `load_export` stays light.
"""
from __future__ import annotations

import ast
import warnings
from typing import Callable, Sequence

import numpy as np

from flax_albert_code.config import CLS_ID, PAD_ID


def check_texts(texts, what: str, allow_blank: bool = False) -> list[str]:
  """A list of str (UTF-8 bytes decoded); one ValueError sentence for anything else, naming the
  text by its 1-based number."""
  if isinstance(texts, (str, bytes)):
    raise ValueError(f"Pass a list of {what.lower()}s, not a single string.")
  out = []
  for i, t in enumerate(texts):
    if isinstance(t, bytes):
      try:
        t = t.decode("utf-8")
      except UnicodeDecodeError:
        raise ValueError(f"{what} {i + 1} is not valid UTF-8 text.") from None
    if not isinstance(t, str):
      raise ValueError(f"{what} {i + 1} is a {type(t).__name__}, not a string.")
    if not allow_blank and not t.strip():
      raise ValueError(f"{what} {i + 1} is empty; give it some text.")
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


def code_ids(tokens: Sequence[int], max_width: int) -> list[int]:
  """What training encodes for a code's vector: [CLS] + code tokens, at most `max_width`."""
  return [CLS_ID, *tokens[:max_width - 1]]


def vectors_by_width(ids: Sequence[Sequence[int]], widths: Sequence[int],
                     batch_buckets: Sequence[int], dim: int,
                     encode: Callable[[np.ndarray, int, int], np.ndarray]) -> np.ndarray:
  """[len(ids), dim] float32: each row encoded at the smallest of `widths` that holds it, in
  batches padded to `batch_buckets`; `encode(batch[bucket, width] int32, bucket, width)` gives
  the batch's vectors (a jitted call or an exported program)."""
  out = np.zeros((len(ids), dim), np.float32)
  groups = np.searchsorted(np.asarray(widths), np.array([len(x) for x in ids], int))
  for g, width in enumerate(widths):
    rows = np.flatnonzero(groups == g)
    for start, size, bucket in chunks(len(rows), batch_buckets):
      batch = np.zeros((bucket, width), np.int32)
      for j, r in enumerate(rows[start:start + size]):
        batch[j] = pad(ids[r], width)
      out[rows[start:start + size]] = np.asarray(encode(batch, bucket, width))[:size]
  return out


def parses(code: str) -> bool:
  """Whether `ast.parse` accepts `code` and it holds at least one real statement: empty,
  comment-only and lone-name or lone-constant outputs (`x`, `def______`) parse trivially but
  are no code. Nothing runs."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")   # SyntaxWarning for odd escapes in generated strings
      body = ast.parse(code).body
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return False
  return any(not (isinstance(n, ast.Expr) and isinstance(n.value, (ast.Name, ast.Constant)))
             for n in body)
