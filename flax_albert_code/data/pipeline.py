"""Input pipeline: grain over the prepared token store, length-bucketed, resumable, per host.

Element i of the grain dataset is global batch i (each epoch planned up front from the code
lengths), so the iterator state is one integer, a restore is exact and all hosts agree on shapes.

A batch is a dict of numpy arrays:
  desc_ids  int32 [b, max_desc_len]  [CLS] description [SEP], zero padded, cut before SEP
  code_ids  int32 [b, bucket]        code [EOS], zero padded; cut code gets no EOS (no BOS)
  index     int32 [b]                index in `prepared.source(split)`; -1: a filler row
  ctx_ids   int32 [b, max_ctx_len]   with retrieval: `tokenizer.frame_context` of the neighbours;
                                     in training self_neighbour_rate of the rows have their own
                                     code, spans cut out, as first neighbour
  own_ctx_ids int32 [b, max_ctx_len] with `own_context`: the row's own code, intact, first
  labelled  bool  [b]                with an unlabelled schedule: False for unlabelled code, whose
                                     context is the code with spans cut to one UNK each

With an unlabelled schedule each global batch is labelled pairs or unlabelled code (to denoise,
as BART's text infilling) by a pure function of its index (`unlabelled_before`).
"""
from __future__ import annotations

import fractions
import hashlib
import os
import sys
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from flax_albert_code.config import CLS_ID, EOS_ID, SEP_ID, UNK_ID
from flax_albert_code.data import splits, token_store
from flax_albert_code.tokenizer import frame_context
from flax_albert_code.data.sources import DataError

Batch = dict[str, np.ndarray]
SCHEDULE_FIELD = "config.train.unlabelled_schedule"
SHUFFLE_SEED = 0   # the batch order of every epoch follows from it and the epoch
DENOISE_RATE, DENOISE_SPAN = 0.15, 3.0   # share of an unlabelled function's tokens cut; mean span
Schedule = tuple[tuple[fractions.Fraction, int | None], ...]


def parse_schedule(text: str) -> Schedule:
  """`config.train.unlabelled_schedule` -> ((fraction, until step), ..., (fraction, None)):
  `F:S` items, F of the batches unlabelled until step S (from 1, included); a last bare `F`
  holds from there on, else 0 after the last S. "" is off."""
  out, last = [], 0
  items = [item.strip() for item in text.split(",")] if text.strip() else []
  for n, item in enumerate(items):
    frac_text, colon, step_text = (t.strip() for t in item.partition(":"))
    problem = f"{frac_text!r} is not a fraction"
    try:
      frac = fractions.Fraction(frac_text)
      problem = f"{step_text!r} is not a step number"
      until = int(step_text) if colon else None
      problem = None
    except (ValueError, ZeroDivisionError):
      pass
    if problem is None and not 0 <= frac <= 1:
      problem = f"fraction {frac_text} is not between 0 and 1"
    elif problem is None and not colon and n != len(items) - 1:
      problem = f"{item!r} has no ':step' but is not the last item"
    elif problem is None and colon and until <= last:
      problem = f"step {until} does not come after {last}"
    if problem:
      raise ValueError(f"{SCHEDULE_FIELD}={text!r}: {problem}; write the fraction of unlabelled "
                       "batches and the step it lasts until, e.g. '1.0:600,0.25' (all unlabelled "
                       "for 600 steps, then a quarter), or '' for none.")
    out.append((frac, until))
    last = until or last
  return tuple(out)


def unlabelled_before(schedule: Schedule, i: int) -> int:
  """How many of global batches 0..i-1 are unlabelled code. Within an item of fraction p/q they
  are spread evenly (floor(j p / q)), integers only, so every host and resumed run agrees."""
  total, start = 0, 0
  for frac, until in schedule:
    end = i if until is None else min(i, until)
    if end > start:
      total += (end - start) * frac.numerator // frac.denominator
    if until is None or i <= until:
      break
    start = until
  return total


