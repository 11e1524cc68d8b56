"""The code index: a corpus encoded once into code vectors, ranked for queries.

Used by `python -m flax_albert_code.search` (see search.py for the command line).

SOURCE is any data source spec (stdlib, site-packages, dir:PATH, jsonl:PATH, csn:PATH, tfds:NAME,
comma-separated) or `prepared[:SPLIT]` (the checkpoint's prepared data, default split test).
A source spec gives every function, with or without a docstring (code search is also for
undocumented code; the training filters do not apply), and counts what it skipped by reason
(files that do not parse or decode, ...).
The index (code vectors + where each function is) is saved under `<workdir>/search_index/<key>/`,
keyed by a hash of the parameters and the corpus files (sizes and mtimes), so it is reused while
both are unchanged and rebuilt otherwise; it is written to a temporary directory and renamed.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Sequence

import jax
import numpy as np

INDEX_FORMAT = 2      # 2: every function of a source, not only documented ones
_ITEM_FIELDS = ("name", "path", "lineno", "description", "code")


@dataclasses.dataclass
class Index:
  vectors: np.ndarray          # [N, align_dim] float32, L2-normalised code vectors
  items: list[dict[str, Any]]  # name, path, lineno, description, code
  key: str
  directory: str = ""
  reused: bool = False


def corpus(spec: str, prepared=None,
           progress: bool = False) -> tuple[list[dict], str, collections.Counter]:
  """The (description, code, where) examples of a corpus spec, a fingerprint of its files and
  what was skipped, counted by reason ("file: syntax error", ...); `progress`: a bar on stderr."""
  if spec == "prepared" or spec.startswith("prepared:"):
    if prepared is None:
      raise ValueError(f"--corpus {spec} needs the checkpoint's prepared data, which was not "
                       "found; pass a data source spec instead (e.g. stdlib or dir:PATH).")
    split = spec.partition(":")[2] or "test"
    examples = [{k: e[k] for k in _ITEM_FIELDS} for e in prepared.source(split)]
    return (examples, f"prepared:{prepared.meta.get('key', prepared.data_dir)}:{split}",
            collections.Counter())
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from flax_albert_code.data import mining, sources  # pylint: disable=import-outside-toplevel
  specs = sources.parse_specs(spec)
  units = [u for s in specs for u in sources.units(s)]
  skipped: collections.Counter = collections.Counter()
  every = mining.Filters(every_function=True)
  examples = [{k: getattr(p, k) for k in _ITEM_FIELDS}
              for u in tqdm(units, desc="reading", unit="file", disable=not progress,
                            leave=False, dynamic_ncols=True)
              for p in u.read(every, skipped)]
  stamp = hashlib.sha256("\n".join(f"{u.label}\0{u.stamp}" for u in units).encode(
      "utf-8", "surrogateescape")).hexdigest()
  return examples, f"{','.join(specs)}:{stamp}", skipped


def describe_skipped(skipped: collections.Counter) -> str:
  """`file: syntax error 2, file: unreadable 1` (most first), or `nothing`."""
  return ", ".join(f"{reason} {n}" for reason, n in sorted(
      skipped.items(), key=lambda kv: (-kv[1], kv[0]))) or "nothing"


def params_fingerprint(variables) -> str:
  """A hash of every parameter's name, shape, dtype and bytes."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(variables),
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    x = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype}\n".encode())
    h.update(x.tobytes())
  return h.hexdigest()


def index_key(generator, corpus_fingerprint: str) -> str:
  h = hashlib.sha256(json.dumps([INDEX_FORMAT, dataclasses.asdict(generator.cfg),
                                 corpus_fingerprint], sort_keys=True).encode())
  h.update(params_fingerprint(generator.variables).encode())
  return h.hexdigest()[:16]


def build_index(generator, examples: Sequence[dict], batch_size: int = 256,
                progress: bool = False) -> np.ndarray:
  """Code vectors of `examples`, [N, align_dim]; `progress`: a bar on stderr."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  codes = [e["code"] for e in examples]
  parts = []
  with tqdm(total=len(codes), desc="indexing", unit="function", disable=not progress,
            leave=False, dynamic_ncols=True) as bar:
    for i in range(0, len(codes), batch_size):
      parts.append(generator.embed(codes[i:i + batch_size], kind="code"))
      bar.update(len(parts[-1]))
  return np.concatenate(parts) if parts else np.zeros((0, generator.cfg.align_dim), np.float32)


def load_or_build(generator, examples: Sequence[dict], corpus_fingerprint: str,
                  root: str, progress: bool = False) -> Index:
  """The index under `root/<key>/` if complete, else built (`progress`: a bar on stderr),
  saved atomically and returned."""
  key = index_key(generator, corpus_fingerprint)
  final = os.path.join(root, key)
  try:
    vectors = np.load(os.path.join(final, "vectors.npy"))
    with open(os.path.join(final, "items.json"), encoding="utf-8") as f:
      items = json.load(f)
    if len(items) == len(vectors):
      return Index(vectors, items, key, final, reused=True)
  except (OSError, ValueError):
    pass
  vectors = build_index(generator, examples, progress=progress)
  items = [{k: e[k] for k in _ITEM_FIELDS} for e in examples]
  os.makedirs(root, exist_ok=True)
  tmp = os.path.join(root, f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    np.save(os.path.join(tmp, "vectors.npy"), vectors)
    with open(os.path.join(tmp, "items.json"), "w", encoding="utf-8",
              errors="surrogateescape") as f:
      json.dump(items, f)
    if os.path.isdir(final):
      shutil.rmtree(final)   # incomplete or damaged (a complete one was returned above)
    try:
      os.rename(tmp, final)
    except OSError:          # another process saved the same index first
      if not os.path.isfile(os.path.join(final, "items.json")):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return Index(vectors, items, key, final)


def query(generator, index: Index, queries: Sequence[str], top_k: int = 10) -> list[list[dict]]:
  """Per query, the `top_k` best items with "score" (cosine similarity) and "rank"."""
  if top_k < 1:
    raise ValueError(f"top_k must be at least 1, got {top_k}.")
  q = generator.embed(list(queries), kind="desc")
  scores = q @ index.vectors.T
  out = []
  for row in scores:
    best = np.argsort(-row, kind="stable")[:top_k]
    out.append([{**index.items[i], "score": float(row[i]), "rank": r + 1}
                for r, i in enumerate(best)])
  return out


def default_root(generator) -> str:
  """`<workdir>/search_index`, beside `<workdir>/checkpoints/<step>`."""
  workdir = os.path.dirname(os.path.dirname(os.path.abspath(generator.checkpoint_path)))
  return os.path.join(workdir, "search_index")
