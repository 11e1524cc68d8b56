"""Greedy, sampling and beam search over any `tokens_to_logits(ids_Nx1, cache)`, each one
`lax.while_loop` that stops once every row is done. With `phase_ends`, one loop per phase calls
`tokens_to_logits(ids, cache, end)` with a static `end`: a step attends only to positions < end.
Scores are `sum log p / ((5 + length) / 6) ** alpha` (GNMT), length counting EOS; best first."""
from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from flax_albert_code.config import BOS_ID, CLS_ID, EOS_ID, PAD_ID, SEP_ID

Array = jax.Array
TokensToLogits = Callable[[Array, Any], tuple[Array, Any]]

STRATEGIES = ("greedy", "sample", "beam")   # what generation, exports and evaluation accept
NEG_INF = -1.0e7          # "impossible" log-probability that stays finite in arithmetic
BANNED_IDS = (PAD_ID, BOS_ID, CLS_ID, SEP_ID)   # never targets in training; never generated


def length_penalty_fn(length: Array, alpha: Array) -> Array:
  """GNMT length penalty ((5 + length) / 6) ** alpha."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def ban_special(logits_NxV: Array) -> Array:
  """-inf at PAD/BOS/CLS/SEP: the decoder is never trained to emit them."""
  ids = lax.broadcasted_iota(jnp.int32, logits_NxV.shape, logits_NxV.ndim - 1)
  banned = functools.reduce(jnp.logical_or, [ids == i for i in BANNED_IDS])
  return jnp.where(banned, -jnp.inf, logits_NxV)


def filter_logits(logits_NxV: Array, *, top_k: int | Array = 0, top_p: Array | float = 1.0,
                  nucleus: bool = False) -> Array:
  """Keeps the `top_k` largest logits (0: all), then (`nucleus`) the top-p set; ties kept."""
  sorted_NxK = None
  if not isinstance(top_k, numbers.Integral):
    sorted_NxK = -jnp.sort(-logits_NxV, axis=-1)
    kth = jnp.take(sorted_NxK, jnp.clip(top_k - 1, 0, logits_NxV.shape[-1] - 1), axis=-1)
    kth = jnp.where(top_k > 0, kth, -jnp.inf)[..., None]
    logits_NxV = jnp.where(logits_NxV < kth, -jnp.inf, logits_NxV)
    sorted_NxK = jnp.where(sorted_NxK < kth, -jnp.inf, sorted_NxK)
  elif top_k:
    sorted_NxK = lax.top_k(logits_NxV, int(top_k))[0]
    logits_NxV = jnp.where(logits_NxV < sorted_NxK[:, -1:], -jnp.inf, logits_NxV)
  if nucleus:
    # Sorted descending: the top-k values when they are known, else the whole row.
    if sorted_NxK is None:
      sorted_NxK = -jnp.sort(-logits_NxV, axis=-1)
    probs = jax.nn.softmax(sorted_NxK, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of the strictly better tokens
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_NxK, jnp.inf), axis=-1, keepdims=True)
    logits_NxV = jnp.where(logits_NxV < threshold, -jnp.inf, logits_NxV)
  return logits_NxV


class _SampleState(NamedTuple):
  step: Array          # scalar int32: tokens generated so far
  last_N: Array        # the token fed next
  tokens_NxT: Array
  done_N: Array        # emitted EOS (or an inactive row)
  logprob_N: Array     # sum of log p of the emitted tokens, EOS included
  length_N: Array      # emitted tokens, EOS included
  cache: Any
  seen_NxV: Array | None = None   # tokens emitted so far (with a repetition penalty)


def penalize_repeats(logits_NxV: Array, seen_NxV: Array, penalty: Array) -> Array:
  """CTRL's repetition penalty: seen tokens' logits divided (> 0) or multiplied by `penalty`."""
  penalized = jnp.where(logits_NxV > 0, logits_NxV / penalty, logits_NxV * penalty)
  return jnp.where(seen_NxV, penalized, logits_NxV)


def ban_repeated_ngrams(tokens_NxT: Array, step: Array, n: int, vocab_size: int) -> Array:
  """[N, V] True where the token next would repeat an n-gram of its row (positions < `step`)."""
  rows, t = tokens_NxT.shape
  if n < 1 or t < n:
    return jnp.zeros((rows, vocab_size), bool)
  width = t - n + 1
  prefix = lax.dynamic_slice(tokens_NxT, (0, jnp.maximum(step - (n - 1), 0)), (rows, n - 1))
  match = (jnp.arange(width) + n - 1 < step)[None, :] & (step >= n - 1)
  for i in range(n - 1):
    match = match & (tokens_NxT[:, i:i + width] == prefix[:, i:i + 1])
  banned = jnp.zeros((rows, vocab_size), bool)
  return banned.at[jnp.arange(rows)[:, None], tokens_NxT[:, n - 1:]].max(match)


def decode_phases(max_new_tokens: int, decode_phase: int) -> tuple[int, ...] | None:
  """(p, 2p, .., max_new_tokens); None when off (0) or one phase would span everything."""
  if decode_phase <= 0 or decode_phase >= max_new_tokens:
    return None
  return tuple(range(decode_phase, max_new_tokens, decode_phase)) + (max_new_tokens,)


def _phased_loop(cond: Callable[[Any], Array], body: Callable[[Any, int | None], Any], state,
                 ends: Sequence[int] | None):
  """`while cond(s): s = body(s, None)`, or per static `end`: while also s.step < end."""
  if ends is None:
    return lax.while_loop(cond, lambda s: body(s, None), state)
  for end in ends:
    state = lax.while_loop(lambda s, end=end: (s.step < end) & cond(s),
                           lambda s, end=end: body(s, end), state)
  return state


def _call(fn: Callable[..., Any], a, b, end: int | None):
  return fn(a, b) if end is None else fn(a, b, end)


def sample_loop(tokens_to_logits: TokensToLogits, cache: Any, *, batch_size: int,
                max_new_tokens: int, choose: Callable[[Array, Array], Array], rng: Array,
                done_N: Array | None = None, phase_ends: Sequence[int] | None = None,
                repetition_penalty: Array | None = None, no_repeat_ngram_size: int = 0,
                limit: Array | None = None) -> tuple[Array, Array, Array, Array]:
  """Decodes until every row emitted EOS or `max_new_tokens` (or traced `limit`) steps; `rng` is
  one key or [N, 2] keys, one a row. Returns tokens [N, T] (PAD after EOS), summed log-probs (the
  model's, even under `repetition_penalty`), lengths (EOS counted) and the steps run."""
  n, t = batch_size, max_new_tokens
  done0 = jnp.zeros((n,), bool) if done_N is None else done_N
  state = _SampleState(jnp.zeros((), jnp.int32), jnp.full((n,), BOS_ID, jnp.int32),
                       jnp.full((n, t), PAD_ID, jnp.int32), done0,
                       jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.int32), cache)
  if repetition_penalty is not None:
    v = jax.eval_shape(tokens_to_logits, state.last_N[:, None], cache)[0].shape[-1]
    state = state._replace(seen_NxV=jnp.zeros((n, v), bool))

  def cond(s: _SampleState) -> Array:
    going = (s.step < t) & ~jnp.all(s.done_N)
    return going if limit is None else going & (s.step < limit)

  def body(s: _SampleState, end: int | None) -> _SampleState:
    logits, cache = _call(tokens_to_logits, s.last_N[:, None], s.cache, end)
    logits = ban_special(logits.reshape(n, -1).astype(jnp.float32))
    chosen_from = (logits if s.seen_NxV is None
                   else penalize_repeats(logits, s.seen_NxV, repetition_penalty))
    if no_repeat_ngram_size:
      banned = ban_repeated_ngrams(s.tokens_NxT, s.step, no_repeat_ngram_size, logits.shape[-1])
      chosen_from = jnp.where(banned, -jnp.inf, chosen_from)
    step_rng = (jax.vmap(jax.random.fold_in, (0, None))(rng, s.step) if jnp.ndim(rng) == 2
                else jax.random.fold_in(rng, s.step))
    ids = choose(chosen_from, step_rng).astype(jnp.int32)
    ids = jnp.where(s.done_N, PAD_ID, ids)
    logp = jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, -1)
    live = ~s.done_N
    seen = None if s.seen_NxV is None else s.seen_NxV.at[jnp.arange(n), ids].set(True)
    return _SampleState(
        s.step + 1, ids, lax.dynamic_update_slice(s.tokens_NxT, ids[:, None], (0, s.step)),
        s.done_N | (ids == EOS_ID), s.logprob_N + jnp.where(live, logp, 0.0),
        s.length_N + live.astype(jnp.int32), cache, seen)

  final = _phased_loop(cond, body, state, phase_ends)
  return final.tokens_NxT, final.logprob_N, final.length_N, final.step


