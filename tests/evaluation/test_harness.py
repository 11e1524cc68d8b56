"""Metrics on hand-made cases, BM25, and `evaluate` end to end with a fake generator."""
import itertools
import json
import math
import random

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from flax_albert_code.evaluation import harness
from flax_albert_code.evaluation import metrics, report
from flax_albert_code.retrieval import bm25

CODE = '''def area(radius: float) -> float:
    """Circle area."""
    return 3.14159 * radius ** 2  # pi r^2
'''


# ---------------------------------------------------------------- metrics

def test_code_tokens_keep_strings_comments_and_operators_whole():
  toks = metrics.code_tokens("x **= f'a b' # c d\ny //= 0x1F >= 1.5e-3")
  assert toks == ["x", "**=", "f'a b'", "# c d", "y", "//=", "0x1F", ">=", "1.5e-3"]


def test_identical_code_has_bleu_100_and_unrelated_code_0():
  assert metrics.bleu([CODE, "x = 1\n"], [CODE, "x = 1\n"]) == pytest.approx(100.0)
  assert metrics.bleu(["while q: pass"], [CODE]) < 1.0


def test_bleu_sees_code_tokens_not_whitespace_words():
  # "a+b" and "a + b" are the same tokens; a whitespace split would see 1 vs 3 words.
  assert metrics.bleu(["y = a+b*c-d/e"], ["y = a + b * c - d / e"]) == pytest.approx(100.0)
  # Whitespace inside a string literal matters: one token differs.
  assert metrics.bleu(['s = "a  b" + t + u + v'], ['s = "a b" + t + u + v']) < 100.0


def test_bleu_details_split_a_short_output_into_its_brevity_penalty():
  ref = "def f(x):\n  y = x + 1\n  return y * 2\n"
  d = metrics.bleu_details(["def f(x):\n  return x"], [ref])
  assert d["bleu"] == pytest.approx(metrics.bleu(["def f(x):\n  return x"], [ref]))
  assert (d["hyp_len"], d["ref_len"]) == (8, 15) and d["precisions"][0] == pytest.approx(100.0)
  assert d["bp"] == pytest.approx(np.exp(1 - 15 / 8))


def test_exact_match_ignores_whitespace_outside_strings_only():
  assert metrics.exact_match("def f(a,b):\n  return a+b", "def f(a, b):\n    return a + b")
  assert not metrics.exact_match('x = "a b"', 'x = "a  b"')
  assert not metrics.exact_match("x = 1", "x = 2")
  assert metrics.exact_match_rate(["a", "b"], ["a", "c"]) == 50.0


def test_parse_rate_counts_ast_parse():
  assert metrics.parses(CODE)
  assert not metrics.parses("def f(:\n")
  assert not metrics.parses("x = '\0'\x00")
  assert metrics.parse_rate([CODE, "def f(:", "pass", "("]) == 50.0


def test_perfect_ranking_has_mrr_1():
  m = metrics.retrieval_metrics(np.eye(5) + 0.01)
  assert m == {"mrr": 1.0, "r@1": 100.0, "r@5": 100.0, "r@10": 100.0}


def test_known_ranking_mrr_by_hand():
  scores = np.array([[0.9, 0.1, 0.5, 0.0],   # target 0.9 first           -> rank 1
                     [0.8, 0.2, 0.1, 0.3],   # 0.8, 0.3 above 0.2         -> rank 3
                     [0.4, 0.6, 0.5, 0.1],   # 0.6 above 0.5              -> rank 2
                     [0.7, 0.7, 0.7, 0.7]])  # all tie; ties count against -> rank 4
  np.testing.assert_array_equal(metrics.ranks(scores), [1, 3, 2, 4])
  m = metrics.retrieval_metrics(scores, ks=(1, 2))
  assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 4) / 4)
  assert m["r@1"] == 25.0 and m["r@2"] == 50.0
  # Explicit targets: same scores, query 3's target is column 0 (still a 4-way tie).
  assert metrics.ranks(scores, targets=[2, 0, 1, 0]).tolist() == [2, 1, 1, 4]


@hypothesis.given(st.integers(1, 12).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_formula_and_brute_force(nck):
  n, c, k = nck
  got = metrics.pass_at_k(n, c, k)
  assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
  # Brute force: the share of k-subsets of the n samples that contain a passing one.
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(samples, k))
  assert got == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_edges():
  assert metrics.pass_at_k(10, 0, 1) == 0.0
  assert metrics.pass_at_k(10, 10, 10) == 1.0
  assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
  with pytest.raises(ValueError):
    metrics.pass_at_k(5, 1, 10)


# ---------------------------------------------------------------- BM25

def test_bm25_words_split_identifiers():
  assert bm25.words("readFile_v2 HTTPServer") == ["read", "file", "v", "2", "http", "server"]


