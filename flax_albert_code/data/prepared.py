"""Prepared data on disk: mine -> split -> tokenizer -> TFDS array_record + token store.

Layout of `config.data.data_dir` (default `<workdir>/data`):

  <key>/             one complete preparation; key = hash of sources (+ file sizes and mtimes) and
    COMPLETE           the options that change the data; written last, in a temp dir renamed
    meta.json          to <key>/, so a half-written preparation is never seen there
    spm.model
    tfds/code_pairs/2.0.0/...    TFDS array_record dataset, splits train/valid/test (text)
    tokens/<split>.*.npy         token ids, flat; also split "unlabelled" (code only, not in TFDS)
  CURRENT            the key of the latest complete preparation (for `load_prepared`)
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import time
from typing import Any

import ml_collections
import numpy as np

from flax_albert_code import tokenizer as tokenizer_lib
from flax_albert_code.data import builder, mining, sources, splits, token_store
from flax_albert_code.utils import files

FORMAT_VERSION = 2
KEY_FIELDS = ("sources", "max_examples", "valid_fraction", "test_fraction",
              "tokenizer_vocab_size", "tokenizer_path", "unlabelled", "max_unlabelled")
# The seed of the split and of the tokenizer's sample.
SPLIT_SEED = 0
# Key options that were config.data fields: kept in the key so data prepared then keeps it.
CONSTANT_KEY_OPTIONS = {f: getattr(mining.Filters(), f) for f in (
    "min_desc_words", "max_code_lines", "max_code_chars", "max_file_bytes")}
CONSTANT_KEY_OPTIONS["split_seed"] = SPLIT_SEED
# Fields a config saved before they existed (an old checkpoint's) lacks: their defaults.
_ADDED_FIELDS = {"unlabelled": False, "max_unlabelled": 0}
OPTIONAL_KEY_FIELDS = {"tokenizer_type": "unigram"}
# The tokenizer trains on a fixed sample of this many characters of the train split's texts,
# plus UNLABELLED_SAMPLE_CHARS of unlabelled code: much faster, about as good a vocabulary.
TOKENIZER_SAMPLE_CHARS = 3_000_000
UNLABELLED_SAMPLE_CHARS = 1_000_000
DataError = sources.DataError


@dataclasses.dataclass
class Prepared:
  """A complete preparation. `source(split)` and `tokens(split)` give random access."""
  data_dir: str                 # this preparation's directory, <data_dir>/<key>
  tokenizer_path: str
  split_sizes: dict[str, int]
  tokenizer: tokenizer_lib.Tokenizer
  meta: dict[str, Any]
  reused: bool = False
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  def source(self, split: str) -> builder.ExampleSource:
    """Examples as dicts of the TFDS fields and desc_tokens, code_tokens (no special tokens)."""
    if splits.ALIASES.get(split, split) == splits.UNLABELLED:
      raise ValueError("The unlabelled split holds token ids only: read it with "
                       "Prepared.tokens('unlabelled') (tokenizer.decode gives its code back).")
    split = splits.canonical_split(split)
    if ("source", split) not in self._cache:
      if not self.split_sizes.get(split):
        self._cache["source", split] = builder.ExampleSource([])
      else:
        b = builder.open_splits(os.path.join(self.data_dir, self.meta["tfds_dir"]))
        self._cache["source", split] = builder.ExampleSource(b.as_data_source(split),
                                                             self.tokens(split))
    return self._cache["source", split]

  def tokens(self, split: str) -> token_store.TokenStore:
    """Token ids of a split; "unlabelled" too (its description tokens are empty)."""
    split = splits.canonical_split(split, splits.TOKEN_SPLITS)
    if split == splits.UNLABELLED and split not in self.split_sizes:
      raise ValueError("This preparation has no unlabelled split; prepare with "
                       "--config.data.unlabelled=True.")
    if ("tokens", split) not in self._cache:
      self._cache["tokens", split] = token_store.TokenStore(
          os.path.join(self.data_dir, "tokens"), split)
    return self._cache["tokens", split]


# Where the data of a run with a remote workdir (gs://...) is prepared: a local disk.
REMOTE_WORKDIR_DATA = os.path.join("~", ".cache", "flax_albert_code", "data")


def data_root(config: ml_collections.ConfigDict, workdir: str) -> str:
  """config.data.data_dir, else <workdir>/data; local disk only (the token store is memory
  mapped), so with a gs:// workdir each host prepares (deterministically) REMOTE_WORKDIR_DATA."""
  if "://" in config.data.data_dir:
    raise DataError(f"config.data.data_dir={config.data.data_dir} is not a local path; prepared "
                    "data is memory-mapped from a local disk: set a local directory (or '').")
  if not config.data.data_dir and "://" in str(workdir):
    return os.path.abspath(os.path.expanduser(REMOTE_WORKDIR_DATA))
  return os.path.abspath(os.path.expanduser(config.data.data_dir or os.path.join(workdir, "data")))


