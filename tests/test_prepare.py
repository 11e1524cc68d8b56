"""prepare(): contents, reuse keyed by inputs, never a half-written preparation, the CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest

from flax_albert_code import prepare as prepare_cli
from flax_albert_code import config as config_lib
from flax_albert_code.data import builder, mining, prepared as prepared_lib
from flax_albert_code.data.sources import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tree(root, n=30):
  for f in range(n):
    (root / f"m{f}.py").write_text("".join(
        f'def f{f}_{g}(x):\n    """Scale x by {g} and add {f} to it."""\n'
        f'    return x * {g} + {f}\n\n'
        for g in range(4)))
  (root / "bad.py").write_bytes(b"\xff\xfe garbage")


def config_for(tree, **data):
  c = config_lib.get_config("tiny")
  c.data.update({"sources": f"dir:{tree}", "max_examples": 0, "tokenizer_vocab_size": 400, **data})
  return c


@pytest.fixture
def tree(tmp_path):
  t = tmp_path / "src"
  t.mkdir()
  write_tree(t)
  return t


def test_contents_agree_across_tfds_token_store_and_tokenizer(tree, tmp_path):
  prep = prepared_lib.prepare(config_for(tree), str(tmp_path / "w"))
  assert prep.data_dir.startswith(str(tmp_path / "w" / "data"))
  assert sum(prep.split_sizes.values()) == 120 and all(prep.split_sizes.values())
  assert prep.meta["skipped"] == {"file: not UTF-8 (nor its declared encoding)": 1}
  assert prep.tokenizer.vocab_size == prep.meta["vocab_size"] <= 400
  for split in ("train", "valid", "test"):
    src, store = prep.source(split), prep.tokens(split)
    assert len(src) == len(store) == prep.split_sizes[split]
    for i in range(len(src)):
      ex = src[i]
      assert ex["index"] == i and ex["source"] == f"dir:{tree}"
      assert set(ex) >= {"description", "code", "path", "name", "lineno"}
      np.testing.assert_array_equal(ex["code_tokens"], prep.tokenizer.encode(ex["code"]))
      np.testing.assert_array_equal(store.tokens("desc", i),
                                    prep.tokenizer.encode(ex["description"]))
      assert prep.tokenizer.decode(ex["code_tokens"]) == ex["code"]
  assert prep.source("validation")[0]["code"] == prep.source("valid")[0]["code"]  # alias
  paths = {s: {e["path"] for e in prep.source(s)} for s in ("train", "valid", "test")}
  assert not paths["train"] & paths["valid"] and not paths["train"] & paths["test"]


def test_reuse_is_keyed_by_inputs(tree, tmp_path):
  work = str(tmp_path / "w")
  first = prepared_lib.prepare(config_for(tree), work)
  again = prepared_lib.prepare(config_for(tree), work)
  assert again.reused and not first.reused and again.data_dir == first.data_dir
  other = prepared_lib.prepare(config_for(tree, max_examples=60), work)
  assert not other.reused and other.data_dir != first.data_dir
  assert prepared_lib.load_prepared(work).data_dir == other.data_dir  # CURRENT = latest
  assert prepared_lib.load_prepared(first.data_dir).data_dir == first.data_dir
  # A run's own data (its checkpoint's config.data), wherever CURRENT points: a data dir shared
  # by runs of several configs gives each its own tokenizer.
  assert prepared_lib.load_prepared(work, config_for(tree).data).data_dir == first.data_dir
  assert prepared_lib.load_prepared(work, config_for(tree, max_examples=60).data).data_dir == \
      other.data_dir
  (tree / "m0.py").write_text((tree / "m0.py").read_text() + "\n# edited\n")
  edited = prepared_lib.prepare(config_for(tree), work)
  assert not edited.reused and edited.data_dir != first.data_dir
  # Options that only shape batches do not change the prepared data.
  shaped = prepared_lib.prepare(config_for(tree, max_code_len=32, code_buckets=(32,)), work)
  assert shaped.reused and shaped.data_dir == edited.data_dir


def test_half_written_preparation_is_never_used(tree, tmp_path, monkeypatch):
  work = str(tmp_path / "w")
  prep = prepared_lib.prepare(config_for(tree), work)
  os.remove(os.path.join(prep.data_dir, "COMPLETE"))  # as if copied half-way or tampered with
  rebuilt = prepared_lib.prepare(config_for(tree), work)
  assert not rebuilt.reused and os.path.isfile(os.path.join(rebuilt.data_dir, "COMPLETE"))

  def crash(*args, **kwargs):
    raise KeyboardInterrupt  # killed while writing the TFDS dataset
  monkeypatch.setattr(builder, "write", crash)
  with pytest.raises(KeyboardInterrupt):
    prepared_lib.prepare(config_for(tree, max_examples=50), work)
  assert set(os.listdir(os.path.join(work, "data"))) == {"CURRENT", os.path.basename(prep.data_dir)}
  assert prepared_lib.load_prepared(work).data_dir == rebuilt.data_dir


def test_given_tokenizer_is_used(tree, tmp_path):
  prep = prepared_lib.prepare(config_for(tree), str(tmp_path / "a"))
  c = config_for(tree, tokenizer_path=prep.tokenizer_path)
  other = prepared_lib.prepare(c, str(tmp_path / "b"))
  assert not other.meta["tokenizer_trained"]
  assert open(other.tokenizer_path, "rb").read() == open(prep.tokenizer_path, "rb").read()
  with pytest.raises(DataError, match="tokenizer_path .* does not exist"):
    prepared_lib.prepare(config_for(tree, tokenizer_path=str(tmp_path / "nope.model")),
                         str(tmp_path / "c"))


def test_errors_are_one_sentence(tree, tmp_path, monkeypatch):
  monkeypatch.setattr(prepared_lib, "_filters", lambda d: mining.Filters(min_desc_words=50))
  with pytest.raises(DataError, match="No \\(description, code\\) pairs .* after filtering"):
    prepared_lib.prepare(config_for(tree), str(tmp_path / "w"))
  monkeypatch.undo()
  with pytest.raises(DataError, match="No complete prepared data under"):
    prepared_lib.load_prepared(str(tmp_path / "nothing"))
  assert not os.listdir(tmp_path / "w" / "data")  # the failed build left nothing


def test_summary_reports_pairs_skips_lengths_padding(tree, tmp_path):
  c = config_for(tree)
  text = prepared_lib.summary(prepared_lib.prepare(c, str(tmp_path / "w")), c.data)
  assert f"dir:{tree}" in text and "total" in text
  assert "file: not UTF-8" in text and "p50" in text and "padding after bucketing" in text


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "flax_albert_code.prepare", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_cli_prints_summary_and_fails_cleanly(tree, tmp_path):
  ok = run_cli("--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
               f"--config.data.sources=dir:{tree}", "--config.data.max_examples=0",
               "--config.data.tokenizer_vocab_size=400")
  assert ok.returncode == 0, ok.stderr
  assert "pairs" in ok.stdout and "padding after bucketing" in ok.stdout
  bad = run_cli("--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
                f"--config.data.sources=dir:{tmp_path / 'missing'}")
  assert bad.returncode == 1
  assert "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error: Data source 'dir:")
  assert prepare_cli.prepare is prepared_lib.prepare  # the library API is re-exported