class Mix(grain.MapDataset):
  """Global batch i from the labelled or the unlabelled dataset, by `unlabelled_before`."""

  def __init__(self, labelled: grain.MapDataset, unlabelled: grain.MapDataset,
               schedule: Schedule):
    super().__init__([labelled, unlabelled])
    self.labelled, self.unlabelled, self.schedule = labelled, unlabelled, schedule

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"Mix(unlabelled schedule {[(str(f), s) for f, s in self.schedule]})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    u = unlabelled_before(self.schedule, index)
    if unlabelled_before(self.schedule, index + 1) > u:
      return self.unlabelled[u]
    return self.labelled[index - u]


class BatchPlan(grain.MapDataset):
  """Global batch i of the run -> (this host's example indices, code bucket width)."""

  def __init__(self, code_lens: np.ndarray, buckets: tuple[int, ...], batch_size: int, *,
               shuffle: bool, seed: int, num_epochs: int | None, drop_remainder: bool,
               process_index: int, process_count: int):
    super().__init__()
    self.buckets = np.asarray(sorted(buckets))
    self.bucket = token_store.bucket_of(code_lens, buckets)
    self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
    self.drop_remainder = drop_remainder
    per_host = batch_size // process_count
    self.rows = slice(process_index * per_host, (process_index + 1) * per_host)
    counts = np.bincount(self.bucket, minlength=len(self.buckets))
    self.batches_per_epoch = int(self._batches(counts).sum())
    self.num_epochs = num_epochs
    self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._length = sys.maxsize if num_epochs is None else self.batches_per_epoch * num_epochs

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return (f"BatchPlan({len(self.bucket)} examples, {self.batches_per_epoch} batches/epoch of "
            f"{self.batch_size}, buckets {self.buckets.tolist()})")

  def _batches(self, examples):
    """Batches of `examples` examples (an int or an array of counts)."""
    bs = self.batch_size
    return examples // bs if self.drop_remainder else -(-examples // bs)

  def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """([batches, batch_size] example indices, -1 for filler; [batches] bucket id)."""
    if epoch not in self._plans:
      self._plans = {epoch: self._plan(epoch), **{e: self._plans[e] for e in self._plans
                                                   if e == epoch - 1}}
    return self._plans[epoch]

  def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(len(self.bucket)) if self.shuffle else np.arange(len(self.bucket))
    batches, bucket_ids = [], []
    for b in range(len(self.buckets)):
      members = order[self.bucket[order] == b]
      n = self._batches(len(members))
      members = np.concatenate([members, np.full(max(n * self.batch_size - len(members), 0), -1)])
      batches.append(members[:n * self.batch_size].reshape(n, self.batch_size))
      bucket_ids.append(np.full(n, b))
    batches, bucket_ids = np.concatenate(batches), np.concatenate(bucket_ids)
    perm = (rng.permutation(len(batches)) if self.shuffle
            else np.argsort(batches[:, 0], kind="stable"))  # unshuffled: in data order
    return batches[perm], bucket_ids[perm]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if index >= self._length:
      raise IndexError(index)
    epoch, i = divmod(index, self.batches_per_epoch)
    batches, bucket_ids = self.epoch(epoch)
    return batches[i, self.rows], int(self.buckets[bucket_ids[i]])


def corrupt_spans(tokens: np.ndarray, rng: np.random.Generator,
                  marker: bool = True) -> np.ndarray:
  """`tokens` with about DENOISE_RATE of them cut out in spans (geometric, mean DENOISE_SPAN),
  each span replaced by one UNK, or by nothing without `marker`."""
  n = len(tokens)
  if n < 2:
    return np.asarray(tokens, np.int32)
  n_spans = max(1, round(n * DENOISE_RATE / DENOISE_SPAN))
  cut = np.zeros(n, bool)
  for start, length in zip(rng.choice(n, size=n_spans, replace=False),
                           rng.geometric(1 / DENOISE_SPAN, size=n_spans)):
    cut[start:start + length] = True
  first = cut & ~np.concatenate([[False], cut[:-1]]) & marker
  out = np.where(first, UNK_ID, np.asarray(tokens, np.int32))
  return out[~cut | first]


def _rows_rng(idx: np.ndarray) -> np.random.Generator:
  """A generator that is a pure function of the batch's rows (resume-exact)."""
  return np.random.default_rng(np.frombuffer(
      hashlib.sha256(idx.astype(np.int64).tobytes()).digest()[:8], np.uint64))


