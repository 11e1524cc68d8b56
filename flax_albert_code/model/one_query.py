"""One-query attention for the one-token decode step as Pallas kernels (`model.decode_attention
="pallas"`): self-attention over a layer of the KV cache, cross-attention over the memory.

Each is one kernel a layer, a program per (row, head) that reads the keys and values of its
head once, where XLA's attention is 3-5 kernels (logits, softmax reductions, weighted sum) and
cuDNN's flash attention is tuned for long queries. The self-attention kernel reads the layer out
of the whole [L, B, S, N, D] cache (the layer and the decode index are kernel inputs), so no
slice of the cache is copied; its beam-search twin gathers each position from the beam that
wrote it (`beam_cache="index"`), so beams never move the cache either. Triton tiles must be
powers of two: the head size must be one, and `CodeModel.init_cache` pads the cache and the
memory to one (the padding is masked out).
On CPU the kernels run in Pallas' interpreter (tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array
_MASKED = -1e30   # finite: a row with no valid position gets zeros, not NaN


def pow2(n: int) -> int:
  """The smallest power of two >= n (Triton tile sizes)."""
  return 1 << max(int(n) - 1, 0).bit_length()


def _softmax_weighted_sum(q_D, k_PxD, v_PxD, valid_P, scale: float):
  q = q_D.astype(jnp.float32)
  logits = jnp.sum(k_PxD.astype(jnp.float32) * q[None, :], axis=1) * scale
  logits = jnp.where(valid_P, logits, _MASKED)
  p = jnp.exp(logits - jnp.max(logits))
  p = p / jnp.sum(p)
  return jnp.sum(p[:, None] * v_PxD.astype(jnp.float32), axis=0)


def _self_kernel(at_ref, q_ref, k_ref, v_ref, o_ref, *, span: int, scale: float):
  n, h = pl.program_id(0), pl.program_id(1)
  layer, index = at_ref[0], at_ref[1]
  k = k_ref[layer, n, pl.ds(0, span), h, :]
  v = v_ref[layer, n, pl.ds(0, span), h, :]
  valid = jnp.arange(span) <= index
  o_ref[n, h, :] = _softmax_weighted_sum(q_ref[n, h, :], k, v, valid, scale).astype(o_ref.dtype)


def _beam_self_kernel(at_ref, q_ref, src_ref, k_ref, v_ref, o_ref, *, span: int, beams: int,
                      cache_len: int, scale: float):
  n, h = pl.program_id(0), pl.program_id(1)
  layer, index = at_ref[0], at_ref[1]
  # Row n = (description b, beam k) reads position s from the row of the beam that wrote it:
  # rows of the flattened [B*K*S] cache, gathered in the kernel (the cache does not move).
  first = (n // beams) * beams
  rows = first + src_ref[n // beams, n % beams, pl.ds(0, span)]
  flat = rows * cache_len + jnp.arange(span)
  valid = jnp.arange(span) <= index
  o_ref[n, h, :] = _softmax_weighted_sum(q_ref[n, h, :], k_ref[layer, flat, h, :],
                                         v_ref[layer, flat, h, :], valid, scale
                                         ).astype(o_ref.dtype)


def _cross_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, *, scale: float):
  n, h = pl.program_id(0), pl.program_id(1)
  span = k_ref.shape[1]
  valid = jnp.arange(span) < len_ref[n]
  o_ref[n, h, :] = _softmax_weighted_sum(q_ref[n, h, :], k_ref[n, :, h, :], v_ref[n, :, h, :],
                                         valid, scale).astype(o_ref.dtype)


def _call(kernel, q_BxNxD: Array, *args: Array) -> Array:
  b, heads, _ = q_BxNxD.shape
  interpret = jax.default_backend() != "gpu"
  params = None
  if not interpret:   # Triton named explicitly: on GPU pallas_call may otherwise pick Mosaic GPU
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=C0415
    params = pltriton.CompilerParams(num_warps=4, num_stages=1)
  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(q_BxNxD.shape, q_BxNxD.dtype),
                        grid=(b, heads), interpret=interpret, compiler_params=params,
                        name=kernel.func.__name__.strip("_"))(args[0], q_BxNxD, *args[1:])


def self_attention(q_BxNxD: Array, cache_k_LxBxSxNxD: Array, cache_v_LxBxSxNxD: Array,
                   layer: Array, index: Array, attend_len: int) -> Array:
  """Attention of one query per row over cache positions <= `index` of `layer`, reading the
  first pow2(attend_len) positions (<= the cache's length, a power of two)."""
  span = pow2(attend_len)
  d = q_BxNxD.shape[-1]
  if span > cache_k_LxBxSxNxD.shape[2] or pow2(d) != d:
    raise ValueError(f"Pallas decode attention needs a power-of-two head size (got {d}) and a "
                     "cache padded to a power of two (CodeModel.init_cache does it).")
  at = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(index, jnp.int32)])
  kernel = functools.partial(_self_kernel, span=span, scale=d ** -0.5)
  return _call(kernel, q_BxNxD, at, cache_k_LxBxSxNxD, cache_v_LxBxSxNxD)


def beam_self_attention(q_BxNxD: Array, cache_k_LxBxSxNxD: Array, cache_v_LxBxSxNxD: Array,
                        layer: Array, index: Array, attend_len: int, src_BxKxS: Array) -> Array:
  """`self_attention` for beam search over a cache that does not move (`beam_cache="index"`):
  row (b, k) reads position s from beam src[b, k, s] of description b, gathered in the kernel."""
  span, (l, rows, s, heads, d) = pow2(attend_len), cache_k_LxBxSxNxD.shape
  if span > s or pow2(d) != d:
    raise ValueError(f"Pallas decode attention needs a power-of-two head size (got {d}) and a "
                     "cache padded to a power of two (CodeModel.init_cache does it).")
  at = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(index, jnp.int32)])
  kernel = functools.partial(_beam_self_kernel, span=span, beams=src_BxKxS.shape[1],
                             cache_len=s, scale=d ** -0.5)
  flat = lambda c: c.reshape(l, rows * s, heads, d)   # free: the cache is contiguous
  return _call(kernel, q_BxNxD, at, src_BxKxS.astype(jnp.int32), flat(cache_k_LxBxSxNxD),
               flat(cache_v_LxBxSxNxD))


def cross_attention(q_BxNxD: Array, k_BxMxNxD: Array, v_BxMxNxD: Array,
                    lengths_B: Array) -> Array:
  """Attention of one query per row over the first `lengths[b]` memory positions (the memory
  padded to a power of two)."""
  d, m = q_BxNxD.shape[-1], k_BxMxNxD.shape[1]
  if pow2(m) != m or pow2(d) != d:
    raise ValueError(f"Pallas decode attention needs power-of-two memory length and head size "
                     f"(got {m}, {d}); CodeModel.init_cache pads the memory.")
  kernel = functools.partial(_cross_kernel, scale=d ** -0.5)
  return _call(kernel, q_BxNxD, lengths_B.astype(jnp.int32), k_BxMxNxD.astype(q_BxNxD.dtype),
               v_BxMxNxD.astype(q_BxNxD.dtype))
