"""One-query attention for the one-token decode step as Pallas kernels (`model.decode_attention
="pallas"`): self-attention over a layer of the KV cache, cross-attention over the memory.

Each is one kernel a layer, a program per (row, head) that reads the keys and values of its
head once, where XLA's attention is 3-5 kernels (logits, softmax reductions, weighted sum) and
cuDNN's flash attention is tuned for long queries. The self-attention kernel reads the layer out
of the whole [L, B, S, N, D] cache (the layer and the decode index are kernel inputs), so no
slice of the cache is copied; its beam-search twin gathers each position from the beam that
wrote it (`beam_cache="index"`), so beams never move the cache either. Triton tiles must be
powers of two: the head size must be one, and `CodeModel.init_cache` pads the cache and the
memory to one (the padding is masked out). `self_attention_write` and `cross_attention_partials`
serve model/fused_decode.py's layer kernels: they take the projections as split-K partial sums
(added inside), and the first writes the new token's K/V into the cache itself.
On CPU the kernels run in Pallas' interpreter (tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array
_MASKED = -1e30   # finite: a row with no valid position gets zeros, not NaN
_BLOCK = 64       # cache positions a block of the write kernel's online softmax
_WARPS = 4        # Triton warps a program (tuning: benchmarks/ab_decode.py patches these)
_STAGES = 1       # Triton pipeline stages of the attention kernels' loops


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


def _beam_positions(src_ref, n: Array, beams: int, start, size: int, cache_len: int) -> Array:
  """Rows of the flattened [B*K*S] cache that row n = (description b, beam k) reads for
  positions [start, start + size): each from the beam that wrote it (src[b, k, s])."""
  rows = (n // beams) * beams + src_ref[n // beams, n % beams, pl.ds(start, size)]
  return rows * cache_len + start + jnp.arange(size)


def _beam_self_kernel(at_ref, q_ref, src_ref, k_ref, v_ref, o_ref, *, span: int, beams: int,
                      cache_len: int, scale: float):
  n, h = pl.program_id(0), pl.program_id(1)
  layer, index = at_ref[0], at_ref[1]
  # Row n = (description b, beam k) reads position s from the row of the beam that wrote it:
  # rows of the flattened [B*K*S] cache, gathered in the kernel (the cache does not move).
  flat = _beam_positions(src_ref, n, beams, 0, span, cache_len)
  valid = jnp.arange(span) <= index
  o_ref[n, h, :] = _softmax_weighted_sum(q_ref[n, h, :], k_ref[layer, flat, h, :],
                                         v_ref[layer, flat, h, :], valid, scale
                                         ).astype(o_ref.dtype)


def _summed(p_ref, b_ref, n, start, size: int, dtype):
  """Row n, columns [start, start + size) of (the sum of partial products + bias), rounded to
  `dtype` as a projection's output is (fused_decode.splitk_dot's partials)."""
  cols = pl.ds(start, size)
  return (jnp.sum(p_ref[:, n, cols], axis=0) + b_ref[cols].astype(jnp.float32)).astype(dtype)


def _write_kernel(at_ref, p_ref, b_ref, *refs, span: int, heads: int, scale: float,
                  beams: int = 0, cache_len: int = 0):
  """Self-attention of row n, head h over the cache, after writing the row's new K/V at
  `index` of `layer` (the cache is aliased in and out: nothing else of it moves). Positions
  are read in blocks of `_BLOCK` up to `index` only (an online softmax that starts from the
  new token's own key and value, held in registers)."""
  if beams:
    src_ref, k_ref, v_ref, o_ref, k_out, v_out = refs
  else:
    k_ref, v_ref, o_ref, k_out, v_out = refs
  n, h = pl.program_id(0), pl.program_id(1)
  layer, index = at_ref[0], at_ref[1]
  d, dt = o_ref.shape[-1], k_out.dtype
  q, k_new, v_new = (_summed(p_ref, b_ref, n, (part * heads + h) * d, d, dt)
                     for part in range(3))
  at = (layer, n * cache_len + index, h) if beams else (layer, n, index, h)
  k_out[at], v_out[at] = k_new, v_new
  blk, qf = min(_BLOCK, span), q.astype(jnp.float32)

  def block(c, carry):
    top, total, acc = carry
    pos = c * blk + jnp.arange(blk)
    if beams:
      flat = _beam_positions(src_ref, n, beams, c * blk, blk, cache_len)
      k, v = k_ref[layer, flat, h, :], v_ref[layer, flat, h, :]
    else:
      k, v = (ref[layer, n, pl.ds(c * blk, blk), h, :] for ref in (k_ref, v_ref))
    logits = jnp.sum(k.astype(jnp.float32) * qf[None, :], axis=1) * scale
    logits = jnp.where(pos < index, logits, _MASKED)
    new_top = jnp.maximum(top, jnp.max(logits))
    p, fix = jnp.exp(logits - new_top), jnp.exp(top - new_top)
    return (new_top, total * fix + jnp.sum(p),
            acc * fix + jnp.sum(p[:, None] * v.astype(jnp.float32), axis=0))
  own = jnp.sum(k_new.astype(jnp.float32) * qf) * scale
  _, total, acc = jax.lax.fori_loop(0, (index + blk - 1) // blk, block,
                                    (own, jnp.float32(1.0), v_new.astype(jnp.float32)))
  o_ref[n, h, :] = (acc / total).astype(o_ref.dtype)


def self_attention_write(qkv_SxMxP: Array, qkv_bias_P: Array, cache_k_LxBxSxNxD: Array,
                         cache_v_LxBxSxNxD: Array, layer: Array, index: Array,
                         attend_len: int, rows: int,
                         src_BxKxS: Array | None = None) -> tuple[Array, Array, Array]:
  """Q|K|V are the sum of partial products [S, M, 3 * N * D] + bias (rows >= `rows` are
  padding): writes each row's K/V at `index` of `layer` and attends over positions <= `index`
  (< attend_len), reading the cache in blocks only up to `index`; with `src_BxKxS` row (b, k)
  reads position s from beam src[b, k, s] (`beam_self_attention`). Returns (context [M, N, D],
  cache k, cache v): the caches are updated in place."""
  l, b, s, heads, d = cache_k_LxBxSxNxD.shape
  span = pow2(attend_len)
  if span > s or pow2(d) != d or qkv_SxMxP.shape[2] != 3 * heads * d:
    raise ValueError(f"Pallas decode attention needs a power-of-two head size (got {d}), a "
                     "cache padded to a power of two and Q|K|V stacked [S, M, 3 * N * D].")
  at = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(index, jnp.int32)])
  kw = dict(span=span, heads=heads, scale=d ** -0.5)
  caches = [cache_k_LxBxSxNxD, cache_v_LxBxSxNxD]
  args = [at, qkv_SxMxP, qkv_bias_P]
  if src_BxKxS is not None:
    kw.update(beams=src_BxKxS.shape[1], cache_len=s)
    caches = [c.reshape(l, b * s, heads, d) for c in caches]   # free: contiguous
    args.append(src_BxKxS.astype(jnp.int32))
  dt = cache_k_LxBxSxNxD.dtype
  out_shape = [jax.ShapeDtypeStruct((qkv_SxMxP.shape[1], heads, d), dt),
               *(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches)]
  first = len(args)
  ctx, ck, cv = pl.pallas_call(
      functools.partial(_write_kernel, **kw), out_shape=out_shape, grid=(rows, heads),
      input_output_aliases={first: 1, first + 1: 2}, **backend(),
      name="self_write_kernel" if src_BxKxS is None else "beam_self_write_kernel")(
          *args, *caches)
  return ctx, ck.reshape(cache_k_LxBxSxNxD.shape), cv.reshape(cache_v_LxBxSxNxD.shape)


