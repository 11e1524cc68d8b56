"""Sources on small trees with nasty files, a CodeSearchNet fixture, jsonl with bad lines, TFDS."""
import collections
import gzip
import json

import pytest

from flax_albert_code.data import builder, mining, sources, splits

GOOD = 'def {name}(x):\n    """Return x plus {n} for the caller."""\n    return x + {n}\n'


def read_all(spec, filters=mining.Filters()):
  skipped = collections.Counter()
  pairs = [p for u in sources.units(spec) for p in u.read(filters, skipped)]
  return pairs, skipped


@pytest.fixture
def nasty_tree(tmp_path):
  root = tmp_path / "repo"
  (root / "pkg").mkdir(parents=True)
  (root / "pkg" / "good.py").write_text(GOOD.format(name="f", n=1) + GOOD.format(name="g", n=2))
  (root / "pkg" / "latin1_declared.py").write_bytes(
      b"# -*- coding: latin-1 -*-\n"
      + GOOD.format(name="h", n=3).encode().replace(b"caller", b"caf\xe9"))
  (root / "binary.py").write_bytes(b"\x00\x01\x02def f(): pass\n")
  (root / "not_utf8.py").write_bytes(GOOD.format(name="k", n=4).encode() + b"# \xff\xfe\n")
  (root / "syntax.py").write_text("def broken(:\n    '''A broken function here.'''\n")
  (root / "empty.py").write_text("")
  (root / "huge.py").write_text("x = 1\n" * 50_000)
  (root / "notes.txt").write_text(GOOD.format(name="t", n=5))  # not .py: ignored
  (root / "__pycache__").mkdir()
  (root / "__pycache__" / "cached.py").write_text(GOOD.format(name="c", n=6))
  return root


def test_nasty_files_are_skipped_and_counted(nasty_tree):
  pairs, skipped = read_all(f"dir:{nasty_tree}", mining.Filters(max_file_bytes=100_000))
  assert sorted(p.name for p in pairs) == ["f", "g", "h"]
  assert skipped == {"file: binary": 1, "file: not UTF-8 (nor its declared encoding)": 1,
                     "file: syntax error": 1, "file: empty": 1, "file: too large": 1}
  h = next(p for p in pairs if p.name == "h")
  assert h.description == "Return x plus 3 for the caf\u00e9."
  assert h.path == "repo/pkg/latin1_declared.py" and h.source == f"dir:{nasty_tree}"


def test_unit_order_is_fixed_and_not_alphabetical(nasty_tree):
  labels = [u.label for u in sources.units(f"dir:{nasty_tree}")]
  assert labels == [u.label for u in sources.units(f"dir:{nasty_tree}")]
  assert sorted(labels) == sorted(f"repo/{n}" for n in (
      "pkg/good.py", "pkg/latin1_declared.py", "binary.py", "not_utf8.py", "syntax.py",
      "empty.py", "huge.py"))


def test_bad_specs_and_missing_paths_raise_one_sentence(tmp_path):
  with pytest.raises(sources.DataError, match="does not exist; fix the path"):
    sources.units(f"dir:{tmp_path / 'missing'}")
  with pytest.raises(sources.DataError, match="Unknown data source 'ftp:x'"):
    sources.parse_specs("stdlib,ftp:x")
  with pytest.raises(sources.DataError, match="Unknown data source 'dir'"):
    sources.parse_specs("dir")
  with pytest.raises(sources.DataError, match="empty"):
    sources.parse_specs(" , ")
  (tmp_path / "x.txt").write_text("")
  with pytest.raises(sources.DataError, match="no .jsonl.gz or .jsonl files"):
    sources.units(f"csn:{tmp_path}")
  with pytest.raises(sources.DataError, match="cannot open the TFDS dataset"):
    sources.units("tfds:surely_not_a_dataset_name_123")


def csn_row(i, partition, **extra):
  code = (f'def func_{i}(a):\n    """Compute the thing number {i} for a.\n\n    Args: a.\n    """\n'
          f'    return a * {i}\n')
  row = dict(repo=f"owner/repo{i % 2}", path=f"src/mod{i}.py", func_name=f"func_{i}",
             original_string=code, language="python", code=code,
             code_tokens=code.split(), docstring=f"Compute the thing number {i} for a.\n\nArgs: a.",
             docstring_tokens=["Compute"], sha="abc", partition=partition,
             url=f"https://github.com/owner/repo/blob/abc/src/mod{i}.py#L{10 + i}-L{14 + i}")
  row.update(extra)
  return row


