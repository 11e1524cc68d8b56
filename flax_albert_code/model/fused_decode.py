"""The one-token decoder layer in twelve Pallas kernels (`model.decode_attention="layer"`, and
"auto" on one GPU).

XLA runs a one-token layer at 64 rows as ~25 kernels of a few microseconds each (split-K GEMMs
and their reductions, LayerNorm as a reduction plus elementwise fusions, bias and residual adds,
slices of Q|K|V, two cache writes), so a step is bound by kernel count, not bytes. Here:

  Q|K|V partials = x Wqkv            -> self-attention: sums them, writes the new K/V, attends
  partials = ctx Wo                  -> epilogue: r1 = LN(sum + bo + x)          (post-norm)
  partials = r1 Wq                   -> cross-attention: sums them, attends over the memory
  partials = ctx Wo'                 -> epilogue: r2 = LN(sum + bo' + r1)
  partials = r2 W1                   -> epilogue: h = act(sum + b1)
  partials = h W2                    -> epilogue: r3 = LN(sum + b2 + r2)

`splitk_dot` splits K so that 64 rows still occupy the GPU (as XLA's own GEMMs do) and leaves
the sum to its consumer; `epilogue` takes a whole row per program, so the residual block's
LayerNorm costs no kernel of its own. Pre-norm (x + f(LN(x))) has the epilogues write both the
stream and its next LayerNorm. Rows are padded to the row tile once per step (`rows_block`).
On CPU the kernels run in Pallas' interpreter (tests).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from flax_albert_code.model import one_query

Array = jax.Array
MIN_PROGRAMS = 96   # splitk_dot splits K until a GEMM has this many programs (H200: 132 SMs)
EPILOGUE_WARPS = 4  # Triton warps of an epilogue program (a row, or a chunk of one)


class Norm(NamedTuple):
  scale: Array
  bias: Array


class LayerWeights(NamedTuple):
  """The shared decoder block's parameters as 2-D matrices: Q|K|V stacked [H, 3H]."""
  qkv_w: Array
  qkv_b: Array
  out_w: Array
  out_b: Array
  self_norm: Norm
  cross_q_w: Array
  cross_q_b: Array
  cross_out_w: Array
  cross_out_b: Array
  cross_norm: Norm
  ffn_w: Array
  ffn_b: Array
  ffn_out_w: Array
  ffn_out_b: Array
  ffn_norm: Norm


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


def _block(n: int, cap: int, what: str) -> int:
  """The largest power of two <= cap dividing n (Triton tiles); at least 16 (tensor cores)."""
  b = cap
  while b > 16 and n % b:
    b //= 2
  if n % b:
    raise ValueError(f"decode_attention='layer' needs {what} to be a multiple of 16 (got {n}); "
                     "use decode_attention='pallas' for this model.")
  return b


