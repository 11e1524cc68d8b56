"""Evaluation: generation (BLEU, exact match, parse rate), retrieval (MRR, R@k), HumanEval pass@k.

`generator` is duck typed (tests use a fake): `generate(descriptions, strategy, num_samples, ...)`
gives per description candidates best first (dicts with "code", "score", "align", "parses") and
`embed(texts, kind="desc"|"code")` L2-normalised vectors. Every method is scored on the same
examples; percentages except MRR (0-1). `progress`: True bars, "lines" a line now and then.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import random
from typing import Any, Iterator, Sequence

import numpy as np

from flax_albert_code.evaluation import humaneval, metrics, sandbox
from flax_albert_code.inference import decoding
from flax_albert_code.retrieval import bm25
from flax_albert_code.utils import progress as progress_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  num_samples: int = 10      # candidates drawn by "sample" (rerank picks among them; pass@k: all)
  num_beams: int = 4
  temperature: float = 0.8
  top_k: int = 0
  top_p: float = 0.95
  max_new_tokens: int | None = None
  seed: int = 0
  batch_size: int = 64       # descriptions per `generate` / `embed` call
  repetition_penalty: float | None = None   # None: the checkpoint's config.sample value
  no_repeat_ngram_size: int | None = None   # None: the checkpoint's config.sample value


def methods(strategies: Sequence[str], rerank: bool) -> list[tuple[str, bool]]:
  """(strategy, rerank) pairs to run; greedy has one candidate, so it is never reranked."""
  for s in strategies:
    if s not in decoding.STRATEGIES:
      raise ValueError(f"Unknown decoding strategy {s!r}; use {', '.join(decoding.STRATEGIES)}.")
  return [(s, False) for s in strategies] + [(s, True) for s in strategies
                                             if rerank and s != "greedy"]


def method_name(strategy: str, rerank: bool) -> str:
  return f"{strategy} + align rerank" if rerank else strategy


@contextlib.contextmanager
def summarised_truncation(generator, descriptions: Sequence[str]) -> Iterator[dict[str, Any]]:
  """One warning for the descriptions the model cuts (their numbers from 1 in the record
  yielded) instead of the generator's warning per description and call."""
  find = getattr(generator, "long_descriptions", None)
  cut = [i + 1 for i in find(list(descriptions))] if find else []
  limit = getattr(generator, "max_desc_len", 2) - 2
  if cut:
    log.warning("%d of %d descriptions are longer than the model reads (%d tokens) and were cut; "
                "report.json lists them (truncated).", len(cut), len(descriptions), limit)
  warned = getattr(generator, "warn_long", None)
  if warned is not None:
    generator.warn_long = False
  try:
    yield {"descriptions": cut, "max_tokens": limit} if cut else {}
  finally:
    if warned is not None:
      generator.warn_long = warned


def _generate(generator, descriptions: Sequence[str], strategy: str, rerank: bool,
              d: DecodeSettings, progress: bool | str, name: str, **retrieve) -> list[list[dict]]:
  out: list[list[dict]] = []
  bar = progress_lib.bar(len(descriptions), name, "desc", progress)
  for i in range(0, len(descriptions), d.batch_size):
    batch = list(descriptions[i:i + d.batch_size])
    cands = generator.generate(
        batch, strategy=strategy,
        num_samples=decoding.num_candidates(strategy, d.num_beams, d.num_samples),
        num_beams=d.num_beams, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p,
        rerank=rerank, max_new_tokens=d.max_new_tokens, seed=d.seed + i, **retrieve,
        **{name: getattr(d, name) for name in ("repetition_penalty", "no_repeat_ngram_size")
           if getattr(d, name) is not None})
    if len(cands) != len(batch) or any(not c for c in cands):
      raise ValueError(f"generate({strategy!r}) returned {len(cands)} candidate lists for "
                       f"{len(batch)} descriptions, or an empty list; expected one non-empty each.")
    out.extend(cands)
    bar.update(len(batch))
  bar.close()
  return out


