"""The copy head: a pointer from each decoder position over the encoder's input tokens.

Pointer-generator (See et al. 2017): p(y) = p_gen softmax(logits)[y] + (1 - p_gen) sum_j a_j
[ctx_j == y], where a is an attention of the decoder's final state over the context, p_gen =
sigmoid(gate). Keys add projections of the unit-RMS word vectors of the token and the one
before it to the token's state; the query adds the word vector of the token just read through
the previous token's projection (`match`), so "copy the token after the one I just wrote" (the
induction pattern) scores highest from the start. The score of position j at step t also adds
learned multiples of the previous `HISTORY` steps' scores at j - l, so a run of matches
outscores one. Special tokens are never copied as themselves; a row with nothing to copy has
p_gen = 1; each [SEP] after the description's (a neighbour's end) copies as EOS.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_albert_code.config import BOS_ID, CLS_ID, EOS_ID, PAD_ID, SEP_ID, UNK_ID
from flax_albert_code.model import layers
from flax_albert_code.model.layers import ModelConfig

Array = jax.Array
NOT_COPIED = (PAD_ID, UNK_ID, BOS_ID, CLS_ID, SEP_ID)   # of `copy_ids`: EOS only from a [SEP]
NO_COPY_GATE = 30.0   # the gate logit of a row with nothing to copy: p_gen = 1 - 1e-13
LOG_ZERO = -1e30      # log of an empty copy mass: finite, so gradients stay finite
HISTORY = 2           # steps of score history the pointer adds (the module docstring)


class CopyTerms(NamedTuple):
  """What the loss and the decoding step need of the copy head at each decoder position."""
  attn_BxTxC: Array    # float32 pointer weights over the context; 0 at tokens never copied
  gate_BxT: Array      # float32 logit of p_gen
  ids_BxC: Array       # the context's token ids


def copy_ids(ids_BxC: Array) -> Array:
  """The token each context position copies as: EOS for each [SEP] after the first."""
  sep = ids_BxC == SEP_ID
  return jnp.where(sep & (jnp.cumsum(sep, axis=-1) > 1), EOS_ID, ids_BxC)


def copyable(ids_BxC: Array) -> Array:
  """True at context tokens the head may copy."""
  return ~jnp.isin(ids_BxC, jnp.array(NOT_COPIED, ids_BxC.dtype))


def unit_rms(x: Array) -> Array:
  """x scaled to a root mean square of 1 over its last axis."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + 1e-12)).astype(
      x.dtype)


class CopyHead(nn.Module):
  """Pointer attention and gate; `keys` once per context, `__call__` per decoder position."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    d = cfg.hidden_size
    self.query = layers.dense(cfg, d, ("embed", "mlp"), "query")
    self.key = layers.dense(cfg, d, ("embed", "mlp"), "key")
    self.key_token = layers.dense(cfg, d, ("emb", "mlp"), "key_token")
    # Unit-RMS word vectors through a kernel of std 1/sqrt(E): |W e|^2 ~ D for the same token,
    # ~ sqrt(D) apart for others, so after the 1/sqrt(D) scaling a match scores ~sqrt(D).
    self.match = layers.dense(cfg, d, ("emb", "mlp"), "match",
                              init_std=cfg.embedding_size ** -0.5)
    self.gate = layers.dense(cfg, 1, ("embed", None), "gate")
    self.history_weights = self.param("history_weights", layers._ones((None,)), (HISTORY,),
                                      jnp.float32)

  def keys(self, states_BxCxH: Array, words_BxCxE: Array) -> Array:
    """Keys [B, C, D] of a context from its encoder states and its tokens' word vectors."""
    words = unit_rms(words_BxCxE)
    prev = jnp.pad(words[:, :-1], ((0, 0), (1, 0), (0, 0)))
    k = self.key(states_BxCxH) + self.key_token(words) + self.match(prev)
    return layers.constrain(k, ("batch", "length", "act_mlp"))

  def __call__(self, h_BxTxH: Array, words_BxTxE: Array, keys_BxCxD: Array, ids_BxC: Array,
               history_BxLxC: Array | None = None) -> tuple[CopyTerms, Array]:
    """`words`: the word vectors of the tokens read at `h`; `history`: the raw scores of the
    HISTORY steps before (None: zeros). Returns the copy terms and the history after."""
    q = self.query(h_BxTxH) + self.match(unit_rms(words_BxTxE))
    q = layers.constrain(q, ("batch", "length", "act_mlp"))
    raw = jnp.einsum("btd,bcd->btc", q, keys_BxCxD.astype(q.dtype),
                     preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
    b, t, c = raw.shape
    if history_BxLxC is None:
      history_BxLxC = jnp.zeros((b, HISTORY, c), jnp.float32)
    full = jnp.concatenate([history_BxLxC, raw], axis=1)
    scores = raw
    for lag in range(1, HISTORY + 1):
      past = full[:, HISTORY - lag:HISTORY - lag + t, :c - lag]   # rows t - lag, columns j - lag
      scores = scores + self.history_weights[lag - 1] * jnp.pad(past, ((0, 0), (0, 0), (lag, 0)))
    ids_BxC = copy_ids(ids_BxC)
    ok_BxC = copyable(ids_BxC)
    any_B = (ok_BxC & (ids_BxC != EOS_ID)).any(-1)
    scores = jnp.where(ok_BxC[:, None, :], scores, -jnp.inf)
    attn = jax.nn.softmax(jnp.where(any_B[:, None, None], scores, 0.0), axis=-1)
    attn = jnp.where(ok_BxC[:, None, :] & any_B[:, None, None], attn, 0.0)
    gate = self.gate(h_BxTxH)[..., 0].astype(jnp.float32)
    gate = jnp.where(any_B[:, None], gate, NO_COPY_GATE)
    return CopyTerms(attn, gate, ids_BxC), full[:, -HISTORY:]


def mix_log_probs(logits_BxTxV: Array, copy: CopyTerms) -> Array:
  """log p(y) of the whole mixture [B, T, V] in float32 (decoding and scoring; not the loss)."""
  b, t, _ = logits_BxTxV.shape
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  rows, cols = jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None]
  mass = jnp.zeros(logp.shape, jnp.float32).at[rows, cols, copy.ids_BxC[:, None, :]].add(
      copy.attn_BxTxC)
  return log_mixture(logp, mass, copy.gate_BxT[..., None])


def log_mixture(logp_vocab: Array, copy_mass: Array, gate: Array) -> Array:
  """log(p_gen p_vocab + (1 - p_gen) copy_mass), p_gen = sigmoid(gate)."""
  log_mass = jnp.where(copy_mass > 0, jnp.log(jnp.where(copy_mass > 0, copy_mass, 1.0)),
                       LOG_ZERO)
  return jnp.logaddexp(jax.nn.log_sigmoid(gate) + logp_vocab,
                       jax.nn.log_sigmoid(-gate) + log_mass)
