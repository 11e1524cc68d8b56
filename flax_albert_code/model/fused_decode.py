"""The one-token decoder layer in twelve Pallas kernels (`model.decode_attention="layer"`, and
"auto" on one GPU): XLA runs it as ~25 tiny kernels, so a step is bound by kernel count.

Each matmul is `splitk_dot` (K split so that 64 rows still occupy the GPU; the sum left to its
consumer), then an `epilogue` (bias, activation, residual and LayerNorm in one kernel: a whole
row per program) or an attention kernel that sums the Q partials itself. Self-attention reads
its layer out of the whole [L, B, S, N, D] cache and writes the new K/V into it in place; beams
gather each position from the beam that wrote it. Triton tiles are powers of two, so
`CodeModel.init_cache` pads the cache and memory (masked). On CPU: Pallas' interpreter.
"""
from __future__ import annotations

import collections
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array
MIN_PROGRAMS = 96   # splitk_dot splits K until a GEMM has this many programs (H200: 132 SMs)
EPILOGUE_WARPS = 4  # Triton warps of an epilogue program (a row, or a chunk of one)
_MASKED = -1e30     # finite: a row with no valid position gets zeros, not NaN
_BLOCK = 64         # cache positions a block of the self-attention's online softmax
_WARPS = 4          # Triton warps of an attention program
_STAGES = 1         # Triton pipeline stages of the attention kernels' loops


def pow2(n: int) -> int:
  """The smallest power of two >= n (Triton tile sizes)."""
  return 1 << max(int(n) - 1, 0).bit_length()


def backend(num_stages: int | None = None, num_warps: int | None = None) -> dict:
  """pallas_call's arguments: Triton on a GPU, the interpreter elsewhere."""
  interpret = jax.default_backend() != "gpu"
  params = None
  if not interpret:   # Triton named explicitly: on GPU pallas_call may otherwise pick Mosaic GPU
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=C0415
    params = pltriton.CompilerParams(num_warps=num_warps or _WARPS,
                                     num_stages=num_stages or _STAGES)
  return dict(interpret=interpret, compiler_params=params)


class Norm(NamedTuple):
  scale: Array
  bias: Array


# The shared decoder block's parameters: 2-D matrices (Q|K|V stacked [H, 3H]), biases, Norms.
LayerWeights = collections.namedtuple("LayerWeights", (
    "qkv_w qkv_b out_w out_b self_norm cross_q_w cross_q_b cross_out_w cross_out_b cross_norm "
    "ffn_w ffn_b ffn_out_w ffn_out_b ffn_norm"))


def layer_weights(self_p: dict, cross_p: dict, ffn_p: dict) -> LayerWeights:
  """From the flax parameter dicts of AlbertAttention (self, cross) and AlbertFFN."""
  h = self_p["query"]["kernel"].shape[0]

  def mat(d):
    return d["kernel"].reshape(h, -1)

  def norm(d):
    return Norm(d["scale"], d["bias"])
  qkv = ("query", "key", "value")
  return LayerWeights(
      jnp.concatenate([mat(self_p[n]) for n in qkv], axis=1),
      jnp.concatenate([self_p[n]["bias"].reshape(-1) for n in qkv]),
      mat(self_p["dense"]), self_p["dense"]["bias"], norm(self_p["LayerNorm"]),
      mat(cross_p["query"]), cross_p["query"]["bias"].reshape(-1),
      mat(cross_p["dense"]), cross_p["dense"]["bias"], norm(cross_p["LayerNorm"]),
      ffn_p["ffn"]["kernel"], ffn_p["ffn"]["bias"], ffn_p["ffn_output"]["kernel"],
      ffn_p["ffn_output"]["bias"], norm(ffn_p["full_layer_layer_norm"]))


def _block(n: int, cap: int) -> int:
  """The largest power of two <= cap dividing n, at least 16 (n is one: `layer_kernels_fit`)."""
  b = cap
  while b > 16 and n % b:
    b //= 2
  return b


def rows_block(m: int) -> int:
  """The row tile for `m` rows: 16, 32 or 64; the stream is padded to a multiple of it."""
  return min(64, max(16, pow2(m)))


def _splitk_kernel(x_ref, w_ref, o_ref, *, bm: int, bn: int, bk: int, steps: int, dtype,
                   precision):
  i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows, cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)

  def body(c, acc):
    ks = pl.ds((s * steps + c) * bk, bk)
    return acc + jnp.dot(x_ref[rows, ks].astype(dtype), w_ref[ks, cols].astype(dtype),
                         preferred_element_type=jnp.float32, precision=precision)
  o_ref[s, rows, cols] = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))


