"""Quality recipe: base-sized model with retrieval, 10 minutes of one or two H200s end to end
(prepare, train, evaluate, export), data mined from that machine's stdlib and site-packages.

  bash benchmarks/run_quality.sh                 # on the GPU machine: everything, into $OUT
  python -m flax_albert_code.train --config configs/quality.py --workdir runs/quality
  # local variant (CPU, minutes): --config.train.steps=50 --config.data.max_examples=3000

The long variant trains past one 10-minute window: 100,000 pairs plus every function and module
of the corpus as unlabelled code, a warmup-stable-decay schedule, a checkpoint every 500 steps
(all kept: the quality-vs-compute curve evaluates them). Stop it any time (SIGTERM saves) and run
the same command again to go on; the compilation cache in the workdir makes the restart quick.

  python -m flax_albert_code.train --config configs/quality.py:long --workdir runs/long
  python -m flax_albert_code.train --config configs/quality.py:long,gpus=2 --workdir runs/long2
  QUALITY_CONFIG=configs/quality.py:long QUALITY_TRAIN_SECONDS=570 \
      QUALITY_STAGES=train bash benchmarks/run_quality.sh OUT   # one call; again to continue

Choices, each measured on the VALID split, never on test (benchmarks/RESULTS.md has the tables):
- LayerNorm before each sublayer (`model.norm_position="pre"`) at peak lr 1e-3, warmup 150:
  after 400 steps (the sweep in benchmarks/RESULTS.md, 50,000 pairs) valid gen_loss 4.15 vs 4.84
  for ALBERT's post-norm at its best lr 2e-4 (post-norm at 5e-4 never left the unigram
  solution; at 1e-4 it learnt slower).
- pooling "first_last" (mean of the embedded input and the last states): with plain mean
  pooling the pre-norm alignment stayed at chance (valid InfoNCE 4.852 = ln 128); first_last
  reached 4.36 and 4.4% in-batch retrieval at a small cost in gen_loss (4.26).
- base size (H768, encoder 12 / decoder 6 applications): H512 with 6 encoder applications ran
  2.2x the tokens/s but reached gen_loss 4.53 at 400 steps.
- 50,000 pairs (5 passes): 25,000 pairs (10 passes) over-fitted the alignment from step ~1000.
- joint generation + InfoNCE (weight 1.0) from step 0, dropout 0.1, batch 128, code up to 256
  tokens in buckets of 64/128/256, unrolled depth (nn.scan cost 32% of tokens/s here and saved
  no compile time: the compile is dominated by autotuning, not depth).
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
  # Retrieval-augmented generation: 2 train functions per description (BM25 before training,
  # then the model's own aligned encoder + BM25 from step 900), 320 encoder tokens in all.
  c.retrieval.k = 2
  c.retrieval.method = "hybrid"
  c.retrieval.max_ctx_len = 320
  c.retrieval.refresh_steps = (900,)
  # Reading the input (issue 30): the copy head (on by default), half of the training rows with
  # their own code (spans cut out) as first neighbour, and denoising on unlabelled code: half
  # of the batches for the first 400 steps, then one in five (about 27% of all batches). Both
  # chosen on the valid split of the default run (benchmarks/RESULTS.md, issue 30).
  c.retrieval.self_neighbour_rate = 0.5
  c.data.unlabelled = True
  c.data.max_unlabelled = 100000
  c.train.unlabelled_schedule = "0.5:400,0.2"
  # Chosen on the valid split (benchmarks/RESULTS.md, issue 19): without it 93% of greedy outputs
  # looped; with 4, 3% (and BLEU 0.38 -> 0.68).
  c.sample.no_repeat_ngram_size = 4
  if arg.recipe == "long":
    _long(c, arg.gpus)
  return c


def _long(c, gpus: int) -> None:
  """The long recipe: data parallel over `gpus` GPUs at 128 pairs a GPU; the same examples seen
  in all (steps scale down as the batch grows)."""
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
