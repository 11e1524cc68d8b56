"""ALBERT building blocks: factorized embedding, attention (self, cross, cached), FFN.

Parameters carry logical axis names, activations logical sharding constraints; parameter names
follow Hugging Face's ALBERT so that `hf.py` maps them one to one.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_albert_code import config as config_lib

Array = jax.Array
DType = Any

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


class _ModelConfigMethods:
  """What `ModelConfig` does beyond holding its fields."""

  @classmethod
  def from_config(cls, cfg) -> ModelConfig:
    """From `config.model` (a ConfigDict or mapping, e.g. a checkpoint's), upgraded by
    `config.upgrade`; any key the schema lacks is refused."""
    values = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    values = config_lib.upgrade({"model": values})[0].model.to_dict()
    schema = config_lib.model_config(values.get("preset", config_lib.DEFAULT_PRESET))
    unknown = sorted(k for k in values if k not in schema)
    if unknown:
      raise ValueError(f"config.model has no field {unknown[0]!r}; its fields are "
                       f"{', '.join(sorted(schema.keys()))}.")
    return cls(**{f.name: (tuple(v) if isinstance(v := values[f.name], list) else v)
                  for f in dataclasses.fields(cls)})

  @classmethod
  def default(cls, preset: str = config_lib.DEFAULT_PRESET) -> ModelConfig:
    """The schema's model config of `preset` (tiny, small, base, large)."""
    return cls.from_config(config_lib.model_config(preset))

  def __post_init__(self):
    checks = [
        (self.hidden_size % self.num_attention_heads == 0,
         f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
         f"{self.num_attention_heads}"),
        (self.num_hidden_layers % self.num_hidden_groups == 0,
         f"num_hidden_layers {self.num_hidden_layers} is not a multiple of num_hidden_groups "
         f"{self.num_hidden_groups}"),
        (self.hidden_act in ACTIVATIONS,
         f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}"),
        (self.decoder_memory in ("states", "vector"),
         f"decoder_memory {self.decoder_memory!r} must be 'states' or 'vector'"),
        (self.pooling in ("cls", "mean", "first_last"),
         f"pooling {self.pooling!r} must be 'cls', 'mean' or 'first_last'"),
        (self.attention_impl in ("xla", "cudnn"),
         f"attention_impl {self.attention_impl!r} must be 'xla' or 'cudnn'"),
        (self.remat in ("none", "full", "dots"),
         f"remat {self.remat!r} must be 'none', 'full' or 'dots'"),
        (self.decode_attention in config_lib.CHOICES[("model", "decode_attention")],
         f"decode_attention {self.decode_attention!r} must be one of "
         f"{', '.join(config_lib.CHOICES[('model', 'decode_attention')])}"),
        (self.decode_attention != "layer" or self.layer_kernels_fit,
         "decode_attention 'layer' needs a power-of-two head size (hidden_size / heads) and "
         "hidden_size and intermediate_size multiples of 16 (Triton tiles); use 'xla' or "
         "'auto'"),
        (self.norm_position in ("post", "pre"),
         f"norm_position {self.norm_position!r} must be 'post' (ALBERT) or 'pre'"),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(f"Bad model config: {msg}; fix config.model.")

  @property
  def layer_kernels_fit(self) -> bool:
    """Whether model/fused_decode.py's Triton tiles fit the sizes."""
    return (self.head_dim & (self.head_dim - 1) == 0 and self.hidden_size % 16 == 0
            and self.intermediate_size % 16 == 0)

  @property
  def decode_layer_kernels(self) -> bool:
    """One-token decode steps run as model/fused_decode.py's kernels: "layer", or "auto" on a
    GPU when the tiles fit. Read at trace time."""
    if self.decode_attention == "auto":
      return jax.default_backend() == "gpu" and self.layer_kernels_fit
    return self.decode_attention == "layer"

  @property
  def pre_norm(self) -> bool:
    return self.norm_position == "pre"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def compute_dtype(self) -> DType:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> DType:
    """Parameters (and the optimizer state) stay float32 whatever the compute dtype."""
    return jnp.dtype(jnp.float32)


# Hashable model hyper-parameters (a jit static argument): one field per key of `config.model`
# but `preset`, declared once by the schema (config.py). Build it with `from_config` or `default`.
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig", [(k, type(v)) for k, v in config_lib.model_config().items() if k != "preset"],
    bases=(_ModelConfigMethods,), frozen=True)
ModelConfig.__module__ = __name__


def _init(cfg: ModelConfig, names: tuple[str | None, ...], std: float | None = None):
  return nn.with_logical_partitioning(
      nn.initializers.normal(cfg.initializer_range if std is None else std), names)


def _zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def layer_norm(cfg: ModelConfig, axis_name: str, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                      param_dtype=cfg.weight_dtype, scale_init=_ones((axis_name,)),
                      bias_init=_zeros((axis_name,)), name=name)


class Dense(nn.Module):
  """y = x . kernel + bias over the last `n_in` axes (flax's DenseGeneral initialises
  multi-axis kernels flat, which breaks logical partitioning)."""
  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  n_in: int
  cfg: ModelConfig
  init_std: float | None = None   # the kernel's initial standard deviation (None: the config's)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    kernel = self.param("kernel", _init(cfg, self.axes, self.init_std),
                        x.shape[-self.n_in:] + self.features, cfg.weight_dtype)
    bias = self.param("bias", _zeros(self.axes[self.n_in:]), self.features, cfg.weight_dtype)
    dt = cfg.compute_dtype
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(dt), kernel.astype(dt), (contract, ((), ())))
    return y + bias.astype(dt)


