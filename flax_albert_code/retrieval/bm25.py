"""Okapi BM25 (k1=1.5, b=0.75) in numpy, and two baselines built on it. Identifiers split at
underscores and camelCase, so "read file" meets `read_file` / `readFile`; IDF is Lucene's
log(1 + (N - df + 0.5) / (df + 0.5)), which stays positive for common terms."""
from __future__ import annotations

import collections
import re
from typing import Sequence

import numpy as np
import scipy.sparse

_WORD = re.compile(r"[A-Za-z]+|\d+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def words(text: str) -> list[str]:
  """Lowercased words; `readFile_v2` -> read, file, v, 2."""
  return [w.lower() for tok in _WORD.findall(text) for w in _CAMEL.findall(tok)]


class BM25:
  """An index over `documents` (token lists); `scores(query)` -> [num_docs] float array."""

  def __init__(self, documents: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75):
    self.k1, self.b = k1, b
    self.num_docs = len(documents)
    lengths = np.array([len(d) for d in documents], dtype=np.float64)
    avg = lengths.mean() if self.num_docs and lengths.mean() > 0 else 1.0
    self._norm_D = k1 * (1.0 - b + b * lengths / avg)
    # Postings (term -> ascending docs, tfs) from one np.unique over (term, doc) ids.
    vocab: dict[str, int] = {}
    n_tokens = np.fromiter(map(len, documents), np.int64, count=self.num_docs)
    term_ids = np.fromiter((vocab.setdefault(t, len(vocab)) for d in documents for t in d),
                           np.int64, count=int(n_tokens.sum()))
    pairs, tf = np.unique(term_ids * max(self.num_docs, 1) +
                          np.repeat(np.arange(self.num_docs), n_tokens), return_counts=True)
    terms, docs = np.divmod(pairs, max(self.num_docs, 1))
    bounds = np.searchsorted(terms, np.arange(len(vocab) + 1))
    tf = tf.astype(np.float64)
    self._postings = {t: (docs[bounds[i]:bounds[i + 1]], tf[bounds[i]:bounds[i + 1]])
                      for i, t in enumerate(vocab)}

  def idf(self, term: str) -> float:
    df = len(self._postings[term][0]) if term in self._postings else 0
    return float(np.log1p((self.num_docs - df + 0.5) / (df + 0.5)))

  def scores(self, query: Sequence[str]) -> np.ndarray:
    out_D = np.zeros(self.num_docs)
    for term, qtf in collections.Counter(query).items():
      if term not in self._postings:
        continue
      docs, tf = self._postings[term]
      out_D[docs] += qtf * self.idf(term) * tf * (self.k1 + 1) / (tf + self._norm_D[docs])
    return out_D

  def score_matrix(self, queries: Sequence[Sequence[str]],
                   dtype: np.dtype = np.float64) -> np.ndarray:
    """[Q, D] scores, as `scores` row by row, in one sparse product."""
    if not queries:
      return np.zeros((0, self.num_docs), dtype)
    weights = self._weights()
    if dtype != weights.dtype:
      if getattr(self, "_W_cast", None) is None or self._W_cast.dtype != dtype:
        self._W_cast = weights.astype(dtype)
      weights = self._W_cast
    return (self._query_matrix(queries).astype(dtype) @ weights).toarray()

  def _weights(self) -> scipy.sparse.csr_matrix:
    """[T, D] BM25 weight of each (term, document): idf * tf (k1 + 1) / (tf + norm)."""
    if getattr(self, "_W", None) is None:
      self._terms = {t: i for i, t in enumerate(self._postings)}
      rows, cols, vals = [], [], []
      for t, (docs, tf) in self._postings.items():
        rows.append(np.full(len(docs), self._terms[t]))
        cols.append(docs)
        vals.append(self.idf(t) * tf * (self.k1 + 1) / (tf + self._norm_D[docs]))
      cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
      self._W = scipy.sparse.csr_matrix(
          (cat(vals, np.float64), (cat(rows, np.int64), cat(cols, np.int64))),
          shape=(len(self._terms), self.num_docs))
    return self._W

  def _query_matrix(self, queries: Sequence[Sequence[str]]) -> scipy.sparse.csr_matrix:
    self._weights()
    rows, cols, vals = [], [], []
    for i, q in enumerate(queries):
      for term, qtf in collections.Counter(q).items():
        if term in self._terms:
          rows.append(i)
          cols.append(self._terms[term])
          vals.append(qtf)
    return scipy.sparse.csr_matrix((np.asarray(vals, np.float64), (rows, cols)),
                                   shape=(len(queries), len(self._terms)))


def nearest_neighbour(queries: Sequence[str], corpus_keys: Sequence[str]) -> np.ndarray:
  """For each query text, the index of the best-scoring corpus text (first on ties)."""
  index = BM25([words(k) for k in corpus_keys])
  return np.array([int(np.argmax(index.scores(words(q)))) for q in queries], dtype=np.int64)


def retrieval_scores(queries: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
  """[Q, C] BM25 scores of each query text against the candidate texts."""
  return BM25([words(c) for c in candidates]).score_matrix([words(q) for q in queries])
