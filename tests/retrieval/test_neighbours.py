"""BM25 neighbour mining's fast top-k (float32 blocks in threads, argmax top-k, excluded files by
index) against a brute-force ranking, and neighbours.mine on a small preparation."""
import numpy as np
import pytest

from flax_albert_code import config as config_lib
from flax_albert_code.data import prepared as prepared_lib
from flax_albert_code.retrieval import neighbours
from flax_albert_code.retrieval import bm25 as bm25_lib
from flax_albert_code.retrieval import retriever as retriever_lib

WORDS = ["read", "file", "path", "add", "sum", "list", "sort", "key", "open", "line"]


def corpus(n, seed):
  rng = np.random.default_rng(seed)
  docs = [" ".join(rng.choice(WORDS, rng.integers(1, 8))) for _ in range(n)]
  docs[5] = docs[3]          # exact ties
  queries = [" ".join(rng.choice(WORDS, rng.integers(0, 4))) for _ in range(n // 2)]
  groups = [f"g{i // 3}" for i in range(n)]
  return docs, queries, groups


def brute_force(docs, queries, groups, exclude, k):
  """Best first by float64 score, ties to the lower index; excluded groups never."""
  index = bm25_lib.BM25([bm25_lib.words(d) for d in docs])
  ids = np.full((len(queries), k), -1)
  for q, text in enumerate(queries):
    s = index.scores(bm25_lib.words(text))
    allowed = [i for i in range(len(docs)) if groups[i] != exclude[q]]
    best = sorted(allowed, key=lambda i: (-s[i], i))[:k]
    ids[q, :len(best)] = best
  return ids, index


@pytest.mark.parametrize("k,chunk", [(1, 7), (3, 1024), (12, 5)])
def test_bm25_top_k_equals_a_brute_force_ranking(k, chunk):
  docs, queries, groups = corpus(40, seed=k)
  exclude = [groups[(7 * q) % len(groups)] for q in range(len(queries))]
  want, index = brute_force(docs, queries, groups, exclude, k)
  r = retriever_lib.Retriever(docs, groups=groups)
  got, scores = r.search(queries, k, method="bm25", exclude=exclude, chunk=chunk)
  for q in range(len(queries)):
    s = index.scores(bm25_lib.words(queries[q]))
    # The same scores in the same order (float32); the same ids wherever scores do not tie.
    np.testing.assert_allclose(scores[q], s[want[q]], rtol=1e-5)
    if k <= 8:   # argmax top-k: ties go to the lower index, exactly as the brute force
      np.testing.assert_array_equal(got[q], want[q])
    assert not {groups[i] for i in got[q]} & {exclude[q]}


def test_bm25_float32_score_matrix_matches_float64():
  docs, queries, _ = corpus(30, seed=0)
  index = bm25_lib.BM25([bm25_lib.words(d) for d in docs])
  words = [bm25_lib.words(q) for q in queries]
  s64, s32 = index.score_matrix(words), index.score_matrix(words, np.float32)
  assert s64.dtype == np.float64 and s32.dtype == np.float32
  np.testing.assert_allclose(s32, s64, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(s64[1], index.scores(words[1]))


def test_top_k_marks_missing_with_minus_one():
  s = np.array([[1.0, -np.inf, 2.0, 2.0], [-np.inf] * 4], np.float32)
  for k in (3, 9):
    ids, scores = retriever_lib.top_k(s.copy(), k)
    assert ids[0, :3].tolist() == [2, 3, 0] and ids[1, :3].tolist() == [-1] * 3
    assert scores[0, :3].tolist() == [2.0, 2.0, 1.0]


def test_mine_excludes_own_file_in_every_split(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for f in range(20):
    (src / f"m{f}.py").write_text("".join(
        f'def f{f}_{g}(x):\n    """Scale the value x by {g} and add {f}."""\n    return x * {g}\n\n'
        for g in range(3)))
  c = config_lib.get_config("tiny")
  c.data.update(sources=f"dir:{src}", max_examples=0, tokenizer_vocab_size=300,
                valid_fraction=0.2, test_fraction=0.2)
  prep = prepared_lib.prepare(c, str(tmp_path / "w"))
  nb = neighbours.mine(prep, 2, "bm25")
  train_paths = [e["path"] for e in prep.source("train")]
  for split in ("train", "valid", "test"):
    assert nb.ids[split].shape == (prep.split_sizes[split], 2)
    paths = [e["path"] for e in prep.source(split)]
    for q, row in enumerate(nb.ids[split]):
      assert all(i >= 0 and train_paths[i] != paths[q] for i in row)