def options(d: ml_collections.ConfigDict) -> dict[str, Any]:
  """The options that make the prepared data: KEY_FIELDS, CONSTANT_KEY_OPTIONS, and those
  OPTIONAL_KEY_FIELDS not at their default (so data prepared before them keeps its key)."""
  out = {f: d.get(f, _ADDED_FIELDS.get(f)) for f in KEY_FIELDS}
  out.update(CONSTANT_KEY_OPTIONS)
  out.update({f: d[f] for f, default in OPTIONAL_KEY_FIELDS.items()
              if d.get(f, default) != default})
  return out


def _filters(d: ml_collections.ConfigDict) -> mining.Filters:
  return mining.Filters(unlabelled=bool(options(d)["unlabelled"]))


def tokenizer_sample(texts: list[str], max_chars: int, seed: int = 0) -> list[str]:
  """A fixed pseudo-random sample of `texts` of about `max_chars` characters, in their order."""
  lengths = np.fromiter(map(len, texts), np.int64, count=len(texts))
  if lengths.sum() <= max_chars:
    return list(texts)
  order = np.random.default_rng(seed).permutation(len(texts))
  take = order[:int(np.searchsorted(np.cumsum(lengths[order]), max_chars)) + 1]
  return [texts[i] for i in np.sort(take)]


def _key(d: ml_collections.ConfigDict, units: list[sources.Unit]) -> str:
  h = hashlib.sha256(json.dumps([FORMAT_VERSION, options(d)], sort_keys=True).encode())
  if d.tokenizer_path:
    h.update(bytes.fromhex(files.sha256(os.path.expanduser(d.tokenizer_path))))
  for u in units:
    h.update(f"{u.label}\0{u.stamp}\n".encode("utf-8", "surrogateescape"))
  return h.hexdigest()[:16]


def prepare(config: ml_collections.ConfigDict, workdir: str, *,
            progress: bool = False) -> Prepared:
  """Returns the preparation for `config.data`, building it unless a complete one exists."""
  d = config.data
  if options(d)["max_unlabelled"] < 0:
    raise DataError(f"config.data.max_unlabelled={d.max_unlabelled} is negative; use 0 (keep all "
                    "unlabelled code) or a count.")
  root = data_root(config, workdir)
  specs = sources.parse_specs(d.sources)
  if d.tokenizer_path and not os.path.isfile(os.path.expanduser(d.tokenizer_path)):
    raise DataError(f"config.data.tokenizer_path {d.tokenizer_path} does not exist; fix it or set "
                    "it to '' to train a tokenizer on the data.")
  all_units = [u for spec in specs for u in sources.units(spec)]
  key = _key(d, all_units)
  final = os.path.join(root, key)
  if _complete(final):
    _set_current(root, key)
    return dataclasses.replace(load_prepared(final), reused=True)
  # An incomplete <key>/ there is not ours (we only ever rename complete ones): it is removed;
  # a complete one another process finished meanwhile is kept.
  with files.staged_dir(final, existing="keep", complete=_complete) as tmp:
    _build(d, specs, tmp, key, progress)
  _set_current(root, key)
  return load_prepared(final)


