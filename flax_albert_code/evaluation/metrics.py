"""Pure metrics: code BLEU-4, exact match, parse rate, retrieval MRR/recall@k, pass@k.

Scores are percentages (0-100) except `pass_at_k`, a probability, and MRR (0-1)."""
from __future__ import annotations

import itertools
import re
import warnings
from typing import Sequence

import numpy as np
import sacrebleu

from flax_albert_code.inference.postprocess import parses

# One token per string literal (with prefix, triple or single quoted, escapes kept), comment,
# identifier, number, multi-character operator, or any other single non-space character.
_CODE_TOKEN = re.compile(r"""
    (?:[rRbBuUfF]{0,2})(?:'''[\s\S]*?'''|\"\"\"[\s\S]*?\"\"\"|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*")
  | \#[^\n]*
  | [^\W\d]\w*
  | 0[xXoObB][0-9a-fA-F_]+ | (?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?[jJ]?
  | \*\*=|//=|>>=|<<=|\.\.\.|->|:=|==|!=|<=|>=|\*\*|//|<<|>>|[-+*/%&|^@]=
  | \S
""", re.VERBOSE)
_WS = re.compile(r"\s")


def code_tokens(code: str) -> list[str]:
  return _CODE_TOKEN.findall(code)


def tokenized(code: str) -> str:
  """Code as space-separated tokens, with whitespace inside tokens (strings, comments) escaped."""
  return " ".join(_WS.sub(lambda m: f"\\u{ord(m.group()):04x}", t) for t in code_tokens(code))


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Corpus BLEU-4 over code tokens (sacrebleu defaults: exp smoothing, tokenize none); 0-100."""
  return bleu_details(hypotheses, references)["bleu"] if hypotheses else 0.0


def bleu_details(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
  """`bleu` with its parts: {"bleu", "bp" (brevity penalty), "precisions" (1-4-gram, %),
  "hyp_len", "ref_len"} in code tokens: a low BLEU of short outputs is the penalty, not n-grams."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    b = sacrebleu.corpus_bleu([tokenized(h) for h in hypotheses],
                              [[tokenized(r) for r in references]], tokenize="none", force=True)
  return {"bleu": float(b.score), "bp": float(b.bp), "precisions": [float(x) for x in b.precisions],
          "hyp_len": int(b.sys_len), "ref_len": int(b.ref_len)}


def sentence_bleu(hypothesis: str, reference: str) -> float:
  """Smoothed sentence BLEU over code tokens, for ranking single examples; 0-100."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return float(sacrebleu.sentence_bleu(tokenized(hypothesis), [tokenized(reference)],
                                         tokenize="none").score)


def exact_match(hypothesis: str, reference: str) -> bool:
  """Equal once whitespace outside string literals and comments is ignored."""
  return code_tokens(hypothesis) == code_tokens(reference)


def exact_match_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  if not hypotheses:
    return 0.0
  return 100.0 * float(np.mean([exact_match(h, r) for h, r in zip(hypotheses, references)]))


def parse_rate(codes: Sequence[str]) -> float:
  """Percent of `codes` that are code (`postprocess.parses`, as generation's "parses")."""
  return 100.0 * float(np.mean([parses(c) for c in codes])) if codes else 0.0


def degenerate(code: str, finished: bool = True, repeats: int = 3) -> bool:
  """A looping output: one non-blank line `repeats`+ times in a row, or (`finished` False) no
  EOS before the token limit."""
  lines = [line.strip() for line in code.splitlines() if line.strip()]
  return not finished or any(len(list(run)) >= repeats for _, run in itertools.groupby(lines))


def degenerate_rate(codes: Sequence[str], finished: Sequence[bool] | None = None) -> float:
  if not codes:
    return 0.0
  finished = [True] * len(codes) if finished is None else finished
  return 100.0 * float(np.mean([degenerate(c, f) for c, f in zip(codes, finished)]))


def ranks(scores_QxC: np.ndarray, targets: Sequence[int] | None = None) -> np.ndarray:
  """1-based rank of each query's target column (default: the diagonal); a tie ranks above the
  target (CodeSearchNet's `scores >= correct`), so a constant scorer gets no credit."""
  scores_QxC = np.asarray(scores_QxC, dtype=np.float64)
  q = scores_QxC.shape[0]
  targets = np.arange(q) if targets is None else np.asarray(targets)
  correct_Q = scores_QxC[np.arange(q), targets]
  return (scores_QxC >= correct_Q[:, None]).sum(axis=1)


def retrieval_metrics(scores_QxC: np.ndarray, targets: Sequence[int] | None = None,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """MRR (0-1) and recall@k (percent) of the target among the candidates."""
  r = ranks(scores_QxC, targets)
  return {"mrr": float(np.mean(1.0 / r)), **{f"r@{k}": 100.0 * float(np.mean(r <= k)) for k in ks}}


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), n samples of which c pass."""
  if k > n:
    raise ValueError(f"pass@{k} needs at least {k} samples, got {n}.")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
