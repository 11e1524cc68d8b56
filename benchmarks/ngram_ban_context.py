"""Experiment: an n-gram ban that lets an n-gram repeat as often as the model's input holds it.

  python benchmarks/ngram_ban_context.py --checkpoint RUN --split valid --max-examples 200 \\
      --strategies greedy --no-retrieval --no-baselines --no-repeat-ngram-size 4 --out OUT

`no_repeat_ngram_size` bans every repeat of an n-gram, so a faithful copy of a neighbour that
repeats a 4-gram is impossible. Here a token is banned only when its n-gram already occurs in
the output at least as often as in the encoder's input (description and neighbours). The ban is
patched into `inference.decoding` for one `evaluate` run (greedy and sampling: the context is
repeated per candidate); the package is unchanged. Results: RESULTS.md, "An n-gram ban that
counts the input".
"""
import runpy
import sys

import jax.numpy as jnp
import numpy as np
from jax import lax

from flax_albert_code.inference import decoding, model_decoding

_CONTEXT = {}
_generate = model_decoding.generate


def _counts(hay_NxH, prefix_NxP, n: int, valid_NxW, vocab_size: int):
  """[N, V]: how often each token follows `prefix` in `hay` (windows where `valid`)."""
  rows, h = hay_NxH.shape
  width = h - n + 1
  match = valid_NxW
  for i in range(n - 1):
    match = match & (hay_NxH[:, i:i + width] == prefix_NxP[:, i:i + 1])
  out = jnp.zeros((rows, vocab_size), jnp.int32)
  return out.at[jnp.arange(rows)[:, None], hay_NxH[:, n - 1:]].add(match.astype(jnp.int32))


def ban_beyond_context(tokens_NxT, step, n: int, vocab_size: int):
  rows, t = tokens_NxT.shape
  if n < 1 or t < n:
    return jnp.zeros((rows, vocab_size), bool)
  prefix = lax.dynamic_slice(tokens_NxT, (0, jnp.maximum(step - (n - 1), 0)), (rows, n - 1))
  ready = step >= n - 1
  seen = _counts(tokens_NxT, prefix, n, ready & (jnp.arange(t - n + 1) + n - 1 < step)[None, :],
                 vocab_size)
  context = jnp.asarray(_CONTEXT["ids"])
  context = jnp.repeat(context, rows // context.shape[0], axis=0)
  held = _counts(context, prefix, n, ready & (context[:, n - 1:] != 0), vocab_size)
  return (seen > 0) & (seen >= held)


def generate(model, params, desc_ids_BxL, **kw):
  # The ban reads this call's input as a constant: retrace for every batch.
  _CONTEXT["ids"] = np.asarray(desc_ids_BxL)
  model_decoding._generate.clear_cache()  # pylint: disable=protected-access
  return _generate(model, params, desc_ids_BxL, **kw)


if __name__ == "__main__":
  decoding.ban_repeated_ngrams = ban_beyond_context
  model_decoding.generate = generate
  sys.argv[0] = "evaluate"
  runpy.run_module("flax_albert_code.evaluate", run_name="__main__")
