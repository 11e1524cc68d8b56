"""The config schema: every field a run can set, with its default.

Config files in `configs/` call `get_config(preset)` and override what they need; every field is
overridable from the command line (`--config.train.steps=100`).
"""
from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

from flax_albert_code import configs as shipped_configs

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# Token ids fixed by the tokenizer (see tokenizer.py): the model and data code share them.
PAD_ID, UNK_ID, BOS_ID, EOS_ID, CLS_ID, SEP_ID = 0, 1, 2, 3, 4, 5

DEFAULT_PRESET = "small"
_PRESET_FIELDS = ("vocab_size", "embedding_size", "hidden_size", "num_attention_heads",
                  "intermediate_size", "num_hidden_layers", "decoder_layers",
                  "max_position_embeddings", "align_dim")
MODEL_PRESETS = {name: dict(zip(_PRESET_FIELDS, sizes)) for name, sizes in {
    "tiny": (512, 16, 32, 4, 64, 2, 2, 128, 16),
    "small": (4000, 64, 128, 4, 512, 4, 3, 512, 64),
    "base": (32000, 128, 768, 12, 3072, 12, 6, 512, 256),
    "large": (32000, 128, 1024, 16, 4096, 24, 12, 512, 256),
}.items()}


def model_config(preset: str = DEFAULT_PRESET) -> ml_collections.ConfigDict:
  """Every model field with its default at `preset`'s sizes (ModelConfig's declaration)."""
  if preset not in MODEL_PRESETS:
    raise ValueError(f"Unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}.")
  m = ml_collections.ConfigDict(dict(
      preset=preset,
      vocab_size=32000, embedding_size=128, hidden_size=768, num_attention_heads=12,
      intermediate_size=3072, num_hidden_layers=12, num_hidden_groups=1, inner_group_num=1,
      hidden_act="gelu_new", max_position_embeddings=512, type_vocab_size=2,
      layer_norm_eps=1e-12, initializer_range=0.02,
      hidden_dropout_prob=0.0,
      # Decoder: one shared block (self-attn, cross-attn, FFN) applied `decoder_layers` times.
      decoder_layers=6,
      share_embedding=True,              # decoder reuses the encoder's factorized embedding
      share_encoder_decoder_block=False,  # decoder reuses encoder self-attn + FFN weights
      decoder_memory="states",           # "states": all encoder states; "vector": only v_d
      # Sentence vector: "mean" (of the last states), "first_last" (of the embedded input and
      # the last states) or "cls" (ALBERT's pooler; HF imports), which InfoNCE did not learn
      # through (RESULTS.md).
      pooling="mean",
      align_dim=256,                     # sentence vectors of unit length in this many dims
      # Numerics and compilation.
      dtype="float32",                   # compute; parameters stay float32
      attention_impl="xla",              # "xla" | "cudnn" (jax.nn.dot_product_attention)
      remat="none",                      # "none" | "full" | "dots": rematerialise the shared block
      scan_layers=True,                  # loop over depth with nn.scan (compile time flat in depth)
      fused_qkv=True,                    # Q|K|V (and a memory's K|V) as one matmul; same parameters
      # One-token decode steps: "layer" runs the whole decoder layer as Pallas kernels
      # (model/fused_decode.py), "xla" as XLA ops; "auto": layer on one GPU, else xla.
      decode_attention="auto",
      # "post": ALBERT's LN(x + f(x)) (HF weights); "pre": x + f(LN(x)) and a final LN per stack,
      # which trains at higher learning rates (not HF-compatible).
      norm_position="post",
      # copy_head: a gated pointer over the input tokens mixed into the output (See et al.
      # 2017). memory_embeddings: the decoder attends to 0.5 * (encoder states + embedded
      # input). context_token_types: tokens after the first [SEP] (neighbours) get type 1.
      copy_head=True, memory_embeddings=True, context_token_types=True,
  ))
  m.update(MODEL_PRESETS[preset])
  return m


# Fields added after checkpoints were written, with the value a saved config without them stands
# for where that is not today's default (others take the schema's default).
LEGACY_MODEL_VALUES = {"copy_head": False, "memory_embeddings": False,
                       "context_token_types": False}