def rows_block(m: int) -> int:
  """The row tile for `m` rows: 16, 32 or 64; the stream is padded to a multiple of it."""
  return min(64, max(16, one_query.pow2(m)))


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
  """x @ w as float32 partial sums over S slices of K, [S, M, N] (sum them for the product):
  at 64 rows the output alone has too few tiles to occupy the GPU (XLA splits K likewise).
  S is the fewest (a power of two: Triton tiles) that gives `min_programs` (default
  `MIN_PROGRAMS`) programs. M must be a multiple of `rows_block(M)`."""
  (m, k), n = x_MxK.shape, w_KxN.shape[1]
  bm = rows_block(m)
  if m % bm:
    raise ValueError(f"splitk_dot needs the rows ({m}) padded to a multiple of {bm}.")
  bn = _block(n, 64, "the hidden and FFN sizes")
  tiles, splits = (m // bm) * (n // bn), 1
  min_programs = MIN_PROGRAMS if min_programs is None else min_programs
  while tiles * splits < min_programs and k % (4 * splits) == 0 and (k // (2 * splits)) % 16 == 0:
    splits *= 2
  bk = _block(k // splits, 128, "the hidden and FFN sizes")
  precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
  kernel = functools.partial(_splitk_kernel, bm=bm, bn=bn, bk=bk, steps=k // splits // bk,
                             dtype=dtype, precision=precision)
  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
                        grid=(m // bm, n // bn, splits), name="splitk_dot",
                        **one_query.backend(3, num_warps=4))(x_MxK, w_KxN)


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
  # Without a LayerNorm each program takes one chunk of the row (more programs); with one,
  # the whole row.
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
  """y = act(sum of the partial products + b) + residual: [y] and/or [LN(y)] (`raw`, `norm`),
  in `dtype`. With `norm` a program takes a whole row, so the LayerNorm of a residual block
  costs no kernel of its own; without, a chunk of a row."""
  _, m, n = partials_SxMxN.shape
  cw = _block(n, 256, "the hidden and FFN sizes")
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
                        grid=grid, name="epilogue", **one_query.backend(1, num_warps=EPILOGUE_WARPS))(*args)


class DecodeAt(NamedTuple):
  """Where a one-token step reads and writes: the cache, its layer and position, the memory."""
  cache_k: Array
  cache_v: Array
  layer: Array
  index: Array
  attend_len: int
  cross_k: Array
  cross_v: Array
  memory_lengths: Array
  rows: int                      # the real rows (the stream is padded to a row tile)
  beam_src: Array | None = None


def decoder_layer(w: LayerWeights, x_MxH: Array, x_ln_MxH: Array, at: DecodeAt, *,
                  pre_norm: bool, eps: float, act: Callable, dtype,
                  num_heads: int) -> tuple[Array, Array, Array, Array]:
  """One application of the shared decoder block to the one-token stream, twelve kernels:
  returns (stream, the LayerNorm the next layer reads it through, cache k, cache v).

  Post-norm: the stream is normalised already (LN(x + f(x)), each epilogue's LayerNorm) and
  `x_ln` is `x`. Pre-norm: the stream is the residual and `x_ln` its self-attention LayerNorm,
  which the previous layer's last epilogue wrote (the decoder writes the first, and applies its
  final LayerNorm after the last layer).
  """
  m, h = x_MxH.shape
  dot = functools.partial(splitk_dot, dtype=dtype)
  out = functools.partial(epilogue, dtype=dtype, eps=eps)

  def residual_block(partials, bias, residual, post_ln: Norm, next_ln: Norm):
    if pre_norm:   # residual + f(LN(residual)): the stream and its next LayerNorm
      return out(partials, bias, residual=residual, norm=next_ln)
    y, = out(partials, bias, residual=residual, norm=post_ln, raw=False)
    return y, y

  qkv = dot(x_ln_MxH, w.qkv_w)
  ctx, cache_k, cache_v = one_query.self_attention_write(
      qkv, w.qkv_b, at.cache_k, at.cache_v, at.layer, at.index, at.attend_len, at.rows,
      at.beam_src)
  r1, r1_ln = residual_block(dot(ctx.reshape(m, h), w.out_w), w.out_b, x_MxH, w.self_norm,
                             w.cross_norm)
  ctx = one_query.cross_attention_partials(dot(r1_ln, w.cross_q_w), w.cross_q_b, at.cross_k,
                                           at.cross_v, at.memory_lengths, at.rows, num_heads)
  r2, r2_ln = residual_block(dot(ctx.reshape(m, h), w.cross_out_w), w.cross_out_b, r1,
                             w.cross_norm, w.ffn_norm)
  hidden, = out(dot(r2_ln, w.ffn_w), w.ffn_b, act=act)
  r3, r3_ln = residual_block(dot(hidden, w.ffn_out_w), w.ffn_out_b, r2, w.ffn_norm,
                             w.self_norm)
  return r3, r3_ln, cache_k, cache_v
