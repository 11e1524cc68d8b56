"""`CodeModel` decoding: the loops of decoding.py with `CodeModel.decode_step`, in one jitted
program per (shapes, strategy, options), sharded over a mesh when one is given."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_albert_code.config import PAD_ID
from flax_albert_code.inference import decoding, options
from flax_albert_code.model.albert import CodeModel, DecodeCache

Array = jax.Array


def reorder_decode_cache(cache: DecodeCache, parent_BxK: Array,
                         end: int | None = None) -> DecodeCache:
  """Beam k of row b continues beam parent[b, k]: the beam-source table and copy history move."""
  del end
  b, k = parent_BxK.shape
  if cache.copy_history_BxLxC is not None:
    hist = cache.copy_history_BxLxC
    hist = jnp.take_along_axis(hist.reshape(b, k, *hist.shape[1:]),
                               parent_BxK[:, :, None, None], axis=1).reshape(hist.shape)
    cache = cache._replace(copy_history_BxLxC=hist)
  src = jnp.take_along_axis(cache.beam_src_BxKxS, parent_BxK[:, :, None], axis=1)
  return cache._replace(beam_src_BxKxS=src)


def generate(model: CodeModel, params: Any, desc_ids_BxL: Array, *, strategy: str = "greedy",
             max_new_tokens: int = 256, rng: Array | int = 0, temperature=1.0,
             top_k: int | Array = 0, top_p=1.0, num_beams: int = 4, length_penalty=1.0,
             num_samples: int = 1, decode_phase: int = 64, mesh: jax.sharding.Mesh | None = None,
             axis_rules: tuple | None = None, repetition_penalty=1.0, no_repeat_ngram_size: int = 0,
             limit: Array | int | None = None) -> tuple[Array, Array]:
  """Tokens [B, K, T] int32 (PAD after EOS) and scores [B, K], best first; all-PAD rows of
  `desc_ids` are not decoded. `rng` (sample): a seed, a key, or keys [B, K, 2], one a candidate.
  `limit` (traced, <= max_new_tokens) stops decoding there; outputs keep max_new_tokens."""
  cfg = model.cfg
  options.check(strategies=decoding.STRATEGIES, strategy=strategy, max_new_tokens=max_new_tokens,
                num_beams=num_beams, num_samples=num_samples, top_k=top_k, top_p=top_p,
                temperature=temperature, repetition_penalty=repetition_penalty,
                length_penalty=length_penalty, max_tokens=cfg.max_position_embeddings,
                vocab_size=cfg.vocab_size, no_repeat_ngram_size=no_repeat_ngram_size)
  if mesh is not None and mesh.size > 1 and cfg.decode_attention == "auto":
    # GSPMD does not partition a Pallas call (it would gather the sharded cache onto every
    # device): a batch sharded over several devices decodes with XLA's attention.
    model = model.clone(cfg=dataclasses.replace(cfg, decode_attention="xla"))
  nucleus = strategy == "sample" and not (isinstance(top_p, numbers.Real) and top_p >= 1.0)
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  static_top_k = isinstance(top_k, numbers.Integral)
  return _generate(model, params, desc_ids_BxL, rng, jnp.float32(temperature), jnp.float32(top_p),
                   jnp.float32(length_penalty), jnp.float32(repetition_penalty),
                   jnp.int32(max_new_tokens if limit is None else limit),
                   jnp.int32(0 if static_top_k else top_k), strategy=strategy,
                   max_new_tokens=max_new_tokens, nucleus=nucleus,
                   k=decoding.num_candidates(strategy, num_beams, num_samples),
                   top_k=(int(top_k) if static_top_k else None) if strategy == "sample" else 0,
                   phases=decoding.decode_phases(max_new_tokens, int(decode_phase)), mesh=mesh,
                   penalize=not (isinstance(repetition_penalty, numbers.Real)
                                 and repetition_penalty == 1.0),
                   no_repeat_ngram_size=int(no_repeat_ngram_size),
                   axis_rules=None if axis_rules is None else tuple(   # hashable: static
                       (n, tuple(ax) if isinstance(ax, list) else ax) for n, ax in axis_rules))


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh | None, axis_rules: tuple | None):
  """The mesh and logical axis rules the layers' constraints use, inside a jitted function."""
  if mesh is None:
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(axis_rules or ()):
    yield


@functools.partial(jax.jit, static_argnames=("model", "strategy", "max_new_tokens", "k", "top_k",
                                             "nucleus", "phases", "mesh", "axis_rules",
                                             "penalize", "no_repeat_ngram_size"))
def _generate(model: CodeModel, params, desc_ids_BxL, rng, temperature, top_p, length_penalty,
              repetition_penalty, limit, top_k_value, *, strategy: str, max_new_tokens: int,
              k: int, top_k: int | None, nucleus: bool, mesh, axis_rules,
              phases: tuple[int, ...] | None, penalize: bool, no_repeat_ngram_size: int):
  # top_k None: the traced `top_k_value` (0: off).
  with mesh_context(mesh, axis_rules):
    b = desc_ids_BxL.shape[0]
    active_B = desc_ids_BxL[:, 0] != PAD_ID
    enc = model.apply(params, desc_ids_BxL, method=CodeModel.encode)
    cache = model.apply(params, enc, max_new_tokens, k, strategy == "beam",
                        method=CodeModel.init_cache)

    def tokens_to_logits(ids_Nx1, cache, attend_len=None):
      logits, cache = model.apply(params, ids_Nx1, cache, attend_len, method=CodeModel.decode_step)
      return logits[:, -1], cache

    penalty = repetition_penalty if penalize else None
    if strategy == "beam":
      tokens, scores = decoding.beam_search(
          tokens_to_logits, cache, batch_size=b, beam_size=k, max_new_tokens=max_new_tokens,
          length_penalty=length_penalty, active_B=active_B, reorder_cache=reorder_decode_cache,
          phase_ends=phases, repetition_penalty=penalty,
          no_repeat_ngram_size=no_repeat_ngram_size, limit=limit)
    else:
      choose = (decoding.greedy_choice if strategy == "greedy" else decoding.sample_choice(
          temperature, top_k_value if top_k is None else top_k, top_p, nucleus))
      if rng.ndim == 3:   # a key per candidate, [B, K, 2]
        rng = rng.reshape(b * k, rng.shape[-1])
      tokens, logprob, length, _ = decoding.sample_loop(
          tokens_to_logits, cache, batch_size=b * k, max_new_tokens=max_new_tokens,
          choose=choose, rng=rng, done_N=jnp.repeat(~active_B, k), phase_ends=phases,
          repetition_penalty=penalty, no_repeat_ngram_size=no_repeat_ngram_size, limit=limit)
      scores = jnp.where(length > 0, logprob / decoding.length_penalty_fn(length, length_penalty),
                       0.0)
      tokens, scores = tokens.reshape(b, k, max_new_tokens), scores.reshape(b, k)
      if k > 1:   # samples best first
        order = jnp.argsort(-scores, axis=1, stable=True)
        tokens, scores = decoding.gather_beams(tokens, order), decoding.gather_beams(scores, order)
    if mesh is not None:
      spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
      tokens, scores = lax.with_sharding_constraint((tokens, scores), spec)
    return tokens, scores
