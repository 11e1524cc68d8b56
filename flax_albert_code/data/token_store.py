"""Token ids of a split as flat memory-mapped arrays: what the input pipeline reads.

Decoding TFDS records is too slow for batches, so each split's token ids are also written flat
(`<split>.<field>.npy`) with offsets (`<split>.<field>_offsets.npy`), gathered with numpy ops.
"""
from __future__ import annotations

import itertools
import os
from typing import Sequence

import numpy as np

FIELDS = ("desc", "code")


def dtype_for(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


def bucket_of(code_len, buckets: tuple[int, ...]):
  """Index of the smallest bucket that holds `code_len` tokens (the largest if none does)."""
  return np.minimum(np.searchsorted(np.asarray(sorted(buckets)), code_len), len(buckets) - 1)


def to_arrays(seqs: Sequence[Sequence[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
  """(flat ids, lengths) of token sequences, without a Python frame per token."""
  lengths = np.fromiter(map(len, seqs), np.int64, count=len(seqs))
  flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype, count=int(lengths.sum()))
  return flat, lengths


def write_arrays(directory: str, split: str,
                 arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
  """Writes each field's (flat ids, lengths) of a split."""
  for field in FIELDS:
    flat, lengths = arrays[field]
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(os.path.join(directory, f"{split}.{field}.npy"), flat)
    np.save(os.path.join(directory, f"{split}.{field}_offsets.npy"), offsets)


def write(directory: str, split: str, tokens: dict[str, Sequence[Sequence[int]]],
          vocab_size: int) -> None:
  dtype = dtype_for(vocab_size)
  write_arrays(directory, split, {f: to_arrays(tokens[f], dtype) for f in FIELDS})


class TokenStore:
  """Read-only token ids of one split; `gather` builds padded [B, L] int32 blocks."""

  def __init__(self, directory: str, split: str):
    self.flat, self.offsets = {}, {}
    for field in FIELDS:
      # A plain ndarray view of the memory map: much faster to slice than a np.memmap.
      self.flat[field] = np.load(os.path.join(directory, f"{split}.{field}.npy"),
                                 mmap_mode="r").view(np.ndarray)
      self.offsets[field] = np.load(os.path.join(directory, f"{split}.{field}_offsets.npy"))
    self.lengths = {f: np.diff(self.offsets[f]) for f in FIELDS}

  def __len__(self) -> int:
    return len(self.offsets["code"]) - 1

  def tokens(self, field: str, index: int) -> np.ndarray:
    return np.asarray(self.flat[field][self.offsets[field][index]:self.offsets[field][index + 1]],
                      np.int32)

  def gather(self, field: str, indices: np.ndarray, width: int, start: int = 0) -> np.ndarray:
    """[len(indices), width] int32: tokens of each example placed from column `start`, truncated
    to fit, zero padded; returns the block and leaves framing (CLS/SEP/EOS) to the caller."""
    starts = self.offsets[field][indices]
    lens = np.minimum(self.lengths[field][indices], width - start)
    cols = np.arange(width - start)
    mask = cols[None, :] < lens[:, None]
    flat = self.flat[field]
    pos = np.where(mask, starts[:, None] + cols[None, :], 0)
    out = np.zeros((len(indices), width), np.int32)
    if flat.size:
      out[:, start:] = np.where(mask, flat[pos.ravel()].reshape(pos.shape), 0)
    return out
