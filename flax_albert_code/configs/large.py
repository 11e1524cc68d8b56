"""ALBERT-large sizes (H1024, 16 heads, FFN 4096, encoder 24); FSDP over the GPUs of a host.

  python -m flax_albert_code.train --config configs/large.py --workdir runs/large \
      --config.mesh.data=1 --config.mesh.fsdp=-1
  # local variant: --config.train.steps=10 --config.train.batch_size=8
"""
from flax_albert_code import config as config_lib


def get_config():
  c = config_lib.get_config("large")
  c.model.dtype = "bfloat16"
  c.model.attention_impl = "cudnn"
  c.model.remat = "full"
  c.data.tokenizer_vocab_size = 32000
  c.train.batch_size = 64
  c.train.learning_rate = 3e-4
  c.train.steps = 50000
  c.train.warmup_steps = 2000
  return c