def _embed(generator, texts: Sequence[str], kind: str, batch_size: int,
           progress: bool | str = False) -> np.ndarray:
  parts = []
  with progress_lib.bar(len(texts), f"embed {kind}", "text", progress) as bar:
    for i in range(0, len(texts), batch_size):
      parts.append(np.asarray(generator.embed(list(texts[i:i + batch_size]), kind=kind),
                              np.float32))
      bar.update(len(parts[-1]))
  return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def retrieval_chunks(n: int, max_candidates: int = 1000) -> list[np.ndarray]:
  """CodeSearchNet protocol: consecutive chunks of at most `max_candidates` examples (as equal as
  possible); each query is ranked against its own chunk: its target and the rest as distractors."""
  if n == 0:
    return []
  return np.array_split(np.arange(n), -(-n // max_candidates))


def _retrieval_rows(name: str, scores: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
  """`scores`: per chunk, ([n, n] desc->code scores, [n, n] code->desc scores)."""
  lo, hi = min(len(d2c) for d2c, _ in scores), max(len(d2c) for d2c, _ in scores)
  span = str(lo) if lo == hi else f"{lo}-{hi}"
  rows = []
  for j, direction in enumerate(("desc→code", "code→desc")):
    r = np.concatenate([metrics.ranks(chunk[j]) for chunk in scores])
    rows.append({"method": f"{name} {direction}", "kind": "retrieval", "examples": int(len(r)),
                 "mrr": float(np.mean(1.0 / r)), "candidates": span,
                 **{f"r@{k}": 100.0 * float(np.mean(r <= k)) for k in (1, 5, 10)}})
  return rows


def fuse(*scores_QxC: np.ndarray) -> np.ndarray:
  """Hybrid retrieval: the sum of each method's scores standardised per query (z-scores over
  that query's candidates), with equal weights fixed in advance, not tuned on any split."""
  def z(s):
    s = np.asarray(s, np.float64)
    return (s - s.mean(-1, keepdims=True)) / np.maximum(s.std(-1, keepdims=True), 1e-9)
  return sum(z(s) for s in scores_QxC)


def _generation_row(name: str, outputs: Sequence[str], refs: Sequence[str],
                    finished: Sequence[bool] | None = None, k: int | None = None) -> dict:
  return {"method": name, "kind": "generation", "examples": len(outputs),
          "bleu": metrics.bleu(outputs, refs),
          "exact_match": metrics.exact_match_rate(outputs, refs),
          "parse_rate": metrics.parse_rate(outputs),
          "degenerate_rate": metrics.degenerate_rate(outputs, finished),
          **({} if k is None else {"k": k})}


def _nearest_codes(descs: Sequence[str], train_examples: Sequence[dict]) -> list[str]:
  """The BM25 baseline: the code of the training example whose description is closest."""
  nn = bm25.nearest_neighbour(descs, [t["description"] for t in train_examples])
  return [train_examples[i]["code"] for i in nn]


def _results(task: str, n: int, train_examples: Sequence[dict], rows: list[dict],
             truncated: dict, examples: dict, **extra) -> dict[str, Any]:
  return {"task": task, "num_examples": n, "num_train_examples": len(train_examples),
          "rows": rows, "truncated": truncated, "examples": examples, **extra}


def evaluate(generator, examples: Sequence[dict], train_examples: Sequence[dict] = (),
             strategies: Sequence[str] = ("greedy",), rerank: bool = False,
             decode: DecodeSettings = DecodeSettings(), retrieval: bool = True,
             max_candidates: int = 1000, num_show: int = 3, num_random: int = 0,
             seed: int = 0, progress: bool | str = False, retrieve: bool | None = None,
             plain: bool = True, corpus: str | None = None) -> dict[str, Any]:
  """Generation and retrieval metrics on `examples` ("description", "code"), with BM25
  baselines. A retrieval model's strategies run with their k neighbours and, with `plain`, without
  ("no retrieval"); "dense/hybrid nearest neighbour" rows answer with its retriever's top code."""
  if not examples:
    raise ValueError("No examples to evaluate; check --data and --split.")
  descs = [e["description"] for e in examples]
  refs = [e["code"] for e in examples]
  rows: list[dict] = []
  outputs: dict[str, list[str]] = {}
  k = int(getattr(generator, "retrieval_k", 0))
  uses = k > 0 and retrieve is not False
  if uses:   # (retrieve argument, k of the row)
    arms = [(True, k)] + ([(False, 0)] if plain else [])
  else:
    arms = [(False if k else None, 0)]
  with summarised_truncation(generator, descs) as truncated:
    for strategy, rr in methods(strategies, rerank):
      for arm, arm_k in arms:
        name = method_name(strategy, rr) + (", no retrieval" if arm is False else "")
        cands = _generate(generator, descs, strategy, rr, decode, progress, name,
                          **({"retrieve": arm} if arm is not None else {}))
        outputs[name] = [c[0]["code"] for c in cands]
        finished = [c[0].get("finish_reason", "eos") == "eos" for c in cands]
        rows.append(_generation_row(name, outputs[name], refs, finished, arm_k))
    if uses:
      for how in ("dense", "hybrid"):
        top = generator.retrieve(descs, corpus, k=1, method=how)
        name = f"{how} nearest neighbour"
        outputs[name] = [t[0]["code"] if t else "" for t in top]
        rows.append(_generation_row(name, outputs[name], refs, k=1))
    if train_examples:
      outputs["BM25 nearest neighbour"] = _nearest_codes(descs, train_examples)
      rows.append(_generation_row("BM25 nearest neighbour", outputs["BM25 nearest neighbour"],
                                  refs))
    if retrieval:
      chunks = retrieval_chunks(len(examples), max_candidates)
      d_emb = _embed(generator, descs, "desc", decode.batch_size, progress)
      c_emb = _embed(generator, refs, "code", decode.batch_size, progress)
      align = [(d_emb[i] @ c_emb[i].T, c_emb[i] @ d_emb[i].T) for i in chunks]
      lexical = [(bm25.retrieval_scores([descs[j] for j in i], [refs[j] for j in i]),
                  bm25.retrieval_scores([refs[j] for j in i], [descs[j] for j in i]))
                 for i in chunks]
      rows += _retrieval_rows("alignment", align)
      rows += _retrieval_rows("BM25", lexical)
      rows += _retrieval_rows("alignment + BM25", [(fuse(ad, ld), fuse(ac, lc))
                                                   for (ad, ac), (ld, lc) in zip(align, lexical)])
  return _results("generation", len(examples), train_examples, rows, truncated,
                  show_examples(examples, outputs, num_show, num_random, seed),
                  settings=dict(strategies=list(strategies), rerank=rerank,
                                decode=dataclasses.asdict(decode), max_candidates=max_candidates))


def show_examples(examples: Sequence[dict], outputs: dict[str, list[str]], num_show: int,
                  num_random: int = 0, seed: int = 0) -> dict[str, Any]:
  """The `num_show` best and worst examples of the first method by sentence BLEU, and
  `num_random` drawn with `random.Random(seed)`, with every method's output side by side."""
  if not outputs or (num_show <= 0 and num_random <= 0):
    return {"best": [], "worst": [], "random": []}
  first = next(iter(outputs))
  scores = [metrics.sentence_bleu(h, e["code"]) for h, e in zip(outputs[first], examples)]
  order = np.argsort(scores, kind="stable")

  def case(i):
    return {"description": examples[i]["description"], "reference": examples[i]["code"],
            "sentence_bleu": scores[i], "ranked_by": first,
            "outputs": {name: out[i] for name, out in outputs.items()},
            **{k: examples[i][k] for k in ("path", "name", "task_id") if k in examples[i]}}
  n = max(0, min(num_show, len(order)))
  drawn = random.Random(seed).sample(range(len(examples)), min(num_random, len(examples)))
  return {"best": [case(int(i)) for i in order[::-1][:n]],
          "worst": [case(int(i)) for i in order[:n]],
          "random": [dict(case(i), index=i) for i in drawn], "random_seed": seed}


def evaluate_humaneval(generator, problems: Sequence[dict] | None = None,
                       strategies: Sequence[str] = ("greedy",), rerank: bool = False,
                       decode: DecodeSettings = DecodeSettings(),
                       train_examples: Sequence[dict] = (),
                       limits: sandbox.Limits = humaneval.DEFAULT_LIMITS,
                       workers: int | None = None, num_show: int = 3,
                       progress: bool | str = False) -> dict[str, Any]:
  """pass@1/10 on HumanEval (all 164 problems by default), every candidate run in the sandbox;
  unreranked sampling is scored as independent samples, other lists as ranked (`pass_at`)."""
  problems = humaneval.load_problems() if problems is None else list(problems)
  descs = [humaneval.description(p) for p in problems]
  rows: list[dict] = []
  outputs: dict[str, list[str]] = {}

  def score(name, cands, ranked):
    results = humaneval.execute(problems, cands, limits, workers, progress=progress is True)
    outputs[name] = [c[0] for c in cands]
    statuses = dict(collections.Counter(r.status for rs in results for r in rs))
    rows.append({"method": name, "kind": "humaneval", "examples": len(results),
                 "samples": "-".join(str(x) for x in sorted({len(r) for r in results})),
                 "parse_rate": metrics.parse_rate(outputs[name]),
                 **humaneval.pass_at(results, (1, 10), ranked=ranked), "statuses": statuses})
  with summarised_truncation(generator, descs) as truncated:
    for strategy, rr in methods(strategies, rerank):
      name = method_name(strategy, rr)
      score(name, [[c["code"] for c in cs] for cs in
                   _generate(generator, descs, strategy, rr, decode, progress, name)],
            ranked=rr or strategy != "sample")
  if train_examples:
    score("BM25 nearest neighbour", [[c] for c in _nearest_codes(descs, train_examples)], True)
  examples = [{"description": d, "code": p["prompt"] + p["canonical_solution"],
               "task_id": p["task_id"]} for d, p in zip(descs, problems)]
  return _results("humaneval", len(problems), train_examples, rows, truncated,
                  show_examples(examples, outputs, num_show), sandbox=sandbox.capabilities(),
                  settings=dict(strategies=list(strategies), rerank=rerank,
                                decode=dataclasses.asdict(decode),
                                limits=dataclasses.asdict(limits)))