# Fields older versions saved that this one no longer has: dropped on load.
REMOVED_FIELDS = {
    "model": ("attention_probs_dropout_prob", "param_dtype", "embedding_grad", "align_normalize"),
    "data": ("num_workers", "min_desc_words", "max_code_lines", "max_code_chars",
             "max_file_bytes", "split_seed", "shuffle_seed"),
    "train": ("eval_batch_size", "pack", "pack_rows", "pack_max_segments", "queue_size",
              "queue_start", "mlm_weight", "decoder_input_dropout",
              "b1", "b2", "eps", "weight_decay", "grad_clip", "end_lr_fraction", "gen_weight",
              "init_temperature", "label_smoothing", "z_loss", "async_checkpointing",
              "decay_fraction"),
    "sample": ("beam_cache",),
}
# Model values older versions saved that this one no longer has, and what stands for them.
REMOVED_MODEL_VALUES = {"decode_attention": {"pallas": "auto"}}


def upgrade(config) -> tuple[ml_collections.ConfigDict, list[str]]:
  """(a config saved by an older version as this one reads it, what changed as
  "section.field=value" (added with a legacy value) and "section.field" (dropped)): the one
  place old configs are read. Keys the schema does not know are kept."""
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  preset = (values.get("model") or {}).get("preset", DEFAULT_PRESET)
  schema = get_config(preset if preset in MODEL_PRESETS else DEFAULT_PRESET).to_dict()
  changes = []
  for section, names in REMOVED_FIELDS.items():
    for name in names:
      if name in values.get(section, {}):
        del values[section][name]
        changes.append(f"{section}.{name}")
  added = []
  for section, fields in schema.items():
    if not isinstance(fields, dict) or not isinstance(values.get(section), dict):
      continue
    saved = values[section]
    if section == "model":
      for name, replaced in REMOVED_MODEL_VALUES.items():
        if name in saved:
          saved[name] = replaced.get(saved[name], saved[name])
      added += [f"model.{k}={LEGACY_MODEL_VALUES[k]}" for k in sorted(LEGACY_MODEL_VALUES)
                if k not in saved]
      saved.update({k: v for k, v in LEGACY_MODEL_VALUES.items() if k not in saved})
    values[section] = {**fields, **saved}
  return ml_collections.ConfigDict(values), added + changes


