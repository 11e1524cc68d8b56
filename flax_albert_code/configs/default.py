"""Default run: the `small` model on the built-in standard-library corpus; what the bare command
runs. Sized to finish within 10 minutes on a 2-core CPU with a clearly falling loss.

  python -m flax_albert_code.train                      # same as --config configs/default.py
  python -m flax_albert_code.train --config configs/default.py --workdir runs/small \
      --config.train.steps=200                          # a shorter local variant
"""
from flax_albert_code import config as config_lib


def get_config():
  c = config_lib.get_config("small")
  c.data.tokenizer_vocab_size = 4000
  c.data.max_desc_len = 32
  c.data.max_code_len = 128
  c.data.code_buckets = (64, 128)
  c.train.steps = 800
  c.train.batch_size = 16
  # 2e-3 and 1e-3 left this post-LayerNorm model at the unigram solution; 5e-4 learnt
  # (benchmarks/RESULTS.md).
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 100
  c.train.log_every = 25
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.sample.max_new_tokens = 128
  # Retrieval: 2 train functions found by BM25 join each description; half of the training rows
  # get their own code (spans cut out) as first neighbour, so the copy head learns to copy from
  # the first steps. Chosen on the valid split (benchmarks/RESULTS.md, issue 30): the aligned
  # encoder is near chance after 800 CPU steps, so retrieval is BM25 alone.
  c.retrieval.k = 2
  c.retrieval.max_ctx_len = 128
  c.retrieval.method = "bm25"
  c.retrieval.self_neighbour_rate = 0.5
  # Without the n-gram ban most outputs are degenerate (valid split, benchmarks/RESULTS.md).
  c.sample.no_repeat_ngram_size = 4
  return c
