"""Collecting pairs from all sources: exact dedupe, `max_examples`, whole files per split.

Sources that fix a partition (CodeSearchNet, jsonl/TFDS with a `partition`) keep it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import multiprocessing
import os
import pickle
from typing import Iterable

from tqdm import tqdm

from flax_albert_code.data import mining, sources

SPLITS = ("train", "valid", "test")
UNLABELLED = "unlabelled"   # code without descriptions: token ids only (prepared.Prepared.tokens)
TOKEN_SPLITS = SPLITS + (UNLABELLED,)
ALIASES = {"validation": "valid", "dev": "valid", "eval": "valid"}


def canonical_split(split: str, allowed: tuple[str, ...] = SPLITS) -> str:
  """The split's name (aliases resolved); `allowed=TOKEN_SPLITS` admits "unlabelled" too."""
  split = ALIASES.get(split, split)
  if split not in allowed:
    raise ValueError(f"Unknown split {split!r}; use one of {', '.join(allowed)}.")
  return split


def file_order(path: str, seed: int) -> bytes:
  return hashlib.blake2b(f"{seed}\0{path}".encode("utf-8", "surrogateescape"),
                         digest_size=8).digest()


def assign_splits(pairs: Iterable[mining.Pair], seed: int, valid_fraction: float,
                  test_fraction: float) -> dict[str, list[mining.Pair]]:
  """Pairs by split: files in the order of hash(seed, path), each to the split furthest below
  its share of the pairs so far; close to the fractions even for a few hundred pairs."""
  by_split: dict[str, list[mining.Pair]] = {s: [] for s in SPLITS}
  files: dict[str, list[mining.Pair]] = collections.defaultdict(list)
  for pair in pairs:
    if pair.partition:
      by_split[pair.partition].append(pair)
    else:
      files[pair.path].append(pair)
  target = {"train": 1.0 - valid_fraction - test_fraction, "valid": valid_fraction,
            "test": test_fraction}
  count = dict.fromkeys(SPLITS, 0)
  total = 0
  for path in sorted(files, key=lambda p: file_order(p, seed)):
    total += len(files[path])
    split = max(SPLITS, key=lambda s: target[s] * total - count[s])
    count[split] += len(files[path])
    by_split[split] += files[path]
  return by_split


@dataclasses.dataclass
class Collected:
  splits: dict[str, list[mining.Pair]]
  pairs: list[mining.Pair]          # all kept pairs in reading order (before splitting)
  skipped: collections.Counter      # "file: ..." / "row: ..." / "pair: ..." -> count
  units_read: int
  units_total: int
  unlabelled: list[mining.Unlabelled] = dataclasses.field(default_factory=list)


def collect(specs: Iterable[str], filters: mining.Filters, *, max_examples: int = 0,
            seed: int = 0, valid_fraction: float = 0.05, test_fraction: float = 0.05,
            progress: bool = False, workers: int | None = None,
            max_unlabelled: int = 0) -> Collected:
  """Reads the sources in order and returns the deduped pairs by split (the first
  `max_examples` if > 0). Units are read by `workers` processes (default: one a core, for 256
  units or more) and taken in order, so the result does not depend on their number.
  """
  all_units = [u for spec in specs for u in sources.units(spec)]
  skipped: collections.Counter = collections.Counter()
  seen: set[bytes] = set()
  kept: list[mining.Pair] = []
  unlabelled: list[mining.Unlabelled] = []
  read = 0
  with _reader(all_units, filters, workers) as results:
    for items, unit_skipped in tqdm(results, total=len(all_units), desc="mining", unit="file",
                                    disable=not progress, leave=False):
      read += 1
      skipped.update(unit_skipped)
      pairs = [p for p in items if isinstance(p, mining.Pair)]
      if len(pairs) < len(items):
        unlabelled += [u for u in items if isinstance(u, mining.Unlabelled)]
      for pair in pairs:
        key = mining.code_key(pair.code)
        if key in seen:
          skipped["pair: duplicate code"] += 1
          continue
        seen.add(key)
        kept.append(pair)
        if max_examples and len(kept) >= max_examples:
          break
      if max_examples and len(kept) >= max_examples:
        break
  by_split = assign_splits(kept, seed, valid_fraction, test_fraction)
  return Collected(by_split, kept, skipped, read, len(all_units),
                   select_unlabelled(unlabelled, by_split, skipped, max_unlabelled, seed))


def select_unlabelled(unlabelled: list[mining.Unlabelled], by_split: dict[str, list[mining.Pair]],
                      skipped: collections.Counter, max_unlabelled: int = 0,
                      seed: int = 0) -> list[mining.Unlabelled]:
  """The unlabelled code that may be used beside these splits, in reading order: none from a
  valid/test pair's file, none with its code (with or without docstring), no duplicates; with
  `max_unlabelled` > 0 those of smallest hash(seed, key), a fixed sample spread over all files.
  """
  held_out = [p for s in ("valid", "test") for p in by_split[s]]
  held_paths = {p.path for p in held_out}
  held_keys = {mining.code_key(p.code) for p in held_out}
  seen: set[bytes] = set()
  kept = []
  for u in unlabelled:
    if u.path in held_paths:
      skipped["unlabelled: from a valid/test file"] += 1
    elif any(k in held_keys for k in u.keys):
      skipped["unlabelled: code of a valid/test pair"] += 1
    elif u.keys[0] in seen:
      skipped["unlabelled: duplicate code"] += 1
    else:
      seen.add(u.keys[0])
      kept.append(u)
  if max_unlabelled and len(kept) > max_unlabelled:
    rank = sorted(range(len(kept)), key=lambda i: hashlib.blake2b(
        seed.to_bytes(8, "little", signed=True) + kept[i].keys[0], digest_size=8).digest())
    chosen = sorted(rank[:max_unlabelled])
    skipped["unlabelled: over max_unlabelled"] += len(kept) - len(chosen)
    kept = [kept[i] for i in chosen]
  return kept


def _read_unit(unit: sources.Unit, filters: mining.Filters):
  skipped: collections.Counter = collections.Counter()
  return unit.read(filters, skipped), skipped


@contextlib.contextmanager
def _reader(units: list[sources.Unit], filters: mining.Filters, workers: int | None):
  """Yields an iterator of (pairs, skipped) per unit, in the units' order."""
  if workers is None:
    workers = min(os.cpu_count() or 1, 32) if len(units) >= 256 else 1
  if workers > 1:
    try:
      pickle.dumps(units[0])
    except (pickle.PicklingError, AttributeError, TypeError):
      workers = 1   # e.g. TFDS splits: few, large units read in this process
  if workers <= 1:
    yield (_read_unit(u, filters) for u in units)
    return
  # forkserver: the parent may hold JAX's threads, which fork does not copy safely.
  ctx = multiprocessing.get_context("forkserver")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    results = pool.map(_read_unit, units, itertools.repeat(filters),
                       chunksize=max(1, min(64, len(units) // (8 * workers))))
    try:
      yield results
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
