"""Sequence packing of the encoder's inputs, host side: each batch's plan, in numpy.

The descriptions (69% padding on the quality data) and the retrieval contexts (the largest share
of the FLOPs) run through the encoder several to a row: `plan` places each example's tokens in
one of a fixed number of rows (first fit, longest first), and the model (`model/packing.py`)
gathers the embedded tokens into those rows, masks attention to each example's own segment and
gathers the states back to [B, L, H], so pooling, the decoder's memory and the losses never see
the packing.

Rows are planned per group of consecutive examples, one group per (microbatch x batch shard),
so every gather stays on its device, and each host plans its own rows of the global batch. A
batch whose examples do not fit the rows runs unpacked (another compiled program; `Packer`
says so): nothing is dropped or moved to another batch.

The plan of a field f (FIELDS) adds four int32 arrays to the batch, G groups of Bg examples
packed into R rows of the field's width L, at most M segments a row:
  {f}_pack_src      [G, R, L]    which token of the group each packed slot holds: b * L + t,
                                 Bg * L for padding
  {f}_pack_dst      [G, Bg, L]   where each token of the group went: r * L + p, R * L for padding
  {f}_pack_seqlen   [G, R, M]    each row's segment lengths, -1 after its last segment
  {f}_pack_offsets  [G, R, M+1]  each row's segment starts, -1 after its last segment
(seqlen and offsets are what cuDNN's packed attention reads; the XLA path reads src).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from flax_albert_code.config import PACK_FIELDS, PAD_ID, pack_fields

FIELDS = dict(zip(PACK_FIELDS, ("desc_ids", "ctx_ids")))


def rows_for(group_size: int, fraction: float) -> int:
  """Rows a group of `group_size` examples is packed into: `fraction` of them, rounded up (the
  rows' tokens, rows x width, are a multiple of the width: no tiling constraint on rows)."""
  return min(group_size, max(1, math.ceil(group_size * fraction - 1e-9)))


def first_fit(lengths: np.ndarray, width: int, rows: int,
              max_segments: int) -> tuple[np.ndarray, np.ndarray] | None:
  """(row, offset) of each example, longest first into the first row with room (at most
  `max_segments` a row), or None when they do not fit in `rows` rows."""
  room = np.full(rows, width, np.int64)
  count = np.zeros(rows, np.int64)
  row_of = np.zeros(len(lengths), np.int32)
  offset_of = np.zeros(len(lengths), np.int32)
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    fits = np.flatnonzero((room >= n) & (count < max_segments))
    if not len(fits):
      return None
    r = fits[0]
    row_of[i], offset_of[i] = r, width - room[r]
    room[r] -= n
    count[r] += 1
  return row_of, offset_of


def rows_needed(lengths: np.ndarray, width: int, max_segments: int) -> int:
  """Rows `first_fit` fills with these examples when it may use one row an example."""
  row_of, _ = first_fit(lengths, width, len(lengths), max_segments)
  return int(row_of.max()) + 1 if len(lengths) else 0


def plan(ids_BxL: np.ndarray, groups: int, rows: int, max_segments: int
         ) -> dict[str, np.ndarray] | None:
  """The four plan arrays (module docstring) of one field, or None if a group does not fit."""
  b, width = ids_BxL.shape
  if b % groups:
    raise ValueError(f"a batch of {b} does not split into {groups} packing groups; make "
                     "config.train.batch_size a multiple of (data x fsdp x microbatches).")
  per = b // groups
  lengths = (ids_BxL != PAD_ID).sum(axis=1)
  if np.any((ids_BxL != PAD_ID) != (np.arange(width) < lengths[:, None])):
    raise ValueError("packing needs right-padded rows (tokens, then PAD only).")
  src = np.full((groups, rows, width), per * width, np.int32)
  dst = np.full((groups, per, width), rows * width, np.int32)
  seqlen = np.full((groups, rows, max_segments), -1, np.int32)
  offsets = np.full((groups, rows, max_segments + 1), -1, np.int32)
  for g in range(groups):
    lens = lengths[g * per:(g + 1) * per]
    placed = first_fit(lens, width, rows, max_segments)
    if placed is None:
      return None
    row_of, offset_of = placed
    filled = np.zeros(rows, np.int32)
    for i in np.lexsort((offset_of, row_of)):   # row by row, left to right
      n, r, o = int(lens[i]), int(row_of[i]), int(offset_of[i])
      if n == 0:
        continue
      t = np.arange(n)
      src[g, r, o + t] = i * width + t
      dst[g, i, t] = r * width + o + t
      seqlen[g, r, filled[r]], offsets[g, r, filled[r]] = n, o
      filled[r] += 1
  return {"src": src, "dst": dst, "seqlen": seqlen, "offsets": offsets}


@dataclasses.dataclass(frozen=True)
class Packer:
  """config.train.pack's plans for the batches of a run. A group is `group_size` consecutive
  examples (the global batch over data x fsdp shards x microbatches), so a host packs its own
  rows of the batch into its own groups; `rows`: the share of a group's examples a field gets
  as rows."""
  fields: tuple[str, ...]
  group_size: int
  rows: dict[str, float]
  max_segments: int

  @classmethod
  def from_config(cls, config, groups: int) -> Packer | None:
    """`groups`: the global batch's groups (data x fsdp mesh axes x microbatches)."""
    fields = pack_fields(config.train.get("pack", ""))
    if not fields:
      return None
    return cls(fields, int(config.train.batch_size) // groups,
               {f: float(config.train.pack_rows[f]) for f in fields},
               int(config.train.pack_max_segments))

  def _plans(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    plans = {}
    for f in self.fields:
      ids = batch[FIELDS[f]]
      p = plan(ids, ids.shape[0] // self.group_size, rows_for(self.group_size, self.rows[f]),
               self.max_segments)
      if p is None:
        return None
      plans.update({f"{f}_pack_{k}": v for k, v in p.items()})
    return plans

  def __call__(self, batch: dict[str, np.ndarray]) -> bool:
    """Adds the plans to `batch` (this host's rows of a global batch) in place; False (and
    nothing added) when one field's examples do not fit its rows, so the batch runs unpacked."""
    plans = self._plans(batch)
    batch.update(plans or {})
    return plans is not None

  def shapes(self, batch_size: int, widths: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The plan arrays' shapes for a (global) batch of `batch_size`, fields `widths` wide (by
    batch key): those of the plans of an empty batch."""
    empty = {FIELDS[f]: np.full((batch_size, widths[FIELDS[f]]), PAD_ID, np.int32)
             for f in self.fields}
    return {k: v.shape for k, v in self._plans(empty).items()}
