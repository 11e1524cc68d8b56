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
    # Unrolled depth: 32 ms vs 47 ms a BENCH-A step on an H100 (the scan's carry copies and
    # stacked residuals cost 9%, and XLA schedules across layers); compile 17 s vs 15 s.
    c.model.scan_layers = False
    # bf16 logits in the loss (fp32 reductions): 31.8 -> 30.2 ms a BENCH-A step on an H100.
    c.train.logits_dtype = "bfloat16"
    # The CE in one pass, its bf16 logits ([64, 256, 32000]: 1 GiB) kept for the backward
    # instead of recomputed chunk by chunk: 27.14 (chunks of 128) -> 26.15 (one chunk of 256,
    # recomputed) -> 25.15 ms (one pass) a BENCH-A step on an H200, peak 6.0 -> 7.1 GiB.
    c.train.loss_chunk = 0
    c.train.precompile = True   # every bucket's steps compiled at once, in threads
    # 5e-4 kept the post-LayerNorm stack at the unigram solution in the 400-step sweep of
    # benchmarks/RESULTS.md (configs/quality.py, warmup 150); 2e-4 learnt.
    c.train.learning_rate = 2e-4
    c.train.steps = 20000
    c.train.warmup_steps = 1000
  else:
    c.model.remat = "full"
    c.train.learning_rate = 3e-4
    c.train.steps = 50000
    c.train.warmup_steps = 2000
  return c