def _build(d: ml_collections.ConfigDict, specs: list[str], out: str, key: str,
           progress: bool) -> None:
  start = time.time()
  timing = {}
  opts = options(d)
  unlabelled = opts["unlabelled"]
  got = splits.collect(specs, _filters(d), max_examples=d.max_examples, seed=SPLIT_SEED,
                       valid_fraction=d.valid_fraction, test_fraction=d.test_fraction,
                       progress=progress, max_unlabelled=opts["max_unlabelled"])
  timing["mine"] = time.time() - start
  skipped = ", ".join(f"{k} {v}" for k, v in sorted(got.skipped.items())) or "nothing"
  if not any(got.splits.values()):
    raise DataError(f"No (description, code) pairs in {d.sources!r} after filtering (skipped: "
                    f"{skipped}); add sources with documented functions.")
  if not got.splits["train"]:
    sizes = {s: len(p) for s, p in got.splits.items()}
    raise DataError(f"The train split of {d.sources!r} is empty ({sizes}); "
                    "add data or lower config.data.valid_fraction/test_fraction.")
  examples = {split: [dict(index=i, lineno=p.lineno, description=p.description, code=p.code,
                           path=p.path, name=p.name, source=p.source)
                      for i, p in enumerate(pairs)]
              for split, pairs in got.splits.items() if pairs}
  # The TFDS dataset (text only) is written by a thread while the tokenizer trains and encodes
  # (sentencepiece releases the GIL); leaving the `with` waits for it and raises its error.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    tfds_job = pool.submit(_timed, builder.write, os.path.join(out, "tfds"), examples)
    t = time.time()
    spm_path = os.path.join(out, "spm.model")
    if d.tokenizer_path:
      shutil.copyfile(os.path.expanduser(d.tokenizer_path), spm_path)
      tok = tokenizer_lib.Tokenizer.load(spm_path)
    else:
      train = got.splits["train"]
      texts = tokenizer_sample([p.description for p in train] + [p.code for p in train],
                               TOKENIZER_SAMPLE_CHARS, SPLIT_SEED)
      texts += tokenizer_sample([u.code for u in got.unlabelled], UNLABELLED_SAMPLE_CHARS,
                                SPLIT_SEED)
      tok = tokenizer_lib.train_tokenizer(texts, spm_path, d.tokenizer_vocab_size,
                                          model_type=d.get("tokenizer_type",
                                                           OPTIONAL_KEY_FIELDS["tokenizer_type"]))
    timing["tokenizer"] = time.time() - t
    t = time.time()
    # Encoded in blocks straight into flat arrays: lists of Python ints would take gigabytes.
    dtype = token_store.dtype_for(tok.vocab_size)
    arrays = {s: {"desc": _encode(tok, [p.description for p in got.splits[s]], dtype),
                  "code": _encode(tok, [p.code for p in got.splits[s]], dtype)}
              for s in splits.SPLITS}
    if unlabelled:
      code = _encode(tok, [u.code for u in got.unlabelled], dtype)
      arrays[splits.UNLABELLED] = {"desc": (np.zeros(0, dtype), np.zeros_like(code[1])),
                                   "code": code}
    timing["encode"] = time.time() - t
    t = time.time()
    os.makedirs(os.path.join(out, "tokens"))
    for split, fields in arrays.items():
      token_store.write_arrays(os.path.join(out, "tokens"), split, fields)
    tfds_dir, timing["tfds"] = tfds_job.result()
  timing["write"] = time.time() - t
  per_source = {split: dict(collections.Counter(p.source for p in pairs))
                for split, pairs in got.splits.items()}
  split_sizes = {s: len(p) for s, p in got.splits.items()}
  extra = {}
  if unlabelled:
    split_sizes[splits.UNLABELLED] = len(got.unlabelled)
    functions = sum(u.name != "<module>" for u in got.unlabelled)
    extra["unlabelled"] = {"functions": functions,
                           "module_chunks": len(got.unlabelled) - functions}
  timing["total"] = time.time() - start
  meta = dict(
      format=FORMAT_VERSION, key=key, created=datetime.datetime.now().isoformat(timespec="seconds"),
      seconds=round(timing["total"], 1), sources=specs, options=opts,
      split_sizes=split_sizes, per_source=per_source,
      skipped=dict(sorted(got.skipped.items())), units_read=got.units_read,
      units_total=got.units_total, vocab_size=tok.vocab_size,
      tokenizer_trained=not d.tokenizer_path, tfds_dir=os.path.relpath(tfds_dir, out),
      timing={k: round(v, 2) for k, v in timing.items()}, **extra)
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  with open(os.path.join(out, "COMPLETE"), "w") as f:
    f.write(key + "\n")


