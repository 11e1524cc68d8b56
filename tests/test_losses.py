"""The chunked generation loss: bf16 logits with fp32 sums and a fused gradient
(`logits_dtype="bfloat16"`) against the upcast float32 path, on bf16 activations as in training.
InfoNCE's memory queue: FIFO pushes, validity, the loss against a direct formula, no gradient
into the queue."""
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


@pytest.mark.parametrize("label_smoothing,z_loss,chunk", [(0.0, 0.0, 4), (0.1, 1e-3, 0)])
def test_bf16_logits_give_the_float32_loss_and_gradients(label_smoothing, z_loss, chunk):
  h, proj, word, bias, targets, weights = _inputs()

  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grad(logits_dtype, *args):
    def loss(h, proj, word, bias):
      ce, acc, _ = losses.generation_loss(h, targets, weights, proj, word, bias,
                                          label_smoothing=label_smoothing, z_loss=z_loss,
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


def _unit(rs, n, a=8):
  v = rs.standard_normal((n, a)).astype(np.float32)
  return jnp.asarray(v / np.linalg.norm(v, axis=-1, keepdims=True))


def test_queue_push_is_fifo_and_marks_what_it_wrote_valid():
  rs = np.random.RandomState(0)
  queue = losses.queue_init(6, 8)
  batches = [(_unit(rs, 2), _unit(rs, 2)) for _ in range(4)]
  queue = losses.queue_push(queue, *batches[0])
  np.testing.assert_array_equal(queue["valid_Q"], [1, 1, 0, 0, 0, 0])
  assert int(queue["ptr"]) == 2
  for d, c in batches[1:3]:
    queue = losses.queue_push(queue, d, c)
  assert int(queue["ptr"]) == 0 and bool(queue["valid_Q"].all())
  np.testing.assert_array_equal(queue["desc_QxA"], np.concatenate([d for d, _ in batches[:3]]))
  np.testing.assert_array_equal(queue["code_QxA"], np.concatenate([c for _, c in batches[:3]]))
  # The fourth batch replaces the oldest (the first); rows not kept are written but invalid.
  d, c = batches[3]
  queue = losses.queue_push(queue, d, c, keep_B=jnp.array([True, False]))
  np.testing.assert_array_equal(queue["code_QxA"][:2], c)
  np.testing.assert_array_equal(queue["code_QxA"][2:], np.concatenate([batches[1][1],
                                                                       batches[2][1]]))
  np.testing.assert_array_equal(queue["valid_Q"], [1, 0, 1, 1, 1, 1])
  assert int(queue["ptr"]) == 2
  with pytest.raises(ValueError, match="multiple of config.train.batch_size"):
    losses.queue_push(losses.queue_init(5, 8), d, c)


def _infonce_reference(v_d, v_c, log_inv_temp, extra_code, extra_desc):
  """Each direction's softmax over the batch then the extra negatives, in numpy float64."""
  v_d, v_c = np.asarray(v_d, np.float64), np.asarray(v_c, np.float64)
  scale = np.exp(log_inv_temp)

  def nll(q, keys):
    logits = q @ keys.T * scale
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.mean(np.diag(logp[:, :len(q)]))
  return 0.5 * (nll(v_d, np.concatenate([v_c, extra_code])) +
                nll(v_c, np.concatenate([v_d, extra_desc])))


def test_infonce_with_a_queue_contrasts_against_its_valid_entries_only():
  rs = np.random.RandomState(1)
  v_d, v_c, temp = _unit(rs, 4), _unit(rs, 4), jnp.float32(np.log(10.0))
  queue = losses.queue_init(8, 8)
  queue = losses.queue_push(queue, _unit(rs, 4), _unit(rs, 4))     # half full
  plain = losses.infonce(v_d, v_c, temp)
  # An empty queue (or one whose entries are all invalid) gives the in-batch loss exactly.
  assert losses.infonce(v_d, v_c, temp, queue=losses.queue_init(8, 8)) == plain
  garbage = dict(queue, valid_Q=jnp.zeros(8, bool))
  assert losses.infonce(v_d, v_c, temp, queue=garbage) == plain
  np.testing.assert_allclose(plain, _infonce_reference(v_d, v_c, np.log(10.0), np.zeros((0, 8)),
                                                       np.zeros((0, 8))), rtol=1e-5)
  with_queue = losses.infonce(v_d, v_c, temp, queue=queue)
  want = _infonce_reference(v_d, v_c, np.log(10.0), np.asarray(queue["code_QxA"][:4]),
                            np.asarray(queue["desc_QxA"][:4]))
  np.testing.assert_allclose(with_queue, want, rtol=1e-5)
  assert with_queue > plain   # more negatives, a harder task


def test_no_gradient_flows_into_the_queue():
  rs = np.random.RandomState(2)
  v_d, v_c, temp = _unit(rs, 4), _unit(rs, 4), jnp.float32(np.log(10.0))
  queue = losses.queue_push(losses.queue_init(8, 8), _unit(rs, 4), _unit(rs, 4))
  banks = {"desc_QxA": queue["desc_QxA"], "code_QxA": queue["code_QxA"]}

  def loss(banks, v_d, v_c):
    return losses.infonce(v_d, v_c, temp, queue=dict(queue, **banks))
  g_banks, g_d, g_c = jax.grad(loss, argnums=(0, 1, 2))(banks, v_d, v_c)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_banks))
  assert np.any(np.asarray(g_d)) and np.any(np.asarray(g_c))   # the batch still learns
  # Nor through a push: the pushed rows (valid, in the loss) are constants for the next step.
  g_push = jax.grad(lambda d: losses.infonce(v_d, v_c, temp,
                                             queue=losses.queue_push(queue, d, v_c)))(v_d)
  assert not np.any(np.asarray(g_push))