def dense(cfg: ModelConfig, features, axes: tuple[str | None, ...], name: str,
          n_in: int = 1, init_std: float | None = None) -> Dense:
  """A Dense whose kernel has logical axes `axes` (inputs first) and bias the output axes."""
  features = features if isinstance(features, tuple) else (features,)
  return Dense(features, axes, n_in, cfg, init_std, name=name)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
  return nn.with_logical_constraint(x, names)


class FactorizedEmbedding(nn.Module):
  """ALBERT embedding: word + position + token type, LayerNorm, dropout, then E -> H; `attend`
  is the output layer tied to it."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    emb = functools.partial(nn.Embed, features=cfg.embedding_size, dtype=cfg.compute_dtype,
                            param_dtype=cfg.weight_dtype)
    self.word_embeddings = emb(cfg.vocab_size, embedding_init=_init(cfg, ("vocab", "emb")))
    self.position_embeddings = emb(cfg.max_position_embeddings,
                                   embedding_init=_init(cfg, (None, "emb")))
    self.token_type_embeddings = emb(cfg.type_vocab_size,
                                     embedding_init=_init(cfg, (None, "emb")))
    self.LayerNorm = layer_norm(cfg, "emb", "LayerNorm")
    self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
    self.embedding_hidden_mapping_in = dense(cfg, cfg.hidden_size, ("emb", "embed"),
                                             "embedding_hidden_mapping_in")

  def __call__(self, ids_BxL: Array, position_offset: Array | int = 0,
               token_types_BxL: Array | None = None, deterministic: bool = True) -> Array:
    """Positions are `position_offset + arange(L)` for every row. Positions and token types
    are read by slicing and a one-hot product, not a gather: its backward scatter-add would
    have all rows collide (position 0, type 0), serialised on GPU atomics."""
    dt = self.cfg.compute_dtype
    length = ids_BxL.shape[-1]
    x = embed_lookup(self.word_embeddings.embedding.astype(dt), ids_BxL)
    pos_table = self.position_embeddings.embedding.astype(dt)
    if isinstance(position_offset, int):
      pos_LxE = pos_table[position_offset:position_offset + length]
    else:
      pos_LxE = jax.lax.dynamic_slice_in_dim(pos_table, position_offset, length)
    types = self.token_type_embeddings.embedding.astype(dt)
    if token_types_BxL is None:
      x = x + (pos_LxE + types[0])[None]
    else:
      onehot = jax.nn.one_hot(token_types_BxL, types.shape[0], dtype=dt)
      x = x + pos_LxE[None] + jnp.einsum("blt,te->ble", onehot, types)
    x = self.dropout(self.LayerNorm(x), deterministic=deterministic)
    return constrain(self.embedding_hidden_mapping_in(x), ("batch", "length", "act_embed"))

  def words(self, ids_BxL: Array) -> Array:
    """The tokens' word vectors [B, L, E] alone (no position, type or norm): their identity."""
    return embed_lookup(self.word_embeddings.embedding.astype(self.cfg.compute_dtype), ids_BxL)

  def attend(self, h_BxLxH: Array, bias_V: Array) -> Array:
    """Tied output projection to vocabulary logits (compute dtype; the loss upcasts)."""
    proj_ExH = nn.meta.unbox(self.embedding_hidden_mapping_in.variables["params"]["kernel"])
    logits = tied_logits(h_BxLxH.astype(self.cfg.compute_dtype), proj_ExH,
                         self.word_embeddings.embedding, bias_V)
    return constrain(logits, ("batch", "length", "act_vocab"))


