"""The jitted sampler: toy `tokens_to_logits` with known answers (flax lm1b/wmt style), then the
tiny model with random fp32 parameters, sharpened so that outputs vary with position and EOS
comes at different steps (argmax gaps stay far above rounding)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_albert_code import config as config_lib
from flax_albert_code.inference import decoding as sampling
from flax_albert_code.inference import model_decoding
from flax_albert_code.model import layers
from flax_albert_code.model import sharding
from flax_albert_code.model import albert as model_lib
from flax_albert_code.config import BOS_ID, CLS_ID, EOS_ID, PAD_ID, SEP_ID, UNK_ID
from weights_util import random_variables

V = 8  # toy vocabulary: 0-5 special (PAD, BOS, CLS, SEP are banned), 6 and 7 ordinary


def _toy_logits(table):
  """tokens_to_logits whose next-token log-probs depend on the previous token only."""
  table = jnp.log(jnp.asarray(table, jnp.float32))

  def tokens_to_logits(ids_Nx1, cache):
    return table[ids_Nx1[:, 0]], cache + 1   # the cache counts decoding steps
  return tokens_to_logits


def _row(**probs):
  row = np.full(V, 1e-9)
  for tok, p in probs.items():
    row[{"eos": EOS_ID, "unk": UNK_ID, "a": 6, "b": 7}[tok]] = p
  return row


# After BOS: a (0.6) or b (0.4). After a: EOS 0.3, the rest 0.7 spread thin; after b: EOS 1.0.
# Greedy takes a, then EOS: log(0.6 * 0.3) = -1.71. Best: b, EOS: log 0.4 = -0.92.
_TABLE = np.stack([_row(eos=1.0)] * V)
_TABLE[BOS_ID] = _row(a=0.6, b=0.4)
_TABLE[6] = _row(eos=0.3, unk=0.25, a=0.225, b=0.225)
_TABLE[7] = _row(eos=1.0)


def test_toy_greedy_stops_at_eos_and_pads():
  tokens, logprob, length, steps = sampling.sample_loop(
      _toy_logits(_TABLE), jnp.zeros((), jnp.int32), batch_size=2, max_new_tokens=10,
      choose=sampling.greedy_choice, rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(tokens, [[6, EOS_ID] + [PAD_ID] * 8] * 2)
  np.testing.assert_allclose(logprob, [np.log(0.6 * 0.3)] * 2, rtol=1e-5)
  np.testing.assert_array_equal(length, [2, 2])
  assert int(steps) == 2   # the loop stopped when every row had emitted EOS, not at 10


def test_toy_repetition_penalty_breaks_a_greedy_loop():
  """After a: a again (0.5) or EOS (0.4). Plain greedy loops on a to the length limit; with
  CTRL's penalty a's logit log 0.5 < 0 is multiplied by 2 (log 0.25 < log 0.4), so greedy
  ends after one a. The returned log-prob is the model's, not the penalised one."""
  table = np.stack([_row(eos=1.0)] * V)
  table[BOS_ID] = _row(a=0.9, b=0.1)
  table[6] = _row(a=0.5, eos=0.4, b=0.1)
  run = lambda penalty: sampling.sample_loop(
      _toy_logits(table), jnp.zeros((), jnp.int32), batch_size=1, max_new_tokens=6,
      choose=sampling.greedy_choice, rng=jax.random.PRNGKey(0), repetition_penalty=penalty)
  np.testing.assert_array_equal(run(None)[0], [[6] * 6])
  tokens, logprob, length, _ = run(jnp.float32(2.0))
  np.testing.assert_array_equal(tokens, [[6, EOS_ID, 0, 0, 0, 0]])
  np.testing.assert_allclose(logprob, [np.log(0.9 * 0.4)], rtol=1e-5)
  # Penalty 1.0 changes nothing; positive logits are divided, negative ones multiplied.
  np.testing.assert_array_equal(run(jnp.float32(1.0))[0], run(None)[0])
  logits = jnp.array([[2.0, -2.0, 2.0]])
  np.testing.assert_allclose(
      sampling.penalize_repeats(logits, jnp.array([[True, True, False]]), 2.0),
      [[1.0, -4.0, 2.0]])


