"""CodeModel: an ALBERT encoder for descriptions and code, and an ALBERT-style decoder for code.

Parameters: shared_embedding/, encoder/albert_layer_groups_{g}/albert_layers_{k}/ (HF ALBERT
layout), encoder/{pooler,align_head}, decoder/{self_attention,ffn (unless shared with the
encoder),cross_attention,logits_bias,copy_head}. Each stack applies its shared block `depth` times
as an `nn.scan` (compile time flat in depth) or a loop; `remat` rematerialises it.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_albert_code.model import copy_head as copy_lib
from flax_albert_code.model import fused_decode
from flax_albert_code.model import layers
from flax_albert_code.config import BOS_ID, CLS_ID, EOS_ID, PAD_ID, SEP_ID
from flax_albert_code.model.layers import ModelConfig

Array = jax.Array


class EncoderOutput(NamedTuple):
  states_BxLxH: Array     # last hidden states
  mask_BxL: Array         # True at real tokens
  pooled_BxH: Array       # sentence vector v (tanh pooler over [CLS], or a masked mean)
  vector_BxA: Array       # alignment vector (projection of v, optionally L2-normalised)
  embedded_BxLxH: Array | None = None   # the embedded input the layers read
  ids_BxL: Array | None = None          # the input's token ids (what the copy head copies)


class DecodeCache(NamedTuple):
  """Static-shape decoding state: self-attention KV per layer, cross-attention KV once."""
  k_LxBxSxNxD: Array
  v_LxBxSxNxD: Array
  cross_k_BxMxNxD: Array
  cross_v_BxMxNxD: Array
  memory_lengths_B: Array
  index: Array            # scalar int32: the position the next token is written at
  # Beam search: row (b, k) reads position s from beam src[b, k, s], the beam that wrote it
  # (the cache never moves); None: every row reads its own.
  beam_src_BxKxS: Array | None = None
  # With copy_head: its keys and the context's ids (once), and its last steps' scores.
  copy_keys_BxCxD: Array | None = None
  copy_ids_BxC: Array | None = None
  copy_history_BxLxC: Array | None = None


class _Unrolled(nn.Module):
  """The Python-loop twin of `nn.scan` (scan_layers=False): same parameters, unrolled graph."""
  body: nn.Module
  length: int
  in_axes: tuple

  def __call__(self, carry, *args):
    ys = []
    for i in range(self.length):
      xs = [a if ax is nn.broadcast else jax.tree.map(lambda t, i=i: t[i], a)
            for a, ax in zip(args, self.in_axes)]
      carry, y = self.body(carry, *xs)
      ys.append(y)
    return carry, (None if ys[0] is None else jax.tree.map(lambda *t: jnp.stack(t), *ys))


def _repeat(body_cls, cfg: ModelConfig, length: int, in_axes: tuple, **attrs) -> nn.Module:
  """`body_cls(**attrs)` `length` times (scan or loop); the body calls shared modules."""
  if cfg.remat != "none":
    policy = (jax.checkpoint_policies.nothing_saveable if cfg.remat == "full"
              else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
    body_cls = nn.remat(body_cls, policy=policy, prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    return nn.scan(body_cls, variable_broadcast="params", split_rngs={"params": False,
                   "dropout": True}, in_axes=in_axes, length=length)(**attrs)
  return _Unrolled(body_cls(**attrs), length, in_axes)


class _GroupBody(nn.Module):
  """One application of an ALBERT layer group (its `inner_group_num` layers in order)."""
  group: nn.Module
  deterministic: bool

  def __call__(self, x, kv_lengths, mask):
    for layer in self.group.albert_layers:
      x = layer(x, kv_lengths, mask, self.deterministic)
    return x, None


class AlbertLayerGroup(nn.Module):
  cfg: ModelConfig

  def setup(self):
    self.albert_layers = [layers.AlbertLayer(self.cfg) for _ in range(self.cfg.inner_group_num)]


class AlbertEncoder(nn.Module):
  """ALBERT encoder over an already embedded sequence, plus pooler and alignment head."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.albert_layer_groups = [AlbertLayerGroup(cfg) for _ in range(cfg.num_hidden_groups)]
    self.pooler = layers.dense(cfg, cfg.hidden_size, ("embed", None), "pooler")
    self.align_head = layers.dense(cfg, cfg.align_dim, ("embed", "align"), "align_head")
    if cfg.pre_norm:   # the pre-norm residual stream is normalised once, at the end
      self.final_layer_norm = layers.layer_norm(cfg, "embed", "final_layer_norm")
    repeats = cfg.num_hidden_layers // cfg.num_hidden_groups
    # One stack per group and dropout mode (stacks hold no parameters of their own).
    self.stacks = [[_repeat(_GroupBody, cfg, repeats, (nn.broadcast,) * 2, group=group,
                            deterministic=det) for det in (True, False)]
                   for group in self.albert_layer_groups]

  def __call__(self, x_BxLxH: Array, mask_BxL: Array, *, deterministic: bool = True,
               attention_mask: Array | None = None) -> EncoderOutput:
    cfg = self.cfg
    # Right padding goes as lengths (cuDNN takes them); any other mask as `attention_mask`.
    lengths = None if attention_mask is not None else mask_BxL.sum(-1)
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    embedded_BxLxH = x_BxLxH
    for det_stack, drop_stack in self.stacks:
      x_BxLxH, _ = (det_stack if deterministic else drop_stack)(x_BxLxH, lengths, mask)
    if cfg.pre_norm:
      x_BxLxH = self.final_layer_norm(x_BxLxH)
    if cfg.pooling == "cls":
      pooled = jnp.tanh(self.pooler(x_BxLxH[:, 0]))
    else:
      if self.is_initializing():   # the pooler exists either way (HF export, pooling switches)
        self.pooler(x_BxLxH[:, 0])
      w = mask_BxL[..., None].astype(x_BxLxH.dtype)
      # "first_last": the mean of the embedded input and the last states (BERT-flow's).
      h = x_BxLxH if cfg.pooling == "mean" else 0.5 * (x_BxLxH + embedded_BxLxH)
      pooled = (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    vec = self.align_head(pooled).astype(jnp.float32)
    vec = vec / jnp.maximum(jnp.linalg.norm(vec, axis=-1, keepdims=True), 1e-6)   # unit length
    return EncoderOutput(x_BxLxH, mask_BxL, pooled, vec, embedded_BxLxH)


class _DecoderBody(nn.Module):
  """One application of the shared decoder block: causal self-attn, cross-attn, FFN.

  mode "decode": the carry holds the whole [L, B, S, N, D] cache, so the new keys/values are
  written in place at `index` (a scanned cache would be copied every step); queries read only
  the first `attend_len` (static; None: all) positions, each from the beam that wrote it.
  """
  self_attention: nn.Module
  cross_attention: nn.Module
  ffn: nn.Module
  deterministic: bool
  mode: str = "train"

  def __call__(self, x, cross_kv, memory_lengths, *decode_args):
    det = self.deterministic
    if self.mode == "train":
      x = self.self_attention(x, is_causal=True, deterministic=det)
    else:
      (x, cache_k, cache_v, layer), (index, attend_len, beam_src) = x, decode_args
      q, k, v = self.self_attention.qkv(x)
      at = (layer, 0, index, 0, 0)
      cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), at)
      cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), at)
      t, s = x.shape[1], attend_len or cache_k.shape[2]
      q_pos = index + jnp.arange(t)
      mask = (jnp.arange(s)[None, :] <= q_pos[:, None])[None, None]
      keys, values = cache_k[layer, :, :s], cache_v[layer, :, :s]
      if beam_src is not None:
        keys, values = (_read_beams(c, beam_src[:, :, :s]) for c in (keys, values))
      x = self.self_attention.attend(x, q, keys, values, mask=mask, deterministic=det)
    x = self.cross_attention(x, cross_kv, kv_lengths_B=memory_lengths, deterministic=det)
    x = self.ffn(x, deterministic=det)
    carry = x if self.mode == "train" else (x, cache_k, cache_v, layer + 1)
    return carry, None


