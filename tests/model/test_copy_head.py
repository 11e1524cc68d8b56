"""The copy head (model/copy_head.py): the training loss is -log of the very mixture decoding
reads, its accuracy is that mixture's argmax, special tokens are never copied, a context with
nothing to copy leaves the vocabulary's distribution, and configs saved before the head
existed build the model without it."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_albert_code import config as config_lib
from flax_albert_code.config import BOS_ID, CLS_ID, EOS_ID, PAD_ID, SEP_ID, UNK_ID
from flax_albert_code.model import albert as model_lib
from flax_albert_code.model import copy_head
from flax_albert_code.model.layers import ModelConfig
from flax_albert_code.training import losses
from flax_albert_code.training import step as train_step

B, C, T = 3, 14, 10


def _config():
  config = config_lib.get_config("tiny")
  config.model.initializer_range = 0.3   # a sharp random model: copy and vocabulary both matter
  return config


def _batch(seed=0):
  rs = np.random.RandomState(seed)
  ctx = rs.randint(SEP_ID + 1, 40, (B, C)).astype(np.int32)   # few ids: repeats in the context
  ctx[:, 0], ctx[:, 5] = CLS_ID, SEP_ID
  ctx[0, 3] = UNK_ID
  ctx[1, 9:] = PAD_ID
  ctx[2, 1:5] = [SEP_ID, UNK_ID, SEP_ID, PAD_ID]
  code = rs.randint(SEP_ID + 1, 60, (B, T)).astype(np.int32)
  code[:, ::3] = ctx[:, 6:6 + len(code[0, ::3])]   # some targets are in the context
  code[1, 7:] = PAD_ID
  return jnp.asarray(ctx), jnp.asarray(code)


@pytest.fixture(scope="module")
def tiny():
  config = _config()
  model, cfg = model_lib.build(config)
  ctx, code = _batch()
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ctx[:, :8], code)["params"])
  params = jax.tree.map(np.asarray, params)
  params["decoder"]["copy_head"]["gate"]["bias"] = np.zeros_like(
      params["decoder"]["copy_head"]["gate"]["bias"])
  return config, model, cfg, params, ctx, code


def _mixture(model, params, ctx, code):
  enc = model.apply({"params": params}, ctx, method="encode")
  return jax.nn.log_softmax(model.apply({"params": params}, enc,
                                        model_lib.shift_right(code, BOS_ID),
                                        method="decode_logits"))


@pytest.mark.parametrize("chunk,logits_dtype", [(0, "float32"), (5, "float32"),
                                                (5, "bfloat16")])
def test_loss_and_accuracy_are_those_of_the_decoded_mixture(tiny, chunk, logits_dtype):
  config, model, cfg, params, ctx, code = tiny
  out = model.apply({"params": params}, ctx[:, :8], code, ctx_ids_BxC=ctx, encode_code=False)
  copy = out["copy"]
  assert copy.attn_BxTxC.shape == (B, T, C)
  weights = code != PAD_ID
  nll, correct, count = losses.generation_row_sums(
      out["hidden"], code, weights, *train_step._output_weights(params, cfg), copy=copy,
      chunk=chunk, logits_dtype=logits_dtype)
  logp = _mixture(model, params, ctx, code)
  want = -jnp.take_along_axis(logp, code[..., None], -1)[..., 0]
  rtol = 2e-2 if logits_dtype == "bfloat16" else 1e-5
  np.testing.assert_allclose(nll, (want * weights).sum(-1), rtol=rtol)
  hits = ((jnp.argmax(logp, -1) == code) & weights).sum(-1)
  if logits_dtype == "float32":
    np.testing.assert_array_equal(correct, hits)
  np.testing.assert_array_equal(count, weights.sum(-1))
  # The copy head matters here: the same loss without it is another number.
  plain, _, _ = losses.generation_row_sums(out["hidden"], code, weights,
                                           *train_step._output_weights(params, cfg), chunk=chunk)
  assert np.abs(np.asarray(plain) - np.asarray(nll)).max() > 0.1


def test_bf16_copy_loss_gradients_match_float32(tiny):
  config, model, cfg, params, ctx, code = tiny

  @functools.partial(jax.jit, static_argnums=0)
  def grads(logits_dtype, params):
    def loss(p):
      out = model.apply({"params": p}, ctx[:, :8], code, ctx_ids_BxC=ctx, encode_code=False)
      ce, _, _ = losses.generation_loss(out["hidden"], code, code != PAD_ID,
                                        *train_step._output_weights(p, cfg), copy=out["copy"],
                                        chunk=5, logits_dtype=logits_dtype)
      return ce
    return jax.grad(loss)(params)

  g32, g16 = grads("float32", params), grads("bfloat16", params)
  for name in ("query", "key", "match", "gate"):
    a = np.asarray(g16["decoder"]["copy_head"][name]["kernel"])
    b = np.asarray(g32["decoder"]["copy_head"][name]["kernel"])
    assert np.abs(b).max() > 0, name
    np.testing.assert_allclose(a, b, atol=2e-2 * np.abs(b).max(), err_msg=name)


def test_special_tokens_are_never_copied_and_an_empty_context_generates(tiny):
  config, model, cfg, params, ctx, code = tiny
  out = model.apply({"params": params}, ctx[:, :8], code, ctx_ids_BxC=ctx, encode_code=False)
  attn = np.asarray(out["copy"].attn_BxTxC)
  special = ~np.asarray(copy_head.copyable(copy_head.copy_ids(ctx)))
  assert special.sum() > 5 and (attn[np.broadcast_to(special[:, None, :], attn.shape)] == 0).all()
  np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)
  # The [SEP] that ends a neighbour copies as EOS; the description's [SEP] is never copied.
  ids = np.asarray(copy_head.copy_ids(ctx))
  sep = np.asarray(ctx) == SEP_ID
  first = sep & (np.cumsum(sep, -1) == 1)
  assert (ids[first] == SEP_ID).all() and (ids[sep & ~first] == EOS_ID).all()
  ends = np.broadcast_to((sep & ~first)[:, None, :], attn.shape)
  assert (sep & ~first).any() and (attn[ends] > 0).all()
  # Nothing copyable ([CLS] [SEP] and padding, as with --no-retrieve on an empty description, or
  # an empty neighbour's [SEP] [SEP]: an EOS alone is no copy):
  # every position's distribution is the vocabulary's.
  empty = jnp.zeros_like(ctx).at[:, 0].set(CLS_ID).at[:, 1].set(SEP_ID).at[:, 2].set(SEP_ID)
  enc = model.apply({"params": params}, empty, method="encode")
  dec_in = model_lib.shift_right(code, BOS_ID)
  mixed = model.apply({"params": params}, enc, dec_in, method="decode_logits")
  h = model.apply({"params": params}, enc, dec_in, method="decoder_hidden")
  vocab = jax.nn.log_softmax(model.apply({"params": params}, h, method="logits").astype(
      jnp.float32))
  np.testing.assert_allclose(mixed, vocab, atol=1e-5)
  assert np.isfinite(np.asarray(mixed)).all()


def test_configs_saved_before_the_head_build_the_model_without_it():
  saved = config_lib.model_config("tiny").to_dict()
  for name in config_lib.LEGACY_MODEL_VALUES:
    del saved[name]
  cfg = ModelConfig.from_config(saved)
  assert (cfg.copy_head, cfg.memory_embeddings, cfg.context_token_types) == (False,) * 3
  assert ModelConfig.default("tiny").copy_head
  model = model_lib.CodeModel(cfg)
  ids = jnp.full((1, 4), 7, jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids)["params"]
  assert "copy_head" not in params["decoder"]


def test_context_token_types_mark_the_neighbours():
  ids = jnp.array([[CLS_ID, 9, 9, SEP_ID, 7, 7, SEP_ID, 8, SEP_ID, PAD_ID]])
  np.testing.assert_array_equal(model_lib.context_token_types(ids),
                                [[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])


def test_parameters_and_config_that_disagree_on_the_head_are_one_sentence(tiny):
  config, model, cfg, params, ctx, code = tiny
  without = model_lib.CodeModel(ModelConfig.from_config({**config.model.to_dict(),
                                                         "copy_head": False}))
  with pytest.raises(ValueError, match="have a copy head .*copy_head is False"):
    model_lib.check_params(without, params)
  plain = {**params, "decoder": {k: v for k, v in params["decoder"].items() if k != "copy_head"}}
  with pytest.raises(ValueError, match="copy_head is True but these parameters have no copy"):
    model_lib.check_params(model, plain)
  model_lib.check_params(model, params)
  model_lib.check_params(without, plain)
