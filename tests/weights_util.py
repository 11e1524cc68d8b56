"""Random model weights for tests, drawn with numpy from the abstract shapes."""
import jax
import numpy as np
from flax import linen as nn


def random_variables(model, desc, code, seed: int = 0):
  """The model's initialisation (normal(initializer_range) weights, zero biases, unit LayerNorm
  scales) drawn with numpy from the abstract shapes: no compile of `init`."""
  abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), desc, code))
  # The copy head draws from a stream of its own, so the rest of the model is the same with
  # it or without it.
  rs, rs_copy = np.random.RandomState(seed), np.random.RandomState(seed + 1)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "'bias'" in name or "logits_bias" in name:
      return np.zeros(x.shape, x.dtype)
    if "'scale'" in name:
      return np.ones(x.shape, x.dtype)
    r = rs_copy if "copy_head" in name else rs
    return (r.standard_normal(x.shape) * model.cfg.initializer_range).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)