def test_toy_beam_finds_the_best_sequence_greedy_misses():
  seqs, scores = sampling.beam_search(
      _toy_logits(_TABLE), jnp.zeros((2,), jnp.int32), batch_size=1, beam_size=2,
      max_new_tokens=6, length_penalty=0.0)
  np.testing.assert_array_equal(seqs[0, 0], [7, EOS_ID, 0, 0, 0, 0])
  np.testing.assert_array_equal(seqs[0, 1], [6, EOS_ID, 0, 0, 0, 0])
  np.testing.assert_allclose(scores[0], [np.log(0.4), np.log(0.6 * 0.3)], rtol=1e-5)


def test_toy_beam_length_penalty_prefers_longer_finished_beams():
  # After a: UNK (0.6) then EOS. a, UNK, EOS (log 0.36) loses to b, EOS (log 0.4) without a
  # length penalty and wins with alpha = 4 (-1.02 / (8/6)^4 > -0.92 / (7/6)^4).
  table = _TABLE.copy()
  table[6] = _row(unk=0.6, eos=0.4)
  table[UNK_ID] = _row(eos=1.0)
  for alpha, best in ((0.0, [7, EOS_ID]), (4.0, [6, UNK_ID, EOS_ID])):
    seqs, _ = sampling.beam_search(_toy_logits(table), jnp.zeros((2,), jnp.int32), batch_size=1,
                                   beam_size=2, max_new_tokens=5, length_penalty=alpha)
    np.testing.assert_array_equal(seqs[0, 0, :len(best)], best)


def _toy_phased_logits(phase: int):
  """tokens_to_logits(ids, cache, end) that favours token 6 when the step (the cache) lies in
  the phase ending at `end`, and 7 otherwise: the output shows every step ran in its phase."""
  def tokens_to_logits(ids_Nx1, cache, end):
    in_phase = (cache >= end - phase) & (cache < end)
    favourite = jnp.where(in_phase, 6, 7)[:, None] if cache.ndim else jnp.where(in_phase, 6, 7)
    logits = jnp.where(jnp.arange(V) == favourite, 0.0, -5.0)
    return jnp.broadcast_to(logits, (ids_Nx1.shape[0], V)), cache + 1
  return tokens_to_logits


def test_toy_phases_call_each_step_with_its_phase_end():
  ends = sampling.decode_phases(7, 3)
  assert ends == (3, 6, 7) and sampling.decode_phases(7, 0) is None
  assert sampling.decode_phases(7, 7) is None and sampling.decode_phases(7, 64) is None
  tokens, _, _, steps = sampling.sample_loop(
      _toy_phased_logits(3), jnp.zeros((), jnp.int32), batch_size=2, max_new_tokens=7,
      choose=sampling.greedy_choice, rng=jax.random.PRNGKey(0), phase_ends=ends)
  np.testing.assert_array_equal(tokens, [[6] * 7] * 2)
  assert int(steps) == 7
  seen = []

  def reorder(cache, parent_BxK, end):
    seen.append(end)   # at trace time: one call per phase
    return sampling.reorder_leading(cache, (parent_BxK + jnp.arange(2)[:, None] * 2).reshape(-1))
  seqs, _ = sampling.beam_search(_toy_phased_logits(3), jnp.zeros((4,), jnp.int32), batch_size=2,
                                 beam_size=2, max_new_tokens=7, reorder_cache=reorder,
                                 phase_ends=ends)
  np.testing.assert_array_equal(seqs[:, 0], [[6] * 7] * 2)
  assert seen == [3, 6, 7]


def test_toy_phases_stop_at_eos_like_one_loop():
  # After the first phase every row has ended: the later phases must not run a step.
  tokens, logprob, length, steps = sampling.sample_loop(
      lambda ids, cache, end: _toy_logits(_TABLE)(ids, cache), jnp.zeros((), jnp.int32),
      batch_size=2, max_new_tokens=10, choose=sampling.greedy_choice,
      rng=jax.random.PRNGKey(0), phase_ends=(3, 6, 9, 10))
  np.testing.assert_array_equal(tokens, [[6, EOS_ID] + [PAD_ID] * 8] * 2)
  assert int(steps) == 2


