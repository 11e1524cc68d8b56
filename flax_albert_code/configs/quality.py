"""Quality recipe: base-sized model with retrieval, 10 minutes of one or two H200s end to end
(prepare, train, evaluate, export), data mined from that machine's stdlib and site-packages.

  bash benchmarks/run_quality.sh                 # on the GPU machine: everything, into $OUT
  python -m flax_albert_code.train --config configs/quality.py --workdir runs/quality
  # local variant (CPU, minutes): --config.train.steps=50 --config.data.max_examples=3000

The long variant trains past one 10-minute window (100,000 pairs plus the corpus as unlabelled
code, a warmup-stable-decay schedule, every checkpoint kept for the quality-vs-compute curve).
Stop it any time (SIGTERM saves) and run the same command again to go on.

  python -m flax_albert_code.train --config configs/quality.py:long --workdir runs/long
  python -m flax_albert_code.train --config configs/quality.py:long,gpus=2 --workdir runs/long2
  QUALITY_CONFIG=configs/quality.py:long QUALITY_TRAIN_SECONDS=570 \
      QUALITY_STAGES=train bash benchmarks/run_quality.sh OUT   # one call; again to continue

Each choice was measured on the VALID split (benchmarks/RESULTS.md has the tables): pre-norm at
peak lr 1e-3, first_last pooling (mean pooling left pre-norm alignment at chance), base size,
50,000 pairs, joint generation + InfoNCE from step 0, unrolled depth.
"""
from flax_albert_code import config as config_lib
from flax_albert_code.configs import common

RECIPES = ("short", "long")


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, recipe="short", gpus=1)
  if arg.recipe not in RECIPES:
    raise ValueError(f"configs/quality.py has no recipe {arg.recipe!r}; use one of "
                     f"{', '.join(RECIPES)}.")
  c = common.accelerator(config_lib.get_config("base"))
  c.name = "quality"
  c.model.scan_layers = False
  c.model.hidden_dropout_prob = 0.1
  c.model.norm_position = "pre"
  c.model.pooling = "first_last"
  c.data.sources = "stdlib,site-packages"
  c.data.max_examples = 50000
  c.data.tokenizer_vocab_size = 16000
  c.data.max_desc_len = 64
  c.data.max_code_len = 256
  c.data.code_buckets = (64, 128, 256)
  c.train.precompile = True
  c.train.stage = "joint"
  c.train.align_losses = "infonce"
  c.train.infonce_weight = 1.0
  c.train.batch_size = 128
  c.train.steps = 1800
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 150
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.eval_batches = 16
  c.train.checkpoint_every = 500
  c.train.samples_at_end = 0   # run_quality.sh evaluates and generates after training
  c.sample.max_new_tokens = 256
  # 2 neighbours per description: BM25 before training, hybrid with the model from step 900.
  c.retrieval.k = 2
  c.retrieval.method = "hybrid"
  c.retrieval.max_ctx_len = 320
  c.retrieval.refresh_steps = (900,)
  # Reading the input (issue 30): own code as first neighbour in half the rows, and denoising
  # on unlabelled code (half of the batches for 400 steps, then one in five).
  c.retrieval.self_neighbour_rate = 0.5
  c.data.unlabelled = True
  c.data.max_unlabelled = 100000
  c.train.unlabelled_schedule = "0.5:400,0.2"
  # Without the n-gram ban most greedy outputs loop (benchmarks/RESULTS.md, issue 19).
  c.sample.no_repeat_ngram_size = 4
  if arg.recipe == "long":
    _long(c, arg.gpus)
  return c


def _long(c, gpus: int) -> None:
  """Data parallel over `gpus` GPUs at 128 pairs each; steps scale down as the batch grows."""
  if gpus < 1:
    raise ValueError(f"configs/quality.py:long,gpus={gpus} must be at least 1.")
  c.name = "quality_long" if gpus == 1 else f"quality_long_{gpus}gpu"
  c.data.max_examples = 100000
  c.data.unlabelled = True         # every function and module, documented or not
  c.data.max_unlabelled = 400000
  c.train.batch_size = 128 * gpus
  c.train.steps = -(-7000 // gpus)
  c.train.warmup_steps = -(-300 // gpus)
  c.train.schedule = "wsd"         # the peak until the last 20%: a run continued keeps its past
  c.train.checkpoint_every = -(-500 // gpus)
  c.train.keep_checkpoints = 100
  c.train.eval_every = -(-500 // gpus)
  c.retrieval.refresh_steps = ()   # BM25 (description + code) neighbours throughout