@jax.custom_vjp
def embed_lookup(table_VxE: Array, ids: Array) -> Array:
  """Row gather whose backward scatter-adds in float32 whatever the table's dtype."""
  return jnp.take(table_VxE, ids, axis=0)


def _embed_fwd(table, ids):
  return jnp.take(table, ids, axis=0), (ids, table)   # the table is alive anyway (a parameter)


def _embed_bwd(res, g):
  ids, table = res
  grad = jnp.zeros((table.shape[0], g.shape[-1]), jnp.float32).at[ids.reshape(-1)].add(
      g.reshape(-1, g.shape[-1]).astype(jnp.float32))
  return grad.astype(table.dtype), None


embed_lookup.defvjp(_embed_fwd, _embed_bwd)


def tied_logits(h_BxTxH: Array, proj_ExH: Array, word_VxE: Array, bias_V: Array) -> Array:
  """Output layer tied to the factorized embedding: H -> E (projection^T) -> V (words^T)."""
  dt = h_BxTxH.dtype
  e = jnp.einsum("bth,eh->bte", h_BxTxH, proj_ExH.astype(dt))
  return jnp.einsum("bte,ve->btv", e, word_VxE.astype(dt)) + bias_V.astype(dt)


def attention(q_BxTxNxD: Array, k_BxSxNxD: Array, v_BxSxNxD: Array, *, impl: str,
              is_causal: bool = False, kv_lengths_B: Array | None = None,
              mask: Array | None = None) -> Array:
  """jax.nn.dot_product_attention, cuDNN's where asked and supported. Padding is right padding
  as `kv_lengths_B` (cuDNN takes it natively) or any boolean `mask` (XLA)."""
  use_cudnn = (impl == "cudnn" and mask is None and q_BxTxNxD.dtype in (jnp.bfloat16, jnp.float16)
               and jax.default_backend() == "gpu")
  lengths = None if kv_lengths_B is None else kv_lengths_B.astype(jnp.int32)
  return jax.nn.dot_product_attention(
      q_BxTxNxD, k_BxSxNxD, v_BxSxNxD, mask=mask, is_causal=is_causal,
      key_value_seq_lengths=lengths, implementation="cudnn" if use_cudnn else "xla")