def _cross_partials_kernel(len_ref, p_ref, b_ref, k_ref, v_ref, o_ref, *, scale: float):
  n, h = pl.program_id(0), pl.program_id(1)
  span, d = k_ref.shape[1], o_ref.shape[-1]
  q = _summed(p_ref, b_ref, n, h * d, d, o_ref.dtype)
  valid = jnp.arange(span) < len_ref[n]
  o_ref[n, h, :] = _softmax_weighted_sum(q, k_ref[n, :, h, :], v_ref[n, :, h, :], valid,
                                         scale).astype(o_ref.dtype)


def cross_attention_partials(q_SxMxH: Array, q_bias_H: Array, k_BxMxNxD: Array,
                             v_BxMxNxD: Array, lengths_B: Array, rows: int,
                             heads: int) -> Array:
  """`cross_attention` for queries given as partial products [S, M, N * D] + bias (rows >=
  `rows` padding): context [M, N, D] in the memory's dtype."""
  d, m = k_BxMxNxD.shape[-1], k_BxMxNxD.shape[1]
  if pow2(m) != m or pow2(d) != d:
    raise ValueError(f"Pallas decode attention needs power-of-two memory length and head size "
                     f"(got {m}, {d}); CodeModel.init_cache pads the memory.")
  kernel = functools.partial(_cross_partials_kernel, scale=d ** -0.5)
  out = jax.ShapeDtypeStruct((q_SxMxH.shape[1], heads, d), k_BxMxNxD.dtype)
  return pl.pallas_call(kernel, out_shape=out, grid=(rows, heads), **backend(),
                        name="cross_partials_kernel")(
                            lengths_B.astype(jnp.int32), q_SxMxH, q_bias_H, k_BxMxNxD,
                            v_BxMxNxD)


def backend(num_stages: int | None = None, num_warps: int | None = None) -> dict:
  """pallas_call's arguments: Triton on a GPU (None: `_STAGES`, `_WARPS`), the interpreter
  elsewhere."""
  interpret = jax.default_backend() != "gpu"
  params = None
  if not interpret:   # Triton named explicitly: on GPU pallas_call may otherwise pick Mosaic GPU
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=C0415
    params = pltriton.CompilerParams(num_warps=num_warps or _WARPS,
                                     num_stages=num_stages or _STAGES)
  return dict(interpret=interpret, compiler_params=params)


def _cross_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, *, scale: float):
  n, h = pl.program_id(0), pl.program_id(1)
  span = k_ref.shape[1]
  valid = jnp.arange(span) < len_ref[n]
  o_ref[n, h, :] = _softmax_weighted_sum(q_ref[n, h, :], k_ref[n, :, h, :], v_ref[n, :, h, :],
                                         valid, scale).astype(o_ref.dtype)


def _call(kernel, q_BxNxD: Array, *args: Array) -> Array:
  b, heads, _ = q_BxNxD.shape
  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(q_BxNxD.shape, q_BxNxD.dtype),
                        grid=(b, heads), **backend(),
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
