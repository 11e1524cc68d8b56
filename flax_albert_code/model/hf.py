"""Import and export of Hugging Face ALBERT encoder weights (local directories, no hub access).

Only `shared_embedding/*` and `encoder/{albert_layer_groups_*,pooler}` have HF counterparts. A
torch Linear weight is (out, in); our kernels are (in..., out...), attention heads split out.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from flax_albert_code import config as config_lib
from flax_albert_code.model import albert as model_lib
from flax_albert_code.model.layers import ModelConfig
from flax_albert_code.utils import files

# HF AlbertConfig fields that define the encoder; they override ours on import.
HF_CONFIG_FIELDS = (
    "vocab_size", "embedding_size", "hidden_size", "num_attention_heads", "intermediate_size",
    "num_hidden_layers", "num_hidden_groups", "inner_group_num", "hidden_act",
    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "initializer_range",
)
# Non-persistent buffers some older checkpoints still carry.
_IGNORED_HF_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
_ENCODER_PREFIXES = ("embeddings.", "encoder.", "pooler.")


class _Tensor(NamedTuple):
  """One encoder tensor: where it lives in our tree and in HF's, and how to convert it."""
  path: tuple[str, ...]   # inside params (no leading "params")
  hf_key: str             # without the "albert." prefix
  kind: str               # "kernel" (torch Linear weight), "vector", or "copy"
  shape: tuple[int, ...]  # our shape
  n_in: int = 1           # leading input axes of a kernel


def _tensors(cfg: ModelConfig) -> list[_Tensor]:
  """Every encoder tensor of our model with its HF name (HF AlbertModel layout)."""
  h, e, n, d, f = (cfg.hidden_size, cfg.embedding_size, cfg.num_attention_heads, cfg.head_dim,
                   cfg.intermediate_size)
  out: list[_Tensor] = []

  def norm(path, key, size):
    out.append(_Tensor(path + ("scale",), key + ".weight", "vector", (size,)))
    out.append(_Tensor(path + ("bias",), key + ".bias", "vector", (size,)))

  def linear(path, key, shape, n_in=1):
    out.append(_Tensor(path + ("kernel",), key + ".weight", "kernel", shape, n_in))
    out.append(_Tensor(path + ("bias",), key + ".bias", "vector", shape[n_in:]))

  emb = ("shared_embedding",)
  for name, rows in (("word_embeddings", cfg.vocab_size),
                     ("position_embeddings", cfg.max_position_embeddings),
                     ("token_type_embeddings", cfg.type_vocab_size)):
    out.append(_Tensor(emb + (name, "embedding"), f"embeddings.{name}.weight", "copy", (rows, e)))
  norm(emb + ("LayerNorm",), "embeddings.LayerNorm", e)
  linear(emb + ("embedding_hidden_mapping_in",), "encoder.embedding_hidden_mapping_in", (e, h))
  for g in range(cfg.num_hidden_groups):
    for k in range(cfg.inner_group_num):
      ours = ("encoder", f"albert_layer_groups_{g}", f"albert_layers_{k}")
      hf = f"encoder.albert_layer_groups.{g}.albert_layers.{k}"
      for qkv in ("query", "key", "value"):
        linear(ours + ("attention", qkv), f"{hf}.attention.{qkv}", (h, n, d))
      linear(ours + ("attention", "dense"), f"{hf}.attention.dense", (n, d, h), n_in=2)
      norm(ours + ("attention", "LayerNorm"), f"{hf}.attention.LayerNorm", h)
      linear(ours + ("ffn", "ffn"), f"{hf}.ffn", (h, f))
      linear(ours + ("ffn", "ffn_output"), f"{hf}.ffn_output", (f, h))
      norm(ours + ("ffn", "full_layer_layer_norm"), f"{hf}.full_layer_layer_norm", h)
  linear(("encoder", "pooler"), "pooler", (h, h))
  return out


def _hf_shape(t: _Tensor) -> tuple[int, ...]:
  if t.kind == "kernel":
    return (math.prod(t.shape[t.n_in:]), math.prod(t.shape[:t.n_in]))
  return (math.prod(t.shape),) if t.kind == "vector" else t.shape


def _to_ours(t: _Tensor, w: np.ndarray) -> np.ndarray:
  return (w.T if t.kind == "kernel" else w).reshape(t.shape)