def _read_beams(cache_NxSxHxD: Array, src_BxKxS: Array) -> Array:
  """Row (b, k) at position s reads beam src[b, k, s] of description b (a fusable gather)."""
  b, k, s = src_BxKxS.shape
  c = cache_NxSxHxD.reshape(b, k, *cache_NxSxHxD.shape[1:])
  c = jnp.take_along_axis(c, src_BxKxS[:, :, :, None, None], axis=1)
  return c.reshape(cache_NxSxHxD.shape)


class AlbertDecoder(nn.Module):
  """Shared-parameter decoder with cross-attention; logits tied to the factorized embedding."""
  cfg: ModelConfig
  embedding: nn.Module
  shared_layer: nn.Module | None = None   # encoder layer whose attention/FFN the decoder reuses

  def setup(self):
    cfg = self.cfg
    if self.shared_layer is None:
      self.self_attention = layers.AlbertAttention(cfg)
      self.ffn = layers.AlbertFFN(cfg)
    self.cross_attention = layers.AlbertAttention(cfg)
    sa, ffn = self._blocks()
    blocks = dict(self_attention=sa, cross_attention=self.cross_attention, ffn=ffn)
    self.train_stacks = [_repeat(_DecoderBody, cfg, cfg.decoder_layers, (nn.broadcast,) * 2,
                                 deterministic=det, **blocks) for det in (True, False)]
    self.decode_stack = _repeat(_DecoderBody, cfg, cfg.decoder_layers,
                                (nn.broadcast,) * 5, deterministic=True, mode="decode",
                                **blocks)
    self.logits_bias = self.param("logits_bias", layers._zeros(("vocab",)), (cfg.vocab_size,),
                                  cfg.weight_dtype)
    if cfg.pre_norm:
      self.final_layer_norm = layers.layer_norm(cfg, "embed", "final_layer_norm")
    if cfg.copy_head:
      self.copy_head = copy_lib.CopyHead(cfg)

  def _final(self, x_BxTxH: Array) -> Array:
    return self.final_layer_norm(x_BxTxH) if self.cfg.pre_norm else x_BxTxH

  def _blocks(self):
    shared = self.shared_layer
    return (self.self_attention, self.ffn) if shared is None else (shared.attention, shared.ffn)

  def memory_kv(self, memory_BxMxH: Array) -> tuple[Array, Array]:
    """Cross-attention keys/values: computed once, reused by every layer and decoding step."""
    return self.cross_attention.kv(memory_BxMxH)

  def hidden(self, ids_BxT: Array, cross_kv, memory_lengths_B: Array, *,
             deterministic: bool = True) -> Array:
    x = self.embedding(ids_BxT, deterministic=deterministic)
    x, _ = self.train_stacks[0 if deterministic else 1](x, cross_kv, memory_lengths_B)
    return self._final(x)

  def logits(self, h_BxTxH: Array) -> Array:
    return self.embedding.attend(h_BxTxH, self.logits_bias)

  def copy_keys(self, enc: EncoderOutput) -> Array:
    return self.copy_head.keys(enc.states_BxLxH, self.embedding.words(enc.ids_BxL))

  def copy(self, h_BxTxH: Array, dec_in_BxT: Array, keys_BxCxD: Array, ids_BxC: Array,
           history_BxLxC: Array | None = None) -> tuple[copy_lib.CopyTerms, Array]:
    """The copy head at each position of `h` (after reading `dec_in`), and its score history."""
    return self.copy_head(h_BxTxH, self.embedding.words(dec_in_BxT), keys_BxCxD, ids_BxC,
                          history_BxLxC)

  def output(self, h_BxTxH: Array, dec_in_BxT: Array, cache_or_enc) -> tuple[Array, Any]:
    """The logits, or with the copy head the mixture's log-probabilities (read as logits:
    log_softmax leaves them); and the copy head's score history (None without it)."""
    logits = self.logits(h_BxTxH)
    if not self.cfg.copy_head:
      return logits, None
    if isinstance(cache_or_enc, DecodeCache):
      keys, ids = cache_or_enc.copy_keys_BxCxD, cache_or_enc.copy_ids_BxC
      history = cache_or_enc.copy_history_BxLxC
    else:
      keys, ids, history = self.copy_keys(cache_or_enc), cache_or_enc.ids_BxL, None
    terms, history = self.copy(h_BxTxH, dec_in_BxT, keys, ids, history)
    return copy_lib.mix_log_probs(logits, terms), history

  def step(self, ids_BxT: Array, cache: DecodeCache,
           attend_len: int | None = None) -> tuple[Array, DecodeCache]:
    """Logits for `ids_BxT` at positions cache.index.. and the new cache. `attend_len` (static,
    >= cache.index + T): attend only to that many cache positions; None: all."""
    x = self.embedding(ids_BxT, cache.index)
    src = cache.beam_src_BxKxS
    if src is not None:   # the new tokens are written to (and read from) each beam's own row
      b, k, t = *src.shape[:2], ids_BxT.shape[1]
      own = jnp.broadcast_to(jnp.arange(k, dtype=src.dtype)[None, :, None], (b, k, t))
      src = jax.lax.dynamic_update_slice(src, own, (0, 0, cache.index))
    if self.cfg.decode_layer_kernels and ids_BxT.shape[1] == 1:
      x, k, v = self._layer_kernels(x, cache, attend_len, src)
    else:
      carry = (x, cache.k_LxBxSxNxD, cache.v_LxBxSxNxD, jnp.zeros((), jnp.int32))
      (x, k, v, _), _ = self.decode_stack(
          carry, (cache.cross_k_BxMxNxD, cache.cross_v_BxMxNxD), cache.memory_lengths_B,
          cache.index, attend_len, src)
    out, history = self.output(self._final(x), ids_BxT, cache)
    return out, cache._replace(k_LxBxSxNxD=k, v_LxBxSxNxD=v, beam_src_BxKxS=src,
                               index=cache.index + ids_BxT.shape[1], copy_history_BxLxC=history)

  def _layer_kernels(self, x_Bx1xH: Array, cache: DecodeCache, attend_len: int | None,
                     src: Array | None) -> tuple[Array, Array, Array]:
    """The one-token decoder stack as model/fused_decode.py's kernels, twelve a layer."""
    cfg = self.cfg
    sa, ffn = self._blocks()
    w = fused_decode.layer_weights(*(nn.meta.unbox(m.variables["params"])
                                     for m in (sa, self.cross_attention, ffn)))
    b, k, v = x_Bx1xH.shape[0], cache.k_LxBxSxNxD, cache.v_LxBxSxNxD
    x = jnp.pad(x_Bx1xH[:, 0], ((0, -b % fused_decode.rows_block(b)), (0, 0)))
    x_ln = sa.LayerNorm(x) if cfg.pre_norm else x
    for layer in range(cfg.decoder_layers):
      at = fused_decode.DecodeAt(k, v, jnp.int32(layer), cache.index,
                                 attend_len or k.shape[2], cache.cross_k_BxMxNxD,
                                 cache.cross_v_BxMxNxD, cache.memory_lengths_B, b, src)
      x, x_ln, k, v = fused_decode.decoder_layer(
          w, x, x_ln, at, pre_norm=cfg.pre_norm, eps=cfg.layer_norm_eps,
          act=layers.ACTIVATIONS[cfg.hidden_act], dtype=cfg.compute_dtype,
          num_heads=cfg.num_attention_heads)
    return x[:b, None], k, v


