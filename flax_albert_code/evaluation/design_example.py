"""The source design's own example, run: does the model's first function `f` pass
`f(2, 3) == 5` and `f(-4, 10) == 6` in the sandbox?"""
from __future__ import annotations

import ast
from typing import Any, Sequence

from flax_albert_code.evaluation import sandbox
from flax_albert_code.retrieval import retriever

DESCRIPTION = "create a function that takes two integers and returns their sum"
CHECKS = ((2, 3, 5), (-4, 10, 6))


def first_function(code: str) -> str | None:
  """The name of the first top-level function `code` defines, or None (or unparsable)."""
  try:
    body = ast.parse(code).body
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None
  return next((n.name for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
              None)


def check(code: str, limits: sandbox.Limits = sandbox.Limits(timeout_s=5.0)) -> sandbox.Result:
  """Runs `code` and asserts its first function adds; the detail as the sandbox's stderr."""
  try:
    compile(code, "program.py", "exec", dont_inherit=True)
  except SyntaxError as e:   # as the sandbox would report it, without starting one
    return sandbox.Result(False, "error", f'  File "program.py", line {e.lineno}\n'
                                          f"{type(e).__name__}: {e.msg}\n")
  except (ValueError, RecursionError, MemoryError) as e:
    return sandbox.Result(False, "error", f"{type(e).__name__}: {e}\n")
  name = first_function(code)
  if name is None:
    return sandbox.Result(False, "error", "no top-level function to call\n")
  asserts = "\n".join(f"assert {name}({a}, {b}) == {c}, "
                      f"'{name}({a}, {b}) returned %r' % ({name}({a}, {b}),)" for a, b, c in CHECKS)
  return sandbox.run(f"{code}\n\n{asserts}\n", limits)


def run(generator, strategies: Sequence[str] = ("greedy", "beam"), num_beams: int = 4,
        **generate_kw) -> list[dict[str, Any]]:
  """Generates the example with each strategy and checks it; "reason" is `sandbox.describe`'s
  words ("" for a pass)."""
  out = []
  for strategy in strategies:
    cand = generator.generate([DESCRIPTION], strategy=strategy, num_beams=num_beams,
                              **generate_kw)[0][0]
    result = check(cand["code"])
    out.append({"strategy": strategy, "code": cand["code"],
                "neighbours": cand.get("neighbours", []), "passed": result.passed,
                "status": result.status, "reason": sandbox.describe(result)})
  return out


def format_results(results: Sequence[dict[str, Any]]) -> str:
  lines = [f"# {DESCRIPTION}"]
  for r in results:
    verdict = "passes" if r["passed"] else f"does not pass ({r.get('reason') or r['status']})"
    lines.append(f"## {r['strategy']}: f(2, 3) == 5 {verdict}")
    lines.extend(retriever.neighbour_lines(r["neighbours"]))
    lines.append(r["code"].rstrip("\n"))
  return "\n".join(lines)