def test_bm25_scores_match_hand_computation():
  docs = [["a", "b"], ["a", "a", "c"], ["d"]]
  index = bm25.BM25(docs)
  avg = 2.0
  idf_a = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
  norm = 1.5 * (1 - 0.75 + 0.75 * 3 / avg)
  expected = idf_a * 2 * 2.5 / (2 + norm)
  assert index.scores(["a"])[1] == pytest.approx(expected)
  assert index.scores(["a"])[2] == 0.0
  assert index.scores(["zzz"]).tolist() == [0.0, 0.0, 0.0]


def test_bm25_nearest_neighbour_and_retrieval():
  train = ["read a file into a string", "sort a list of numbers", "open a network socket"]
  assert bm25.nearest_neighbour(["sort numbers in a list", "read file"], train).tolist() == [1, 0]
  codes = ["def read_file(path): ...", "def sort_numbers(xs): ...", "def open_socket(): ..."]
  s = bm25.retrieval_scores(train, codes)
  assert s.shape == (3, 3) and (s.argmax(axis=1) == np.arange(3)).all()


# ---------------------------------------------------------------- evaluate with a fake generator

def _vector(text, dim=64):
  v = np.zeros(dim, np.float32)
  for w in bm25.words(text):
    v[hash(w) % dim] += 1.0
  return v / max(np.linalg.norm(v), 1e-6)


class FakeGenerator:
  """Answers the reference for even-numbered examples and junk (that does not parse) otherwise;
  reranking swaps in the reference for every example. Embeds with a bag of words."""

  def __init__(self, examples):
    self.answers = {e["description"]: (i, e["code"]) for i, e in enumerate(examples)}
    self.calls = []

  def generate(self, descriptions, strategy="greedy", num_samples=1, num_beams=4, temperature=1.0,
               top_k=0, top_p=1.0, rerank=False, max_new_tokens=None, seed=0):
    self.calls.append((strategy, num_samples, rerank, len(descriptions)))
    out = []
    for d in descriptions:
      i, code = self.answers[d]
      good = rerank or i % 2 == 0
      cands = [{"code": code if good else "def broken(:", "score": 0.0, "align": None,
                "parses": good}]
      cands += [{"code": "pass", "score": -1.0, "align": None, "parses": True}] * (num_samples - 1)
      out.append(cands)
    return out

  def embed(self, texts, kind="desc"):
    return np.stack([_vector(t) for t in texts])


def _examples(n):
  topics = ["parse json config", "sort user records", "compute file checksum", "resize image",
            "send email message", "merge two dicts", "count word frequency", "retry http request"]
  return [{"description": f"{topics[i % len(topics)]} variant {i}",
           "code": f"def {topics[i % len(topics)].replace(' ', '_')}_{i}(x):\n    return x + {i}\n",
           "path": f"m{i}.py", "name": f"f{i}"} for i in range(n)]


def test_evaluate_with_fake_generator_end_to_end(tmp_path):
  examples = _examples(10)
  train = _examples(26)[10:]  # the same topics as the test examples, other code
  gen = FakeGenerator(examples)
  results = harness.evaluate(
      gen, examples, train, strategies=("greedy", "sample"), rerank=True,
      decode=harness.DecodeSettings(num_samples=3, batch_size=4), max_candidates=4,
      num_random=3, seed=7)
  rows = {r["method"]: r for r in results["rows"]}
  assert list(rows) == ["greedy", "sample", "sample + align rerank", "BM25 nearest neighbour",
                        "alignment desc→code", "alignment code→desc", "BM25 desc→code",
                        "BM25 code→desc", "alignment + BM25 desc→code",
                        "alignment + BM25 code→desc"]
  assert rows["greedy"]["exact_match"] == 50.0 and rows["greedy"]["parse_rate"] == 50.0
  assert rows["sample + align rerank"]["exact_match"] == 100.0
  assert rows["sample + align rerank"]["bleu"] == pytest.approx(100.0)
  assert 0 < rows["BM25 nearest neighbour"]["bleu"] < 100
  assert rows["BM25 nearest neighbour"]["exact_match"] == 0.0
  # 10 examples in chunks of at most 4 -> 3 chunks of 3-4 candidates; MRR within (0, 1].
  for name in ("alignment desc→code", "BM25 code→desc"):
    assert rows[name]["candidates"] == "3-4" and rows[name]["examples"] == 10
    assert 0 < rows[name]["mrr"] <= 1
  # Sampling asked for all samples; greedy for one; batches of 4.
  assert ("sample", 3, True, 4) in gen.calls and ("greedy", 1, False, 2) in gen.calls
  best, worst = results["examples"]["best"], results["examples"]["worst"]
  assert best[0]["sentence_bleu"] == pytest.approx(100.0)
  assert worst[0]["outputs"]["greedy"] == "def broken(:"
  # Random examples: drawn by the seed, not by score, each with its index and every output.
  drawn = results["examples"]["random"]
  assert [d["index"] for d in drawn] == random.Random(7).sample(range(10), 3)
  assert all(d["reference"] == examples[d["index"]]["code"] and "greedy" in d["outputs"]
             for d in drawn)
  json_path, md_path = report.write(results, str(tmp_path))
  assert json.load(open(json_path))["rows"][0]["method"] == "greedy"
  md = open(md_path).read()
  assert "| sample + align rerank | " in md and "| BM25 nearest neighbour |" in md
  assert "Worst examples" in md and "def broken(:" in md
  assert "Random examples (random.Random(7)" in md