def _encode(tok: tokenizer_lib.Tokenizer, texts: list[str], dtype: np.dtype,
            block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
  """(flat token ids, lengths) of `texts`; each block encoded by sentencepiece's threads."""
  flats, lengths = [np.zeros(0, dtype)], [np.zeros(0, np.int64)]
  for i in range(0, len(texts), block):
    flat, lens = token_store.to_arrays(tok.encode_batch(texts[i:i + block]), dtype)
    flats.append(flat)
    lengths.append(lens)
  return np.concatenate(flats), np.concatenate(lengths)


def _timed(fn, *args):
  t = time.time()
  return fn(*args), time.time() - t


def _complete(prep_dir: str) -> bool:
  return os.path.isfile(os.path.join(prep_dir, "COMPLETE"))


def _set_current(root: str, key: str) -> None:
  with files.atomic_write(os.path.join(root, "CURRENT")) as f:
    f.write(key + "\n")


def load_prepared(path: str, data: ml_collections.ConfigDict | None = None) -> Prepared:
  """Opens a preparation: its own directory, a data dir (uses CURRENT), or a workdir (data/);
  with `data` (a run's config.data), the newest made with its options (a data dir may be shared
  by runs of other configs), else CURRENT's."""
  path = os.path.abspath(os.path.expanduser(path))
  for candidate in (path, os.path.join(path, "data")):
    if os.path.isfile(os.path.join(candidate, "COMPLETE")):
      prep_dir = candidate
      break
    current = os.path.join(candidate, "CURRENT")
    if os.path.isfile(current):
      with open(current) as f:
        prep_dir = os.path.join(candidate, f.read().strip())
      if data is not None:
        prep_dir = _made_with(candidate, options(data)) or prep_dir
      if os.path.isfile(os.path.join(prep_dir, "COMPLETE")):
        break
  else:
    raise DataError(f"No complete prepared data under {path}; run `python -m "
                    "flax_albert_code.prepare --workdir DIR` (or train, which prepares) first.")
  try:
    with open(os.path.join(prep_dir, "meta.json")) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"Prepared data in {prep_dir} is damaged ({e}); delete that directory and "
                    "prepare again.") from None
  spm_path = os.path.join(prep_dir, "spm.model")
  return Prepared(prep_dir, spm_path, meta["split_sizes"], tokenizer_lib.Tokenizer.load(spm_path),
                  meta)


def _made_with(root: str, opts: dict[str, Any]) -> str | None:
  """The newest complete preparation under `root` made with `opts` (CURRENT's first), or None."""
  want = json.loads(json.dumps(opts))
  try:
    with open(os.path.join(root, "CURRENT")) as f:
      current = f.read().strip()
    dirs = [d for d in os.listdir(root) if _complete(os.path.join(root, d))]
  except OSError:
    return None
  dirs.sort(key=lambda d: (d == current, os.path.getmtime(os.path.join(root, d, "COMPLETE"))),
            reverse=True)
  for d in dirs:
    try:
      with open(os.path.join(root, d, "meta.json")) as f:
        if json.load(f).get("options") == want:
          return os.path.join(root, d)
    except (OSError, ValueError):
      continue
  return None


