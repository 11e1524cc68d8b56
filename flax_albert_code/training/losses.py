"""Training objectives as pure functions: alignment (l2, InfoNCE) and generation (masked CE).

The generation loss cuts the sequence into chunks whose logits are recomputed in the backward
pass (`jax.checkpoint`), so fp32 logits of the whole batch never exist at once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_albert_code.model.copy_head import CopyTerms, log_mixture
from flax_albert_code.model.layers import tied_logits

Array = jax.Array


@jax.custom_vjp
def _bf16_logit_stats(logits_BxTxV: Array, targets_BxT: Array) -> tuple[Array, Array, Array]:
  """Per token, in fp32 from bf16 logits: (logsumexp, target logit, max), as the float32 path
  computes them. Autodiff of the gather would scatter into a dense fp32 [B, T, V] buffer; here
  d(logits) = g_lse p + g_target onehot is computed per element and written in bf16 once."""
  return _bf16_stats_fwd(logits_BxTxV, targets_BxT)[0]


def _bf16_stats_fwd(logits, targets):
  m = jnp.max(logits, axis=-1).astype(jnp.float32)
  lse = m + jnp.log(jnp.sum(jnp.exp(logits.astype(jnp.float32) - m[..., None]), axis=-1))
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return (lse, target_logit.astype(jnp.float32), m), (logits, targets, lse)


def _bf16_stats_bwd(res, g):
  logits, targets, lse = res
  g_lse, g_target, _ = g   # the max only counts correct tokens: no gradient
  p = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
  d = g_lse[..., None] * p + jnp.where(onehot, g_target[..., None], 0.0)
  return d.astype(logits.dtype), None


_bf16_logit_stats.defvjp(_bf16_stats_fwd, _bf16_stats_bwd)


def _logit_stats(logits, targets, logits_dtype: str):
  """(logsumexp, target logit, max logit) per token, float32."""
  if logits_dtype == "bfloat16":
    return _bf16_logit_stats(logits.astype(jnp.bfloat16), targets)
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse, target_logit, jax.lax.stop_gradient(logits.max(-1))


def _copy_log_prob(logp_vocab_BxT: Array, targets_BxT: Array, copy: CopyTerms) -> Array:
  """log p(target) of the copy head's mixture: p_gen p_vocab + (1 - p_gen) copy mass."""
  mass = (copy.attn_BxTxC * (copy.ids_BxC[:, None, :] == targets_BxT[..., None])).sum(-1)
  return log_mixture(logp_vocab_BxT, mass, copy.gate_BxT)


def _copy_correct(logits_BxTxV, lse, max_logit, logp_BxT, copy: CopyTerms) -> Array:
  """Whether the target is the mixture's most likely token (no [B, T, V] mixture built)."""
  b, t, _ = logits_BxTxV.shape
  p_gen = jax.nn.sigmoid(copy.gate_BxT)
  at_ctx = jnp.take_along_axis(logits_BxTxV, jnp.broadcast_to(
      copy.ids_BxC[:, None, :], (b, t, copy.ids_BxC.shape[1])), axis=-1).astype(jnp.float32)
  same_CxC = (copy.ids_BxC[:, :, None] == copy.ids_BxC[:, None, :]).astype(jnp.float32)
  mass_ctx = jnp.einsum("btc,bcd->btd", copy.attn_BxTxC, same_CxC)
  p_ctx = p_gen[..., None] * jnp.exp(at_ctx - lse[..., None]) + (1 - p_gen[..., None]) * mass_ctx
  best = jnp.maximum(p_gen * jnp.exp(max_logit - lse), p_ctx.max(-1))
  return jnp.exp(logp_BxT) >= best * (1 - 1e-5)


def _chunk_stats(h, targets, weights, copy, proj, word, bias, logits_dtype):
  logits = tied_logits(h, proj, word, bias)
  lse, target_logit, max_logit = _logit_stats(logits, targets, logits_dtype)
  logp = target_logit - lse
  if copy is not None:
    logp = _copy_log_prob(logp, targets, copy)
    correct = jax.lax.stop_gradient(_copy_correct(logits, lse, max_logit, logp, copy))
  else:
    correct = target_logit >= max_logit
  return (-logp * weights).sum(-1), (correct.astype(jnp.float32) * weights).sum(-1)


