"""Self-contained inference exports: config, tokenizer, safetensors parameters, StableHLO programs.

  python -m flax_albert_code.export --checkpoint runs/small --out exports/small [--dtype bf16]

Layout of an export directory (every file's sha256 and size are in the manifest):

  manifest.json           format, versions, training step, validation metrics, programs, files
  config.json             the run's config, model section as exported (dtype, attention_impl)
  spm.model               the tokenizer
  params.safetensors      the inference variables, keys "params/encoder/..." (no pickle anywhere)
  programs/*.jaxexport    `jax.export.Exported.serialize()`: StableHLO plus calling convention
  hf_encoder/             the encoder as a Hugging Face ALBERT directory (hf.save_hf_encoder)
  retrieval_index/        a retrieval model's corpus as a search index (retrieval/index.py)

Programs take the variables first: `encode_b{B}_w{W}(variables, ids[B, W])` gives alignment
vectors; `generate_{strategy}_b{B}_t{T}(variables, *GENERATE_INPUTS)` gives (tokens [B, K, T],
scores [B, K]) for any max_new_tokens up to T, with `_w{C}` for a retrieval model's context of
width C. `sample` programs draw one candidate per row with the row's key.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import json
import logging
import os
import platform
import shutil
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from flax_albert_code.deploy.runtime import (FORMAT, GENERATE_INPUTS, MANIFEST, RETRIEVAL_INDEX,
                                             generate_program)
from flax_albert_code.inference import decoding
from flax_albert_code.inference import generator
from flax_albert_code.inference import model_decoding
from flax_albert_code.model import checkpoint_io
from flax_albert_code.model import hf
from flax_albert_code.retrieval import index as index_lib
from flax_albert_code.utils import files

log = logging.getLogger("flax_albert_code")

PARAMS = "params.safetensors"
TOKENIZER = "spm.model"
DTYPES = {"float32": "float32", "fp32": "float32", "f32": "float32",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
PLATFORMS = ("cpu", "cuda")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")    # what jax.export lowers for


def export(checkpoint_path: str, out_dir: str, dtype: str = "float32",
           buckets: Sequence[int] | None = None, **kwargs) -> str:
  """Exports a workdir's latest checkpoint (or a checkpoint directory); returns the export's
  absolute path. `buckets` overrides `config.sample.batch_buckets`; other keyword arguments
  go to `export_generator`."""
  check_options(dtype=dtype, buckets=buckets, **{k: kwargs[k] for k in (
      "lengths", "strategies", "platforms") if k in kwargs})
  _check_out(out_dir)
  if kwargs.get("corpus"):
    index_lib.check_corpus(kwargs["corpus"])
  gen = generator.CodeGenerator.from_checkpoint(checkpoint_path)
  params = None
  if jnp.dtype(gen.config.model.dtype) != jnp.dtype(_dtype(dtype)):
    params = checkpoint_io.load_for_inference(checkpoint_path)[1]   # the unrounded weights
  directory, _ = checkpoint_io.resolve(checkpoint_path)
  info = {"checkpoint": os.path.abspath(gen.checkpoint_path), "step": gen.step,
          "valid_metrics": validation_metrics(os.fspath(directory.parent), gen.step)}
  return export_generator(gen, out_dir, dtype=dtype, buckets=buckets, params=params, info=info,
                          **kwargs)


def export_generator(gen, out_dir: str, *, dtype: str = "float32",
                     buckets: Sequence[int] | None = None, lengths: Sequence[int] | None = None,
                     strategies: Sequence[str] = decoding.STRATEGIES,
                     platforms: Sequence[str] = PLATFORMS, hf_encoder: bool = True,
                     params: Any = None, info: dict[str, Any] | None = None,
                     progress: bool = False, retrieval_index: bool = True,
                     corpus: str | None = None) -> str:
  """Exports a `CodeGenerator`'s model (or `params` with its config) and tokenizer. A retrieval
  model's export ships the search index of `corpus` (default `prepared:train`) unless
  `retrieval_index` is False."""
  check_options(dtype=dtype, buckets=buckets, lengths=lengths, strategies=strategies,
                platforms=platforms)
  dtype = _dtype(dtype)
  config = gen.config.copy_and_resolve_references()
  # Portable numerics: the cuDNN and Pallas attention kernels have no CPU lowering; remat is
  # training only.
  config.model.update(dtype=dtype, attention_impl="xla", decode_attention="xla", remat="none")
  if buckets:
    config.sample.batch_buckets = tuple(sorted({int(b) for b in buckets}))
  if min(config.sample.batch_buckets) < 1:
    raise ValueError(f"Batch buckets must be positive, got {config.sample.batch_buckets}.")
  if gen.tokenizer.vocab_size != config.model.vocab_size:
    raise ValueError(f"The tokenizer has {gen.tokenizer.vocab_size} pieces but the model's "
                     f"vocabulary is {config.model.vocab_size}; export a checkpoint with the "
                     "tokenizer it was trained with.")
  src = params if params is not None else gen.variables
  xgen = generator.CodeGenerator(config, src, gen.tokenizer)
  lengths = sorted({int(t) for t in lengths} if lengths else
                   {min(b, xgen.default_max_new_tokens) for b in xgen.code_buckets}
                   | {xgen.default_max_new_tokens})
  if lengths[0] < 1 or lengths[-1] > xgen.cfg.max_position_embeddings:
    raise ValueError(f"Lengths {lengths} must lie in 1..{xgen.cfg.max_position_embeddings} (the "
                     "model's positions).")
  rag = config.retrieval
  spec = (corpus or "prepared:train") if rag.k and retrieval_index else None
  if corpus and not spec:
    raise ValueError("--corpus names the corpus a retrieval model's export ships; this one "
                     + ("is exported with --no-retrieval-index." if rag.k else
                        "was trained without retrieval (config.retrieval.k = 0)."))
  own_fingerprint = index_lib.params_fingerprint(xgen.variables)
  examples = corpus_fingerprint = vectors = None
  if spec:
    examples, corpus_fingerprint, _ = index_lib.corpus(spec, gen.prepared, progress=progress)
    if not examples:
      raise ValueError(f"The retrieval corpus {spec} holds no functions; name another with "
                       "--corpus (e.g. dir:PATH) or pass --no-retrieval-index.")
    vectors = index_lib.build_index(xgen, examples, progress=progress)

  out_dir = _check_out(out_dir)
  with files.staged_dir(out_dir) as tmp:       # an older export there is replaced whole
    widths = [xgen.max_desc_len] + ([int(rag.max_ctx_len)] if rag.k else [])
    programs, used_platforms, note = _write_programs(xgen, tmp, lengths, strategies, platforms,
                                                     progress, widths)
    if spec:
      os.makedirs(os.path.join(tmp, RETRIEVAL_INDEX))
      index_lib.write(os.path.join(tmp, RETRIEVAL_INDEX), vectors, examples,
                      {"params_fingerprint": own_fingerprint, "corpus": corpus_fingerprint,
                       "spec": spec})
    _write_params(xgen.variables, os.path.join(tmp, PARAMS), dtype)
    shutil.copyfile(xgen.tokenizer.path, os.path.join(tmp, TOKENIZER))
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(config.to_dict(), f, indent=1, sort_keys=True)
    if hf_encoder and xgen.cfg.pre_norm:
      log.warning("No hf_encoder/: norm_position='pre' is not an HF ALBERT layout.")
    elif hf_encoder:
      hf.save_hf_encoder(xgen.variables["params"], xgen.cfg, os.path.join(tmp, "hf_encoder"))
    files.write_manifest(tmp, MANIFEST, atomic=False, extra={
        "format": FORMAT, "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": versions(), **(info or {}), "dtype": dtype,
        "platforms": used_platforms, "platforms_note": note,
        "inference": {
            "batch_buckets": list(xgen.batch_buckets), "desc_len": xgen.max_desc_len,
            "code_widths": list(xgen.code_buckets), "lengths": lengths,
            "max_new_tokens": xgen.default_max_new_tokens, "strategies": list(strategies),
            "num_beams": int(config.sample.num_beams), "generate_inputs": list(GENERATE_INPUTS),
            "no_repeat_ngram_size": int(config.sample.no_repeat_ngram_size),
            "align_dim": xgen.cfg.align_dim, "vocab_size": xgen.cfg.vocab_size,
            "copy_head": xgen.cfg.copy_head,
            "tokenizer": TOKENIZER, "params": PARAMS,
            "retrieval": {"k": int(rag.k), "method": str(rag.method),
                          "max_desc_len": xgen.max_desc_len,
                          "max_ctx_len": int(rag.max_ctx_len) if rag.k else xgen.max_desc_len,
                          "index": RETRIEVAL_INDEX if spec else None, "corpus": spec},
            "params_fingerprint": own_fingerprint,
            "source_params_fingerprint": index_lib.params_fingerprint(gen.variables),
        },
        "programs": programs,
    })
    _ordinary_permissions(tmp)
  return out_dir


def check_options(*, dtype: str = "float32", buckets: Sequence[int] | None = None,
                  lengths: Sequence[int] | None = None,
                  strategies: Sequence[str] = decoding.STRATEGIES,
                  platforms: Sequence[str] = PLATFORMS) -> None:
  """ValueError (one sentence) for an option `export_generator` cannot use."""
  _dtype(dtype)
  unknown = sorted(set(strategies) - set(decoding.STRATEGIES))
  if unknown or not strategies:
    raise ValueError(f"Unknown or no strategies {unknown or list(strategies)}; choose from "
                     f"{', '.join(decoding.STRATEGIES)}.")
  unknown = sorted(set(platforms) - set(KNOWN_PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"Unknown or no platforms {unknown or list(platforms)}; choose from "
                     f"{', '.join(KNOWN_PLATFORMS)}.")
  for what, values in (("Batch buckets", buckets), ("Lengths", lengths)):
    if values is not None and (not values or min(int(v) for v in values) < 1):
      raise ValueError(f"{what} must be positive whole numbers, got {list(values)}.")


def _check_out(out_dir: str) -> str:
  """The absolute export directory; FileExistsError if something else is there."""
  out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or (
      os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)))):
    raise FileExistsError(f"{out_dir} exists and is not an export; choose another --out or "
                          "empty it.")
  return out_dir


def _ordinary_permissions(root: str) -> None:
  """What a build leaves, not the temporary directory's 0700: 0777 and 0666 less the umask."""
  umask = os.umask(0)
  os.umask(umask)
  for d, _, names in os.walk(root):
    os.chmod(d, 0o777 & ~umask)
    for name in names:
      os.chmod(os.path.join(d, name), 0o666 & ~umask)


