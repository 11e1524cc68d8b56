"""Runs an export (export.py) alone: generation, embedding and search with no flax or orbax.

  exp = flax_albert_code.load_export("exports/small", index="runs/small/search_index/<key>")
  exp.generate(["return the sum of two integers"], strategy="beam", num_samples=2, rerank=True)
  exp.embed(["def add(a, b):\\n  return a + b"], kind="code")
  exp.search("parse a date string", k=5)

Loading refuses, in one sentence naming the file, a listed file that is missing, resized,
altered or does not fit the programs. Inputs are batched as `CodeGenerator` batches them and
options checked by `options.check`, so greedy decoding gives the checkpoint's tokens; sample j
of description i is drawn with its own key whatever else is batched with it. A retrieval
model's export retrieves by default, as `CodeGenerator` does, from the index it ships or the
`index=` it was loaded with; an index of another model or a damaged one is refused.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Sequence

import jax
import numpy as np
from safetensors.numpy import load_file

from flax_albert_code.inference import decoding
from flax_albert_code.inference import options
from flax_albert_code.retrieval import index as index_lib
from flax_albert_code.inference import postprocess
from flax_albert_code.retrieval import retriever as retriever_lib
from flax_albert_code.tokenizer import Tokenizer, TokenizerError, frame_context
from flax_albert_code.utils import files

# What this module reads and deploy/writer.py writes. Retrieval only adds to format 2: a reader
# that ignores it still runs the description-width programs.
FORMAT = 2
MANIFEST = "manifest.json"
RETRIEVAL_INDEX = "retrieval_index"   # the search index an export of a retrieval model ships
SPOT_CHECKS = 4          # items of an index without a recorded fingerprint re-encoded at load
SPOT_COSINE = 0.9        # ... whose stored vectors must be this close to the model's
# The inputs of a generate program after the variables (scalars but the first two).
GENERATE_INPUTS = ("desc_ids", "keys", "max_new_tokens", "temperature", "top_k", "top_p",
                   "length_penalty", "repetition_penalty")

log = logging.getLogger("flax_albert_code")


class ExportError(ValueError):
  """An export directory is incomplete, altered or inconsistent; the message names the file."""


def generate_program(strategy: str, batch: int, length: int, width: int, desc_len: int) -> str:
  """`generate_{strategy}_b{B}_t{T}`, with `_w{width}` for the retrieval context's width."""
  name = f"generate_{strategy}_b{batch}_t{length}"
  return name if width == desc_len else f"{name}_w{width}"


def load_export(path: str, *, index: str | index_lib.Index | None = None,
                verify: bool = True) -> Export:
  """Opens an export; `index` (see `Export.load_index`) defaults to the one it ships, if any."""
  exp = Export(path, verify=verify)
  if index is not None:
    exp.load_index(index)
  elif exp.shipped_index:
    exp.load_index(os.path.join(exp.path, exp.shipped_index))
  return exp


def verify_files(root: str, manifest: dict[str, Any]) -> None:
  """Raises ExportError naming the first listed file that is missing, resized or altered."""
  listed = manifest.get("files")
  if not isinstance(listed, dict) or not listed:
    raise ExportError(f"{os.path.join(root, MANIFEST)} lists no files; export again.")
  bad = files.check(root, listed)
  if bad is not None:
    raise ExportError({
        "missing": f"Export file {bad.path} is missing; copy the whole export directory or "
                   "export again.",
        "size": f"Export file {bad.path} is {bad.size} bytes, not the {bad.want} the manifest "
                "lists (truncated or replaced); export again.",
        "sha256": f"Export file {bad.path} does not match its sha256 in the manifest (altered "
                  "or corrupted); export again."}[bad.kind])


