"""Unlabelled code (config.data.unlabelled): what is mined, what is kept out (valid/test files and
code), the token store split it lands in, determinism, and nothing changed when it is off."""
import collections
import textwrap

import ml_collections
import numpy as np
import pytest

from flax_albert_code import config as config_lib
from flax_albert_code.data import mining, prepared as prepared_lib, splits

FILTERS = mining.Filters(unlabelled=True)


def write_tree(root):
  for f in range(24):
    (root / f"m{f}.py").write_text("import os\n\nLIMIT = 3\n\n" + "".join(
        f'def f{f}_{g}(x):\n    """Scale x by {g} and add {f} to it."""\n'
        f'    return x * {g} + {f}\n\n'
        for g in range(4)))
  for f in range(4):   # no docstrings: no pairs, only unlabelled code
    (root / f"u{f}.py").write_text("".join(f"def u{f}_{g}(y):\n    return y - {g} * {f}\n\n"
                                           for g in range(3)))
  # Every documented function again: duplicates give no pairs, so this file's code is
  # unlabelled, except the functions that are some valid/test pair's code.
  (root / "zcopy.py").write_text("\n".join((root / f"m{f}.py").read_text() for f in range(24)))


@pytest.fixture
def tree(tmp_path):
  t = tmp_path / "src"
  t.mkdir()
  write_tree(t)
  return t


def collect(tree, **kw):
  return splits.collect([f"dir:{tree}"], FILTERS, seed=0, valid_fraction=0.2,
                        test_fraction=0.2, **kw)


def test_functions_whole_and_modules_in_chunks_within_the_limits():
  source = textwrap.dedent('''\
      """Module docstring."""
      import os

      # a comment before f
      def f(a):
          """Add one to a number."""
          return a + 1

      class C:
          def m(self):
              return 2
      ''') + "".join(f"X{i} = {i}\n" for i in range(30))
  filters = mining.Filters(unlabelled=True, max_code_lines=12, max_code_chars=400)
  skipped = collections.Counter()
  got = mining.mine_text(source, "p.py", "dir:x", filters, skipped)
  pairs = [g for g in got if isinstance(g, mining.Pair)]
  unl = [g for g in got if isinstance(g, mining.Unlabelled)]
  assert [p.name for p in pairs] == ["f"]
  funcs = {u.name: u for u in unl if u.name != "<module>"}
  assert set(funcs) == {"f", "C.m"}
  assert funcs["f"].code == 'def f(a):\n    """Add one to a number."""\n    return a + 1\n'
  # A documented function also carries the key of its code without the docstring: its pair's.
  assert funcs["f"].keys == (mining.code_key(funcs["f"].code), mining.code_key(pairs[0].code))
  assert funcs["C.m"].code == "def m(self):\n    return 2\n" and len(funcs["C.m"].keys) == 1
  chunks = [u for u in unl if u.name == "<module>"]
  assert len(chunks) > 2
  for u in chunks:
    assert u.code.count("\n") <= 12 and len(u.code) <= 400
    assert source.splitlines()[u.lineno - 1] == u.code.splitlines()[0]
  # Together the chunks are the module, in order; cuts fall between top-level statements.
  assert "".join(u.code for u in chunks).split() == source.split()
  assert chunks[0].code.startswith('"""Module docstring."""')
  assert any("# a comment before f\ndef f(a):" in u.code for u in chunks)   # kept together
  assert all(not u.code.startswith("    ") for u in chunks)


def test_a_long_statement_is_cut_between_lines_and_a_huge_line_dropped():
  source = "def big():\n" + "".join(f"    x{i} = {i}\n" for i in range(25)) + \
      "Y = '" + "a" * 500 + "'\n"
  filters = mining.Filters(unlabelled=True, max_code_lines=10, max_code_chars=400)
  skipped = collections.Counter()
  unl = mining.mine_text(source, "p.py", "dir:x", filters, skipped)
  assert all(u.name == "<module>" for u in unl)   # big() is too long to be one example
  assert skipped["unlabelled: function too long (its module's chunks hold it)"] == 1
  assert [u.code.count("\n") for u in unl] == [10, 10, 6]
  assert "a" * 500 not in "".join(u.code for u in unl)


def test_no_unlabelled_code_from_valid_test_files_or_of_valid_test_pairs(tree):
  got = collect(tree)
  assert all(got.splits.values()) and got.unlabelled
  held = [p for s in ("valid", "test") for p in got.splits[s]]
  held_paths = {p.path for p in held}
  held_keys = {mining.code_key(p.code) for p in held}
  assert not {u.path for u in got.unlabelled} & held_paths
  assert not {k for u in got.unlabelled for k in u.keys} & held_keys
  assert {u.path for u in got.unlabelled} >= {p.path for p in got.splits["train"]}
  assert any(u.path.endswith("/zcopy.py") for u in got.unlabelled)   # a file without pairs
  assert any(u.path.endswith("/u0.py") for u in got.unlabelled)
  assert got.skipped["unlabelled: code of a valid/test pair"] > 0
  assert got.skipped["unlabelled: from a valid/test file"] > 0
  keys = [u.keys[0] for u in got.unlabelled]
  assert len(keys) == len(set(keys))   # deduped
  # Same pairs as without unlabelled code.
  plain = splits.collect([f"dir:{tree}"], mining.Filters(), seed=0, valid_fraction=0.2,
                         test_fraction=0.2)
  assert plain.splits == got.splits and plain.unlabelled == []