def get_config(preset: str = DEFAULT_PRESET) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = preset
  c.seed = 0
  c.model = model_config(preset)
  c.data = ml_collections.ConfigDict(dict(
      # Comma-separated: stdlib, site-packages, dir:PATH, csn:PATH, jsonl:PATH, tfds:NAME.
      sources="stdlib",
      data_dir="",                 # prepared data lives here; "" -> <workdir>/data
      max_examples=0,              # 0: all mined pairs; N: the first N after dedupe (smoke runs)
      valid_fraction=0.05, test_fraction=0.05,
      tokenizer_vocab_size=8000, tokenizer_path="",  # "" -> train on the prepared train split
      tokenizer_type="unigram",    # "unigram" | "bpe"
      max_desc_len=64, max_code_len=256,
      # Static batch shapes: each code length goes to the smallest bucket that fits.
      code_buckets=(64, 128, 256),
      # Unlabelled code (split "unlabelled"): functions and module chunks from files that gave
      # no valid/test pair. max_unlabelled: 0 keeps all, N a fixed sample of N.
      unlabelled=False, max_unlabelled=0,
  ))
  c.train = ml_collections.ConfigDict(dict(
      # "pretrain" (alignment only) | "finetune" (generation [+ alignment]) | "joint".
      stage="joint",
      init_from="",                # finetune start: a pretrain checkpoint dir or an HF ALBERT dir
      steps=3000, batch_size=32, microbatches=1,
      optimizer="adamw",           # "adamw" | "lamb"
      # "cosine" | "linear" | "constant" | "wsd" (the peak, then the last 20% of steps decay).
      learning_rate=1e-3, warmup_steps=200, schedule="cosine",
      align_losses="infonce",      # comma-separated subset of {l2, infonce}; "" disables alignment
      l2_weight=1.0, infonce_weight=0.1,
      # Sequence chunk of the tied-logit CE (recomputed in the backward pass); 0: one pass.
      loss_chunk=128,
      # CE logits: "float32" (upcast) | "bfloat16" (fp32 sums, a fused bf16 gradient).
      logits_dtype="float32",
      # Denoising: the share of batches that are unlabelled code (read with spans cut, written
      # whole), by step: "1.0:600,0.25" = all for 600 steps, then one in four; "" off. Needs
      # config.data.unlabelled.
      unlabelled_schedule="",
      # Compile every code bucket's train/eval steps at start, side by side in threads. Off by
      # default: small CPU runs may never meet every bucket.
      precompile=False,
      # JAX's persistent compilation cache: "auto" = <workdir>/jax_cache, a directory, or "" (off).
      compilation_cache="auto",
      log_every=50, eval_every=500, eval_batches=8,
      checkpoint_every=500, keep_checkpoints=3,
      samples_at_end=4,
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Logical axis -> mesh axes: batch over (data, fsdp), `embed` over fsdp, heads/mlp/vocab over
  # tensor. The word embedding has no `embed` axis, so its vocab rows go over fsdp too.
  c.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("emb", None),
      ("vocab", ("tensor", "fsdp")),
      ("heads", "tensor"),
      ("kv", None),
      ("mlp", "tensor"),
      ("length", None),
      ("align", None),
      ("layers", None),
      # Activations: batch over (data, fsdp); heads/mlp/vocab over tensor; hidden replicated.
      ("act_embed", None),
      ("act_heads", "tensor"),
      ("act_mlp", "tensor"),
      ("act_vocab", "tensor"),
  )
  c.sample = ml_collections.ConfigDict(dict(
      strategy="greedy", max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0,
      num_beams=4, length_penalty=1.0, num_samples=1, batch_buckets=(1, 8, 32),
      # Decode in phases of N steps that read only the cache written so far; 0: off.
      decode_phase=64,
      repetition_penalty=1.0,      # CTRL penalty of tokens already emitted (1.0: off)
      no_repeat_ngram_size=0,      # never repeat an n-gram of the output (0: off)
  ))
  # Retrieval-augmented generation: the decoder attends to the description followed by the code
  # of k train functions retrieved for it (retrieval/neighbours.py, retrieval/retriever.py).
  c.retrieval = ml_collections.ConfigDict(dict(
      k=0,                         # neighbours per description; 0: the plain model
      method="hybrid",             # "dense" (aligned vectors) | "bm25" | "hybrid" (both, z-scored)
      max_ctx_len=256,             # encoder tokens for the description + neighbours
      refresh_steps=(),            # steps after which the model's own encoder re-mines neighbours
      # Training only: this share of rows gets its own code, spans cut out, as first neighbour.
      self_neighbour_rate=0.0,
  ))
  return c


# String fields with a closed set of values (the first is the default's).
CHOICES = {("model", "decode_attention"): ("auto", "xla", "layer")}


# Numeric fields' ranges: (low, low inclusive, high, high inclusive), None unbounded.
_AT_LEAST_1, _AT_LEAST_0 = (1, True, None, None), (0, True, None, None)
_POSITIVE, _SHARE = (0, False, None, None), (0, True, 1, False)
RANGES = {
    **{f"model.{k}": _AT_LEAST_1 for k in (
        "vocab_size", "embedding_size", "hidden_size", "num_attention_heads", "intermediate_size",
        "num_hidden_layers", "num_hidden_groups", "inner_group_num", "max_position_embeddings",
        "type_vocab_size", "decoder_layers", "align_dim")},
    "model.layer_norm_eps": _POSITIVE, "model.initializer_range": _POSITIVE,
    "model.hidden_dropout_prob": _SHARE,
    **{f"data.{k}": _AT_LEAST_1 for k in ("tokenizer_vocab_size", "max_desc_len", "max_code_len")},
    **{f"data.{k}": _AT_LEAST_0 for k in ("max_examples", "max_unlabelled")},
    "data.valid_fraction": _SHARE, "data.test_fraction": _SHARE,
    **{f"train.{k}": _AT_LEAST_1 for k in (
        "steps", "batch_size", "microbatches", "log_every", "eval_batches", "checkpoint_every",
        "keep_checkpoints")},
    **{f"train.{k}": _AT_LEAST_0 for k in (
        "warmup_steps", "l2_weight", "infonce_weight", "loss_chunk", "eval_every",
        "samples_at_end")},
    "train.learning_rate": _POSITIVE,
    **{f"sample.{k}": _AT_LEAST_1 for k in ("max_new_tokens", "num_beams", "num_samples")},
    **{f"sample.{k}": _AT_LEAST_0 for k in (
        "top_k", "length_penalty", "decode_phase", "no_repeat_ngram_size")},
    "sample.temperature": _POSITIVE, "sample.top_p": (0, False, 1, True),
    "sample.repetition_penalty": (1, True, None, None),
    "retrieval.k": _AT_LEAST_0, "retrieval.max_ctx_len": _AT_LEAST_1,
    "retrieval.self_neighbour_rate": _SHARE,
}


def _out_of_range(value, low, low_in, high, high_in) -> str | None:
  """What `value` must be, when it is not."""
  if (value >= low if low_in else value > low) and (
      high is None or (value <= high if high_in else value < high)):
    return None
  if high is not None:
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
  return f"at least {low}" if low_in else "positive"


def validate(config: ml_collections.ConfigDict) -> None:
  """ValueError, in one sentence naming the field, for a wrong type or out-of-range value."""
  preset = config.model.get("preset", DEFAULT_PRESET) if "model" in config else DEFAULT_PRESET
  schema = get_config(preset)

  def check(node, default, path):
    for key, want in default.items():
      if key not in node:
        continue
      name, value = f"{path}.{key}", node[key]
      if isinstance(want, ml_collections.ConfigDict):
        check(value, want, name)
      elif isinstance(want, tuple) and want and isinstance(want[0], int):
        if not (isinstance(value, (tuple, list)) and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
          raise ValueError(f"{name}={value!r} is not a tuple of positive ints; set it like "
                           f"--{name}='{want}'.")
      elif isinstance(want, float) and isinstance(value, (int, float)):
        if not math.isfinite(value):
          raise ValueError(f"{name}={value!r} is not a finite number; give a finite value.")

  check(config, schema, "config")
  for path, bounds in RANGES.items():
    section, name = path.split(".")
    value = config[section].get(name) if section in config else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      want = _out_of_range(value, *bounds)
      if want:
        raise ValueError(f"config.{path}={value} must be {want}.")
  for axis, value in config.get("mesh", {}).items():
    if isinstance(value, int) and value != -1 and value < 1:
      raise ValueError(f"config.mesh.{axis}={value} must be a number of devices, or -1 for the "
                       "rest of them.")
  if "data" in config and config.data.get("valid_fraction", 0) + config.data.get(
      "test_fraction", 0) >= 1:
    raise ValueError(f"config.data.valid_fraction + test_fraction = "
                     f"{config.data.valid_fraction + config.data.test_fraction:g} leaves no train "
                     "split; keep their sum below 1.")
  for (section, name), choices in CHOICES.items():
    value = config[section].get(name) if section in config else None
    if value is not None and value not in choices:
      raise ValueError(f"config.{section}.{name}={value!r} is not one of {', '.join(choices)}; "
                       f"set --config.{section}.{name}={choices[0]}.")


def config_path(spec: str) -> str:
  """A `--config` value as a file config_flags can load: an existing path as given, else the
  shipped config `configs/X.py`, `X.py`, `X` or variant `X` (configs.VARIANTS); `:arg` kept."""
  path, colon, arg = spec.partition(":")
  if os.path.exists(path) or not path:
    return spec
  name = os.path.basename(path)
  stem = name[:-len(".py")] if name.endswith(".py") else name
  if stem in shipped_configs.VARIANTS:
    file, _, variant = shipped_configs.VARIANTS[stem].partition(":")
    return os.path.join(CONFIG_DIR, file) + ":" + ",".join(a for a in (variant, arg) if a)
  shipped = os.path.join(CONFIG_DIR, stem + ".py")
  return shipped + colon + arg if os.path.exists(shipped) else spec


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config a `--config` value names, without command-line overrides."""
  path, colon, arg = config_path(spec).partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config file {path!r}; give a path or a shipped config "
                            f"({', '.join(shipped_names())}).")
  module_spec = importlib.util.spec_from_file_location("_loaded_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if colon else module.get_config()


def shipped_names() -> list[str]:
  """The names `--config` finds in the package: its config files and their named variants."""
  files = [f[:-len(".py")] for f in os.listdir(CONFIG_DIR)
           if f.endswith(".py") and f not in ("__init__.py", "common.py")]
  return sorted(set(files) | set(shipped_configs.VARIANTS))


def with_shipped_configs(argv: list[str]) -> list[str]:
  """argv with every `--config X` / `--config=X` resolved by `config_path`."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + config_path(a[len("--config="):])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = config_path(out[i + 1])
  return out
