"""The code index: a corpus encoded once into code vectors by a `generator` (anything with
`embed(texts, kind)`), saved under `<workdir>/search_index/<key>/` keyed by a hash of the
parameters and the corpus files. Imports neither flax nor orbax (the export runtime uses it)."""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from flax_albert_code.data import mining, sources
from flax_albert_code.utils import files, progress as progress_lib

INDEX_FORMAT = 2      # 2: every function of a source, not only documented ones
ITEM_FIELDS = ("name", "path", "lineno", "description", "code")
VECTORS, ITEMS, META = "vectors.npy", "items.json", "index.json"


@dataclasses.dataclass
class Index:
  """Code vectors [N, align_dim] (float32, L2-normalised) and the item of each."""
  vectors: np.ndarray
  items: list[dict[str, Any]]
  key: str = ""
  directory: str = ""
  reused: bool = False
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)   # index.json, if any


def item(it: dict[str, Any]) -> dict[str, Any]:
  """A search item with the fields the index keeps, typed ("" and 0 for what is missing)."""
  return {k: int(it.get(k) or 0) if k == "lineno" else str(it.get(k) or "") for k in ITEM_FIELDS}


def read(directory: str) -> Index:
  """The index saved in `directory`; OSError, ValueError, TypeError or AttributeError if not."""
  vectors = np.load(os.path.join(directory, VECTORS), allow_pickle=False)
  with open(os.path.join(directory, ITEMS), encoding="utf-8", errors="surrogateescape") as f:
    items = [item(it) for it in json.load(f)]
  meta = {}
  if os.path.exists(os.path.join(directory, META)):
    with open(os.path.join(directory, META), encoding="utf-8") as f:
      meta = dict(json.load(f))
  return Index(np.asarray(vectors, np.float32), items, directory=directory, meta=meta)


def write(directory: str, vectors: np.ndarray, items: Sequence[dict],
          meta: dict[str, Any]) -> dict[str, Any]:
  """Saves an index into an existing `directory`; returns what index.json holds."""
  np.save(os.path.join(directory, VECTORS), np.asarray(vectors, np.float32))
  with open(os.path.join(directory, ITEMS), "w", encoding="utf-8", errors="surrogateescape") as f:
    json.dump([{k: e[k] for k in ITEM_FIELDS} for e in items], f)
  meta = {"format": INDEX_FORMAT, "count": len(items), **meta}
  with open(os.path.join(directory, META), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  return meta


def check_corpus(spec: str) -> None:
  """DataError naming --corpus for a spec of no kind of source or a missing path."""
  if spec != "prepared" and not spec.startswith("prepared:"):
    sources.check(spec, "--corpus")


def corpus(spec: str, prepared=None,
           progress: bool = False) -> tuple[list[dict], str, collections.Counter]:
  """The examples of a corpus spec, a fingerprint of its files and what was skipped, by reason."""
  if spec == "prepared" or spec.startswith("prepared:"):
    if prepared is None:
      raise ValueError(f"--corpus {spec} needs the checkpoint's prepared data, which was not "
                       "found; pass a data source spec instead (e.g. stdlib or dir:PATH).")
    split = spec.partition(":")[2] or "test"
    examples = [{k: e[k] for k in ITEM_FIELDS} for e in prepared.source(split)]
    return (examples, f"prepared:{prepared.meta.get('key', prepared.data_dir)}:{split}",
            collections.Counter())
  specs = sources.parse_specs(spec, "--corpus")
  units = [u for s in specs for u in sources.units(s, "--corpus")]
  skipped: collections.Counter = collections.Counter()
  every = mining.Filters(every_function=True)
  examples = [{k: getattr(p, k) for k in ITEM_FIELDS}
              for u in progress_lib.bar(len(units), "reading", "file", progress, iterable=units)
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


def build_index(generator, examples: Sequence[dict], batch_size: int = 256,
                progress: bool = False) -> np.ndarray:
  """Code vectors of `examples`, [N, align_dim]."""
  codes = [e["code"] for e in examples]
  parts = []
  with progress_lib.bar(len(codes), "indexing", "function", progress) as bar:
    for i in range(0, len(codes), batch_size):
      parts.append(generator.embed(codes[i:i + batch_size], kind="code"))
      bar.update(len(parts[-1]))
  return np.concatenate(parts) if parts else np.zeros((0, generator.cfg.align_dim), np.float32)


def _whole(directory: str) -> Index | None:
  """The index in `directory` if it reads and has one item per vector, else None."""
  try:
    idx = read(directory)
  except (OSError, ValueError, TypeError, AttributeError):
    return None
  return idx if len(idx.items) == len(idx.vectors) else None


def load_or_build(generator, examples: Sequence[dict], corpus_fingerprint: str,
                  root: str, progress: bool = False) -> Index:
  """The index under `root/<key>/` if complete, else built, saved atomically and returned."""
  params = params_fingerprint(generator.variables)
  h = hashlib.sha256(json.dumps([INDEX_FORMAT, dataclasses.asdict(generator.cfg),
                                 corpus_fingerprint], sort_keys=True).encode())
  h.update(params.encode())
  key = h.hexdigest()[:16]
  final = os.path.join(root, key)
  found = _whole(final)
  if found is not None:
    return dataclasses.replace(found, key=key, reused=True)
  vectors = build_index(generator, examples, progress=progress)
  items = [{k: e[k] for k in ITEM_FIELDS} for e in examples]
  meta = {"params_fingerprint": params, "corpus": corpus_fingerprint}
  # A damaged index there is replaced; one another process saved meanwhile is kept.
  with files.staged_dir(final, existing="keep", complete=lambda d: _whole(d) is not None) as tmp:
    meta = write(tmp, vectors, items, meta)
  return Index(vectors, items, key, final, meta=meta)


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
