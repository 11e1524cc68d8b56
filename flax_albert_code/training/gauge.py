"""The reading gauge: does the decoder use its input? Measured at each validation:

  input_gap       nll per code token with another row's input minus with the row's own
  copy_gap        nll as generated minus with the row's own code as first neighbour (retrieval)
  encoder_spread  mean |state - its row's mean state| / |state| over the context's real tokens

An input_gap under `MIN_INPUT_GAP` after warmup, or a spread under `MIN_SPREAD`, earns a warning.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_albert_code.config import PAD_ID
from flax_albert_code.model import sharding
from flax_albert_code.training import losses
from flax_albert_code.training import step as train_step

Array = jax.Array
MIN_INPUT_GAP, MIN_SPREAD = 0.05, 0.05
BATCHES = 2   # the first valid batches (the validation iterator is unshuffled: always the same)


def encoder_spread(states_BxLxH: Array, mask_BxL: Array) -> tuple[Array, Array]:
  """(sum over real tokens of |s - row mean| / |s|, number of real tokens)."""
  s = states_BxLxH.astype(jnp.float32)
  w = mask_BxL.astype(jnp.float32)[..., None]
  mean = (s * w).sum(1, keepdims=True) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
  ratio = jnp.linalg.norm(s - mean, axis=-1) / jnp.maximum(jnp.linalg.norm(s, axis=-1), 1e-6)
  return (ratio * w[..., 0]).sum(), w.sum()


def _nll_sum(params, model, config, desc, code, ctx) -> tuple[Array, Array]:
  """(sum of the code tokens' nll, their count) with `ctx` (None: the description) as input."""
  out = model.apply({"params": params}, desc, code, encode_code=False, ctx_ids_BxC=ctx)
  nll, _, count = losses.generation_row_sums(
      out["hidden"], code, code != PAD_ID, *train_step._output_weights(params, model.cfg),
      copy=out.get("copy"), chunk=config.train.loss_chunk,
      logits_dtype=config.train.logits_dtype)
  return nll.sum(), count.sum()


def gauge_sums(params, batch, *, model, config) -> dict[str, Array]:
  """One batch's sums for `finish`: nll with the row's own input, with the next row's, with its
  own code as first neighbour (given `own_ctx_ids`), and the context encoder's spread."""
  params = params["model"]
  desc, code, ctx = batch["desc_ids"], batch["code_ids"], batch.get("ctx_ids")
  roll = lambda x: None if x is None else jnp.roll(x, 1, axis=0)
  own, n = _nll_sum(params, model, config, desc, code, ctx)
  other, _ = _nll_sum(params, model, config, roll(desc), code, roll(ctx))
  out = {"own": own, "other": other, "tokens": n}
  if "own_ctx_ids" in batch:
    out["copy"], _ = _nll_sum(params, model, config, desc, code, batch["own_ctx_ids"])
  enc = model.apply({"params": params}, desc if ctx is None else ctx, method="encode")
  out["spread"], out["real"] = encoder_spread(enc.states_BxLxH, enc.mask_BxL)
  return out


def jit_gauge(model, config, mesh, param_shardings):
  """`gauge_sums` jitted like the eval step (params and batch sharded, sums replicated)."""
  rules = sharding.rules(config)

  def fn(params, batch):
    with nn.logical_axis_rules(rules):
      return gauge_sums(params, batch, model=model, config=config)
  return jax.jit(fn, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def finish(sums: dict[str, float]) -> dict[str, float]:
  """The gauge's metrics from summed `gauge_sums`."""
  n = max(sums["tokens"], 1.0)
  out = {"input_gap": (sums["other"] - sums["own"]) / n,
         "encoder_spread": sums["spread"] / max(sums["real"], 1.0)}
  if "copy" in sums:
    out["copy_gap"] = (sums["own"] - sums["copy"]) / n
  return out


def problem(metrics: dict[str, float], step: int, warmup: int) -> str | None:
  """One sentence when the gauge says the decoder does not read its input (after warmup)."""
  if step > warmup and metrics.get("input_gap", 1.0) < MIN_INPUT_GAP:
    return (f"step {step}: input_gap {metrics['input_gap']:.3f} nats/token (< {MIN_INPUT_GAP}): "
            "the decoder barely reads its input; see benchmarks/RESULTS.md 'Reading gauge'.")
  if metrics.get("encoder_spread", 1.0) < MIN_SPREAD:
    return (f"step {step}: encoder_spread {metrics['encoder_spread']:.3f} (< {MIN_SPREAD}): the "
            "encoder gives every token nearly the same state (collapse); lower "
            "config.train.learning_rate.")
  return None