def greedy_choice(logits_NxV: Array, rng: Array) -> Array:
  del rng
  return jnp.argmax(logits_NxV, axis=-1)


def sample_choice(temperature, top_k: int | Array, top_p,
                  nucleus: bool) -> Callable[[Array, Array], Array]:
  """Draws from softmax(logits / temperature) within top-k/top-p; keys [N, 2]: one a row."""
  def choose(logits_NxV: Array, rng: Array) -> Array:
    logits = filter_logits(logits_NxV / temperature, top_k=top_k, top_p=top_p, nucleus=nucleus)
    if jnp.ndim(rng) == 2:
      return jax.vmap(lambda key, row: jax.random.categorical(key, row))(rng, logits)
    return jax.random.categorical(rng, logits, axis=-1)
  return choose


# Beam search (flax wmt, t5x): 2K candidates per step, so that K live beams remain even when K of
# them end; finished beams are kept aside and the search stops when no live beam can beat them.


class _BeamState(NamedTuple):
  step: Array                  # scalar int32: tokens generated so far
  last_BxK: Array              # the token each live beam feeds next
  live_seqs_BxKxT: Array
  live_logprob_BxK: Array      # sorted descending
  finished_seqs_BxKxT: Array
  finished_scores_BxK: Array   # sorted descending; NEG_INF where empty
  finished_flags_BxK: Array
  cache: Any