def summary(prepared: Prepared, data: ml_collections.ConfigDict) -> str:
  """The human summary `prepare` prints: pairs, skips, token lengths, padding."""
  m = prepared.meta
  names = sorted({s for per in m["per_source"].values() for s in per})
  w = max([38] + [len(s) + 1 for s in (*names, *m["skipped"])])
  lines = [f"Prepared data {prepared.data_dir} ({'reused' if prepared.reused else 'built'}; "
           f"{m['units_read']}/{m['units_total']} files read)"]
  if "timing" in m:
    t = m["timing"]
    lines.append(f"prepared in {t['total']:.1f} s: " + ", ".join(
        f"{k} {t[k]:.1f}" for k in ("mine", "tokenizer", "encode", "write") if k in t) +
        (f" (TFDS {t['tfds']:.1f} of it in a thread from the end of mining)" if "tfds" in t
         else ""))
  else:
    lines.append(f"prepared in {m['seconds']} s")
  lines.append(f"{'pairs':<{w + 2}}" + "".join(f"{s:>8}" for s in (*splits.SPLITS, "total")))
  for name in names + ["total"]:
    row = [m["per_source"][s].get(name, 0) if name != "total" else m["split_sizes"][s]
           for s in splits.SPLITS]
    lines.append(f"  {name:<{w}}" + "".join(f"{n:>8}" for n in (*row, sum(row))))
  if "unlabelled" in m:
    u = m["unlabelled"]
    lines.append(f"unlabelled code: {m['split_sizes'][splits.UNLABELLED]} examples "
                 f"({u['functions']} functions, {u['module_chunks']} module chunks; from files "
                 "without valid/test pairs, valid/test code removed)")
  lines.append("skipped:" if m["skipped"] else "skipped: nothing")
  lines += [f"  {reason:<{w}}{n:>8}" for reason, n in m["skipped"].items()]
  lines.append(f"tokenizer: {prepared.tokenizer_path} (vocab {m['vocab_size']}, "
               f"{'trained on a sample of train' if m['tokenizer_trained'] else 'given'})")
  store = prepared.tokens("train")
  desc, code = store.lengths["desc"], store.lengths["code"]
  buckets = tuple(sorted(data.code_buckets))
  longest = min(data.max_code_len, buckets[-1])
  lines.append(f"{'train token lengths':<{w + 2}}" +
               "".join(f"{h:>8}" for h in ("p50", "p90", "p99", "max", "cut")))
  for name, lens, limit in (("description (+CLS, SEP)", desc + 2, data.max_desc_len),
                            ("code (+EOS)", code + 1, longest)):
    p = np.percentile(lens, [50, 90, 99]).astype(int).tolist() if len(lens) else [0, 0, 0]
    cut = f"{np.mean(lens > limit):.1%}" if len(lens) else "-"
    lines.append(f"  {name:<{w}}" + "".join(f"{v:>8}" for v in (*p, lens.max(initial=0), cut)))
  real_code = np.minimum(code + 1, longest)
  real = {"code": real_code.sum(), "desc": np.minimum(desc + 2, data.max_desc_len).sum()}
  padded = {"code": np.asarray(buckets)[token_store.bucket_of(real_code, buckets)].sum(),
            "desc": data.max_desc_len * len(desc)}
  pad = {k: 1 - real[k] / max(padded[k], 1) for k in real}
  pad_all = 1 - sum(real.values()) / max(sum(padded.values()), 1)
  lines.append(
      f"padding after bucketing (code buckets {','.join(map(str, buckets))}, descriptions padded "
      f"to {data.max_desc_len}): code {pad['code']:.1%}, description {pad['desc']:.1%}, "
      f"all {pad_all:.1%}")
  return "\n".join(lines)
