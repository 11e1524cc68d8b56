"""Each example's retrieved neighbours in the train split: mined, saved beside the run, loaded.

A query never retrieves a function of its own source file (no leakage of the target). Saved as
`<workdir>/retrieval/neighbours_<step>.npz` (written to a temporary name and renamed); a resumed
run loads the newest file not after its step, so it sees what an uninterrupted run saw.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import zipfile
from typing import Callable

import numpy as np

from flax_albert_code.data.sources import DataError
from flax_albert_code.retrieval import retriever as retriever_lib
from flax_albert_code.utils import files

log = logging.getLogger("flax_albert_code")
SPLITS = ("train", "valid", "test")
_FILE = re.compile(r"neighbours_(\d{8})\.npz$")
Embed = Callable[[list[str], str], np.ndarray]   # (texts, "desc" | "code") -> [N, A] vectors


@dataclasses.dataclass
class Neighbours:
  ids: dict[str, np.ndarray]       # split -> [N, k] int64 indices into the train split; -1: none
  scores: dict[str, np.ndarray]    # split -> [N, k] float32
  method: str
  step: int


def directory(workdir: str) -> str:
  return os.path.join(workdir, "retrieval")


def texts(prepared, split: str) -> tuple[list[str], list[str], list[str]]:
  """(descriptions, codes, source paths) of a split, in its example order."""
  if not prepared.split_sizes.get(split):
    return [], [], []
  source = prepared.source(split)
  rows = [source[i] for i in range(len(source))]
  return [r["description"] for r in rows], [r["code"] for r in rows], [r["path"] for r in rows]


def mine(prepared, k: int, method: str, embed: Embed | None = None, step: int = 0) -> Neighbours:
  """Top-k train neighbours of every example of every split, its own file excluded."""
  retriever_lib.check_method(method)
  if method != "bm25" and embed is None:
    raise ValueError(f"Retrieval method {method!r} needs the model's vectors; mine with 'bm25'.")
  train = texts(prepared, "train")
  descs, codes, paths = train
  keys = [retriever_lib.key_text(d, c) for d, c in zip(descs, codes)]
  retriever = retriever_lib.Retriever(codes, embed(codes, "code") if method != "bm25" else None,
                                      groups=paths, keys=keys)
  ids, scores = {}, {}
  for split in SPLITS:
    descs, _, split_paths = train if split == "train" else texts(prepared, split)
    if not descs:
      continue
    qv = embed(descs, "desc") if method != "bm25" else None
    ids[split], scores[split] = retriever.search(descs, k, method=method, query_vectors_QxA=qv,
                                                 exclude=split_paths)
  log.info("Mined %d neighbours per example (%s) for %s.", k, method,
           ", ".join(f"{s} {len(v)}" for s, v in ids.items()))
  return Neighbours(ids, scores, method, step)


def save(workdir: str, nb: Neighbours) -> str:
  """Writes `nb` atomically; returns its path."""
  os.makedirs(directory(workdir), exist_ok=True)
  path = os.path.join(directory(workdir), f"neighbours_{nb.step:08d}.npz")
  arrays = {f"ids_{s}": v for s, v in nb.ids.items()}
  arrays.update({f"scores_{s}": v for s, v in nb.scores.items()})
  with files.atomic_write(path, "wb") as f:
    np.savez(f, method=np.array(nb.method), step=np.array(nb.step), **arrays)
  return path


def load(workdir: str, at_step: int, prepared, k: int) -> Neighbours | None:
  """The newest saved neighbours of a step <= `at_step`, checked against the data; None if none."""
  out = directory(workdir)
  steps = sorted(int(m.group(1)) for f in (os.listdir(out) if os.path.isdir(out) else [])
                 if (m := _FILE.match(f)) and int(m.group(1)) <= at_step)
  if not steps:
    return None
  path = os.path.join(out, f"neighbours_{steps[-1]:08d}.npz")
  fix = f"delete {path} to mine them again"
  try:
    with np.load(path) as z:
      nb = Neighbours({s: z[f"ids_{s}"] for s in SPLITS if f"ids_{s}" in z},
                      {s: z[f"scores_{s}"] for s in SPLITS if f"scores_{s}" in z},
                      str(z["method"]), int(z["step"]))
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f"The retrieval neighbours {path} are damaged ({e}); {fix}.") from None
  train_size = prepared.split_sizes.get("train", 0)
  for split, ids in nb.ids.items():
    n = prepared.split_sizes.get(split, 0)
    if ids.shape != (n, k) or ids.max(initial=-1) >= train_size:
      raise DataError(f"The retrieval neighbours {path} do not fit this run's data ({split}: "
                      f"{ids.shape} for {n} examples, k={k}, {train_size} train functions); "
                      f"{fix}.")
  return nb