def test_reorder_moves_the_beam_index_and_the_copy_history_not_the_cache():
  rs = np.random.RandomState(0)
  shape = (2, 2 * 3, 5, 2, 4)   # [L, B*K, S, N, D]: 2 descriptions, 3 beams, 5 positions
  k, v = (jnp.asarray(rs.standard_normal(shape), jnp.float32) for _ in range(2))
  src = jnp.asarray(rs.randint(0, 3, (2, 3, 5)), jnp.int32)
  history = jnp.asarray(rs.standard_normal((6, 2, 7)), jnp.float32)
  cache = model_lib.DecodeCache(k, v, jnp.zeros((6, 1, 2, 4)), jnp.zeros((6, 1, 2, 4)),
                                jnp.ones((6,), jnp.int32), jnp.zeros((), jnp.int32), src,
                                copy_history_BxLxC=history)
  parent = jnp.array([[2, 2, 0], [1, 0, 1]])
  out = jax.jit(model_decoding.reorder_decode_cache, static_argnums=2)(cache, parent, 3)
  assert out.k_LxBxSxNxD is not None and (out.k_LxBxSxNxD == k).all()
  assert (out.v_LxBxSxNxD == v).all()
  np.testing.assert_array_equal(out.beam_src_BxKxS[0], src[0, [2, 2, 0]])
  np.testing.assert_array_equal(out.beam_src_BxKxS[1], src[1, [1, 0, 1]])
  np.testing.assert_array_equal(out.copy_history_BxLxC, history[np.array([2, 2, 0, 4, 3, 4])])


def test_toy_a_row_key_decides_its_draws_whatever_the_batch():
  """Keys [N, 2], one a row: a row draws the same tokens alone and among other rows."""
  table = np.stack([_row(a=0.3, b=0.3, unk=0.2, eos=0.2)] * V)
  choose = sampling.sample_choice(1.0, 0, 1.0, False)
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  run = lambda k: sampling.sample_loop(_toy_logits(table), jnp.zeros((), jnp.int32),
                                       batch_size=len(k), max_new_tokens=12, choose=choose,
                                       rng=k)[0]
  together = np.asarray(run(keys))
  for i in range(5):
    np.testing.assert_array_equal(np.asarray(run(keys[i:i + 1]))[0], together[i])
  assert len({tuple(r) for r in together.tolist()}) > 1


def test_toy_a_traced_limit_stops_where_max_new_tokens_would():
  table = np.stack([_row(a=0.6, b=0.3, eos=0.1)] * V)
  for limit in (1, 3):
    short = sampling.sample_loop(_toy_logits(table), jnp.zeros((), jnp.int32), batch_size=2,
                                 max_new_tokens=limit, choose=sampling.greedy_choice,
                                 rng=jax.random.PRNGKey(0))
    long = jax.jit(lambda n: sampling.sample_loop(
        _toy_logits(table), jnp.zeros((), jnp.int32), batch_size=2, max_new_tokens=8,
        choose=sampling.greedy_choice, rng=jax.random.PRNGKey(0), limit=n))(limit)
    np.testing.assert_array_equal(np.asarray(long[0])[:, :limit], short[0])
    assert (np.asarray(long[0])[:, limit:] == PAD_ID).all()
    for a, b in zip(long[1:], short[1:]):
      np.testing.assert_array_equal(a, b)
    b_short = sampling.beam_search(_toy_logits(table), jnp.zeros((4,), jnp.int32), batch_size=2,
                                   beam_size=2, max_new_tokens=limit)
    b_long = jax.jit(lambda n: sampling.beam_search(
        _toy_logits(table), jnp.zeros((4,), jnp.int32), batch_size=2, beam_size=2,
        max_new_tokens=8, limit=n))(limit)
    np.testing.assert_array_equal(np.asarray(b_long[0])[..., :limit], b_short[0])
    np.testing.assert_allclose(b_long[1], b_short[1], rtol=1e-6)


def test_toy_a_traced_top_k_filters_as_a_static_one():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
  traced = jax.jit(lambda k, p: sampling.filter_logits(logits, top_k=k, top_p=p, nucleus=True))
  for k in (0, 1, 2, 4):
    for p in (0.5, 1.0):
      np.testing.assert_array_equal(
          traced(k, p), sampling.filter_logits(logits, top_k=k, top_p=p, nucleus=True))


