"""Training objectives as pure functions: alignment (l2, InfoNCE) and generation (masked CE).

The generation loss never materialises fp32 logits for the whole batch: the sequence is cut
into chunks and each chunk's logits are recomputed in the backward pass (`jax.checkpoint`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_albert_code.layers import tied_logits

Array = jax.Array


def _chunk_stats(h, targets, weights, proj, word, bias, label_smoothing, z_loss):
  logits = tied_logits(h, proj, word, bias).astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = lse - target_logit
  if label_smoothing:
    nll = (1 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(-1))
  if z_loss:
    nll = nll + z_loss * jnp.square(lse)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return (nll * weights).sum(), (correct * weights).sum()


def generation_loss(h_BxTxH: Array, targets_BxT: Array, weights_BxT: Array, proj_ExH: Array,
                    word_VxE: Array, bias_V: Array, *, label_smoothing: float = 0.0,
                    z_loss: float = 0.0, chunk: int = 128) -> tuple[Array, Array, Array]:
  """Token-mean cross-entropy; returns (loss, token accuracy, token count)."""
  b, t, h = h_BxTxH.shape
  if not chunk:   # one pass, logits kept for the backward pass
    nll, correct = _chunk_stats(h_BxTxH, targets_BxT, weights_BxT.astype(jnp.float32), proj_ExH,
                                word_VxE, bias_V, label_smoothing, z_loss)
    count = jnp.maximum(weights_BxT.sum().astype(jnp.float32), 1.0)
    return nll / count, correct / count, count
  chunk = min(chunk, t)
  if t % chunk:
    chunk = t
  n = t // chunk
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
  stats = jax.checkpoint(lambda args: _chunk_stats(*args, proj_ExH, word_VxE, bias_V,
                                                   label_smoothing, z_loss))
  nll, correct = jax.lax.map(stats, (split(h_BxTxH), split(targets_BxT),
                                     split(weights_BxT.astype(jnp.float32))))
  count = jnp.maximum(weights_BxT.sum().astype(jnp.float32), 1.0)
  return nll.sum() / count, correct.sum() / count, count


def l2_alignment(v_d_BxA: Array, v_c_BxA: Array) -> Array:
  """The source design's L = ||v_d - v_c||^2, averaged over the batch."""
  return jnp.mean(jnp.sum(jnp.square(v_d_BxA - v_c_BxA), axis=-1))


def similarity(v_d_BxA: Array, v_c_BxA: Array) -> Array:
  return jnp.einsum("ia,ja->ij", v_d_BxA, v_c_BxA)


def infonce(v_d_BxA: Array, v_c_BxA: Array, log_inv_temp: Array) -> Array:
  """Symmetric in-batch contrastive loss with a learned temperature (CLIP).

  Under jit over a sharded batch, the similarity matrix spans the global batch, so every
  device's examples are negatives for every other's.
  """
  scale = jnp.exp(jnp.clip(log_inv_temp, 0.0, jnp.log(100.0)))
  logits = similarity(v_d_BxA, v_c_BxA) * scale
  labels = jnp.arange(logits.shape[0])
  d2c = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], -1).mean()
  c2d = -jnp.take_along_axis(jax.nn.log_softmax(logits.T, -1), labels[:, None], -1).mean()
  return 0.5 * (d2c + c2d)


def retrieval_accuracy(v_d_BxA: Array, v_c_BxA: Array) -> Array:
  """Share of descriptions whose own code is the nearest in the batch."""
  sim = similarity(v_d_BxA, v_c_BxA)
  return jnp.mean((jnp.argmax(sim, -1) == jnp.arange(sim.shape[0])).astype(jnp.float32))