def test_codesearchnet_layout_keeps_partition(tmp_path):
  d = tmp_path / "python" / "final" / "jsonl"
  for part, rows in (("train", range(0, 6)), ("valid", range(6, 8)), ("test", range(8, 10))):
    (d / part).mkdir(parents=True)
    with gzip.open(d / part / f"python_{part}_0.jsonl.gz", "wt") as f:
      for i in rows:
        f.write(json.dumps(csn_row(i, part)) + "\n")
      f.write(json.dumps(csn_row(99, part, code="print 'py2'", original_string="x")) + "\n")
  pairs, skipped = read_all(f"csn:{tmp_path / 'python'}")
  assert len(pairs) == 10 and skipped == {"row: code does not parse": 3}
  p = next(p for p in pairs if p.name == "func_3")
  assert p.description == "Compute the thing number 3 for a."
  assert p.code == "def func_3(a):\n    return a * 3\n"
  assert (p.path, p.lineno, p.partition) == ("owner/repo1/src/mod3.py", 13, "train")
  got = splits.collect([f"csn:{tmp_path / 'python'}"], mining.Filters(), seed=1)
  assert {s: sorted(int(p.name[5:]) for p in ps) for s, ps in got.splits.items()} == {
      "train": [0, 1, 2, 3, 4, 5], "valid": [6, 7], "test": [8, 9]}


def test_jsonl_bad_lines_are_counted(tmp_path):
  f = tmp_path / "pairs.jsonl"
  lines = [json.dumps({"description": "Return the answer to everything.",
                       "code": "def a():\n    return 42\n"}),
           json.dumps({"docstring": "Return one more than x.\n\nMore.",
                       "code": "def b(x):\n    return x + 1\n",
                       "path": "lib/b.py", "partition": "test"}),
           "{not json", "", json.dumps([1, 2]), json.dumps({"description": "no code here at all"}),
           json.dumps({"description": "Too short", "code": "x = 1"})]
  f.write_text("\n".join(lines) + "\n")
  pairs, skipped = read_all(f"jsonl:{f}")
  assert [p.description for p in pairs] == ["Return the answer to everything.",
                                             "Return one more than x."]
  assert [p.path for p in pairs] == ["pairs.jsonl:1", "lib/b.py"]
  assert [p.partition for p in pairs] == ["", "test"]
  assert skipped == {"row: not JSON": 1, "row: not a JSON object": 1,
                     "row: missing description or code": 1, "pair: description too short": 1}
  gz = tmp_path / "trunc.jsonl.gz"
  gz.write_bytes(gzip.compress(("\n".join(lines[:2]) + "\n").encode())[:-12])  # cut-off gzip
  pairs, skipped = read_all(f"jsonl:{gz}")
  assert skipped["file: unreadable or truncated"] == 1


def test_tfds_array_record_source(tmp_path):
  rows = [dict(index=i, lineno=i + 1, description=f"Compute value number {i} quickly.",
               code=f"def v{i}():\n    return {i}\n", path=f"m{i}.py", name=f"v{i}", source="x")
          for i in range(5)]
  ds_dir = builder.write(str(tmp_path / "tfds"), {"train": rows[:3], "test": rows[3:]})
  pairs, skipped = read_all(f"tfds:{ds_dir}")
  assert not skipped
  assert sorted((p.name, p.partition) for p in pairs) == [
      ("v0", "train"), ("v1", "train"), ("v2", "train"), ("v3", "test"), ("v4", "test")]
  v0 = next(p for p in pairs if p.name == "v0")
  assert (v0.code, v0.path, v0.lineno) == ("def v0():\n    return 0\n", "m0.py", 1)


def test_dedupe_across_sources_keeps_first(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  (a / "m.py").write_text(GOOD.format(name="f", n=1))
  (b / "m.py").write_text(GOOD.format(name="f", n=1).replace("+ 1\n", "+ 1   \n") + "\n\n")
  (b / "n.py").write_text(GOOD.format(name="g", n=2))
  got = splits.collect([f"dir:{a}", f"dir:{b}"], mining.Filters())
  assert [(p.path, p.name) for p in got.pairs] == [("a/m.py", "f"), ("b/n.py", "g")]
  assert got.skipped == {"pair: duplicate code": 1}