def test_toy_top_k_and_top_p_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda **kw: np.isfinite(np.asarray(sampling.filter_logits(logits, **kw)))[0].tolist()
  assert keep(top_k=2) == [True, True, False, False]
  assert keep(top_p=0.7, nucleus=True) == [True, True, False, False]
  assert keep(top_p=0.5, nucleus=True) == [True, False, False, False]
  assert keep(top_p=0.9, nucleus=True) == [True, True, True, False]
  assert keep(top_k=1, top_p=0.99, nucleus=True) == [True, False, False, False]


# ---------------------------------------------------------------------------------------------
# The tiny model.

B, L, T = 4, 12, 16


def _config():
  config = config_lib.get_config("tiny")
  config.model.initializer_range = 0.2
  return config


@pytest.fixture(scope="module")
def tiny():
  config = _config()
  model = model_lib.build(config)[0]
  rs = np.random.RandomState(0)
  desc = rs.randint(SEP_ID + 1, 512, (B, L)).astype(np.int32)
  desc[:, 0] = CLS_ID
  for i, n in enumerate((12, 9, 7, 5)):
    desc[i, n - 1], desc[i, n:] = SEP_ID, PAD_ID
  variables = random_variables(model, desc, desc[:, :4])
  # Loud positions (a random model otherwise repeats one token) and a likelier EOS, so rows
  # differ along the sequence and end at different steps.
  emb = variables["params"]["shared_embedding"]["position_embeddings"]
  emb["embedding"] = emb["embedding"] * 10.0
  variables["params"]["decoder"]["logits_bias"][EOS_ID] = 1.0
  # The copy head points at the random description's tokens; a gate that mostly generates
  # (p_gen 0.998) lets EOS win in some rows and lets the model loop once EOS is banned, while
  # every decoding path still reads the mixture.
  variables["params"]["decoder"]["copy_head"]["gate"]["bias"][:] = 6.0
  return config, model, jax.tree.map(jnp.asarray, variables), jnp.asarray(desc)


def _gen(tiny, desc=None, **kw):
  _, model, variables, d = tiny
  kw.setdefault("max_new_tokens", T)
  tokens, scores = model_decoding.generate(model, variables, d if desc is None else desc, **kw)
  return np.asarray(tokens), np.asarray(scores)


def _lengths(tokens_NxT):
  eos = tokens_NxT == EOS_ID
  return np.where(eos.any(-1), eos.argmax(-1) + 1, tokens_NxT.shape[-1])


def test_greedy_equals_argmax_of_teacher_forced_pass_over_its_output(tiny):
  _, model, variables, desc = tiny
  tokens, scores = _gen(tiny, strategy="greedy")
  tokens = tokens[:, 0]
  enc = model.apply(variables, desc, method=model_lib.CodeModel.encode)
  dec_in = model_lib.shift_right(jnp.asarray(tokens), BOS_ID)
  logits = sampling.ban_special(
      model.apply(variables, enc, dec_in, method=model_lib.CodeModel.decode_logits))
  argmax = np.asarray(jnp.argmax(logits, -1))
  lengths = _lengths(tokens)
  assert len(set(lengths.tolist())) > 1 and lengths.min() < T, "EOS should end rows early"
  logp = np.asarray(jax.nn.log_softmax(logits))
  for i, n in enumerate(lengths):
    np.testing.assert_array_equal(tokens[i, :n], argmax[i, :n])
    assert (tokens[i, n:] == PAD_ID).all()
    expected = logp[i, np.arange(n), tokens[i, :n]].sum() / ((5 + n) / 6)
    np.testing.assert_allclose(scores[i, 0], expected, rtol=1e-4)


def test_beam_width_one_and_top_k_one_equal_greedy(tiny):
  # Without a length penalty: with one, a width-1 beam rightly keeps looking for a longer
  # sequence whose penalised score beats the greedy one.
  greedy, greedy_scores = _gen(tiny, strategy="greedy", length_penalty=0.0)
  beam, beam_scores = _gen(tiny, strategy="beam", num_beams=1, length_penalty=0.0)
  np.testing.assert_array_equal(beam, greedy)
  np.testing.assert_allclose(beam_scores, greedy_scores, rtol=1e-5)
  top1, _ = _gen(tiny, strategy="sample", top_k=1, temperature=0.7, rng=3)
  np.testing.assert_array_equal(top1, greedy)


