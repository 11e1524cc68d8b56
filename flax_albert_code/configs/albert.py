"""ALBERT's published sizes on GPUs and TPUs, one variant each; `--config base` and
`--config large` (or `configs/base.py`, `configs/large.py`) name them.

  :base   E128 H768, 12 heads, FFN 3072, encoder 12, decoder 6; the GPUs of one host
  :large  H1024, 16 heads, FFN 4096, encoder 24, decoder 12; FSDP over the GPUs of a host

  python -m flax_albert_code.train --config configs/albert.py:base --workdir runs/base \
      --config.data.sources=stdlib,site-packages --config.train.steps=20000
  python -m flax_albert_code.train --config configs/albert.py:large --workdir runs/large \
      --config.mesh.data=1 --config.mesh.fsdp=-1
  # local variant: --config configs/albert.py:base --config.train.steps=10 \
  #     --config.train.batch_size=8
"""
from flax_albert_code import config as config_lib
from flax_albert_code.configs import common

SIZES = ("base", "large")


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, size="base")
  if arg.size not in SIZES:
    raise ValueError(f"configs/albert.py has no size {arg.size!r}; use one of {', '.join(SIZES)}.")
  c = common.accelerator(config_lib.get_config(arg.size))
  c.data.tokenizer_vocab_size = 32000
  c.train.batch_size = 64
  if arg.size == "base":
    # Each measured faster on an H100/H200 (benchmarks/RESULTS.md): unrolled depth, bf16 logits
    # in the loss, the CE in one pass (its 1 GiB of bf16 logits kept for the backward).
    c.model.scan_layers = False
    c.train.logits_dtype = "bfloat16"
    c.train.loss_chunk = 0
    c.train.precompile = True   # every bucket's steps compiled at once, in threads
    # 5e-4 kept the post-LayerNorm stack at the unigram solution (RESULTS.md); 2e-4 learnt.
    c.train.learning_rate = 2e-4
    c.train.steps = 20000
    c.train.warmup_steps = 1000
  else:
    c.model.remat = "full"
    c.train.learning_rate = 3e-4
    c.train.steps = 50000
    c.train.warmup_steps = 2000
  return c
