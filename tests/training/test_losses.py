"""The chunked generation loss: bf16 logits with fp32 sums and a fused gradient
(`logits_dtype="bfloat16"`) against the upcast float32 path, on bf16 activations as in training.
InfoNCE against a direct formula, and over labelled rows only. The train step over
microbatches."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_albert_code.training import losses
from flax_albert_code.model.layers import tied_logits

B, T, H, E, V = 2, 16, 32, 16, 300


def _inputs(seed: int = 0):
  rs = np.random.RandomState(seed)
  h = jnp.asarray(rs.standard_normal((B, T, H)), jnp.bfloat16)
  proj = jnp.asarray(rs.standard_normal((E, H)) * 0.3, jnp.float32)
  word = jnp.asarray(rs.standard_normal((V, E)) * 0.3, jnp.float32)
  bias = jnp.asarray(rs.standard_normal((V,)) * 0.1, jnp.float32)
  targets = rs.randint(0, V, (B, T))
  best = np.asarray(jnp.argmax(tied_logits(h, proj, word, bias).astype(jnp.float32), -1))
  targets[:, ::2] = best[:, ::2]   # half the tokens right, so the accuracy means something
  targets = jnp.asarray(targets, jnp.int32)
  weights = jnp.asarray(np.arange(T)[None, :] < np.array([[T], [T - 5]]))
  return h, proj, word, bias, targets, weights


@pytest.mark.parametrize("chunk", [4, 0])
def test_bf16_logits_give_the_float32_loss_and_gradients(chunk):
  h, proj, word, bias, targets, weights = _inputs()

  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grad(logits_dtype, *args):
    def loss(h, proj, word, bias):
      ce, acc, _ = losses.generation_loss(h, targets, weights, proj, word, bias,
                                          chunk=chunk, logits_dtype=logits_dtype)
      return ce, acc
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)

  (ce32, acc32), g32 = value_and_grad("float32", h, proj, word, bias)
  (ce16, acc16), g16 = value_and_grad("bfloat16", h, proj, word, bias)
  # The logits are bf16 products in both paths, but XLA may skip roundings where it upcasts
  # (excess precision: the bias added in fp32), so the losses differ by bf16 rounding noise.
  np.testing.assert_allclose(ce16, ce32, rtol=3e-4)
  np.testing.assert_allclose(acc16, acc32)
  assert float(acc32) > 0, "a vacuous accuracy check"
  for name, a, b in zip(("h", "proj", "word", "bias"), g16, g32):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = np.abs(b).max()
    assert scale > 0, name
    np.testing.assert_allclose(a, b, atol=1e-2 * scale, err_msg=name)   # bf16 d(logits)


def test_unknown_logits_dtype_is_one_sentence():
  h, proj, word, bias, targets, weights = _inputs()
  with pytest.raises(ValueError, match="config.train.logits_dtype"):
    losses.generation_loss(h, targets, weights, proj, word, bias, logits_dtype="float16")


def test_row_sums_give_the_loss_and_group_means():
  h, proj, word, bias, targets, weights = _inputs()
  kw = dict(chunk=4)
  nll, correct, count = losses.generation_row_sums(h, targets, weights, proj, word, bias, **kw)
  assert nll.shape == correct.shape == count.shape == (B,)
  np.testing.assert_allclose(count, [T, T - 5])
  loss, acc, n = losses.generation_loss(h, targets, weights, proj, word, bias, **kw)
  np.testing.assert_allclose(loss, nll.sum() / count.sum(), rtol=1e-6)
  only_second = losses.generation_loss(h[1:], targets[1:], weights[1:], proj, word, bias, **kw)
  rows = jnp.array([False, True])
  np.testing.assert_allclose(losses.group_mean(nll, correct, count, rows), only_second,
                             rtol=1e-5)
  assert losses.group_mean(nll, correct, count, jnp.zeros(B, bool))[0] == 0.0   # no rows


def _vectors(b=6, a=8, seed=0):
  rs = np.random.RandomState(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  v_d = unit(rs.standard_normal((b, a)))
  return jnp.asarray(v_d, jnp.float32), jnp.asarray(unit(v_d + 0.5 * rs.standard_normal((b, a))),
                                                    jnp.float32)


def test_alignment_ignores_unlabelled_rows():
  """Unlabelled code is neither an anchor nor a negative: the losses equal those of the
  labelled rows alone, whatever the other rows hold, and send them no gradient."""
  v_d, v_c = _vectors()
  rows = jnp.array([True, False, True, True, False, True])
  t = jnp.log(1 / 0.07)
  alone = (losses.infonce(v_d[rows], v_c[rows], t), losses.l2_alignment(v_d[rows], v_c[rows]),
           losses.retrieval_accuracy(v_d[rows], v_c[rows]))
  other_d, other_c = _vectors(seed=1)
  for d, c in ((v_d, v_c), (jnp.where(rows[:, None], v_d, other_d),
                            jnp.where(rows[:, None], v_c, other_c)), (v_d, v_d)):
    d, c = jnp.where(rows[:, None], v_d, d), jnp.where(rows[:, None], v_c, c)
    masked = (losses.infonce(d, c, t, rows), losses.l2_alignment(d, c, rows),
              losses.retrieval_accuracy(d, c, rows))
    np.testing.assert_allclose(masked, alone, rtol=1e-6)
  # Unlabelled rows that copy a labelled row's code would be its hardest negatives: ignored.
  copy = v_c.at[1].set(v_c[0])
  np.testing.assert_allclose(losses.infonce(v_d, copy, t, rows), alone[0], rtol=1e-6)
  assert losses.infonce(v_d, copy, t) != losses.infonce(v_d, v_c, t)
  grads = jax.grad(lambda d, c: losses.infonce(d, c, t, rows) + losses.l2_alignment(d, c, rows),
                   argnums=(0, 1))(v_d, v_c)
  for g in grads:
    assert not np.asarray(g)[~np.asarray(rows)].any() and np.asarray(g)[np.asarray(rows)].any()
  none = jnp.zeros(6, bool)   # an all-unlabelled batch: zero, finite, no gradient
  assert losses.infonce(v_d, v_c, t, none) == losses.l2_alignment(v_d, v_c, none) == 0.0
  assert not jax.grad(losses.infonce)(v_d, v_c, t, none).any()


def _unit(rs, n, a=8):
  v = rs.standard_normal((n, a)).astype(np.float32)
  return jnp.asarray(v / np.linalg.norm(v, axis=-1, keepdims=True))


def _infonce_reference(v_d, v_c, log_inv_temp):
  """Each direction's softmax over the batch, in numpy float64."""
  v_d, v_c = np.asarray(v_d, np.float64), np.asarray(v_c, np.float64)
  scale = np.exp(log_inv_temp)

  def nll(q, keys):
    logits = q @ keys.T * scale
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.mean(np.diag(logp[:, :len(q)]))
  return 0.5 * (nll(v_d, v_c) + nll(v_c, v_d))


