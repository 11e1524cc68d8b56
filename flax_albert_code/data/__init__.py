"""Data: sources and mining -> splits -> TFDS array_record + token store -> grain pipeline.

  sources.py      where pairs come from (stdlib, site-packages, dir:, csn:, jsonl:, tfds:)
  mining.py       ast: first docstring paragraph -> function code without its docstring
  splits.py       dedupe, max_examples, whole source files per split
  builder.py      the TFDS GeneratorBasedBuilder (array_record) and random-access reading
  token_store.py  flat token ids per split, what the pipeline gathers batches from
  prepared.py     prepare()/load_prepared(): the on-disk preparation, keyed by a hash
  pipeline.py     make_iterator(): bucketed, resumable, per-host batches; to_global()
"""