class Assemble(grain.transforms.Map):
  """(indices, width) -> the padded batch dict, gathered from the token store."""

  def __init__(self, store: token_store.TokenStore, max_desc_len: int,
               neighbours: np.ndarray | None = None,
               train_store: token_store.TokenStore | None = None, max_ctx_len: int = 0,
               labelled: bool | None = None, self_neighbour_rate: float = 0.0,
               own_context: bool = False):
    self.store, self.max_desc_len = store, max_desc_len
    self.neighbours, self.train_store, self.max_ctx_len = neighbours, train_store, max_ctx_len
    self.labelled = labelled   # None: no `labelled` field
    self.self_neighbour_rate = self_neighbour_rate
    self.own_context = own_context

  def map(self, element: tuple[np.ndarray, int]) -> Batch:
    indices, width = element
    filler = indices < 0
    idx = np.where(filler, 0, indices)
    rows = np.arange(len(idx))
    ld = self.max_desc_len
    desc = np.zeros((len(idx), ld), np.int32)
    desc[:, :ld - 1] = self.store.gather("desc", idx, ld - 1, start=1)
    desc[:, 0] = CLS_ID
    desc_len = np.where(filler, 0, np.minimum(self.store.lengths["desc"][idx], ld - 2))
    desc[filler] = 0
    desc[filler, 0] = CLS_ID
    desc[rows, desc_len + 1] = SEP_ID
    code = self.store.gather("code", idx, width)
    code_len = self.store.lengths["code"][idx]
    fits = (code_len < width) & ~filler
    code[rows[fits], code_len[fits]] = EOS_ID
    code[filler] = 0
    out = {"desc_ids": desc, "code_ids": code, "index": indices.astype(np.int32)}
    if self.labelled is False:
      out["ctx_ids"] = self._denoising_contexts(idx, filler)
    elif self.neighbours is not None:
      out["ctx_ids"] = self._contexts(idx, filler)
      if self.own_context:
        out["own_ctx_ids"] = self._contexts(idx, filler, own=~filler, noisy=False)
    if self.labelled is not None:
      out["labelled"] = np.full(len(idx), self.labelled)
    return out

  def _contexts(self, idx: np.ndarray, filler: np.ndarray, own: np.ndarray | None = None,
                noisy: bool = True) -> np.ndarray:
    """Description + neighbours; rows where `own` (default: self_neighbour_rate of them) have
    their own code first, spans cut out without a marker when `noisy` (a near copy)."""
    rng = _rows_rng(idx)   # which rows see their own code, and its cut spans
    if own is None:
      own = (rng.random(len(idx)) < self.self_neighbour_rate if self.self_neighbour_rate
             else np.zeros(len(idx), bool))
    rows = []
    for r, (i, fill) in enumerate(zip(idx, filler)):
      codes = [self.train_store.tokens("code", j) for j in self.neighbours[i] if j >= 0]
      if own[r]:
        code = np.array(self.store.tokens("code", i), np.int32)
        if noisy:
          code = corrupt_spans(code, rng, marker=False)
        codes = [code.tolist(), *codes[:-1]] if codes else [code.tolist()]
      rows.append(([], []) if fill else (self.store.tokens("desc", i), codes))
    return self._framed(rows)

  def _denoising_contexts(self, idx: np.ndarray, filler: np.ndarray) -> np.ndarray:
    rng = _rows_rng(idx)
    codes = ([] if fill else [corrupt_spans(np.asarray(self.store.tokens("code", i)), rng)]
             for i, fill in zip(idx, filler))
    return self._framed([([], c) for c in codes])

  def _framed(self, rows: list[tuple]) -> np.ndarray:
    """[len(rows), max_ctx_len]: `frame_context` of each (description, codes), zero padded."""
    ctx = np.zeros((len(rows), self.max_ctx_len), np.int32)
    for r, (desc, codes) in enumerate(rows):
      row = frame_context(desc, codes, self.max_desc_len, self.max_ctx_len)
      ctx[r, :len(row)] = row
    return ctx


