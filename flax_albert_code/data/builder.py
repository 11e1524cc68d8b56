"""The prepared pairs as a TFDS array_record dataset, read back without TensorFlow.

Read with `as_data_source` (random access; `as_dataset` would need TensorFlow). Records keep
the generation order, so record i has `index == i`. Token ids live in the token store only.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

TEXT_FIELDS = ("description", "code", "path", "name", "source")


class CodePairs(tfds.core.GeneratorBasedBuilder):
  """(description, code) pairs with where they come from."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "First version.",
                   "2.0.0": "Token ids only in the token store (prepared.py), not here."}

  # No code path: TFDS would look for a checksums file through `importlib_resources`.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(self, *, examples: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
               **kwargs):
    self._examples = examples or {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Python (description, code) pairs mined by flax_albert_code.prepare.",
        features=tfds.features.FeaturesDict({"index": np.int64, "lineno": np.int64,
                                             **{f: tfds.features.Text() for f in TEXT_FIELDS}}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(rows) for split, rows in self._examples.items()}

  def _generate_examples(self, rows) -> Iterator[tuple[int, dict]]:
    for row in rows:
      yield int(row["index"]), dict(row)


def write(data_dir: str, examples: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
  """Writes the splits (each a list of feature dicts) and returns the dataset directory."""
  tfds.disable_progress_bar()  # prepare shows its own; TFDS's bars are per split and noisy
  builder = CodePairs(data_dir=data_dir, examples=examples, file_format="array_record")
  with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading and preparing..."
    builder.download_and_prepare(file_format="array_record")
  return os.fspath(builder.data_path)


def open_splits(dataset_dir: str):
  """A read-only builder for a written dataset; `.as_data_source(split)` gives random access."""
  return tfds.builder_from_directory(dataset_dir)


class ExampleSource:
  """Random access to one split's examples as dicts of str, int and int32 arrays; `store` (its
  token_store.TokenStore) gives them `desc_tokens` and `code_tokens`."""

  def __init__(self, data_source, store=None):
    self.data_source = data_source  # raw tfds source: text fields come back as bytes
    self.store = store

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for a split of {len(self)} examples")
    index = int(index) % len(self)
    out = decode(self.data_source[index])
    if self.store is not None and "code_tokens" not in out:
      out["desc_tokens"] = self.store.tokens("desc", index)
      out["code_tokens"] = self.store.tokens("code", index)
    return out

  def __iter__(self):
    return (self[i] for i in range(len(self)))


def decode(record: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(record)
  for f in TEXT_FIELDS:
    if isinstance(out[f], bytes):
      out[f] = out[f].decode("utf-8", "surrogateescape")
  out["index"], out["lineno"] = int(out["index"]), int(out["lineno"])
  return out