def _dtype(name: str) -> str:
  if str(name).lower() not in DTYPES:
    raise ValueError(f"Unknown export dtype {name!r}; use float32 or bfloat16 (bf16).")
  return DTYPES[str(name).lower()]


def _write_programs(gen, out: str, lengths: list[int], strategies: Sequence[str],
                    platforms: Sequence[str], progress: bool = False,
                    widths: Sequence[int] = ()) -> tuple[list[dict], list[str], str]:
  """Lowers and serialises every program; tries all `platforms` at once, else this backend's."""
  os.makedirs(os.path.join(out, "programs"))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), gen.variables)
  ids = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
  real, whole = jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)
  encode = functools.partial(generator._vectors, gen.model,  # pylint: disable=protected-access
                             mesh=None, axis_rules=None)
  specs = []
  for b in gen.batch_buckets:
    for w in sorted({gen.max_desc_len, *gen.code_buckets}):
      specs.append(({"name": f"encode_b{b}_w{w}", "kind": "encode", "batch": b, "width": w},
                    encode, (abstract, ids((b, w)))))
    for strategy in strategies:
      k = decoding.num_candidates(strategy, int(gen.config.sample.num_beams), 1)
      for t in lengths:
        fn = functools.partial(_generate, gen.model, strategy=strategy, max_new_tokens=t, k=k,
                               decode_phase=gen.decode_phase,
                               no_repeat_ngram_size=int(gen.config.sample.no_repeat_ngram_size))
        for width in dict.fromkeys(widths or [gen.max_desc_len]):
          specs.append(({"name": generate_program(strategy, b, t, width, gen.max_desc_len),
                         "kind": "generate", "batch": b, "width": width, "strategy": strategy,
                         "k": k, "max_new_tokens": t},
                        fn, (abstract, ids((b, width)),
                             jax.ShapeDtypeStruct((b, 2), jnp.uint32), whole, real, whole, real,
                             real, real)))
  wanted = tuple(dict.fromkeys(platforms))
  here = jax.default_backend()
  note = f"lowered for {', '.join(wanted)} at once"
  programs = []
  for meta, fn, args in tqdm(specs, desc="export", unit="program", disable=not progress,
                             leave=False, dynamic_ncols=True):
    try:
      exported = jax.export.export(jax.jit(fn), platforms=wanted)(*args)
    except Exception as e:  # pylint: disable=broad-except  # jax raises many types here
      if wanted == (here,):
        raise
      note = (f"jax.export could not lower for {', '.join(wanted)} at once "
              f"({type(e).__name__}: {str(e)[:200]}); lowered for {here} only")
      wanted = (here,)
      exported = jax.export.export(jax.jit(fn), platforms=wanted)(*args)
    meta["file"] = f"programs/{meta['name']}.jaxexport"
    with open(os.path.join(out, meta["file"]), "wb") as f:
      f.write(exported.serialize())
    programs.append(meta)
  return programs, list(wanted), note