def test_fusion_adds_per_query_z_scores():
  """Hybrid retrieval: each method's scores standardised over a query's candidates, summed; a
  method that scales its scores has no more say than one that does not."""
  a = np.array([[3.0, 1.0, 2.0], [0.0, 0.0, 6.0]])
  b = np.array([[10.0, 30.0, 20.0], [1.0, 2.0, 3.0]])
  fused = harness.fuse(a, b)
  z = lambda x: (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
  np.testing.assert_allclose(fused, z(a) + z(b))
  np.testing.assert_allclose(harness.fuse(a, 1000 * b), fused, atol=1e-12)
  assert np.isfinite(harness.fuse(np.ones((1, 3)), b[:1])).all()   # ties: z = 0
  # Two half-right rankers: each has the target second once; fused, it is first both times.
  align = np.array([[0.9, 1.0, 0.0], [0.2, 0.9, 1.0]])
  lexical = np.array([[1.0, 0.1, 0.9], [0.0, 1.0, 0.8]])
  assert (np.argmax(harness.fuse(align, lexical), 1) == [0, 1]).all()


def test_retrieval_chunks_follow_codesearchnet():
  assert [len(c) for c in harness.retrieval_chunks(2500)] == [834, 833, 833]
  assert [len(c) for c in harness.retrieval_chunks(1000)] == [1000]
  assert np.concatenate(harness.retrieval_chunks(2001)).tolist() == list(range(2001))


def test_unknown_strategy_is_an_error():
  with pytest.raises(ValueError, match="Unknown decoding strategy"):
    harness.methods(["nucleus"], rerank=False)


def test_report_table_leaves_blanks_where_a_metric_does_not_apply():
  md = report.table([{"method": "greedy", "bleu": 12.345, "examples": 3},
                     {"method": "BM25 desc→code", "mrr": 0.5, "candidates": "1000"}])
  assert md.splitlines()[0] == "| method | BLEU | MRR | candidates | examples |"
  assert md.splitlines()[2] == "| greedy | 12.35 |  |  | 3 |"
  assert md.splitlines()[3] == "| BM25 desc→code |  | 0.500 | 1000 |  |"


# ---------------------------------------------------------------- the CLI with a fake checkpoint

class _Prepared:
  def __init__(self, splits):
    self.splits = splits

  def source(self, split):
    yield from self.splits[split]


def test_evaluate_cli_writes_reports(tmp_path, monkeypatch, capsys):
  import sys
  import types
  from flax_albert_code import evaluate as cli
  test, train = _examples(6), _examples(20)[6:]
  jsonl = tmp_path / "extra.jsonl"
  jsonl.write_text("".join(json.dumps({"description": e["description"], "code": e["code"]}) + "\n"
                           for e in test))

  class FakeCheckpointGenerator(FakeGenerator):
    loaded = []

    @classmethod
    def from_checkpoint(cls, path):
      cls.loaded.append(path)
      gen = cls(test)
      gen.prepared = _Prepared({"train": train, "test": test})
      return gen
  # Both the module table and the package attribute: `from flax_albert_code.inference import
  # generator` reads the attribute once another test has imported the real module.
  import flax_albert_code.inference as inference_pkg
  fake = types.SimpleNamespace(CodeGenerator=FakeCheckpointGenerator)
  monkeypatch.setitem(sys.modules, "flax_albert_code.inference.generator", fake)
  monkeypatch.setattr(inference_pkg, "generator", fake, raising=False)
  from flax_albert_code import cli as cli_utils  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(cli_utils, "check_decoding", lambda *a, **decode: None)   # no config
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  results = cli.main(["--checkpoint", str(ckpt), "--strategies", "greedy,beam", "--rerank",
                      "--max-examples", "4"])
  assert FakeCheckpointGenerator.loaded == [str(ckpt)]
  assert results["num_examples"] == 4 and results["num_train_examples"] == 14
  assert [r["method"] for r in results["rows"]][:4] == [
      "greedy", "beam", "beam + align rerank", "BM25 nearest neighbour"]
  assert (ckpt / "report.json").exists() and "| beam + align rerank |" in capsys.readouterr().out
  out = tmp_path / "out"
  results = cli.main(["--checkpoint", str(ckpt), "--data", f"jsonl:{jsonl}", "--out", str(out),
                      "--no-baselines", "--no-retrieval"])
  assert results["num_examples"] == 6 and results["rows"][0]["exact_match"] == 50.0
  assert (out / "report.md").read_text().startswith(f"# Evaluation: jsonl:{jsonl} (test)")


def test_empty_output_does_not_count_as_parsing():
  assert not metrics.parses("")
  assert not metrics.parses("# only a comment\n")
  assert not metrics.parses("def" + "_" * 40)   # a degenerate model output seen on the GPU
  assert metrics.parses("def f():\n  return 1\n")