def generation_row_sums(h_BxTxH: Array, targets_BxT: Array, weights_BxT: Array, proj_ExH: Array,
                        word_VxE: Array, bias_V: Array, *, copy: CopyTerms | None = None,
                        chunk: int = 128,
                        logits_dtype: str = "float32") -> tuple[Array, Array, Array]:
  """Per row [B]: (weighted token NLL sum, weighted correct tokens, weight sum), so that rows can
  be grouped (`group_mean`) at no extra logits cost. With `copy`, the NLL of the copy head's
  mixture, from each position's target logit, logsumexp and copy mass: no [B, T, V] mixture."""
  if logits_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"logits_dtype {logits_dtype!r} must be 'float32' or 'bfloat16'; fix "
                     "config.train.logits_dtype.")
  b, t, h = h_BxTxH.shape
  weights = weights_BxT.astype(jnp.float32)
  count = weights.sum(-1)
  if not chunk:   # one pass, logits kept for the backward pass
    nll, correct = _chunk_stats(h_BxTxH, targets_BxT, weights, copy, proj_ExH, word_VxE, bias_V,
                                logits_dtype)
    return nll, correct, count
  chunk = min(chunk, t)
  if t % chunk:
    chunk = t
  n = t // chunk
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
  ids = None if copy is None else copy.ids_BxC

  def stats(args):
    h_c, targets_c, weights_c, copy_c = args
    copy_c = None if copy_c is None else CopyTerms(*copy_c, ids)
    return _chunk_stats(h_c, targets_c, weights_c, copy_c, proj_ExH, word_VxE, bias_V,
                        logits_dtype)
  copy_split = None if copy is None else (split(copy.attn_BxTxC), split(copy.gate_BxT))
  nll, correct = jax.lax.map(jax.checkpoint(stats), (split(h_BxTxH), split(targets_BxT),
                                                     split(weights), copy_split))
  return nll.sum(0), correct.sum(0), count


def generation_loss(h_BxTxH: Array, targets_BxT: Array, weights_BxT: Array, proj_ExH: Array,
                    word_VxE: Array, bias_V: Array, *, copy: CopyTerms | None = None,
                    chunk: int = 128,
                    logits_dtype: str = "float32") -> tuple[Array, Array, Array]:
  """(token-mean cross-entropy, token accuracy, token count) over chunks of `chunk` tokens."""
  nll, correct, count = generation_row_sums(
      h_BxTxH, targets_BxT, weights_BxT, proj_ExH, word_VxE, bias_V, copy=copy, chunk=chunk,
      logits_dtype=logits_dtype)
  return group_mean(nll, correct, count)


def group_mean(nll_B: Array, correct_B: Array, count_B: Array,
               rows_B: Array | None = None) -> tuple[Array, Array, Array]:
  """(token-mean loss, accuracy, token count) over the rows where `rows_B` (None: all)."""
  if rows_B is not None:
    w = rows_B.astype(jnp.float32)
    nll_B, correct_B, count_B = nll_B * w, correct_B * w, count_B * w
  count = jnp.maximum(count_B.sum(), 1.0)
  return nll_B.sum() / count, correct_B.sum() / count, count


def _row_mean(x_B: Array, rows_B: Array | None) -> Array:
  """Mean over the rows where `rows_B` (all when None; 0 when none is)."""
  if rows_B is None:
    return jnp.mean(x_B)
  w = rows_B.astype(jnp.float32)
  return (x_B * w).sum() / jnp.maximum(w.sum(), 1.0)


def l2_alignment(v_d_BxA: Array, v_c_BxA: Array, rows_B: Array | None = None) -> Array:
  """The source design's L = ||v_d - v_c||^2, averaged over the batch (its `rows_B` rows)."""
  return _row_mean(jnp.sum(jnp.square(v_d_BxA - v_c_BxA), axis=-1), rows_B)


def similarity(v_d_BxA: Array, v_c_BxA: Array) -> Array:
  return jnp.einsum("ia,ja->ij", v_d_BxA, v_c_BxA)


def _only_pairs(sim_BxB: Array, rows_B: Array | None) -> Array:
  """Similarities with the columns of rows outside `rows_B` at -1e9: no one's negatives."""
  if rows_B is None:
    return sim_BxB
  return jnp.where(rows_B[None, :], sim_BxB, -1e9)


def infonce(v_d_BxA: Array, v_c_BxA: Array, log_inv_temp: Array,
            rows_B: Array | None = None) -> Array:
  """Symmetric in-batch contrastive loss with a learned temperature (CLIP), over the global
  batch; with `rows_B`, over those rows only, the others neither anchors nor negatives."""
  scale = jnp.exp(jnp.clip(log_inv_temp, 0.0, jnp.log(100.0)))
  logits_BxB = similarity(v_d_BxA, v_c_BxA) * scale
  d2c, c2d = _only_pairs(logits_BxB, rows_B), _only_pairs(logits_BxB.T, rows_B)
  labels = jnp.arange(logits_BxB.shape[0])
  nll = lambda logits: -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None],
                                            -1)[:, 0]
  return 0.5 * (_row_mean(nll(d2c), rows_B) + _row_mean(nll(c2d), rows_B))


def retrieval_accuracy(v_d_BxA: Array, v_c_BxA: Array, rows_B: Array | None = None) -> Array:
  """Share of descriptions whose own code is the nearest in the batch (among `rows_B`)."""
  sim = _only_pairs(similarity(v_d_BxA, v_c_BxA), rows_B)
  hit = (jnp.argmax(sim, -1) == jnp.arange(sim.shape[0])).astype(jnp.float32)
  return _row_mean(hit, rows_B)
