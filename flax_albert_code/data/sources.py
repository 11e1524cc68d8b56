"""Where pairs come from: `config.data.sources`, a comma-separated list of

  stdlib          the running Python's standard library (mined with `ast`)
  site-packages   installed third-party packages (mined)
  dir:PATH        any directory of Python code, or one .py file (mined)
  csn:PATH        CodeSearchNet `*.jsonl.gz` files (a file or a directory), partition kept
  jsonl:PATH      JSON lines with `description` (or `docstring`) and `code`; `.jsonl` or `.jsonl.gz`
  tfds:NAME       a TFDS dataset (name, name:version, or its directory) read with `tfds.data_source`

Each source becomes `Unit`s (a file, a TFDS split) in a fixed order; reading one counts what it
skipped by reason. Only a source that cannot be read at all raises (`DataError`).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
import re
import sysconfig
import tokenize
from typing import Callable, Iterator

from flax_albert_code.data import mining

KINDS = ("stdlib", "site-packages", "dir", "csn", "jsonl", "tfds")
_PARTITIONS = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid",
               "test": "test"}
_SKIP_DIRS = frozenset(("site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".tox",
                        "node_modules"))


class DataError(ValueError):
  """Data that cannot be used at all; the message names the path, the reason and what to do."""


@dataclasses.dataclass(frozen=True)
class Unit:
  """One readable piece of a source: `read(filters, skipped)` returns its pairs."""
  label: str
  read: Callable[[mining.Filters, collections.Counter], list[mining.Pair]]
  stamp: str = ""  # size and mtime of the file: part of the preparation's cache key


def _stamp(filename: str) -> str:
  try:
    st = os.stat(filename)
  except OSError:
    return "?"
  return f"{st.st_size}:{st.st_mtime_ns}"


# Where a user gave the sources, named in the errors: a config field or a command's flag.
CONFIG_FIELD = "config.data.sources"


def parse_specs(sources: str, where: str = CONFIG_FIELD) -> list[str]:
  """The comma-separated specs of `sources`, checked; errors name `where` they were given."""
  specs = [s.strip() for s in sources.split(",") if s.strip()]
  if not specs:
    raise DataError(f"{where} is empty; name at least one source, e.g. 'stdlib'.")
  for spec in specs:
    kind, _, arg = spec.partition(":")
    if kind not in KINDS or (kind in ("dir", "csn", "jsonl", "tfds")) != bool(arg):
      raise DataError(f"Unknown data source {spec!r} in {where}; use stdlib, site-packages, "
                      "dir:PATH, csn:PATH, jsonl:PATH or tfds:NAME, comma-separated.")
  return specs


def check(sources: str, where: str = CONFIG_FIELD) -> list[str]:
  """`parse_specs`, and a DataError for a path that does not exist (checked without reading)."""
  specs = parse_specs(sources, where)
  for spec in specs:
    local_path(spec, where)
  return specs


def local_path(spec: str, where: str = CONFIG_FIELD) -> str | None:
  """The absolute path a dir:, csn: or jsonl: spec names (else None); DataError if missing."""
  kind, _, arg = spec.partition(":")
  if kind not in ("dir", "csn", "jsonl"):
    return None
  path = os.path.abspath(os.path.expanduser(arg))
  if not os.path.exists(path):
    raise DataError(f"Data source {spec!r}: {path} does not exist; fix the path in {where}.")
  return path


def units(spec: str, where: str = CONFIG_FIELD) -> list[Unit]:
  """The units of one source spec, in a deterministic order; errors name `where` it was given."""
  kind, _, arg = spec.partition(":")
  if kind == "stdlib":
    return _py_units(spec, "stdlib", sysconfig.get_paths()["stdlib"])
  if kind == "site-packages":
    roots = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return [u for r in roots if os.path.isdir(r) for u in _py_units(spec, "site-packages", r)]
  if kind == "tfds":
    return _tfds_units(spec, arg)
  path = local_path(spec, where)
  if kind == "dir":
    return _py_units(spec, os.path.basename(path.rstrip(os.sep)) or "root", path)
  suffixes = (".jsonl.gz", ".jsonl", ".json.gz") if kind == "jsonl" else (".jsonl.gz", ".jsonl")
  files = _files(path, suffixes)
  if not files:
    raise DataError(f"Data source {spec!r}: no {' or '.join(suffixes)} files under {path}; "
                    "point it at the files or their directory.")
  # Partials of module-level functions pickle: files can be mined in worker processes.
  return [Unit(f, functools.partial(_read_records, spec, f, csn=kind == "csn"), _stamp(f))
          for f in files]


def _files(path: str, suffixes: tuple[str, ...]) -> list[str]:
  if os.path.isfile(path):
    return [path]
  found = []
  for root, dirs, names in os.walk(path):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
    found += [os.path.join(root, n) for n in sorted(names) if n.endswith(suffixes)]
  return found


def order_key(path: str) -> bytes:
  """A fixed pseudo-random order of files, so the first N pairs come from many files."""
  return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()


def _py_units(spec: str, label: str, root: str) -> list[Unit]:
  files = _files(root, (".py",))   # one file when root is one
  if os.path.isfile(root):
    root = os.path.dirname(root)
  rels = [f"{label}/{os.path.relpath(f, root).replace(os.sep, '/')}" for f in files]
  units_ = [Unit(r, functools.partial(_read_py, spec, f, r), _stamp(f))
            for f, r in zip(files, rels)]
  return sorted(units_, key=lambda u: order_key(u.label))


def read_python_file(filename: str, skipped: collections.Counter,
                     max_bytes: int = 1 << 20) -> str | None:
  """The text of a Python file, or None with the reason counted in `skipped`."""
  try:
    if os.path.getsize(filename) > max_bytes:
      skipped["file: too large"] += 1
      return None
    with open(filename, "rb") as f:
      data = f.read()
  except OSError:
    skipped["file: unreadable"] += 1
    return None
  if not data.strip():
    skipped["file: empty"] += 1
    return None
  if b"\0" in data:
    skipped["file: binary"] += 1
    return None
  try:
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    return data.decode(encoding)
  except (SyntaxError, LookupError, UnicodeDecodeError):
    skipped["file: not UTF-8 (nor its declared encoding)"] += 1
    return None


def _read_py(spec: str, filename: str, rel: str, filters: mining.Filters,
             skipped: collections.Counter) -> list[mining.Pair]:
  text = read_python_file(filename, skipped, filters.max_file_bytes)
  return [] if text is None else mining.mine_text(text, rel, spec, filters, skipped)


def _lines(filename: str, skipped: collections.Counter) -> Iterator[tuple[int, str]]:
  opener = gzip.open if filename.endswith(".gz") else open
  try:
    with opener(filename, "rt", encoding="utf-8", errors="strict") as f:
      yield from enumerate(f, 1)
  except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile):
    skipped["file: unreadable or truncated"] += 1


def _records(filename: str, skipped: collections.Counter) -> Iterator[tuple[int, dict]]:
  for lineno, line in _lines(filename, skipped):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except ValueError:
      skipped["row: not JSON"] += 1
      continue
    if not isinstance(obj, dict):
      skipped["row: not a JSON object"] += 1
      continue
    yield lineno, obj


def _str(v):
  return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _text_field(obj: dict, *names: str) -> str | None:
  for n in names:
    v = _str(obj.get(n))
    if isinstance(v, str) and v.strip():
      return v
  return None


def _partition(value) -> str:
  value = _str(value)
  return _PARTITIONS.get(str(value).lower(), "") if value else ""


def _record_pair(obj: dict, spec: str, default_path: str, filters: mining.Filters,
                 skipped: collections.Counter, *, csn: bool,
                 partition: str = "") -> mining.Pair | None:
  desc = _text_field(obj, "docstring") if csn else _text_field(obj, "description", "docstring")
  code = _text_field(obj, "code", "original_string")
  if code is None or (desc is None and not filters.every_function):
    skipped["row: missing description or code"] += 1
    return None
  if csn:
    code = mining.strip_docstring(code)
    if code is None:
      skipped["row: code does not parse"] += 1
      return None
  description = mining.first_paragraph(desc or "")
  reason = filters.reason_to_skip(description, code)
  if reason:
    skipped["pair: " + reason] += 1
    return None
  path = _text_field(obj, "path") or default_path
  if csn and _text_field(obj, "repo"):
    path = f"{_text_field(obj, 'repo')}/{path}"
  name = _text_field(obj, "func_name", "name") or ""
  lineno = obj.get("lineno") if isinstance(obj.get("lineno"), int) else 0
  url = _text_field(obj, "url") or ""
  if not lineno and (m := re.search(r"#L(\d{1,9})(?!\d)", url)):   # not a line: 0
    lineno = int(m.group(1))
  return mining.Pair(description, code, path, name, lineno, spec,
                     partition or _partition(obj.get("partition") or obj.get("split")))


def _read_records(spec: str, filename: str, filters: mining.Filters,
                  skipped: collections.Counter, *, csn: bool) -> list[mining.Pair]:
  base = os.path.basename(filename)
  pairs = (_record_pair(obj, spec, f"{base}:{n}", filters, skipped, csn=csn)
           for n, obj in _records(filename, skipped))
  return [p for p in pairs if p is not None]


def _tfds_units(spec: str, name: str) -> list[Unit]:
  # Optional here: only tfds: sources need TensorFlow Datasets, a heavy import that the stdlib
  # sources and the export runtime (through retrieval/index.py) must not pay.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    path = os.path.expanduser(name)
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
      builder = tfds.builder_from_directory(path)
    else:
      builder = tfds.builder(name)
    splits = sorted(builder.info.splits)
    if not splits:
      raise FileNotFoundError("no prepared splits")
  except Exception as e:  # tfds raises many types for a missing/unprepared dataset
    raise DataError(f"Data source {spec!r}: cannot open the TFDS dataset ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); prepare it in array_record "
                    "format or give its directory (the one with dataset_info.json).") from None

  def read(split, filters, skipped):
    try:
      source = builder.as_data_source(split=split)
    except Exception as e:  # not array_record, files missing
      raise DataError(f"Data source {spec!r}: split {split!r} cannot be read with "
                      f"tfds.data_source ({e}); it must be in array_record format.") from None
    part = _partition(split) if len(splits) > 1 else ""
    pairs = (_record_pair(dict(source[i]), spec, f"{builder.name}/{split}:{i}", filters, skipped,
                          csn=False, partition=part) for i in range(len(source)))
    return [p for p in pairs if p is not None]

  return [Unit(f"{name}/{s}", functools.partial(read, s),
               f"{builder.data_dir}:{builder.info.splits[s].num_examples}") for s in splits]
