"""utils/files.py: digests and manifests catch damaged files; staged writes are whole or absent,
even when the writer is killed half way."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
from etils import epath

from flax_albert_code.utils import files

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _tree(root) -> None:
  os.makedirs(os.path.join(root, "sub", "deeper"))
  for rel, data in (("a.bin", b"\x00\x01" * 1000), ("sub/b.txt", b"hello"),
                    ("sub/deeper/c", b""), ("sub/SKIPPED", b"rewritten later")):
    with open(os.path.join(root, rel), "wb") as f:
      f.write(data)


def test_sha256_and_digests_list_every_file_but_the_skipped(tmp_path):
  _tree(tmp_path)
  assert files.sha256(tmp_path / "a.bin") == hashlib.sha256(b"\x00\x01" * 1000).hexdigest()
  got = files.digests(str(tmp_path), skip={"SKIPPED"})
  assert sorted(got) == ["a.bin", "sub/b.txt", "sub/deeper/c"]
  assert got["sub/b.txt"] == {"sha256": hashlib.sha256(b"hello").hexdigest(), "size": 5}
  assert files.digests(epath.Path(tmp_path), skip={"SKIPPED"}) == got   # checkpoints: epath


def _flip_a_bit(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage, kind", [
    (_flip_a_bit, "sha256"),
    (lambda p: open(p, "r+b").truncate(100), "size"),
    (os.remove, "missing"),
])
def test_a_damaged_file_is_found_by_its_manifest(tmp_path, damage, kind):
  _tree(tmp_path)
  manifest = files.write_manifest(tmp_path, "manifest.json", extra={"format": 1},
                                  skip={"SKIPPED"})
  on_disk = json.loads((tmp_path / "manifest.json").read_text())
  assert on_disk == manifest and on_disk["format"] == 1
  assert "manifest.json" not in manifest["files"] and "sub/SKIPPED" not in manifest["files"]
  (tmp_path / "sub" / "SKIPPED").write_text("not checked")
  assert files.check(tmp_path, manifest["files"]) is None
  damage(tmp_path / "a.bin")
  bad = files.check(str(tmp_path), manifest["files"])
  assert bad is not None and bad.kind == kind and str(bad.path) == str(tmp_path / "a.bin")
  if kind == "size":
    assert (bad.size, bad.want) == (100, 2000)


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
  path = tmp_path / "CURRENT"
  path.write_text("old\n")
  with pytest.raises(RuntimeError):
    with files.atomic_write(path) as f:
      f.write("half")
      raise RuntimeError("disk full")
  assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["CURRENT"]
  with files.atomic_write(str(path)) as f:
    f.write("new\n")
  assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["CURRENT"]


def test_a_failed_block_leaves_no_directory(tmp_path):
  final = tmp_path / "out"
  with pytest.raises(ValueError):
    with files.staged_dir(final) as tmp:
      open(os.path.join(tmp, "part"), "w").write("half")
      raise ValueError("the writer failed")
  assert os.listdir(tmp_path) == []


def _killed_while_writing(tmp_path, body: str) -> None:
  """Runs `body` (with `files` imported) in a child that SIGKILLs itself at `KILL`."""
  code = ("import os, signal\nfrom flax_albert_code.utils import files\n"
          + body.replace("KILL", "os.kill(os.getpid(), signal.SIGKILL)"))
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                        env={**os.environ, "PYTHONPATH": ROOT}, timeout=60, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_a_writer_killed_mid_write_leaves_no_half_directory_taken_for_whole(tmp_path):
  _killed_while_writing(tmp_path, (
      "with files.staged_dir('index/key') as tmp:\n"
      "  open(os.path.join(tmp, 'vectors.npy'), 'wb').write(b'x' * 100000)\n"
      "  KILL\n"))
  index = tmp_path / "index"
  assert not (index / "key").exists()
  leftovers = os.listdir(index)
  assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-key-")   # hidden, never read
  # A half-written directory under the final name (an older writer, a copy cut short) is not
  # taken for whole either: "keep" publishes over it unless it is complete.
  (index / "key").mkdir()
  (index / "key" / "vectors.npy").write_bytes(b"half")
  complete = lambda d: os.path.isfile(os.path.join(d, "COMPLETE"))
  with files.staged_dir(index / "key", existing="keep", complete=complete) as tmp:
    open(os.path.join(tmp, "COMPLETE"), "w").write("ours")
  assert sorted(os.listdir(index / "key")) == ["COMPLETE"]
  with files.staged_dir(index / "key", existing="keep", complete=complete) as tmp:
    open(os.path.join(tmp, "COMPLETE"), "w").write("a second writer's")
  assert (index / "key" / "COMPLETE").read_text() == "ours"     # the first whole one stays


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
  (tmp_path / "CURRENT").write_text("old\n")
  _killed_while_writing(tmp_path, (
      "with files.atomic_write('CURRENT') as f:\n"
      "  f.write('ne')\n  f.flush()\n  KILL\n"))
  assert (tmp_path / "CURRENT").read_text() == "old\n"


def test_replace_swaps_the_old_directory_out_whole_and_merge_keeps_the_rest(tmp_path, monkeypatch):
  final = tmp_path / "exp"
  final.mkdir()
  (final / "old.txt").write_text("old")
  with files.staged_dir(final) as tmp:
    open(os.path.join(tmp, "new.txt"), "w").write("new")
  assert os.listdir(tmp_path) == ["exp"] and os.listdir(final) == ["new.txt"]
  with files.staged_dir(final, existing="merge") as tmp:
    open(os.path.join(tmp, "new.txt"), "w").write("newer")
    open(os.path.join(tmp, "more.txt"), "w").write("more")
  assert sorted(os.listdir(final)) == ["more.txt", "new.txt"]
  assert (final / "new.txt").read_text() == "newer"
  # A rename that fails half way puts the old directory back.
  rename = os.rename

  def failing(src, dst):
    if os.path.basename(src).startswith(".tmp-"):
      raise OSError("cross-device link")
    rename(src, dst)
  monkeypatch.setattr(os, "rename", failing)
  with pytest.raises(OSError, match="cross-device"):
    with files.staged_dir(final) as tmp:
      open(os.path.join(tmp, "x"), "w").write("x")
  assert os.listdir(tmp_path) == ["exp"] and sorted(os.listdir(final)) == ["more.txt", "new.txt"]