class CodeModel(nn.Module):
  """Encoder + decoder: `__call__` trains; `encode`, `init_cache`, `decode_step` infer."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.shared_embedding = layers.FactorizedEmbedding(cfg)
    self.encoder = AlbertEncoder(cfg)
    shared_layer = (self.encoder.albert_layer_groups[0].albert_layers[0]
                    if cfg.share_encoder_decoder_block else None)
    if not cfg.share_embedding:
      self.decoder_embedding = layers.FactorizedEmbedding(cfg)
    dec_emb = self.shared_embedding if cfg.share_embedding else self.decoder_embedding
    self.decoder = AlbertDecoder(cfg, embedding=dec_emb, shared_layer=shared_layer)

  def encode(self, ids_BxL: Array, *, deterministic: bool = True,
             attention_mask: Array | None = None,
             token_type_ids: Array | None = None) -> EncoderOutput:
    mask = ids_BxL != PAD_ID if attention_mask is None else attention_mask.astype(bool)
    if token_type_ids is None and self.cfg.context_token_types:
      token_type_ids = context_token_types(ids_BxL)
    x = self.shared_embedding(ids_BxL, token_types_BxL=token_type_ids,
                              deterministic=deterministic)
    enc = self.encoder(x, mask, deterministic=deterministic, attention_mask=attention_mask)
    return enc._replace(ids_BxL=ids_BxL)

  def _memory(self, enc: EncoderOutput) -> tuple[Array, Array]:
    if self.cfg.decoder_memory == "vector":
      return enc.pooled_BxH[:, None, :], jnp.ones(enc.pooled_BxH.shape[:1], jnp.int32)
    states = enc.states_BxLxH
    if self.cfg.memory_embeddings:
      states = 0.5 * (states + enc.embedded_BxLxH.astype(states.dtype))
    return states, enc.mask_BxL.sum(-1).astype(jnp.int32)

  def decoder_hidden(self, enc: EncoderOutput, dec_in_BxT: Array, *,
                     deterministic: bool = True) -> Array:
    memory, lengths = self._memory(enc)
    return self.decoder.hidden(dec_in_BxT, self.decoder.memory_kv(memory), lengths,
                               deterministic=deterministic)

  def logits(self, h_BxTxH: Array) -> Array:
    return self.decoder.logits(h_BxTxH)

  def __call__(self, desc_ids_BxL: Array, code_ids_BxT: Array, *, deterministic: bool = True,
               encode_code: bool = True, decode: bool = True,
               ctx_ids_BxC: Array | None = None) -> dict[str, Any]:
    """Training forward pass over targets `code_ids`: EncoderOutputs "desc" and "code", the
    decoder's last states "hidden" and the copy head's CopyTerms "copy". With `ctx_ids`
    (retrieval) the decoder attends to their encoding instead of the description's."""
    enc_d = self.encode(desc_ids_BxL, deterministic=deterministic)
    out = {"desc": enc_d}
    if decode or self.is_initializing():
      dec_in = shift_right(code_ids_BxT, BOS_ID)
      memory = enc_d if ctx_ids_BxC is None else self.encode(ctx_ids_BxC,
                                                             deterministic=deterministic)
      out["hidden"] = self.decoder_hidden(memory, dec_in, deterministic=deterministic)
      if self.cfg.copy_head:
        out["copy"], _ = self.decoder.copy(out["hidden"], dec_in, self.decoder.copy_keys(memory),
                                           memory.ids_BxL)
    if encode_code or self.is_initializing():
      # [CLS] + code kept at length T (T+1 would not tile for cuDNN); EOS is read as padding,
      # so a row truncated without EOS loses its last token here.
      out["code"] = self.encode(code_encoder_input(code_ids_BxT), deterministic=deterministic)
    return out

  def init_cache(self, enc: EncoderOutput, max_len: int, batch_repeat: int = 1,
                 beam_index: bool = False) -> DecodeCache:
    """A zeroed KV cache for `max_len` tokens and the cross-attention KV of `enc`, each row
    repeated `batch_repeat` times; `beam_index` adds `beam_src_BxKxS`."""
    cfg = self.cfg
    memory, lengths = self._memory(enc)
    rows = [*self.decoder.memory_kv(memory), lengths]
    if cfg.copy_head:
      rows += [self.decoder.copy_keys(enc).astype(cfg.compute_dtype), enc.ids_BxL]
    if batch_repeat > 1:
      rows = [jnp.repeat(t, batch_repeat, axis=0) for t in rows]
    (ck, cv, lengths), (copy_keys, copy_ids) = rows[:3], rows[3:] or (None, None)
    b, cache_len = ck.shape[0], max_len
    if cfg.decode_layer_kernels:   # Triton tiles: powers of two, the padding masked
      cache_len = fused_decode.pow2(max_len)
      pad = [(0, 0), (0, fused_decode.pow2(ck.shape[1]) - ck.shape[1]), (0, 0), (0, 0)]
      ck, cv = jnp.pad(ck, pad), jnp.pad(cv, pad)
    shape = (cfg.decoder_layers, b, cache_len, cfg.num_attention_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, cfg.compute_dtype)
    src = jnp.zeros((b // batch_repeat, batch_repeat, cache_len), jnp.int32) if beam_index else None
    history = None
    if cfg.copy_head:
      history = jnp.zeros((b, copy_lib.HISTORY, copy_ids.shape[1]), jnp.float32)
    return DecodeCache(zeros, zeros, ck, cv, lengths, jnp.zeros((), jnp.int32), src, copy_keys,
                       copy_ids, history)

  def decode_step(self, ids_BxT: Array, cache: DecodeCache,
                  attend_len: int | None = None) -> tuple[Array, DecodeCache]:
    return self.decoder.step(ids_BxT, cache, attend_len)

  def decode_logits(self, enc: EncoderOutput, dec_in_BxT: Array) -> Array:
    """Teacher-forced `decode_step` outputs (the reference for the cached path)."""
    return self.decoder.output(self.decoder_hidden(enc, dec_in_BxT), dec_in_BxT, enc)[0]


def shift_right(ids_BxT: Array, first_id: int) -> Array:
  """[a, b, c] -> [first, a, b]: decoder inputs from targets, [CLS]-led code for the encoder."""
  return jnp.concatenate([jnp.full_like(ids_BxT[:, :1], first_id), ids_BxT[:, :-1]], axis=1)


def context_token_types(ids_BxL: Array) -> Array:
  """Token type 1 after the first [SEP] (a retrieval context's neighbours), else 0."""
  sep = ids_BxL == SEP_ID
  return ((jnp.cumsum(sep, axis=-1) - sep) > 0).astype(jnp.int32)


def code_encoder_input(code_ids_BxT: Array) -> Array:
  """What the encoder reads for code targets: [CLS] + code at length T, EOS as padding."""
  return shift_right(jnp.where(code_ids_BxT == EOS_ID, PAD_ID, code_ids_BxT), CLS_ID)


def build(config) -> tuple[CodeModel, ModelConfig]:
  cfg = ModelConfig.from_config(config.model if hasattr(config, "model") else config)
  return CodeModel(cfg), cfg


def check_params(model: CodeModel, params) -> None:
  """A one-sentence ValueError when `params` and the modules `model` builds differ."""
  ids = jnp.zeros((1, 4), jnp.int32)
  want = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids)["params"])
  have = params.get("params", params) if hasattr(params, "get") else params
  paths = lambda tree: {jax.tree_util.keystr(p) for p, _ in
                        jax.tree_util.tree_flatten_with_path(tree)[0]}
  missing, extra = sorted(paths(want) - paths(have)), sorted(paths(have) - paths(want))
  if any("copy_head" in p for p in missing):
    raise ValueError("config.model.copy_head is True but these parameters have no copy head (the "
                     "model was trained without one); run it with --config.model.copy_head=False "
                     "or load it with its own saved config.")
  if any("copy_head" in p for p in extra):
    raise ValueError("These parameters have a copy head (decoder/copy_head) but "
                     "config.model.copy_head is False; run them with the config they were "
                     "trained with (copy_head=True).")
  if missing or extra:
    what = f"lack {missing[0]}" if missing else f"hold {extra[0]}, which it does not build"
    raise ValueError(f"These parameters do not fit config.model (they {what}); load them with the "
                     "config they were trained with.")


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
