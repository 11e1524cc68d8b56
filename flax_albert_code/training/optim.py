"""Optimiser from the config: AdamW or LAMB (ALBERT's), warmup + cosine/linear/wsd decay, clipping.

Weight decay skips biases, LayerNorm parameters and scalars (ALBERT's recipe: ndim < 2).
Master weights and optimizer state stay in the parameter dtype (fp32) whatever the compute dtype.
"""
from __future__ import annotations

import jax
import optax


def schedule(train_cfg) -> optax.Schedule:
  peak, steps = train_cfg.learning_rate, max(int(train_cfg.steps), 1)
  warmup = min(int(train_cfg.warmup_steps), steps - 1) if steps > 1 else 0
  end = peak * train_cfg.end_lr_fraction
  if train_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), steps, end)
  if train_cfg.schedule == "linear":
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                 optax.linear_schedule(peak, end, max(steps - warmup, 1))],
                                [max(warmup, 1)])
  if train_cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                 optax.constant_schedule(peak)], [max(warmup, 1)])
  if train_cfg.schedule == "wsd":
    # Warmup, stable, decay: the peak until the last `decay_fraction` of the steps. A long run
    # continued with more steps (`--config.train.steps`) only moves the decay, not the past.
    decay = min(max(int(steps * train_cfg.decay_fraction), 1), steps - max(warmup, 1))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                 optax.constant_schedule(peak),
                                 optax.linear_schedule(peak, end, max(decay, 1))],
                                [max(warmup, 1), steps - max(decay, 1)])
  raise ValueError(f"config.train.schedule={train_cfg.schedule!r} is not one of "
                   "'cosine', 'linear', 'constant', 'wsd'.")


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make(train_cfg) -> optax.GradientTransformation:
  lr = schedule(train_cfg)
  if train_cfg.optimizer == "adamw":
    opt = optax.adamw(lr, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                      weight_decay=train_cfg.weight_decay, mask=_decay_mask)
  elif train_cfg.optimizer == "lamb":
    opt = optax.lamb(lr, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                     weight_decay=train_cfg.weight_decay, mask=_decay_mask)
  else:
    raise ValueError(f"config.train.optimizer={train_cfg.optimizer!r} is not 'adamw' or 'lamb'.")
  chain = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip else []
  return optax.chain(*chain, opt)