def unlabelled_store(prepared) -> token_store.TokenStore:
  """The prepared unlabelled code (desc fields empty); a DataError saying how to get it."""
  n = prepared.split_sizes.get("unlabelled", 0)
  directory = os.path.join(prepared.data_dir, "tokens")
  if not n or not os.path.isfile(os.path.join(directory, "unlabelled.code.npy")):
    raise DataError(f"{SCHEDULE_FIELD} is set but {prepared.data_dir} has no unlabelled code; "
                    "prepare with config.data.unlabelled=True, or set the schedule to ''.")
  return token_store.TokenStore(directory, "unlabelled")


def make_dataset(config: ml_collections.ConfigDict, prepared, split: str, batch_size: int, *,
                 shuffle: bool, num_epochs: int | None, drop_remainder: bool | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None, neighbours=None,
                 unlabelled_schedule: str = "", own_context: bool = False) -> grain.MapDataset:
  """The grain MapDataset of this host's batches; see `make_iterator`."""
  d = config.data
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  split = splits.canonical_split(split)
  schedule = parse_schedule(unlabelled_schedule)
  if batch_size % process_count:
    raise ValueError(f"The global batch size {batch_size} is not divisible by the "
                     f"{process_count} processes; change config.train.batch_size.")
  buckets = tuple(sorted(b for b in d.code_buckets if b <= d.max_code_len)) or (d.max_code_len,)
  if d.max_desc_len < 2:
    raise ValueError(f"config.data.max_desc_len={d.max_desc_len} cannot hold [CLS] and [SEP].")

  def plan(store, name):
    code_lens = np.minimum(store.lengths["code"] + 1, buckets[-1])
    p = BatchPlan(code_lens, buckets, batch_size, shuffle=shuffle, seed=SHUFFLE_SEED,
                  num_epochs=None if schedule else num_epochs, process_index=process_index,
                  process_count=process_count,
                  drop_remainder=shuffle if drop_remainder is None else drop_remainder)
    if p.batches_per_epoch == 0:
      raise DataError(f"Split {name!r} of {prepared.data_dir} has {len(store)} examples, not one "
                      f"full batch of {batch_size} in any code bucket {buckets}; lower the batch "
                      "size, use fewer buckets or add data.")
    return p

  store = prepared.tokens(split)
  labelled = True if schedule else None
  if neighbours is None:
    ds = plan(store, split).map(Assemble(store, d.max_desc_len, labelled=labelled))
  else:
    own = (float(config.retrieval.self_neighbour_rate)
           if split == "train" and shuffle else 0.0)
    ds = plan(store, split).map(Assemble(store, d.max_desc_len, neighbours.ids[split],
                                         prepared.tokens("train"),
                                         int(config.retrieval.max_ctx_len), labelled=labelled,
                                         self_neighbour_rate=own, own_context=own_context))
  if not schedule:
    return ds
  if not int(config.retrieval.k):
    raise ValueError(f"{SCHEDULE_FIELD} denoises unlabelled code, which the decoder reads as its "
                     "context, but retrieval is off (config.retrieval.k=0); set "
                     "--config.retrieval.k=2 or the schedule to ''.")
  code = unlabelled_store(prepared)
  unl = plan(code, "unlabelled").map(Assemble(
      code, d.max_desc_len, max_ctx_len=int(config.retrieval.max_ctx_len), labelled=False))
  return Mix(ds, unl, schedule)


def make_iterator(config: ml_collections.ConfigDict, prepared, split: str, batch_size: int, *,
                  prefetch: int = 2, **options) -> grain.DatasetIterator:
  """An iterator over this host's part of each global batch (`batch_size` is global);
  `options` are make_dataset's. With `unlabelled_schedule` it never ends. `drop_remainder`
  (default: `shuffle`) drops each bucket's last partial batch per epoch, else fills it with
  index -1 rows. Its grain `get_state()`/`set_state()` resume it exactly."""
  ds = make_dataset(config, prepared, split, batch_size, **options)
  read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(read))


def to_global(batch: Batch, sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """Per-host numpy batch -> global jax arrays laid out by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