class Export:
  """A loaded export: `generate`, `embed` and `search`, thread-safe."""

  def __init__(self, path: str, *, verify: bool = True):
    self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    manifest_path = os.path.join(self.path, MANIFEST)
    if not os.path.isdir(self.path):
      raise ExportError(f"Export directory {self.path} does not exist; pass the --out of "
                        "`python -m flax_albert_code.export`.")
    try:
      with open(manifest_path, encoding="utf-8") as f:
        self.manifest = json.load(f)
      info = self.manifest["inference"]
      programs = self.manifest["programs"]
    except FileNotFoundError:
      raise ExportError(f"{manifest_path} is missing, so {self.path} is not a complete export; "
                        "export again.") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ExportError(f"{manifest_path} cannot be read ({type(e).__name__}: {e}); "
                        "export again.") from None
    if self.manifest.get("format") != FORMAT:
      raise ExportError(f"{manifest_path} has format {self.manifest.get('format')}, this "
                        f"library reads format {FORMAT}; export again.")
    if verify:
      verify_files(self.path, self.manifest)
    self.step = self.manifest.get("step")
    self.batch_buckets = sorted(int(b) for b in info["batch_buckets"])
    self.desc_len = int(info["desc_len"])
    self.code_widths = sorted(int(w) for w in info["code_widths"])
    self.lengths = sorted(int(t) for t in info["lengths"])
    self.max_new_tokens = int(info["max_new_tokens"])
    self.strategies = list(info["strategies"])
    self.num_beams = int(info["num_beams"])
    # Built into the programs (0 in exports older than the option).
    self.no_repeat_ngram_size = int(info.get("no_repeat_ngram_size", 0))
    # Built into the programs too; exports written before the copy head decode without one.
    self.copy_head = bool(info.get("copy_head", False))
    if "copy_head" not in info:
      log.info("Export %s was written before the copy head: its programs decode without one.",
               self.path)
    self.align_dim = int(info["align_dim"])
    self.vocab_size = int(info["vocab_size"])
    rag = info.get("retrieval") or {}      # absent in exports written before retrieval
    self.retrieval_k = int(rag.get("k", 0))
    self.retrieval_method = retriever_lib.check_method(str(rag.get("method", "hybrid")))
    self.ctx_len = int(rag.get("max_ctx_len", self.desc_len))
    self.frame_desc_len = int(rag.get("max_desc_len", self.desc_len))
    self.shipped_index: str | None = rag.get("index") or None
    # Parameter fingerprints (index.params_fingerprint) an index may have been built with: the
    # export's own and its checkpoint's (the same model before the export's dtype cast).
    self.fingerprints = {f for f in (info.get("params_fingerprint"),
                                     info.get("source_params_fingerprint")) if f}
    tok_path = os.path.join(self.path, info["tokenizer"])
    try:
      self.tokenizer = Tokenizer.load(tok_path)
    except TokenizerError as e:
      raise ExportError(f"Export file {tok_path} is not a usable tokenizer ({e}).") from None
    self._meta = {p["name"]: p for p in programs}
    self._programs = {p["name"]: self._deserialize(p) for p in programs}
    self.variables = self._load_params(os.path.join(self.path, info["params"]))
    want = [(x.shape, x.dtype) for x in jax.tree.leaves(self.variables)]
    for name, exp in self._programs.items():
      if [(a.shape, a.dtype) for a in exp.in_avals[:len(want)]] != want:
        raise ExportError(f"Export file {os.path.join(self.path, self._meta[name]['file'])} "
                          "takes other parameters than the other programs; export again.")
    self._compiled: dict[str, Any] = {}
    self._lock = threading.Lock()
    self.index: index_lib.Index | None = None
    self._retriever: retriever_lib.Retriever | None = None    # over self.index, for generation

  def _deserialize(self, meta: dict[str, Any]) -> jax.export.Exported:
    path = os.path.join(self.path, meta["file"])
    try:
      with open(path, "rb") as f:
        exp = jax.export.deserialize(bytearray(f.read()))
    except Exception as e:  # pylint: disable=broad-except  # flatbuffers raises many types
      raise ExportError(f"Export file {path} is not a serialised jax.export program "
                        f"({type(e).__name__}); export again.") from None
    inputs = 1 if meta["kind"] == "encode" else len(GENERATE_INPUTS)
    ids = exp.in_avals[len(exp.in_avals) - inputs]
    if tuple(ids.shape) != (meta["batch"], meta["width"]):
      raise ExportError(f"Export file {path} takes ids of shape {tuple(ids.shape)}, not the "
                        f"({meta['batch']}, {meta['width']}) its manifest entry says.")
    # jax.export's names (cpu, cuda, rocm, tpu); jax.default_backend() says "gpu" for CUDA.
    here = jax.export.default_export_platform()
    if here not in exp.platforms:
      raise ExportError(f"Export file {path} was lowered for {', '.join(exp.platforms)}, not "
                        f"for this machine's {here}; export on (or for) {here}.")
    return exp

  def _load_params(self, path: str) -> Any:
    try:
      flat = load_file(path)
    except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own types
      raise ExportError(f"Export file {path} is not a readable safetensors file "
                        f"({type(e).__name__}: {e}).") from None
    some = next(iter(self._programs.values()))
    treedef = some.in_tree.children()[0].children()[0]
    names = ["/".join(str(getattr(k, "key", k)) for k in kp) for kp, _ in
             jax.tree_util.tree_flatten_with_path(
                 jax.tree_util.tree_unflatten(treedef, range(treedef.num_leaves)))[0]]
    leaves = []
    for name, aval in zip(names, some.in_avals):   # the variables come first
      x = flat.pop(name, None)
      if x is None:
        raise ExportError(f"Export file {path} lacks the tensor {name} that the programs take.")
      if tuple(x.shape) != tuple(aval.shape) or np.dtype(x.dtype) != np.dtype(aval.dtype):
        raise ExportError(f"Export file {path} holds {name} as {x.dtype}{list(x.shape)}; the "
                          f"programs take {aval.dtype}{list(aval.shape)}.")
      leaves.append(jax.device_put(x))
    if flat:
      raise ExportError(f"Export file {path} holds tensors the programs do not take "
                        f"({', '.join(sorted(flat)[:3])}).")
    return jax.tree_util.tree_unflatten(treedef, leaves)

  def load_index(self, index: str | index_lib.Index) -> index_lib.Index:
    """An `Index`, a directory as `python -m flax_albert_code.search` saves, or a .jsonl/.json
    file of items with "code" (embedded now)."""
    embedded = False
    if isinstance(index, index_lib.Index):
      idx = index
    elif os.path.isdir(index):
      try:
        idx = index_lib.read(index)
      except (OSError, ValueError, TypeError, AttributeError) as e:
        raise self._bad_index(index, f"cannot be read ({type(e).__name__}: {e})") from None
    else:
      try:
        with open(index, encoding="utf-8") as f:
          text = f.read()
        items = [index_lib.item(it) for it in (
            json.loads(text) if index.endswith(".json")
            else [json.loads(line) for line in text.splitlines() if line.strip()])]
      except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ExportError(f"Search corpus {index} cannot be read ({type(e).__name__}: {e}); "
                          "pass JSON lines, each an object with at least \"code\".") from None
      idx = index_lib.Index(self.embed([it["code"] for it in items], kind="code"), items,
                            directory=index)
      embedded = True
    self._check_index(idx, embedded)
    retriever = None
    if self.retrieval_k:
      if not idx.items:
        raise ExportError(f"Search index {idx.directory or 'given'} holds no functions, so "
                          "this retrieval model has no neighbours to draw on; pass another "
                          "index (serve --index) or generate with retrieve=False.")
      retriever = retriever_lib.over_items(idx.items, idx.vectors)
    with self._lock:
      self.index, self._retriever = idx, retriever
    return idx

  def _check_index(self, idx: index_lib.Index, embedded: bool) -> None:
    """ExportError unless `idx` holds this model's vectors of its items' code."""
    if idx.vectors.ndim != 2 or idx.vectors.shape[1] != self.align_dim or len(
        idx.items) != len(idx.vectors):
      raise self._bad_index(idx.directory, f"holds vectors of shape {idx.vectors.shape} for "
                            f"{len(idx.items)} items; this model's are {self.align_dim}-"
                            "dimensional, one per item")
    if not np.isfinite(idx.vectors).all():
      raise self._bad_index(idx.directory, "holds vectors that are not finite (damaged)")
    if embedded:
      return
    recorded = idx.meta.get("params_fingerprint")
    if recorded and self.fingerprints:
      if recorded not in self.fingerprints:
        raise self._bad_index(idx.directory, f"was built by another model (parameters "
                              f"{str(recorded)[:12]}, this export's "
                              f"{sorted(self.fingerprints)[0][:12]})")
      return
    # No fingerprint to compare: re-encode a few items and compare with their stored vectors.
    picks = sorted({int(i) for i in np.linspace(0, len(idx.items) - 1,
                                                min(SPOT_CHECKS, len(idx.items)))})
    if not picks:
      return
    fresh = self.embed([idx.items[i]["code"] for i in picks], kind="code")
    cosine = np.sum(fresh * idx.vectors[picks], axis=1) / np.maximum(
        np.linalg.norm(idx.vectors[picks], axis=1), 1e-6)
    if (cosine < SPOT_COSINE).any():
      raise self._bad_index(idx.directory, "holds vectors that are not this model's encoding "
                            f"of their code (cosine {float(cosine.min()):.2f} at item "
                            f"{picks[int(np.argmin(cosine))] + 1}): built by another model or "
                            "altered")

  def _bad_index(self, directory: str | None, why: str) -> ExportError:
    """`why` and what to do: rebuild the index (or, for the shipped one, export again)."""
    if directory and self.shipped_index and os.path.abspath(directory) == os.path.join(
        self.path, self.shipped_index):
      fix = "export again (it is the export's own index)."
    else:
      fix = ("rebuild it with this model (python -m flax_albert_code.search --checkpoint RUN "
             "--corpus SOURCE saves one under RUN/search_index/) or pass a JSON-lines corpus.")
    return ExportError(f"Search index {directory or 'given'} {why}; {fix}")

  def warmup(self, strategies: Sequence[str] = ("greedy",), embed: bool = False) -> int:
    """Compiles the programs a default request of `strategies` runs (and with `embed` the
    encoders) now; returns how many."""
    width = self.ctx_len if self.retrieval_k and self.index is not None else self.desc_len
    query = width != self.desc_len and self.retrieval_method != "bm25"
    names = [n for n, m in self._meta.items()
             if (m["kind"] == "encode" and (embed or (query and m["width"] == self.desc_len)))
             or (m.get("strategy") in strategies and m["width"] == width)]
    for name in names:
      exp = self._programs[name]
      args = [np.zeros(a.shape, a.dtype) for a in exp.in_avals[len(jax.tree.leaves(
          self.variables)):]]
      jax.block_until_ready(self._fn(name)(self.variables, *args))
    return len(names)

  def check_generate(self, descriptions: Sequence[str], strategy: str = "greedy",
                     num_samples: int = 1, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, max_new_tokens: int | None = None,
                     length_penalty: float = 1.0, repetition_penalty: float = 1.0,
                     seed: int = 0, max_samples: int | None = None,
                     retrieve: bool | None = None, num_beams: int | None = None) -> list[str]:
    """The descriptions as strings; ValueError (one sentence) for what this export cannot do.
    `max_samples`: a caller's (the server's) limit."""
    texts = postprocess.check_texts(descriptions, "Description")
    self.retrieves(retrieve)
    if strategy in decoding.STRATEGIES and strategy not in self.strategies:
      raise ValueError(f"This export has no {strategy!r} programs; use one of "
                       f"{', '.join(self.strategies)}.")
    beams = self.num_beams if num_beams is None else num_beams
    options.check(strategies=self.strategies, strategy=strategy, max_new_tokens=max_new_tokens,
                  num_samples=num_samples, num_beams=beams, temperature=temperature,
                  top_k=top_k, top_p=top_p, length_penalty=length_penalty,
                  repetition_penalty=repetition_penalty, seed=seed,
                  max_tokens=self.lengths[-1], max_tokens_why="this export's longest program",
                  vocab_size=self.vocab_size, max_samples=max_samples, beams_fixed=True)
    if beams != self.num_beams:
      raise options.OptionError(
          lambda n: f"This export's beam search keeps {self.num_beams} beams (fixed when it was "
                    f"exported), so {n('num_beams')} must be {self.num_beams} or left out, got "
                    f"{beams}.")
    return texts

  def retrieves(self, retrieve: bool | None = None) -> bool:
    """Whether a request with `retrieve` (None: the export's default) draws on neighbours."""
    used = postprocess.retrieves(retrieve, self.retrieval_k, "drop retrieve or export a model "
                                 "trained with --config.retrieval.k=2.")
    if used and self.index is None:
      raise ValueError("This export retrieves neighbours but has no index (exported with "
                       "--no-retrieval-index); load it with index= (serve --index) or pass "
                       "retrieve=False.")
    return used

  def retrieve(self, texts: Sequence[str], k: int | None = None,
               method: str | None = None) -> list[list[dict[str, Any]]]:
    """Per description, the index's nearest functions, best first, as `CodeGenerator.retrieve`."""
    with self._lock:
      index, retriever = self.index, self._retriever
    if index is None or retriever is None:
      raise ValueError("No retrieval index is loaded; pass index= to load_export.")
    method = retriever_lib.check_method(method or self.retrieval_method)
    return retriever_lib.neighbours(retriever, index.items, texts,
                                    self.retrieval_k if k is None else int(k), method,
                                    self.embed, self.tokenizer.encode)

  def generate(self, descriptions: Sequence[str], strategy: str = "greedy", num_samples: int = 1,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               rerank: bool = False, max_new_tokens: int | None = None, seed: int = 0,
               length_penalty: float = 1.0, repetition_penalty: float = 1.0,
               drop_unparsable: bool = False,
               seeds: Sequence[tuple[int, int]] | None = None,
               retrieve: bool | None = None,
               num_beams: int | None = None) -> list[list[dict[str, Any]]]:
    """Per description, candidates best first, as `CodeGenerator.generate`. `seeds`: per
    description (seed, its index in its request), for callers that batch several requests into
    one call (the server); default (seed, i)."""
    texts = self.check_generate(descriptions, strategy, num_samples, temperature, top_k, top_p,
                                max_new_tokens, length_penalty, repetition_penalty, seed,
                                retrieve=retrieve, num_beams=num_beams)
    if not texts:
      return []
    neighbours = self.retrieve(texts) if self.retrieves(retrieve) else None
    want = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    tokens_NxKxT, scores_NxK = self.generate_tokens(
        texts, strategy=strategy, num_samples=num_samples, temperature=temperature,
        top_k=top_k, top_p=top_p, max_new_tokens=want, seed=seed,
        length_penalty=length_penalty, repetition_penalty=repetition_penalty, seeds=seeds,
        neighbour_tokens=None if neighbours is None else [[n["tokens"] for n in nbs]
                                                          for nbs in neighbours])
    results = postprocess.candidates(
        self.tokenizer.decode, tokens_NxKxT, scores_NxK, neighbours, max_new_tokens=want,
        by_score=strategy == "sample" and num_samples > 1)
    return postprocess.rank(results, texts, self.embed, rerank=rerank,
                            drop_unparsable=drop_unparsable, keep=num_samples)

  def generate_tokens(self, texts: Sequence[str], *, strategy: str = "greedy",
                      num_samples: int = 1, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, max_new_tokens: int | None = None, seed: int = 0,
                      length_penalty: float = 1.0, repetition_penalty: float = 1.0,
                      seeds: Sequence[tuple[int, int]] | None = None,
                      neighbour_tokens: Sequence[Sequence[Sequence[int]]] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [N, K, T] (T the smallest compiled length >= max_new_tokens) and scores [N, K]
    of checked `texts`. `neighbour_tokens`: per text, its neighbours' code tokens to frame it
    with (None: the description alone)."""
    want = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    t = next(x for x in self.lengths if x >= want)
    reps = num_samples if strategy == "sample" else 1      # sample programs draw one per row
    if neighbour_tokens is None:
      width = self.desc_len
      inputs = [self.tokenizer.encode_description(x, self.desc_len) for x in texts]
    else:
      width = self.ctx_len
      inputs = [frame_context(self.tokenizer.encode(x), list(nbs), self.frame_desc_len, width)
                for x, nbs in zip(texts, neighbour_tokens)]
    rows = [postprocess.pad(ids, width) for ids in inputs for _ in range(reps)]
    ids = np.asarray(rows, np.int32)
    keys = np.zeros((len(texts), reps, 2), np.uint32)
    if strategy == "sample":
      by_seed: dict[int, list[tuple[int, int]]] = {}
      for n, (s, i) in enumerate(seeds or [(seed, i) for i in range(len(texts))]):
        by_seed.setdefault(int(s), []).append((n, int(i)))
      for s, where in by_seed.items():
        keys[[n for n, _ in where]] = options.candidate_keys(s, [i for _, i in where], reps)
    keys = keys.reshape(len(rows), 2)
    tokens, scores = [], []
    for start, size, bucket in postprocess.chunks(len(rows), self.batch_buckets):
      pad = ((0, bucket - size), (0, 0))
      out = self._fn(generate_program(strategy, bucket, t, width, self.desc_len))(
          self.variables, np.pad(ids[start:start + size], pad),
          np.pad(keys[start:start + size], pad), np.int32(want), np.float32(temperature),
          np.int32(top_k), np.float32(top_p), np.float32(length_penalty),
          np.float32(repetition_penalty))
      tok, sc = jax.device_get(out)
      tokens.append(np.asarray(tok)[:size])
      scores.append(np.asarray(sc)[:size])
    k = tokens[0].shape[1] * reps
    return (np.concatenate(tokens).reshape(len(texts), k, t),
            np.concatenate(scores).reshape(len(texts), k))

  def embed(self, texts: Sequence[str], kind: str = "desc") -> np.ndarray:
    """L2-normalised alignment vectors [N, align_dim] of descriptions or code."""
    ids, widths = postprocess.embed_ids(texts, kind, self.tokenizer, self.desc_len,
                                        self.code_widths)

    def encode(batch, bucket, width):
      return jax.device_get(self._fn(f"encode_b{bucket}_w{width}")(self.variables, batch))
    return postprocess.vectors_by_width(ids, widths, self.batch_buckets, self.align_dim, encode)

  def search(self, query: str | Sequence[str], k: int = 10,
             index: index_lib.Index | None = None) -> list[dict] | list[list[dict]]:
    """The `k` best index items ({**item, "score", "rank"}); a list of queries, a list each."""
    index = index or self.index
    if index is None:
      raise ValueError("No search index is loaded; pass index= to load_export or call "
                       "load_index.")
    single = isinstance(query, str)
    hits = index_lib.query(self, index, [query] if single else list(query), top_k=k)
    return hits[0] if single else hits

  def _fn(self, name: str):
    fn = self._compiled.get(name)
    if fn is None:
      if name not in self._programs:
        raise ValueError(f"This export has no program {name}.")
      with self._lock:
        fn = self._compiled.setdefault(name, jax.jit(self._programs[name].call))
    return fn
