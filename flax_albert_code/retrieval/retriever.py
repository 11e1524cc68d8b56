"""The k nearest functions of a corpus for each description: "dense" (cosine of aligned vectors),
"bm25" or "hybrid" (both as z-scores, added). `exclude` keeps a query from its own source file."""
from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, Sequence

import numpy as np

from flax_albert_code.retrieval import bm25 as bm25_lib

METHODS = ("dense", "bm25", "hybrid")
NEIGHBOUR_FIELDS = ("path", "name", "lineno", "score")   # what a candidate lists per neighbour


def check_method(method: str) -> str:
  if method not in METHODS:
    raise ValueError(f"Unknown retrieval method {method!r}; use one of {', '.join(METHODS)}.")
  return method


class Retriever:
  """A corpus of functions (code texts, optional aligned code vectors) ranked for descriptions."""

  def __init__(self, codes: Sequence[str], vectors_NxA: np.ndarray | None = None,
               groups: Sequence[str] | None = None, keys: Sequence[str] | None = None):
    self.num = len(codes)
    self.vectors = None if vectors_NxA is None else np.asarray(vectors_NxA, np.float32)
    if self.vectors is not None and len(self.vectors) != self.num:
      raise ValueError(f"The retrieval corpus has {self.num} functions but {len(self.vectors)} "
                       "vectors; rebuild its index.")
    self.bm25 = bm25_lib.BM25([bm25_lib.words(c) for c in (codes if keys is None else keys)])
    self._group_names = None if groups is None else {
        g: i for i, g in enumerate(dict.fromkeys(groups))}
    self.groups = None if groups is None else np.array([self._group_names[g] for g in groups])

  def search(self, queries: Sequence[str], k: int, *, method: str = "hybrid",
             query_vectors_QxA: np.ndarray | None = None, exclude: Sequence[str] | None = None,
             chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """([Q, k] corpus indices best first, [Q, k] scores); -1 / -inf where fewer than k remain.
    `exclude[q]` names query q's group (source file), whose functions are skipped."""
    check_method(method)
    if method != "bm25" and (self.vectors is None or query_vectors_QxA is None):
      raise ValueError(f"Retrieval method {method!r} needs the model's vectors of the corpus and "
                       "of the queries; use method 'bm25' or build the index with the model.")
    if exclude is not None and self.groups is None:
      raise ValueError("exclude= needs the corpus's groups (source files).")
    q = len(queries)
    idx = np.full((q, k), -1, np.int64)
    scores = np.full((q, k), -np.inf, np.float32)
    if not q or not self.num or k < 1:
      return idx, scores
    words = [bm25_lib.words(t) for t in queries]
    members = None
    if exclude is not None:
      order = np.argsort(self.groups, kind="stable")
      bounds = np.searchsorted(self.groups[order], np.arange(len(self._group_names) + 1))
      members = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def block(start: int) -> None:
      rows = slice(start, min(q, start + chunk))
      s = self._scores(words[rows], None if query_vectors_QxA is None
                       else np.asarray(query_vectors_QxA[rows], np.float32), method)
      if exclude is not None:
        for i, g in enumerate(exclude[rows]):
          if (gi := self._group_names.get(g, -1)) >= 0:
            s[i, members[gi]] = -np.inf
      idx[rows, :min(k, self.num)], scores[rows, :min(k, self.num)] = top_k(s, k)

    if method != "dense":
      self.bm25.score_matrix(words[:1], np.float32)   # builds the cached weights, once
    if q <= chunk:   # one block (a served request): no thread pool
      block(0)
    else:   # blocks in threads: the sparse product, argmax and matmul run without the GIL
      with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(block, range(0, q, chunk)))
    return idx, scores

  def _scores(self, words: list[list[str]], qv: np.ndarray | None, method: str) -> np.ndarray:
    if method == "dense":
      return qv @ self.vectors.T
    lexical = self.bm25.score_matrix(words, np.float32)
    if method == "bm25":
      return lexical
    return zscore(qv @ self.vectors.T) + zscore(lexical)


def top_k(s_QxC: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """([Q, min(k, C)] column indices best first, their scores); -1 where the score is -inf.
  Up to k=8 by repeated argmax (faster for small k; ties to the lower index; overwrites `s_QxC`),
  above by argpartition and a stable sort."""
  kk = min(k, s_QxC.shape[1])
  if kk <= 8:
    rows = np.arange(len(s_QxC))
    top = np.empty((len(s_QxC), kk), np.int64)
    top_s = np.empty((len(s_QxC), kk), np.float32)
    for j in range(kk):
      top[:, j] = best = s_QxC.argmax(axis=1)
      top_s[:, j] = s_QxC[rows, best]
      s_QxC[rows, best] = -np.inf
  else:
    top = np.argpartition(-s_QxC, kk - 1, axis=1)[:, :kk]
    top_s = np.take_along_axis(s_QxC, top, 1)
    order = np.argsort(-top_s, axis=1, kind="stable")
    top, top_s = np.take_along_axis(top, order, 1), np.take_along_axis(top_s, order, 1)
  return np.where(np.isfinite(top_s), top, -1), top_s


def zscore(s_QxC: np.ndarray) -> np.ndarray:
  """Each row standardised over its candidates (a constant row becomes zeros)."""
  s = np.asarray(s_QxC, np.float32)
  std = s.std(axis=1, keepdims=True)
  return (s - s.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)


def key_text(description: str, code: str) -> str:
  """What BM25 matches a query against: the function's docstring (if any) and its code."""
  return f"{description}\n{code}" if description else code


def over_items(items: Sequence[dict[str, Any]], vectors_NxA: np.ndarray | None) -> Retriever:
  """A Retriever over search-index items: their code, BM25 keyed by `key_text`, their vectors."""
  return Retriever([it["code"] for it in items], vectors_NxA,
                   keys=[key_text(it.get("description", ""), it["code"]) for it in items])


def neighbours(retriever: Retriever, items: Sequence[dict[str, Any]], texts: Sequence[str],
               k: int, method: str, embed: Callable[..., np.ndarray],
               encode: Callable[[str], list[int]]) -> list[list[dict[str, Any]]]:
  """Per description, its `k` nearest items best first, with their code's tokens."""
  qv = None if method == "bm25" else embed(list(texts), kind="desc")
  idx, scores = retriever.search(list(texts), k, method=method, query_vectors_QxA=qv)
  return [[{**{f: items[j][f] for f in ("path", "name", "lineno", "code")},
            "score": float(sc), "tokens": encode(items[j]["code"])}
           for j, sc in zip(row, row_scores) if j >= 0]
          for row, row_scores in zip(idx, scores)]


def listed(nbs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """What a candidate lists under "neighbours": each one's path, name, lineno and score."""
  return [{f: n[f] for f in NEIGHBOUR_FIELDS} for n in nbs]


def neighbour_lines(nbs: Sequence[dict[str, Any]]) -> list[str]:
  """As the commands print them: `# neighbour 1: stdlib/codecs.py:609 f (score 6.86)`."""
  return [f"# neighbour {i + 1}: {n['path']}:{n['lineno']} {n['name']} (score {n['score']:.2f})"
          for i, n in enumerate(nbs)]
