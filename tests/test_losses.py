"""The chunked generation loss: bf16 logits with fp32 sums and a fused gradient
(`logits_dtype="bfloat16"`) against the upcast float32 path, on bf16 activations as in training."""
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
