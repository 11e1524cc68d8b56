"""The real standard library: counts, no split leakage, determinism, exact tokenizer round trip."""
import ast
import os
import sysconfig

import pytest

from flax_albert_code import tokenizer as tokenizer_lib
from flax_albert_code.data import mining, splits

FILTERS = mining.Filters()  # the config defaults: 3 words, 80 lines, 4000 chars


@pytest.fixture(scope="module")
def stdlib():
  return splits.collect(["stdlib"], FILTERS, seed=0, valid_fraction=0.05, test_fraction=0.05)


def test_counts_are_sane(stdlib):
  sizes = {s: len(p) for s, p in stdlib.splits.items()}
  total = sum(sizes.values())
  # ~7,800 pairs from 1,790 files on CPython 3.11; 5,405 from 668 files on Debian's python3.11,
  # which leaves the test suite (test/, python3-test) out of the standard library: a venv of it.
  assert 5_000 < total < 20_000, sizes
  assert total == len(stdlib.pairs)
  assert 0.04 < sizes["valid"] / total < 0.06 and 0.04 < sizes["test"] / total < 0.06, sizes
  assert stdlib.units_read == stdlib.units_total > 500
  assert stdlib.skipped["pair: duplicate code"] > 0
  # Files that do not parse (lib2to3's test data and friends) are counted; Debian's python3.11
  # leaves them out.
  if os.path.isdir(os.path.join(sysconfig.get_paths()["stdlib"], "lib2to3", "tests", "data")):
    assert stdlib.skipped["file: syntax error"] > 0
  assert all(len(p.description.split()) >= 3 and len(p.code) <= 4000 for p in stdlib.pairs)
  sample = stdlib.pairs[::50]
  assert all(ast.parse(p.code) for p in sample)
  assert all(p.source == "stdlib" and p.path.startswith("stdlib/") for p in sample)


def test_no_file_in_two_splits(stdlib):
  files = {s: {p.path for p in ps} for s, ps in stdlib.splits.items()}
  assert not files["train"] & files["valid"]
  assert not files["train"] & files["test"]
  assert not files["valid"] & files["test"]
  keys = [mining.code_key(p.code) for p in stdlib.pairs]
  assert len(set(keys)) == len(keys)  # deduped


def test_splits_are_deterministic_per_seed(stdlib):
  names = lambda by_split: {s: [(p.path, p.name) for p in ps] for s, ps in by_split.items()}  # noqa: E731
  again = splits.assign_splits(stdlib.pairs, 0, 0.05, 0.05)
  assert names(again) == names(stdlib.splits)
  other = splits.assign_splits(stdlib.pairs, 1, 0.05, 0.05)
  assert names(other)["test"] != names(stdlib.splits)["test"]


def test_max_examples_stops_early_with_the_same_first_pairs(stdlib):
  small = splits.collect(["stdlib"], FILTERS, max_examples=300)
  assert small.units_read < stdlib.units_total // 5
  assert [(p.path, p.name, p.code) for p in small.pairs] == \
      [(p.path, p.name, p.code) for p in stdlib.pairs[:300]]
  assert all(small.splits.values())  # a few hundred pairs still fill every split


def test_tokenizer_round_trips_every_test_code_sample(stdlib, tmp_path):
  train = stdlib.splits["train"][:1000]
  tok = tokenizer_lib.train_tokenizer([p.description for p in train] + [p.code for p in train],
                                      str(tmp_path / "spm.model"), vocab_size=2000)
  codes = [p.code for p in stdlib.splits["test"]]
  descs = [p.description for p in stdlib.splits["test"]]
  assert len(codes) > 200   # 263 on Debian's python3.11
  failures = [c for ids, c in zip(tok.encode_batch(codes), codes) if tok.decode(ids) != c]
  failures += [d for ids, d in zip(tok.encode_batch(descs), descs) if tok.decode(ids) != d]
  assert failures == []
  assert sum(map(len, tok.encode_batch(codes))) < sum(map(len, codes)) / 2  # real compression


def test_parallel_mining_equals_serial(stdlib):
  """Worker processes read files in order: the same pairs, skips and splits as one process."""
  serial = splits.collect(["stdlib"], FILTERS, seed=0, valid_fraction=0.05, test_fraction=0.05,
                          workers=1)
  assert serial.pairs == stdlib.pairs and serial.skipped == stdlib.skipped
  parallel = splits.collect(["stdlib"], FILTERS, max_examples=400, workers=2)
  assert parallel.pairs == serial.pairs[:400]