def test_infonce_is_the_symmetric_in_batch_softmax_loss():
  rs = np.random.RandomState(1)
  v_d, v_c, temp = _unit(rs, 4), _unit(rs, 4), jnp.float32(np.log(10.0))
  np.testing.assert_allclose(losses.infonce(v_d, v_c, temp),
                             _infonce_reference(v_d, v_c, np.log(10.0)), rtol=1e-5)


def test_microbatches_accumulate_the_gradient_of_the_whole_batch():
  """train.microbatches=2 on a batch without padding (equal token counts): the same generation
  loss, gradient norm and update as one pass, and the token count of the whole batch."""
  # pylint: disable=import-outside-toplevel
  from flax_albert_code import config as config_lib
  from flax_albert_code.model import albert as model_lib
  from flax_albert_code.model import sharding
  from flax_albert_code.training import optim
  from flax_albert_code.training import step as train_step
  config = config_lib.load_config("tiny")
  config.train.align_losses = ""   # in-batch negatives would differ between the two
  model, _ = model_lib.build(config)
  rs = np.random.RandomState(0)
  batch = {"desc_ids": jnp.asarray(rs.randint(6, 500, (4, 8)), jnp.int32),
           "code_ids": jnp.asarray(rs.randint(6, 500, (4, 16)), jnp.int32)}
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx = optim.make(config.train)
  state, _ = train_step.create_state(model, tx, config, mesh, jax.random.PRNGKey(0))
  out = {}
  for n in (1, 2):
    config.train.microbatches = n
    step = jax.jit(functools.partial(train_step.train_step, model=model, tx=tx, config=config))
    with jax.set_mesh(mesh):
      out[n] = jax.device_get(step(state, batch))
  (one, m1), (two, m2) = out[1], out[2]
  assert m1["code_tokens"] == m2["code_tokens"] == 4 * 16
  for k in ("gen_loss", "grad_norm"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