def test_the_same_with_workers_and_a_fixed_cap(tree):
  serial = collect(tree, workers=1)
  assert collect(tree, workers=2).unlabelled == serial.unlabelled
  capped = collect(tree, max_unlabelled=10)
  assert len(capped.unlabelled) == 10 and collect(tree, max_unlabelled=10) == capped
  assert set(capped.unlabelled) <= set(serial.unlabelled)
  order = {u: i for i, u in enumerate(serial.unlabelled)}
  assert [order[u] for u in capped.unlabelled] == sorted(order[u] for u in capped.unlabelled)
  assert len({u.path for u in capped.unlabelled}) > 3   # a sample across files, not the first


def config_for(tree, **data):
  c = config_lib.get_config("tiny")
  c.data.update(sources=f"dir:{tree}", max_examples=0, tokenizer_vocab_size=400,
                valid_fraction=0.2, test_fraction=0.2, **data)
  return c


def test_prepare_writes_the_unlabelled_token_split(tree, tmp_path):
  prep = prepared_lib.prepare(config_for(tree, unlabelled=True), str(tmp_path / "w"))
  store = prep.tokens("unlabelled")
  n = prep.split_sizes["unlabelled"]
  assert n == len(store) == len(collect(tree).unlabelled) > 0
  assert prep.meta["unlabelled"]["functions"] + prep.meta["unlabelled"]["module_chunks"] == n
  assert not store.lengths["desc"].any() and store.lengths["code"].all()
  codes = [prep.tokenizer.decode(store.tokens("code", i)) for i in range(n)]
  held = {mining.code_key(e["code"]) for s in ("valid", "test") for e in prep.source(s)}
  assert not {mining.code_key(c) for c in codes} & held
  assert any(c.startswith("import os\n\nLIMIT = 3") for c in codes)   # module chunks
  with pytest.raises(ValueError, match="token ids only"):
    prep.source("unlabelled")
  text = prepared_lib.summary(prep, config_for(tree).data)
  assert f"unlabelled code: {n} examples" in text
  assert "prepared in" in text and "tokenizer" in text
  assert set(prep.meta["timing"]) >= {"mine", "tokenizer", "encode", "write", "total"}


def test_unlabelled_off_changes_nothing_of_the_pairs(tree, tmp_path):
  off = prepared_lib.prepare(config_for(tree), str(tmp_path / "w"))
  on = prepared_lib.prepare(config_for(tree, unlabelled=True), str(tmp_path / "w"))
  assert on.data_dir != off.data_dir   # part of the key
  assert "unlabelled" not in off.split_sizes and "unlabelled" not in off.meta
  assert {s: on.split_sizes[s] for s in splits.SPLITS} == off.split_sizes
  fields = ("description", "code", "path", "name", "lineno", "source")
  for split in splits.SPLITS:
    assert [{f: e[f] for f in fields} for e in on.source(split)] == \
        [{f: e[f] for f in fields} for e in off.source(split)]
  with pytest.raises(ValueError, match="no unlabelled split"):
    off.tokens("unlabelled")
  with pytest.raises(ValueError, match="Unknown split 'unlabeled'"):
    off.tokens("unlabeled")
  assert splits.canonical_split("validation") == "valid"
  with pytest.raises(ValueError, match="Unknown split 'unlabelled'"):
    splits.canonical_split("unlabelled")   # not a split of pairs
  np.testing.assert_array_equal(off.source("train")[0]["code_tokens"],
                                off.tokenizer.encode(off.source("train")[0]["code"]))


def test_a_config_saved_before_the_fields_prepares_as_their_defaults(tree, tmp_path):
  c = config_for(tree)
  old = config_for(tree).to_dict()
  for f in ("unlabelled", "max_unlabelled"):
    del old["data"][f]
  old = ml_collections.ConfigDict(old)
  assert prepared_lib.options(old.data) == prepared_lib.options(c.data)
  work = str(tmp_path / "w")
  assert prepared_lib.prepare(old, work).data_dir == prepared_lib.prepare(c, work).data_dir
  with pytest.raises(prepared_lib.DataError, match="max_unlabelled=-1 is negative"):
    prepared_lib.prepare(config_for(tree, unlabelled=True, max_unlabelled=-1), work)
