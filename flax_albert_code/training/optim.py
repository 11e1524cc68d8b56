"""Optimiser from the config: AdamW or LAMB (ALBERT's), warmup + cosine/linear/wsd decay, clipping.

Weight decay skips biases, LayerNorm parameters and scalars (ALBERT's recipe: ndim < 2).
Master weights and optimizer state stay in the parameter dtype (fp32) whatever the compute dtype.
"""
from __future__ import annotations

import jax
import optax

# AdamW/LAMB moments, epsilon and weight decay; the global-norm clip; the learning rate a decay
# ends at (a fraction of the peak); the share of steps "wsd" decays over.
B1, B2, EPS, WEIGHT_DECAY = 0.9, 0.98, 1e-8, 0.01
GRAD_CLIP, END_LR_FRACTION, DECAY_FRACTION = 1.0, 0.1, 0.2


def schedule(train_cfg) -> optax.Schedule:
  peak, steps = train_cfg.learning_rate, max(int(train_cfg.steps), 1)
  warmup = min(int(train_cfg.warmup_steps), steps - 1) if steps > 1 else 0
  end, w = peak * END_LR_FRACTION, max(warmup, 1)
  ramp = optax.linear_schedule(0.0, peak, w)
  if train_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, w, steps, end)
  if train_cfg.schedule == "linear":
    return optax.join_schedules([ramp, optax.linear_schedule(peak, end, max(steps - warmup, 1))],
                                [w])
  if train_cfg.schedule == "constant":
    return optax.join_schedules([ramp, optax.constant_schedule(peak)], [w])
  if train_cfg.schedule == "wsd":
    # The peak until the last `DECAY_FRACTION` of the steps: a run continued with more steps
    # only moves the decay, not its past.
    decay = max(min(max(int(steps * DECAY_FRACTION), 1), steps - w), 1)
    return optax.join_schedules([ramp, optax.constant_schedule(peak),
                                 optax.linear_schedule(peak, end, decay)],
                                [w, steps - decay])
  raise ValueError(f"config.train.schedule={train_cfg.schedule!r} is not one of "
                   "'cosine', 'linear', 'constant', 'wsd'.")


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make(train_cfg) -> optax.GradientTransformation:
  opt = {"adamw": optax.adamw, "lamb": optax.lamb}.get(train_cfg.optimizer)
  if opt is None:
    raise ValueError(f"config.train.optimizer={train_cfg.optimizer!r} is not 'adamw' or 'lamb'.")
  return optax.chain(optax.clip_by_global_norm(GRAD_CLIP), opt(
      schedule(train_cfg), b1=B1, b2=B2, eps=EPS, weight_decay=WEIGHT_DECAY, mask=_decay_mask))