def _to_hf(t: _Tensor, x: np.ndarray) -> np.ndarray:
  y = x.reshape(_hf_shape(t)[::-1]).T if t.kind == "kernel" else x.reshape(_hf_shape(t))
  return np.ascontiguousarray(y)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return load_file(path)
  except TypeError:  # bfloat16, which numpy lacks: read the raw layout with ml_dtypes
    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
              "F64": np.float64, "I64": np.int64, "I32": np.int32}
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(n))
      data = f.read()
    return {k: np.frombuffer(data[slice(*i["data_offsets"])], dtypes[i["dtype"]]).reshape(
        i["shape"]) for k, i in header.items() if k != "__metadata__"}


def _read_weights(path: str) -> dict[str, np.ndarray]:
  """All tensors of an HF model directory as float32 numpy arrays."""
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  binary = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(single):
    raw = _read_safetensors(single)
  elif os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    raw = {k: v for s in shards for k, v in _read_safetensors(os.path.join(path, s)).items()}
  elif os.path.exists(binary):
    try:  # torch is an optional dependency: only pytorch_model.bin checkpoints need it
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ValueError(
          f"{binary} is a PyTorch pickle and torch is not installed; convert it to "
          "model.safetensors (transformers: model.save_pretrained(dir, safe_serialization=True)) "
          "or install torch.") from e
    state = torch.load(binary, map_location="cpu", weights_only=True)
    raw = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise FileNotFoundError(
        f"No model.safetensors (or pytorch_model.bin) in {path}; point to a local Hugging Face "
        "ALBERT directory (save_pretrained output).")
  return {k: np.asarray(v, np.float32) for k, v in raw.items()}


def _read_config(path: str) -> dict[str, Any]:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"No config.json in {path}; point to a local Hugging Face ALBERT "
                            "directory (save_pretrained output).")
  with open(cfg_path) as f:
    hf = json.load(f)
  if hf.get("model_type", "albert") != "albert":
    raise ValueError(f"{cfg_path} describes a {hf['model_type']!r} model, not ALBERT; "
                     "give an ALBERT directory.")
  return hf


def model_config_from_hf(hf: Mapping[str, Any], config=None) -> ml_collections.ConfigDict:
  """`config` (model or full; default the `base` preset) with the encoder fields of `hf`."""
  if config is None:
    m = config_lib.model_config("base")
  else:
    src = config.model if "model" in config else config
    m = ml_collections.ConfigDict(src.to_dict() if hasattr(src, "to_dict") else dict(src))
  defaults = {"num_hidden_groups": 1, "inner_group_num": 1, "hidden_act": "gelu_new",
              "type_vocab_size": 2, "layer_norm_eps": 1e-12, "initializer_range": 0.02}
  for name in HF_CONFIG_FIELDS:
    if name not in hf and name not in defaults:
      raise ValueError(f"The HF config lacks {name!r}; it is not a complete AlbertConfig.")
    m[name] = hf.get(name, defaults.get(name))
  m.pooling = "cls"   # an HF ALBERT encoder comes with its [CLS] pooler; use it
  return m


def _params_root(params: Mapping) -> tuple[Mapping, bool]:
  """The params tree, and whether it came wrapped as {"params": ...}."""
  if "params" in params and "shared_embedding" not in params:
    return params["params"], True
  return params, False


def _init_params(cfg: ModelConfig, seed: int) -> dict:
  """A fresh CodeModel init (rbg compiles faster than threefry; it seeds what HF lacks)."""
  ids = jnp.zeros((1, 2), jnp.int32)
  variables = jax.jit(model_lib.CodeModel(cfg).init)(jax.random.key(seed, impl="rbg"), ids, ids)
  return nn.meta.unbox(variables["params"])


def _replace(tree: Mapping, path: tuple[str, ...], value: np.ndarray, what: str) -> dict:
  """A copy of `tree` with the leaf at `path` replaced (keeping its box, dtype and sharding)."""
  key = path[0]
  if not isinstance(tree, Mapping) or key not in tree:
    raise ValueError(f"The given params have no {'/'.join(path)} (for {what}); they were not "
                     "built from the model config that matches this HF directory.")
  out = dict(tree)
  if len(path) > 1:
    out[key] = _replace(tree[key], path[1:], value, what)
    return out
  old = tree[key]
  raw = old.value if isinstance(old, nn.meta.AxisMetadata) else old
  if tuple(raw.shape) != tuple(value.shape):
    raise ValueError(f"params/{'/'.join(path)} has shape {tuple(raw.shape)} but {what} gives "
                     f"{tuple(value.shape)}; build the params from the returned config.")
  new = value.astype(raw.dtype)
  new = jax.device_put(new, raw.sharding) if isinstance(raw, jax.Array) else jnp.asarray(new)
  out[key] = old.replace_boxed(new) if isinstance(old, nn.meta.AxisMetadata) else new
  return out


