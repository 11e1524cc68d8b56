"""What CodeGenerator and the export runtime share around the model: text checks, embedding
inputs, bucket padding, result assembly and ranking, and `parses`, the one meaning of "this
candidate is code". Free of flax/orbax so that `load_export` stays light."""
from __future__ import annotations

import ast
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from flax_albert_code.config import CLS_ID, EOS_ID, PAD_ID
from flax_albert_code.retrieval import retriever as retriever_lib


def check_texts(texts, what: str, allow_blank: bool = False) -> list[str]:
  """A list of str (UTF-8 bytes decoded); one ValueError sentence for anything else."""
  if isinstance(texts, (str, bytes)):
    raise ValueError(f"Pass a list of {what.lower()}s, not a single string.")
  out = []
  for i, t in enumerate(texts):
    if isinstance(t, bytes):
      try:
        t = t.decode("utf-8")
      except UnicodeDecodeError:
        raise ValueError(f"{what} {i + 1} is not valid UTF-8 text.") from None
    if not isinstance(t, str):
      raise ValueError(f"{what} {i + 1} is a {type(t).__name__}, not a string.")
    if not allow_blank and not t.strip():
      raise ValueError(f"{what} {i + 1} is empty; give it some text.")
    out.append(t)
  return out


def pad(ids: Sequence[int], width: int) -> list[int]:
  return list(ids[:width]) + [PAD_ID] * (width - len(ids))


def chunks(n: int, buckets: Sequence[int]) -> list[tuple[int, int, int]]:
  """(start, size, bucket): the largest bucket at a time, the remainder in the smallest fit."""
  largest, out = buckets[-1], []
  for start in range(0, n, largest):
    size = min(largest, n - start)
    out.append((start, size, next(b for b in buckets if b >= size)))
  return out


def code_ids(tokens: Sequence[int], max_width: int) -> list[int]:
  """What training encodes for a code's vector: [CLS] + code tokens, at most `max_width`."""
  return [CLS_ID, *tokens[:max_width - 1]]


def embed_ids(texts, kind: str, tokenizer, desc_len: int, code_widths: Sequence[int],
              description_ids: Callable[[str, int], list[int]] | None = None
              ) -> tuple[list[list[int]], list[int]]:
  """The encoder inputs of `embed(texts, kind)` and the widths to encode them at."""
  if kind not in ("desc", "code"):
    raise ValueError(f"Unknown embedding kind {kind!r}; use 'desc' or 'code'.")
  texts = check_texts(texts, "Description" if kind == "desc" else "Code",
                      allow_blank=kind == "code")
  if kind == "code":
    return [code_ids(tokenizer.encode(x), code_widths[-1]) for x in texts], list(code_widths)
  describe = description_ids or (lambda x, _: tokenizer.encode_description(x, desc_len))
  return [describe(x, i) for i, x in enumerate(texts)], [desc_len]


def vectors_by_width(ids: Sequence[Sequence[int]], widths: Sequence[int],
                     batch_buckets: Sequence[int], dim: int,
                     encode: Callable[[np.ndarray, int, int], np.ndarray]) -> np.ndarray:
  """[len(ids), dim]: each row encoded at the smallest width that holds it, in padded batches."""
  out = np.zeros((len(ids), dim), np.float32)
  groups = np.searchsorted(np.asarray(widths), np.array([len(x) for x in ids], int))
  for g, width in enumerate(widths):
    rows = np.flatnonzero(groups == g)
    for start, size, bucket in chunks(len(rows), batch_buckets):
      batch = np.zeros((bucket, width), np.int32)
      for j, r in enumerate(rows[start:start + size]):
        batch[j] = pad(ids[r], width)
      out[rows[start:start + size]] = np.asarray(encode(batch, bucket, width))[:size]
  return out


def parses(code: str) -> bool:
  """Whether `code` parses to a real statement (not empty, a comment or a lone name or constant)."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")   # SyntaxWarning for odd escapes in generated strings
      body = ast.parse(code).body
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return False
  return any(not (isinstance(n, ast.Expr) and isinstance(n.value, (ast.Name, ast.Constant)))
             for n in body)


def retrieves(retrieve: bool | None, k: int, fix: str) -> bool:
  """Whether a call with `retrieve` (None: `k` > 0) uses neighbours; ValueError ending in `fix`."""
  if retrieve and not k:
    raise ValueError("This model was trained without retrieval (config.retrieval.k = 0), so "
                     f"it cannot use neighbours; {fix}")
  return bool(k) if retrieve is None else bool(retrieve)


def candidates(decode: Callable[[list[int]], str], tokens_NxKxT: np.ndarray,
               scores_NxK: np.ndarray, neighbours: Sequence[Sequence[dict]] | None = None, *,
               max_new_tokens: int | None = None,
               by_score: bool = False) -> list[list[dict[str, Any]]]:
  """Per text, its K candidates {"code", "score", "align" (None), "parses", "finish_reason"}
  (and "neighbours" when given); `by_score` orders a row best first (stable)."""
  results = []
  for i, (row_tokens, row_scores) in enumerate(zip(tokens_NxKxT, scores_NxK)):
    order = np.argsort(-row_scores, kind="stable") if by_score else range(len(row_scores))
    cands = []
    for j in order:
      seq = row_tokens[j][:max_new_tokens].tolist()
      code = decode(seq)
      cands.append({"code": code, "score": float(row_scores[j]), "align": None,
                    "parses": parses(code), "finish_reason": "eos" if EOS_ID in seq else "length"})
      if neighbours is not None:
        cands[-1]["neighbours"] = retriever_lib.listed(neighbours[i])
    results.append(cands)
  return results


def rank(results: list[list[dict[str, Any]]], texts: Sequence[str],
         embed: Callable[..., np.ndarray], *, rerank: bool, drop_unparsable: bool,
         keep: int) -> list[list[dict[str, Any]]]:
  """The first `keep` of each text's candidates: with `drop_unparsable` those that parse (all
  when none does), with `rerank` ordered by "align", the description-code cosine (stable)."""
  if rerank:
    desc_vecs = embed(list(texts), kind="desc")
    flat = [(i, c) for i, cands in enumerate(results) for c in cands]
    code_vecs = embed([c["code"] for _, c in flat], kind="code")
    for (i, cand), vec in zip(flat, code_vecs):
      cand["align"] = float(np.dot(desc_vecs[i], vec))
  out = []
  for cands in results:
    if drop_unparsable and any(c["parses"] for c in cands):
      cands = [c for c in cands if c["parses"]]
    if rerank:
      cands = sorted(cands, key=lambda c: -c["align"])
    out.append(cands[:keep])
  return out
