"""The code index: a corpus encoded once into code vectors, ranked for queries.

Code search by description: encode a corpus once into an index, then rank it for queries.

  python -m flax_albert_code.search --checkpoint runs/small --corpus stdlib "parse a date string"
  python -m flax_albert_code.search --checkpoint DIR --corpus dir:~/src/repo --top-k 5 --json "..."

SOURCE is any data source spec (stdlib, site-packages, dir:PATH, jsonl:PATH, csn:PATH, tfds:NAME,
comma-separated) or `prepared[:SPLIT]` (the checkpoint's prepared data, default split test).
The index (code vectors + where each function is) is saved under `<workdir>/search_index/<key>/`,
keyed by a hash of the parameters and the corpus files (sizes and mtimes), so it is reused while
both are unchanged and rebuilt otherwise; it is written to a temporary directory and renamed.
"""