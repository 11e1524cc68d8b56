"""Sequence packing inside the model: gathers into packed rows and back, segment attention.

`Packed` holds one field's plan (`data/packing.py` makes it on the host). `pack` gathers the
embedded tokens [B, L, H] into the plan's rows [G * R, L, H], `unpack` gathers the encoder's
states back; each is the other's gradient (a gather, never a scatter-add whose padding rows all
collide). Attention in packed rows reads `Segments`: cuDNN's packed flash attention on a GPU
(segment lengths and starts, Hopper and later), a segment mask in XLA elsewhere.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Segments(NamedTuple):
  """Which segment each packed token belongs to (0: padding), and per row the segments' lengths
  and starts (-1 after the last)."""
  ids_NxL: Array
  seqlen_NxM: Array
  offsets_NxM1: Array


class Packed(NamedTuple):
  src_GxRxL: Array
  dst_GxBxL: Array
  seqlen_GxRxM: Array
  offsets_GxRxM1: Array

  @classmethod
  def from_batch(cls, batch, field: str) -> Packed | None:
    """The plan of `field` ("desc", "ctx") in a batch, None if the batch carries none."""
    if f"{field}_pack_src" not in batch:
      return None
    return cls(*(batch[f"{field}_pack_{name.split('_')[0]}"] for name in cls._fields))

  def segments(self) -> Segments:
    g, r, width = self.src_GxRxL.shape
    per = self.dst_GxBxL.shape[1]
    ids = jnp.where(self.src_GxRxL < per * width, self.src_GxRxL // width + 1, 0)
    return Segments(ids.reshape(g * r, width), self.seqlen_GxRxM.reshape(g * r, -1),
                    self.offsets_GxRxM1.reshape(g * r, -1))


def _gather(x_GxSxH: Array, idx_GxT: Array) -> Array:
  """x's rows at idx within each group; an index of S (one past the end) reads zeros."""
  padded = jnp.concatenate([x_GxSxH, jnp.zeros_like(x_GxSxH[:, :1])], axis=1)
  return jnp.take_along_axis(padded, idx_GxT[..., None], axis=1)


@jax.custom_vjp
def _move(x_GxSxH: Array, idx_GxT: Array, inverse_GxS: Array) -> Array:
  return _gather(x_GxSxH, idx_GxT)


def _move_fwd(x, idx, inverse):
  return _gather(x, idx), (idx, inverse)


def _move_bwd(res, g):
  idx, inverse = res
  return _gather(g, inverse), None, None


_move.defvjp(_move_fwd, _move_bwd)


def pack(x_BxLxH: Array, p: Packed) -> Array:
  """The embedded tokens of B examples in the plan's rows: [G * R, L, H]."""
  g, r, width = p.src_GxRxL.shape
  b, _, h = x_BxLxH.shape
  x = x_BxLxH.reshape(g, (b // g) * width, h)
  out = _move(x, p.src_GxRxL.reshape(g, r * width), p.dst_GxBxL.reshape(g, -1))
  return out.reshape(g * r, width, h)


def unpack(y_NxLxH: Array, p: Packed) -> Array:
  """Packed rows' states back at their examples: [B, L, H], zeros at padding."""
  g, r, width = p.src_GxRxL.shape
  per = p.dst_GxBxL.shape[1]
  h = y_NxLxH.shape[-1]
  y = y_NxLxH.reshape(g, r * width, h)
  out = _move(y, p.dst_GxBxL.reshape(g, per * width), p.src_GxRxL.reshape(g, -1))
  return out.reshape(g * per, width, h)


@functools.cache
def _cudnn_packed():
  """cuDNN's attention entry point that takes segment offsets, or None where there is none."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if "q_offsets" not in cudnn.dot_product_attention.__code__.co_varnames:
    return None
  return cudnn


@jax.custom_vjp
def _grad_within(x: Array, valid: Array) -> Array:
  """x; its gradient zeroed where not `valid`."""
  return x


def _grad_within_fwd(x, valid):
  return x, valid


def _grad_within_bwd(valid, g):
  return jnp.where(valid, g, jnp.zeros_like(g)), None


_grad_within.defvjp(_grad_within_fwd, _grad_within_bwd)


def attention(q_NxLxKxD: Array, k_NxLxKxD: Array, v_NxLxKxD: Array, seg: Segments, *,
              impl: str) -> Array:
  """Self-attention within each segment of packed rows; zeros at padding, forward and backward.

  cuDNN leaves the outputs and the gradients of tokens outside every segment unwritten
  (measured on an H200: NaN weight gradients), and a layer's weight gradients sum over every
  position, padding included: so padding is zeroed both ways here.
  """
  valid = (seg.ids_NxL > 0)[:, :, None, None]
  q, k, v = (_grad_within(t, valid) for t in (q_NxLxKxD, k_NxLxKxD, v_NxLxKxD))
  cudnn = _cudnn_packed()
  if (impl == "cudnn" and cudnn is not None and jax.default_backend() == "gpu"
      and q.dtype in (jnp.bfloat16, jnp.float16)):
    out = cudnn.dot_product_attention(
        q, k, v, q_seqlen=seg.seqlen_NxM, kv_seqlen=seg.seqlen_NxM,
        q_offsets=seg.offsets_NxM1, kv_offsets=seg.offsets_NxM1,
        scale=1.0 / math.sqrt(q.shape[-1]), mask_type=cudnn.MaskType.PADDING, qkv_layout="BTNH")
  else:
    ids = seg.ids_NxL
    mask = (ids[:, None, :, None] == ids[:, None, None, :]) & (ids[:, None, None, :] > 0)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  return jnp.where(valid, out, jnp.zeros_like(out))