def splitk_dot(x_MxK: Array, w_KxN: Array, *, dtype, min_programs: int | None = None) -> Array:
  """x @ w as float32 partial sums over S slices of K, [S, M, N]: S is the fewest power of two
  giving `min_programs` (default `MIN_PROGRAMS`) programs. M: a multiple of `rows_block(M)`."""
  (m, k), n = x_MxK.shape, w_KxN.shape[1]
  bm = rows_block(m)
  bn = _block(n, 64)
  tiles, splits = (m // bm) * (n // bn), 1
  min_programs = MIN_PROGRAMS if min_programs is None else min_programs
  while tiles * splits < min_programs and k % (4 * splits) == 0 and (k // (2 * splits)) % 16 == 0:
    splits *= 2
  bk = _block(k // splits, 128)
  precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
  kernel = functools.partial(_splitk_kernel, bm=bm, bn=bn, bk=bk, steps=k // splits // bk,
                             dtype=dtype, precision=precision)
  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
                        grid=(m // bm, n // bn, splits), name="splitk_dot",
                        **backend(3, num_warps=4))(x_MxK, w_KxN)


def _layer_norm(chunks: list, norm_refs, cw: int, eps: float) -> list:
  """flax's LayerNorm (float32 statistics, E[x^2] - E[x]^2) of a row held as chunks."""
  width = cw * len(chunks)
  mean = sum(jnp.sum(c) for c in chunks) / width
  var = jnp.maximum(sum(jnp.sum(c * c) for c in chunks) / width - mean * mean, 0.0)
  rstd = jax.lax.rsqrt(var + eps)
  g_ref, b_ref = norm_refs
  return [(c - mean) * rstd * g_ref[pl.ds(i * cw, cw)].astype(jnp.float32)
          + b_ref[pl.ds(i * cw, cw)].astype(jnp.float32) for i, c in enumerate(chunks)]


def _epilogue_kernel(*refs, cw: int, eps: float, act, residual: bool, norm: bool,
                     raw: bool):
  p_ref, b_ref, *rest = refs
  r_ref = rest.pop(0) if residual else None
  norm_refs = (rest.pop(0), rest.pop(0)) if norm else None
  outs = rest
  row = pl.program_id(0)
  # Without a LayerNorm each program takes one chunk of the row (more programs).
  first = 0 if norm else pl.program_id(1)
  chunks = []
  for i in range(b_ref.shape[0] // cw if norm else 1):
    cs = pl.ds((first + i) * cw, cw)
    y = jnp.sum(p_ref[:, row, cs], axis=0) + b_ref[cs].astype(jnp.float32)
    if act is not None:
      y = act(y)
    if r_ref is not None:
      y = y + r_ref[row, cs].astype(jnp.float32)
    chunks.append(y)
  if raw:
    o_ref = outs.pop(0)
    for i, y in enumerate(chunks):
      o_ref[row, pl.ds((first + i) * cw, cw)] = y.astype(o_ref.dtype)
  if norm:
    o_ref = outs.pop(0)
    for i, y in enumerate(_layer_norm(chunks, norm_refs, cw, eps)):
      o_ref[row, pl.ds(i * cw, cw)] = y.astype(o_ref.dtype)


def epilogue(partials_SxMxN: Array, b_N: Array, *, dtype, eps: float = 0.0,
             act: Callable | None = None, residual: Array | None = None,
             norm: Norm | None = None, raw: bool = True) -> list[Array]:
  """y = act(sum of the partials + b) + residual, as [y] and/or [LN(y)] (`raw`, `norm`)."""
  _, m, n = partials_SxMxN.shape
  cw = _block(n, 256)
  args = [partials_SxMxN, b_N]
  if residual is not None:
    args.append(residual)
  if norm is not None:
    args += [norm.scale, norm.bias]
  out = jax.ShapeDtypeStruct((m, n), dtype)
  kernel = functools.partial(_epilogue_kernel, cw=cw, eps=eps, act=act,
                             residual=residual is not None, norm=norm is not None, raw=raw)
  grid = (m,) if norm is not None else (m, n // cw)
  return pl.pallas_call(kernel, out_shape=[out] * (int(raw) + int(norm is not None)),
                        grid=grid, name="epilogue",
                        **backend(1, num_warps=EPILOGUE_WARPS))(*args)


def _softmax_weighted_sum(q_D, k_PxD, v_PxD, valid_P, scale: float):
  q = q_D.astype(jnp.float32)
  logits = jnp.sum(k_PxD.astype(jnp.float32) * q[None, :], axis=1) * scale
  logits = jnp.where(valid_P, logits, _MASKED)
  p = jnp.exp(logits - jnp.max(logits))
  p = p / jnp.sum(p)
  return jnp.sum(p[:, None] * v_PxD.astype(jnp.float32), axis=0)


def _beam_positions(src_ref, n: Array, beams: int, start, size: int, cache_len: int) -> Array:
  """Flat cache rows that row n = (b, k) reads for [start, start + size): src[b, k, s]'s."""
  rows = (n // beams) * beams + src_ref[n // beams, n % beams, pl.ds(start, size)]
  return rows * cache_len + start + jnp.arange(size)


def _summed(p_ref, b_ref, n, start, size: int, dtype):
  """Row n, columns [start, start + size) of the sum of partial products + bias, in `dtype`."""
  cols = pl.ds(start, size)
  return (jnp.sum(p_ref[:, n, cols], axis=0) + b_ref[cols].astype(jnp.float32)).astype(dtype)


def _write_kernel(at_ref, p_ref, b_ref, *refs, span: int, heads: int, scale: float,
                  beams: int = 0, cache_len: int = 0):
  """Row n, head h: writes its K/V at `index` of `layer` (the cache aliased in and out), then
  an online softmax from the new K/V over blocks of `_BLOCK` positions up to `index`."""
  src_ref = refs[0] if beams else None
  k_ref, v_ref, o_ref, k_out, v_out = refs[-5:]
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
  """Q|K|V as partial products [S, M, 3 * N * D] + bias (rows >= `rows`: padding): writes each
  row's K/V at `index` of `layer`, attends over positions <= `index` (from beam src[b, k, s]
  with `src_BxKxS`). Returns (context [M, N, D], cache k, cache v), the caches in place."""
  l, b, s, heads, d = cache_k_LxBxSxNxD.shape
  at = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(index, jnp.int32)])
  kw = dict(span=pow2(attend_len), heads=heads, scale=d ** -0.5)
  caches = [cache_k_LxBxSxNxD, cache_v_LxBxSxNxD]
  args = [at, qkv_SxMxP, qkv_bias_P]
  if src_BxKxS is not None:
    kw.update(beams=src_BxKxS.shape[1], cache_len=s)
    caches = [c.reshape(l, b * s, heads, d) for c in caches]   # free: contiguous
    args.append(src_BxKxS.astype(jnp.int32))
  out_shape = [jax.ShapeDtypeStruct((qkv_SxMxP.shape[1], heads, d), cache_k_LxBxSxNxD.dtype),
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
  """One query per row (partial products [S, M, N * D] + bias; rows >= `rows` padding) over
  the first `lengths[b]` memory positions. Context [M, N, D] in the memory's dtype."""
  d = k_BxMxNxD.shape[-1]
  kernel = functools.partial(_cross_partials_kernel, scale=d ** -0.5)
  out = jax.ShapeDtypeStruct((q_SxMxH.shape[1], heads, d), k_BxMxNxD.dtype)
  return pl.pallas_call(kernel, out_shape=out, grid=(rows, heads), **backend(),
                        name="cross_partials_kernel")(
                            lengths_B.astype(jnp.int32), q_SxMxH, q_bias_H, k_BxMxNxD,
                            v_BxMxNxD)


# Where a one-token step reads and writes: the cache, its layer and position, the memory; `rows`
# are the real rows (the stream is padded to a row tile).
DecodeAt = collections.namedtuple("DecodeAt", (
    "cache_k cache_v layer index attend_len cross_k cross_v memory_lengths rows beam_src"),
    defaults=(None,))


def decoder_layer(w: LayerWeights, x_MxH: Array, x_ln_MxH: Array, at: DecodeAt, *,
                  pre_norm: bool, eps: float, act: Callable, dtype,
                  num_heads: int) -> tuple[Array, Array, Array, Array]:
  """The shared decoder block on the one-token stream: (stream, its LayerNorm that the next
  layer reads, cache k, cache v). Post-norm: `x_ln` is `x`; pre-norm: the stream's LayerNorm."""
  m, h = x_MxH.shape
  dot = functools.partial(splitk_dot, dtype=dtype)
  out = functools.partial(epilogue, dtype=dtype, eps=eps)

  def residual_block(partials, bias, residual, post_ln: Norm, next_ln: Norm):
    if pre_norm:   # residual + f(LN(residual)): the stream and its next LayerNorm
      return out(partials, bias, residual=residual, norm=next_ln)
    y, = out(partials, bias, residual=residual, norm=post_ln, raw=False)
    return y, y

  ctx, cache_k, cache_v = self_attention_write(
      dot(x_ln_MxH, w.qkv_w), w.qkv_b, at.cache_k, at.cache_v, at.layer, at.index,
      at.attend_len, at.rows, at.beam_src)
  r1, r1_ln = residual_block(dot(ctx.reshape(m, h), w.out_w), w.out_b, x_MxH, w.self_norm,
                             w.cross_norm)
  ctx = cross_attention_partials(dot(r1_ln, w.cross_q_w), w.cross_q_b, at.cross_k,
                                           at.cross_v, at.memory_lengths, at.rows, num_heads)
  r2, r2_ln = residual_block(dot(ctx.reshape(m, h), w.cross_out_w), w.cross_out_b, r1,
                             w.cross_norm, w.ffn_norm)
  hidden, = out(dot(r2_ln, w.ffn_w), w.ffn_b, act=act)
  r3, r3_ln = residual_block(dot(hidden, w.ffn_out_w), w.ffn_out_b, r2, w.ffn_norm,
                             w.self_norm)
  return r3, r3_ln, cache_k, cache_v