def reorder_leading(cache: Any, flat_idx_N: Array) -> Any:
  """Gathers every non-scalar leaf of `cache` along axis 0."""
  return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.take(x, flat_idx_N, axis=0), cache)


def gather_beams(x_BxKx: Array, idx_BxJ: Array) -> Array:
  """`x[b, idx[b, j]]` for every row b: beams (or samples) picked or reordered per row."""
  return jnp.take_along_axis(x_BxKx, idx_BxJ.reshape(idx_BxJ.shape + (1,) * (x_BxKx.ndim - 2)),
                             axis=1)


def beam_search(tokens_to_logits: TokensToLogits, cache: Any, *, batch_size: int, beam_size: int,
                max_new_tokens: int, length_penalty: Array | float = 1.0,
                active_B: Array | None = None, reorder_cache: Callable[..., Any] | None = None,
                phase_ends: Sequence[int] | None = None, repetition_penalty: Array | None = None,
                no_repeat_ngram_size: int = 0, limit: Array | None = None) -> tuple[Array, Array]:
  """Beam search over a cache of `batch_size * beam_size` rows (beams of a row adjacent). Returns
  sequences [B, K, T] and scores [B, K]: finished beams best first, then unfinished ones scored
  at length T to fill empty slots. Rows where `active_B` is False are not searched."""
  b, k, t = batch_size, beam_size, max_new_tokens
  last = t if limit is None else jnp.minimum(limit, t)
  if reorder_cache is None:
    def reorder_cache(c, parent_BxK, end=None):
      del end
      return reorder_leading(c, (jnp.arange(b)[:, None] * k + parent_BxK).reshape(-1))
  active = jnp.ones((b,), bool) if active_B is None else active_B
  alpha = jnp.asarray(length_penalty, jnp.float32)
  live0 = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
  state = _BeamState(jnp.zeros((), jnp.int32), jnp.full((b, k), BOS_ID, jnp.int32),
                     jnp.full((b, k, t), PAD_ID, jnp.int32), live0,
                     jnp.full((b, k, t), PAD_ID, jnp.int32), jnp.full((b, k), NEG_INF),
                     jnp.zeros((b, k), bool), cache)

  def cond(s: _BeamState) -> Array:
    # The best any live beam can still reach: its log-prob (which only falls) over the most
    # favourable penalty among the lengths it can still end at.
    best_live = s.live_logprob_BxK[:, 0]
    bound = jnp.maximum(best_live / length_penalty_fn(s.step + 1, alpha),
                        best_live / length_penalty_fn(jnp.asarray(last), alpha))
    worst_finished = jnp.where(jnp.all(s.finished_flags_BxK, axis=1),
                               s.finished_scores_BxK[:, -1], NEG_INF)
    settled = (worst_finished > bound) | ~active
    return (s.step < last) & ~jnp.all(settled)

  def body(s: _BeamState, end: int | None) -> _BeamState:
    logits, cache = _call(tokens_to_logits, s.last_BxK.reshape(b * k, 1), s.cache, end)
    logits = ban_special(logits.reshape(b * k, -1).astype(jnp.float32))
    v = logits.shape[-1]
    if repetition_penalty is not None:
      flat = s.live_seqs_BxKxT.reshape(b * k, t)
      seen = jnp.zeros((b * k, v), bool).at[jnp.arange(b * k)[:, None], flat].set(True)
      logits = penalize_repeats(logits, seen.at[:, PAD_ID].set(False), repetition_penalty)
    logprob_BxKxV = (jax.nn.log_softmax(logits).reshape(b, k, v)
                     + s.live_logprob_BxK[:, :, None])
    if no_repeat_ngram_size:
      banned = ban_repeated_ngrams(s.live_seqs_BxKxT.reshape(b * k, t), s.step,
                                   no_repeat_ngram_size, v)
      logprob_BxKxV = jnp.where(banned.reshape(b, k, v), NEG_INF, logprob_BxKxV)
    top_lp, top_idx = lax.top_k(logprob_BxKxV.reshape(b, k * v), 2 * k)   # [B, 2K]
    parent, ids = top_idx // v, (top_idx % v).astype(jnp.int32)
    seqs = gather_beams(s.live_seqs_BxKxT, parent)
    seqs = lax.dynamic_update_slice(seqs, ids[:, :, None], (0, 0, s.step))
    # An EOS candidate finishes only if it ranks among the top K (so width 1 is greedy); the
    # other K candidates are there to keep K beams alive when some of those end.
    in_top_k = jnp.arange(2 * k)[None, :] < k
    is_eos = ids == EOS_ID
    ended = is_eos & in_top_k & (top_lp > NEG_INF / 2)

    # Live: the best K candidates that did not end.
    live_lp, sel = lax.top_k(jnp.where(is_eos, NEG_INF, top_lp), k)
    live_parent = gather_beams(parent, sel)
    cache = _call(reorder_cache, cache, live_parent, end)

    # Finished: merge the ended candidates into the kept-aside set.
    new_scores = jnp.where(ended, top_lp / length_penalty_fn(s.step + 1, alpha), NEG_INF)
    all_scores = jnp.concatenate([s.finished_scores_BxK, new_scores], axis=1)
    fin_scores, fsel = lax.top_k(all_scores, k)
    fin_seqs = gather_beams(jnp.concatenate([s.finished_seqs_BxKxT, seqs], axis=1), fsel)
    fin_flags = gather_beams(jnp.concatenate([s.finished_flags_BxK, ended], axis=1), fsel)
    return _BeamState(s.step + 1, gather_beams(ids, sel), gather_beams(seqs, sel), live_lp,
                      fin_seqs, fin_scores, fin_flags, cache)

  final = _phased_loop(cond, body, state, phase_ends)
  # Finished beams first, then unfinished ones (only to fill empty slots), each by score.
  live_scores = jnp.where(final.live_logprob_BxK > NEG_INF / 2,
                          final.live_logprob_BxK / length_penalty_fn(final.step, alpha), NEG_INF)
  scores = jnp.concatenate([jnp.where(final.finished_flags_BxK, final.finished_scores_BxK,
                                      NEG_INF), live_scores], axis=1)
  unfinished = jnp.concatenate([~final.finished_flags_BxK, jnp.ones((b, k), bool)], axis=1)
  order = jnp.lexsort((-scores, unfinished), axis=-1)[:, :k]
  seqs = jnp.concatenate([final.finished_seqs_BxKxT, final.live_seqs_BxKxT], axis=1)
  seqs, scores = gather_beams(seqs, order), gather_beams(scores, order)
  seqs = jnp.where(active[:, None, None], seqs, PAD_ID)
  return seqs, jnp.where(active[:, None], scores, 0.0)


def num_candidates(strategy: str, num_beams: int, num_samples: int) -> int:
  """Candidates a strategy decodes per description: 1 (greedy), every sample, every beam."""
  return {"greedy": 1, "sample": num_samples, "beam": num_beams}[strategy]

