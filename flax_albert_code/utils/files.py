"""Files written whole or not at all, and checked against their sha256 (checkpoints, exports,
search indexes, prepared data, tokenizers). A path is a str, an os.PathLike or any object with
pathlib's methods (etils `epath.Path` for gs://). Standard library only: the export runtime uses it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import IO, Any, Callable, Collection, Iterator, Mapping

EXISTING = ("replace", "merge", "keep")


def _path(path: Any) -> Any:
  """pathlib-like objects (epath.Path) as they are; a str or other os.PathLike as pathlib.Path."""
  return path if hasattr(path, "iterdir") else pathlib.Path(os.fspath(path))


def _unique(name: str, kind: str) -> str:
  """A hidden name beside `name` that no other process picks: `.<kind>-<name>-<pid>-<random>`."""
  return f".{kind}-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _digest(path: Any) -> tuple[str, int]:
  """(hex sha256, size in bytes) of a file, read once."""
  h, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
      size += len(block)
  return h.hexdigest(), size


def sha256(path: Any) -> str:
  """The hex sha256 of the file at `path`."""
  return _digest(_path(path))[0]


def _walk(root: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(relative path, path) of every file below `root`, sorted (epath has no recursive glob)."""
  for p in sorted(root.iterdir()):
    if p.is_dir():
      yield from _walk(p, f"{prefix}{p.name}/")
    else:
      yield prefix + p.name, p


def digests(root: Any, skip: Collection[str] = ()) -> dict[str, dict[str, Any]]:
  """{relative path: {"sha256", "size"}} of every file below `root` not named in `skip`."""
  out = {}
  for rel, p in _walk(_path(root)):
    if p.name not in skip:
      digest, size = _digest(p)
      out[rel] = {"sha256": digest, "size": size}
  return out


def write_manifest(root: Any, name: str, extra: Mapping[str, Any] | None = None,
                   skip: Collection[str] = (), atomic: bool = True) -> dict[str, Any]:
  """Writes and returns `{**extra, "files": digests(root)}` as JSON root/name (not listing itself
  or `skip`). `atomic=False` writes in place, for a temporary `root` about to be renamed."""
  root = _path(root)
  manifest = {**(extra or {}), "files": digests(root, {name, *skip})}
  text = json.dumps(manifest, indent=1) + "\n"
  if atomic:
    with atomic_write(root / name) as f:
      f.write(text)
  else:
    (root / name).write_text(text)
  return manifest


@dataclasses.dataclass(frozen=True)
class Mismatch:
  """A file a manifest lists that is "missing", has another "size" or another "sha256"."""
  path: Any          # root / relative path, of the root's path type
  kind: str
  size: int = 0      # bytes on disk (kind "size")
  want: Any = 0      # bytes the manifest lists (kind "size")


def check(root: Any, files: Mapping[str, Mapping[str, Any]]) -> Mismatch | None:
  """The first file (by name) of a manifest's `files` that differs below `root`, else None."""
  root = _path(root)
  for rel, want in sorted(files.items()):
    p = root / rel
    if not p.is_file():
      return Mismatch(p, "missing")
    digest, size = _digest(p)
    if size != want.get("size"):
      return Mismatch(p, "size", size, want.get("size"))
    if digest != want.get("sha256"):
      return Mismatch(p, "sha256")
  return None


@contextlib.contextmanager
def atomic_write(path: Any, mode: str = "w", **open_kwargs) -> Iterator[IO]:
  """A file object on a new file beside `path`, renamed over `path` when the block ends and
  removed if it raises: readers see the old file or the new one, never part of one."""
  path = _path(path)
  tmp = path.parent / _unique(path.name, "tmp")
  try:
    with tmp.open(mode, **open_kwargs) as f:
      yield f
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


@contextlib.contextmanager
def staged_dir(final: Any, *, existing: str = "replace",
               complete: Callable[[str], bool] | None = None) -> Iterator[str]:
  """A new directory beside `final` (a local path), published as `final` when the block ends and
  removed if it raises: a killed process leaves a hidden `.tmp-<name>-*`, never half a `final`."""
  final = os.path.abspath(os.fspath(final))
  _check_existing(existing, complete)
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, _unique(os.path.basename(final), "tmp"))
  os.makedirs(tmp)
  try:
    yield tmp
    publish(tmp, final, existing=existing, complete=complete)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _check_existing(existing: str, complete: Callable[[str], bool] | None) -> None:
  if existing not in EXISTING:
    raise ValueError(f"existing must be one of {', '.join(EXISTING)}, got {existing!r}.")
  if existing == "keep" and complete is None:
    raise ValueError("existing='keep' needs `complete`, which says whether a directory is whole.")


def publish(tmp: str, final: str, *, existing: str = "replace",
            complete: Callable[[str], bool] | None = None) -> None:
  """Renames the finished directory `tmp` to `final`. A `final` already there is, by `existing`:
  "replace": swapped out whole (and put back if the rename fails);
  "merge": kept, with each top-level entry of `tmp` moved over the one of its name;
  "keep": kept when `complete(final)` says it is whole (another process published the same
  content first; `tmp` is then dropped), else removed first: never taken for whole."""
  _check_existing(existing, complete)
  if existing == "keep":
    if os.path.isdir(final) and not complete(final):
      shutil.rmtree(final)
    try:
      os.rename(tmp, final)
    except OSError:
      if not complete(final):
        raise
    return
  if not os.path.exists(final):
    os.rename(tmp, final)
    return
  if existing == "merge":
    for name in sorted(os.listdir(tmp)):
      os.replace(os.path.join(tmp, name), os.path.join(final, name))
    return
  old = os.path.join(os.path.dirname(final), _unique(os.path.basename(final), "old"))
  os.rename(final, old)
  try:
    os.rename(tmp, final)
  except OSError:
    os.rename(old, final)
    raise
  shutil.rmtree(old, ignore_errors=True)