def test_beam_is_at_least_as_good_as_greedy_and_ranked(tiny):
  greedy, greedy_scores = _gen(tiny, strategy="greedy")
  beam, scores = _gen(tiny, strategy="beam", num_beams=3)
  assert beam.shape == (B, 3, T)
  assert (np.diff(scores, axis=1) <= 1e-6).all(), "beams must come best first"
  assert (scores[:, 0] >= greedy_scores[:, 0] - 1e-5).all()
  for seq in beam.reshape(-1, T):  # PAD after EOS
    n = _lengths(seq[None])[0]
    assert (seq[n:] == PAD_ID).all() and not np.isin(seq[:n], (PAD_ID, BOS_ID, CLS_ID)).any()


def test_output_for_a_description_does_not_depend_on_the_batch(tiny):
  _, _, _, desc = tiny
  alone = np.zeros_like(np.asarray(desc))   # all-PAD rows are bucket padding: not decoded
  alone[0] = desc[2]
  for strategy in ("greedy", "beam"):
    full, full_scores = _gen(tiny, strategy=strategy, num_beams=3)
    solo, solo_scores = _gen(tiny, jnp.asarray(alone), strategy=strategy, num_beams=3)
    np.testing.assert_array_equal(solo[0], full[2])
    np.testing.assert_allclose(solo_scores[0], full_scores[2], rtol=1e-5)
    assert (solo[1:] == PAD_ID).all()


def test_same_seed_same_samples(tiny):
  kw = dict(strategy="sample", num_samples=3, temperature=1.5, top_p=0.9)
  a, sa = _gen(tiny, rng=7, **kw)
  b, sb = _gen(tiny, rng=7, **kw)
  c, _ = _gen(tiny, rng=8, **kw)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(sa, sb)
  assert not np.array_equal(a, c)
  assert (np.diff(sa, axis=1) <= 1e-6).all(), "samples must come best first"


def test_repetition_penalty_on_the_model(tiny):
  """Compiled with the penalty: 1.0 gives plain greedy exactly; a strong one changes outputs
  and repeats fewer tokens."""
  config, model, variables, desc = tiny
  variables = jax.tree.map(lambda x: x, variables)
  bias = variables["params"]["decoder"]["logits_bias"]
  variables["params"]["decoder"]["logits_bias"] = bias.at[EOS_ID].set(-10.0)  # long outputs
  loud = (config, model, variables, desc)
  plain, plain_scores = _gen(loud, strategy="greedy")
  same, same_scores = _gen(loud, strategy="greedy", repetition_penalty=1.0)
  np.testing.assert_array_equal(same, plain)
  np.testing.assert_array_equal(same_scores, plain_scores)
  strong, _ = _gen(loud, strategy="greedy", repetition_penalty=5.0)
  assert not np.array_equal(strong, plain)
  repeats = lambda t: sum(len(r[r > EOS_ID]) - len(set(r[r > EOS_ID])) for r in t[:, 0])
  assert repeats(strong) < repeats(plain)


def _repeated_ngrams(row, n: int) -> int:
  toks = [int(x) for x in row if x > EOS_ID]
  grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
  return len(grams) - len(set(grams))


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_no_repeat_ngram_size_bans_repeated_ngrams_in_every_strategy(tiny, strategy):
  """With EOS made unlikely the tiny model loops; no_repeat_ngram_size=3 leaves no trigram
  twice in any candidate, and 0 changes nothing."""
  config, model, variables, desc = tiny
  variables = jax.tree.map(lambda x: x, variables)
  bias = variables["params"]["decoder"]["logits_bias"]
  variables["params"]["decoder"]["logits_bias"] = bias.at[EOS_ID].set(-10.0)
  loud = (config, model, variables, desc)
  kw = dict(strategy=strategy,   # a cold sampler loops like greedy
            **({"num_samples": 2, "temperature": 0.05} if strategy == "sample" else {}))
  plain, _ = _gen(loud, **kw)
  same, _ = _gen(loud, no_repeat_ngram_size=0, **kw)
  np.testing.assert_array_equal(same, plain)
  banned, _ = _gen(loud, no_repeat_ngram_size=3, **kw)
  assert sum(_repeated_ngrams(r, 3) for r in plain.reshape(-1, plain.shape[-1])) > 0
  assert all(_repeated_ngrams(r, 3) == 0 for r in banned.reshape(-1, banned.shape[-1]))