class AlbertAttention(nn.Module):
  """Multi-head attention in a residual block: LN(x + dense(attn(x))) (ALBERT), or with
  `norm_position="pre"` x + dense(attn(LN(x))). Cross-attention when given `kv` (a memory's,
  computed once by `kv`). With `cfg.fused_qkv` the projections of one input are one matmul
  against their kernels stacked at compute time on a new axis before `heads` (where tensor
  parallelism shards), the parameters staying separate."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    heads = (cfg.num_attention_heads, cfg.head_dim)
    self.query = dense(cfg, heads, ("embed", "heads", "kv"), "query")
    self.key = dense(cfg, heads, ("embed", "heads", "kv"), "key")
    self.value = dense(cfg, heads, ("embed", "heads", "kv"), "value")
    self.dense = dense(cfg, cfg.hidden_size, ("heads", "kv", "embed"), "dense", n_in=2)
    self.LayerNorm = layer_norm(cfg, "embed", "LayerNorm")
    self.dropout = nn.Dropout(self.cfg.hidden_dropout_prob)

  def _project(self, x_BxTxH: Array, names: tuple[str, ...]) -> tuple[Array, ...]:
    """The projections `names` (of query, key, value) of x, each [B, T, N, D]."""
    modules = [getattr(self, n) for n in names]
    out_names = ("batch", "length", "act_heads", "kv")
    if not self.cfg.fused_qkv or len(names) == 1 or self.is_initializing():
      return tuple(constrain(m(x_BxTxH), out_names) for m in modules)
    dt = self.cfg.compute_dtype
    weights = [nn.meta.unbox(m.variables["params"]) for m in modules]
    kernel_HxPxNxD = constrain(jnp.stack([w["kernel"].astype(dt) for w in weights], axis=1),
                               ("embed", None, "heads", "kv"))
    bias_PxNxD = jnp.stack([w["bias"].astype(dt) for w in weights])
    y_BxTxPxNxD = jax.lax.dot_general(x_BxTxH.astype(dt), kernel_HxPxNxD,
                                      (((x_BxTxH.ndim - 1,), (0,)), ((), ()))) + bias_PxNxD
    y_BxTxPxNxD = constrain(y_BxTxPxNxD, ("batch", "length", None, "act_heads", "kv"))
    return tuple(constrain(y_BxTxPxNxD[:, :, i], out_names) for i in range(len(names)))

  def _in(self, x_BxTxH: Array) -> Array:
    """The sublayer's input: LN(x) in the pre-norm layout, x in ALBERT's."""
    return self.LayerNorm(x_BxTxH) if self.cfg.pre_norm else x_BxTxH

  def kv(self, memory_BxSxH: Array) -> tuple[Array, Array]:
    """A memory's keys and values (the memory is taken as it is: no LayerNorm of this block)."""
    return self._project(memory_BxSxH, ("key", "value"))

  def qkv(self, x_BxTxH: Array) -> tuple[Array, Array, Array]:
    return self._project(self._in(x_BxTxH), ("query", "key", "value"))

  def __call__(self, x_BxTxH: Array, kv: tuple[Array, Array] | None = None, *,
               is_causal: bool = False, kv_lengths_B: Array | None = None,
               mask: Array | None = None, deterministic: bool = True) -> Array:
    if kv is None:
      q, k, v = self.qkv(x_BxTxH)
    else:
      q, (k, v) = self._project(self._in(x_BxTxH), ("query",))[0], kv
    return self.attend(x_BxTxH, q, k, v, is_causal=is_causal, kv_lengths_B=kv_lengths_B,
                       mask=mask, deterministic=deterministic)

  def attend(self, x_BxTxH: Array, q_BxTxNxD: Array, k_BxSxNxD: Array, v_BxSxNxD: Array, *,
             is_causal: bool = False, kv_lengths_B: Array | None = None,
             mask: Array | None = None, deterministic: bool = True) -> Array:
    """Attention of projected queries over keys/values, then the residual block."""
    dt = q_BxTxNxD.dtype
    ctx = attention(q_BxTxNxD, k_BxSxNxD.astype(dt), v_BxSxNxD.astype(dt),
                    impl=self.cfg.attention_impl, is_causal=is_causal,
                    kv_lengths_B=kv_lengths_B, mask=mask)
    out = self.dropout(self.dense(ctx), deterministic=deterministic)
    y = x_BxTxH + out if self.cfg.pre_norm else self.LayerNorm(x_BxTxH + out)
    return constrain(y, ("batch", "length", "act_embed"))


class AlbertFFN(nn.Module):
  """ALBERT's FFN block: LN(x + W2 act(W1 x)), or pre-norm x + W2 act(W1 LN(x))."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.ffn = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "ffn")
    self.ffn_output = dense(cfg, cfg.hidden_size, ("mlp", "embed"), "ffn_output")
    self.full_layer_layer_norm = layer_norm(cfg, "embed", "full_layer_layer_norm")
    self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, x_BxLxH: Array, deterministic: bool = True) -> Array:
    pre = self.cfg.pre_norm
    h = self.full_layer_layer_norm(x_BxLxH) if pre else x_BxLxH
    h = constrain(ACTIVATIONS[self.cfg.hidden_act](self.ffn(h)), ("batch", "length", "act_mlp"))
    out = self.dropout(self.ffn_output(h), deterministic=deterministic)
    y = x_BxLxH + out if pre else self.full_layer_layer_norm(x_BxLxH + out)
    return constrain(y, ("batch", "length", "act_embed"))


class AlbertLayer(nn.Module):
  """One ALBERT transformer layer: self-attention, then FFN (HF `AlbertLayer`)."""
  cfg: ModelConfig

  def setup(self):
    self.attention = AlbertAttention(self.cfg)
    self.ffn = AlbertFFN(self.cfg)

  def __call__(self, x_BxLxH: Array, kv_lengths_B: Array | None, mask: Array | None,
               deterministic: bool) -> Array:
    x = self.attention(x_BxLxH, kv_lengths_B=kv_lengths_B, mask=mask, deterministic=deterministic)
    return self.ffn(x, deterministic=deterministic)