def _generate(model, variables, desc_ids, keys, limit, temperature, top_k, top_p,
              length_penalty, repetition_penalty, *, strategy: str, max_new_tokens: int, k: int,
              decode_phase: int, no_repeat_ngram_size: int = 0):
  """One generate program: every option traced but the strategy and the n-gram ban (it shapes
  the program)."""
  return model_decoding.generate(model, variables, desc_ids, strategy=strategy,
                                 max_new_tokens=max_new_tokens, rng=keys[:, None, :],
                                 temperature=temperature, top_k=top_k, top_p=top_p, num_beams=k,
                                 length_penalty=length_penalty, num_samples=1,
                                 decode_phase=decode_phase, limit=limit,
                                 repetition_penalty=repetition_penalty,
                                 no_repeat_ngram_size=no_repeat_ngram_size)


def _write_params(variables, path: str, dtype: str) -> None:
  flat = {"/".join(str(getattr(p, "key", p)) for p in kp): np.asarray(jax.device_get(x))
          for kp, x in jax.tree_util.tree_leaves_with_path(variables)}
  save_file(flat, path, metadata={"format": "flax_albert_code", "dtype": dtype})


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for dist in ("flax_albert_code", "jax", "jaxlib", "flax", "numpy", "sentencepiece",
               "safetensors"):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      out[dist] = importlib.metadata.version(dist)
  return out


def validation_metrics(workdir: str, step: int | None) -> dict[str, float]:
  """The last `valid_*` metrics at or before `step` in `<workdir>/metrics.jsonl` ({} if none)."""
  found: dict[str, float] = {}
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      for line in f:
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        valid = {k: v for k, v in rec.items() if k.startswith("valid_")}
        if valid and (step is None or rec.get("step", 0) <= step):
          found = {"step": rec.get("step"), **valid}
  except OSError:
    pass
  return found