def test_repetition_penalty_applies_to_beam_search(tiny):
  config, model, variables, desc = tiny
  variables = jax.tree.map(lambda x: x, variables)
  bias = variables["params"]["decoder"]["logits_bias"]
  variables["params"]["decoder"]["logits_bias"] = bias.at[EOS_ID].set(-10.0)
  loud = (config, model, variables, desc)
  plain, _ = _gen(loud, strategy="beam")
  strong, _ = _gen(loud, strategy="beam", repetition_penalty=5.0)
  repeats = lambda t: sum(len(r[r > EOS_ID]) - len(set(r[r > EOS_ID])) for r in t[:, 0])
  assert repeats(strong) < repeats(plain)


def test_bad_options_are_one_sentence_value_errors(tiny):
  for kw, words in ((dict(strategy="nucleus"), "Unknown decoding strategy"),
                    (dict(strategy="sample", top_p=0.0), "top_p"),
                    (dict(strategy="sample", temperature=0.0), "temperature"),
                    (dict(strategy="greedy", max_new_tokens=10_000), "positions"),
                    (dict(strategy="greedy", repetition_penalty=0.5), "repetition_penalty"),
                    (dict(strategy="beam", no_repeat_ngram_size=-1), "no_repeat_ngram_size")):
    with pytest.raises(ValueError, match=words):
      _gen(tiny, **kw)


def test_phased_decoding_gives_the_tokens_of_one_loop(tiny):
  # 32 new tokens in phases of 6 (the last one 2 long), EOS less likely than in the tests above
  # so that rows end in different phases and some run to the end.
  config, model, variables, desc = tiny
  variables = jax.tree.map(lambda x: x, variables)
  bias = variables["params"]["decoder"]["logits_bias"]
  variables["params"]["decoder"]["logits_bias"] = bias.at[EOS_ID].set(0.8)
  run = lambda **kw: (np.asarray(x) for x in model_decoding.generate(
      model, variables, desc, max_new_tokens=32, **kw))
  for kw in (dict(strategy="greedy"), dict(strategy="beam", num_beams=3),
             dict(strategy="sample", num_samples=2, temperature=1.5, rng=5)):
    one, one_scores = run(decode_phase=0, **kw)
    phased, phased_scores = run(decode_phase=6, **kw)
    np.testing.assert_array_equal(phased, one)
    np.testing.assert_allclose(phased_scores, one_scores, rtol=1e-5, atol=1e-6)
    lengths = _lengths(one.reshape(-1, 32))
    assert lengths.max() == 32 and len(set((lengths - 1) // 6)) > 1, (kw, lengths)


def _teacher_forced_scores(tiny, tokens_BxKxT, alpha=1.0):
  """Each candidate's summed log-probability (special tokens banned, as decoding does) under
  the teacher-forced model, over the length penalty: what its score must be."""
  _, model, variables, desc = tiny
  b, k, t = tokens_BxKxT.shape
  enc = model.apply(variables, desc, method=model_lib.CodeModel.encode)
  enc = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), enc)
  flat = tokens_BxKxT.reshape(b * k, t)
  dec_in = model_lib.shift_right(jnp.asarray(flat), BOS_ID)
  logp = np.asarray(jax.nn.log_softmax(sampling.ban_special(
      model.apply(variables, enc, dec_in, method=model_lib.CodeModel.decode_logits))))
  n = _lengths(flat)
  return np.array([logp[i, np.arange(m), flat[i, :m]].sum() / ((5 + m) / 6) ** alpha
                   for i, m in enumerate(n)]).reshape(b, k)


