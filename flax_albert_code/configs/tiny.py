"""Smoke run: tiny model, a few steps, a small slice of the stdlib corpus; under a minute on CPU.

  python -m flax_albert_code.train --config configs/tiny.py --workdir /tmp/tiny
"""
from flax_albert_code import config as config_lib


def get_config():
  c = config_lib.get_config("tiny")
  c.data.max_examples = 600
  c.data.tokenizer_vocab_size = 512
  c.data.max_desc_len = 32
  c.data.max_code_len = 64
  c.data.code_buckets = (32, 64)
  c.train.steps = 20
  c.train.batch_size = 16
  c.train.warmup_steps = 2
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.eval_batches = 2
  c.train.checkpoint_every = 10
  c.sample.max_new_tokens = 32
  return c