def load_hf_encoder(path: str, params: Mapping | None = None, config=None, *,
                    seed: int = 0) -> tuple[dict, ml_collections.ConfigDict]:
  """(params, model config) from a local HF ALBERT directory: `params` (any CodeModel tree;
  None: a fresh init from `seed`) with its encoder leaves replaced (a missing pooler keeps its
  init), and `config` (default the `base` preset) with the HF encoder fields."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory; give a local Hugging Face ALBERT "
                            "directory (config.json + model.safetensors).")
  model_cfg = model_config_from_hf(_read_config(path), config)
  cfg = ModelConfig.from_config(model_cfg)
  _check_post_norm(cfg, f"{path} holds an HF ALBERT (post-LayerNorm) encoder")
  weights = _read_weights(path)
  prefix = "albert." if any(k.startswith("albert.embeddings.") for k in weights) else ""
  weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

  found = []
  for t in _tensors(cfg):
    if t.hf_key not in weights:
      if t.hf_key.startswith("pooler."):
        continue  # headless checkpoints (AlbertForMaskedLM) have no pooler
      raise ValueError(f"{path} has no tensor {prefix}{t.hf_key}; it is not an ALBERT checkpoint "
                       "matching its config.json.")
    w = weights[t.hf_key]
    if tuple(w.shape) != _hf_shape(t):
      raise ValueError(f"{prefix}{t.hf_key} in {path} has shape {tuple(w.shape)} but its "
                       f"config.json implies {_hf_shape(t)}; the checkpoint is inconsistent.")
    found.append((t, w))
  used = {t.hf_key for t, _ in found} | set(_IGNORED_HF_KEYS)
  extra = sorted(k for k in weights if k.startswith(_ENCODER_PREFIXES) and k not in used)
  if extra:
    raise ValueError(f"{path} has encoder tensors its config.json does not describe (e.g. "
                     f"{prefix}{extra[0]}); fix num_hidden_groups/inner_group_num there.")

  root, wrapped = (_init_params(cfg, seed), False) if params is None else _params_root(params)
  for t, w in found:
    root = _replace(root, t.path, _to_ours(t, w), f"{prefix}{t.hf_key}")
  return ({**params, "params": root} if wrapped else root), model_cfg


def _check_post_norm(cfg: ModelConfig, what: str) -> None:
  if cfg.pre_norm:
    raise ValueError(f"{what}, but config.model.norm_position='pre' places LayerNorm before each "
                     "sublayer, which HF ALBERT does not; use norm_position='post'.")


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
  """config.json for our encoder: AlbertConfig fields (the rest take AlbertConfig defaults)."""
  d = {"architectures": ["AlbertModel"], "model_type": "albert"}
  d.update({name: getattr(cfg, name) for name in HF_CONFIG_FIELDS})
  # Our attention applies no dropout to its probabilities (HF's attention_probs_dropout_prob).
  d.update(hidden_dropout_prob=cfg.hidden_dropout_prob, attention_probs_dropout_prob=0.0,
           pad_token_id=config_lib.PAD_ID, bos_token_id=config_lib.BOS_ID,
           eos_token_id=config_lib.EOS_ID, dtype="float32")
  return d


def _leaf(root: Mapping, path: tuple[str, ...]) -> np.ndarray:
  x = root
  for i, key in enumerate(path):
    if not isinstance(x, Mapping) or key not in x:
      raise ValueError(f"params lack {'/'.join(path[:i + 1])}; pass the CodeModel params that "
                       "match model_cfg.")
    x = x[key]
  x = x.value if isinstance(x, nn.meta.AxisMetadata) else x
  return np.asarray(jax.device_get(x), np.float32)


def save_hf_encoder(params: Mapping, model_cfg, out_dir: str) -> str:
  """Writes our encoder as an HF ALBERT directory (config.json + model.safetensors, float32)
  that `AlbertModel.from_pretrained` loads, staged then moved in (other files left alone)."""
  cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_config(
      getattr(model_cfg, "model", model_cfg))
  _check_post_norm(cfg, "An HF ALBERT directory holds a post-LayerNorm encoder")
  root, _ = _params_root(params)
  tensors = {t.hf_key: _to_hf(t, _leaf(root, t.path)) for t in _tensors(cfg)}
  out_dir = os.path.abspath(os.fspath(out_dir))
  with files.staged_dir(out_dir, existing="merge") as tmp:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config_dict(cfg), f, indent=2, sort_keys=True)
      f.write("\n")
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  return out_dir