def test_beam_scores_are_the_teacher_forced_log_probs_of_the_beams(tiny):
  # Beams never move the KV cache: each reads every position through the index of the beam
  # that wrote it. Reading the wrong beam's positions (the index not reordered with the beams)
  # scores the beams as other prefixes would.
  config, model, variables, desc = tiny
  variables = jax.tree.map(lambda x: x, variables)
  bias = variables["params"]["decoder"]["logits_bias"]
  variables["params"]["decoder"]["logits_bias"] = bias.at[EOS_ID].set(0.8)
  tiny = (config, model, variables, desc)
  run = lambda **kw: (np.asarray(x) for x in model_decoding.generate(
      model, variables, desc, strategy="beam", num_beams=3, max_new_tokens=32, **kw))
  for phase in (0, 6):
    tokens, scores = run(decode_phase=phase)
    np.testing.assert_allclose(scores, _teacher_forced_scores(tiny, tokens), rtol=1e-4,
                               atol=1e-5)
  own = model_decoding.reorder_decode_cache
  try:
    model_decoding.reorder_decode_cache = lambda cache, parent, end=None: cache
    model_decoding._generate.clear_cache()  # pylint: disable=protected-access
    stale, stale_scores = run(decode_phase=0)
  finally:
    model_decoding.reorder_decode_cache = own
    model_decoding._generate.clear_cache()  # pylint: disable=protected-access
  assert not np.allclose(stale_scores, _teacher_forced_scores(tiny, stale), rtol=1e-3)


def test_layer_kernels_give_the_tokens_of_xla(tiny):
  # model.decode_attention="layer": the one-token layer in model/fused_decode.py's kernels
  # (Pallas' interpreter on CPU), rows padded 4 -> 16, over a cache and a memory (12 -> 16)
  # padded to powers of two.
  config, model, variables, desc = tiny
  config = _config()
  config.model.decode_attention = "layer"
  kernels = model_lib.build(config)[0]
  for kw in (dict(strategy="greedy", max_new_tokens=12, decode_phase=0),
             dict(strategy="greedy", max_new_tokens=12, decode_phase=5),
             dict(strategy="beam", num_beams=3, max_new_tokens=12, decode_phase=5),
             dict(strategy="beam", num_beams=3, max_new_tokens=12)):
    ref, ref_scores = (np.asarray(x) for x in model_decoding.generate(model, variables, desc,
                                                                      **kw))
    out, scores = (np.asarray(x) for x in model_decoding.generate(kernels, variables, desc,
                                                                  **kw))
    np.testing.assert_array_equal(out, ref, err_msg=str(kw))
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-5)
  cache = kernels.apply(variables, kernels.apply(variables, desc, method="encode"), 12,
                        method="init_cache")
  assert cache.k_LxBxSxNxD.shape[2] == 16 and cache.cross_k_BxMxNxD.shape[1] == 16


def test_decode_attention_auto_is_the_layer_kernels_only_on_a_gpu():
  cfg = layers.ModelConfig.default("tiny")
  assert cfg.decode_attention == "auto"
  assert cfg.decode_layer_kernels == (jax.default_backend() == "gpu")
  assert dataclasses.replace(cfg, decode_attention="layer").decode_layer_kernels
  assert not dataclasses.replace(cfg, decode_attention="xla").decode_layer_kernels


def test_sharded_generation_on_8_devices_equals_single_device(tiny):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices; conftest.py sets XLA_FLAGS")
  config, model, variables, desc = tiny
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), desc, desc[:, :4])
  sharded = jax.device_put(variables, sharding.logical_shardings(abstract, mesh, rules))
  d = jax.device_put(desc, sharding.batch_sharding(mesh))
  # The programs of the tests above, so only the sharded ones compile here.
  for kw in (dict(strategy="greedy"), dict(strategy="beam", num_beams=3),
             dict(strategy="sample", num_samples=3, temperature=1.5, top_p=0.9, rng=7)):
    ref, ref_scores = _gen(tiny, **kw)
    out = model_decoding.generate(model, sharded, d, max_new_tokens=T, mesh=mesh, axis_rules=rules,
                            **kw)
    assert out[0].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(out[0]), ref)
    np.testing.assert_allclose(np.asarray(out[1]), ref_scores, rtol=1e-4, atol=1e-5)
  # On a mesh, decode_attention="auto" decodes with XLA's attention (GSPMD does not partition a
  # Pallas call); the swapped model compiles once, not at every call.
  before = model_decoding._generate._cache_size()  # pylint: disable=protected-access
  model_decoding.generate(model, sharded, d, max_new_tokens=T, mesh=mesh, axis_rules=rules)
  assert model.cfg.decode_attention == "auto"
  assert model_decoding._generate._cache_size() == before  # pylint: disable=protected-access
