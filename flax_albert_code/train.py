"""Train: `python -m flax_albert_code.train [--config configs/X.py] [--workdir DIR]
[--config.a.b=v]`.

With no arguments: the `small` config on the stdlib corpus, into ./runs/<config name>. The same
command resumes from the workdir's latest checkpoint; it ends with the losses, a few generated
samples and where the checkpoint is.
"""
from __future__ import annotations

import logging
import os
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from flax_albert_code import config as config_lib
from flax_albert_code import cli

_DEFAULT_CONFIG = os.path.join(config_lib.CONFIG_DIR, "default.py")


def _unknown_field(err: Exception) -> str:
  """Which `--config.a.b=v` names no field, and the fields that exist there."""
  for arg in sys.argv[1:]:
    flag = arg.split("=", 1)[0]
    if not flag.startswith("--config."):
      continue
    node, path = config_lib.get_config(), flag[len("--config."):].split(".")
    for i, name in enumerate(path):
      where = ".".join(["config", *path[:i]])
      if not isinstance(node, ml_collections.ConfigDict):
        return f"{flag}: {where} is a value, not a section; drop the '.{name}'."
      if name not in node:
        return (f"{flag}: {where} has no field {name!r}; its fields are "
                f"{', '.join(sorted(node.keys()))}.")
      node = node[name]
  return f"bad --config override ({err})."


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a mistyped `--config.a.b` ends in one sentence, not a traceback."""
  try:
    return app.parse_flags_with_usage(cli.config_argv(argv))
  except (KeyError, AttributeError) as e:
    sys.exit(f"error: {_unknown_field(e)}")


# config_flags also applies the overrides when it loads the default config, here.
try:
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG,
      "Config file, or the name of a shipped one (default, quality, base, large, tiny).",
      lock_config=True)
except (KeyError, AttributeError) as e:
  sys.exit(f"error: {_unknown_field(e)}")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default ./runs/<config name>).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", None, "Call jax.distributed.initialize() (default: when the environment names "
    "a coordinator, e.g. JAX_COORDINATOR_ADDRESS, SLURM or a TPU pod).")


def _want_distributed() -> bool:
  if _MULTIHOST.value is not None:
    return _MULTIHOST.value
  env = os.environ
  return bool(env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("SLURM_NTASKS", "1")) > 1
              or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0)


def _distributed_args() -> dict[str, int]:
  """num_processes and process_id from JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
  names = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
  return {arg: int(os.environ[var]) for arg, var in names.items() if os.environ.get(var)}


def main(argv: list[str]) -> None:
  del argv
  # Here, not at the top: `--help` stays fast, and nothing runs before jax.distributed.initialize.
  import jax
  if _want_distributed():
    jax.distributed.initialize(**_distributed_args())
  from flax_albert_code.training import checkpoint
  from flax_albert_code.training import loop as trainer
  from flax_albert_code.data.prepared import DataError
  from flax_albert_code.tokenizer import TokenizerError
  from flax_albert_code.utils import compile_cache
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "jax", "orbax", "grain", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", config.name)
  try:
    config_lib.validate(config)
    # Before anything is written there: a refused run leaves the workdir as it was.
    checkpoint.check_workdir(workdir, config)
    cache = compile_cache.enable(config.train.compilation_cache, workdir)
    if jax.process_index() == 0:
      print(f"Training config {config.name!r} on {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es) into "
            f"{checkpoint.absolute(workdir)}{f' (compilation cache {cache})' if cache else ''}",
            flush=True)
    # A bar on a terminal; in a log or a pipe a line every log_every steps instead.
    result = trainer.run(config, workdir, progress=cli.progress(), embedder=cli.embedder)
  except (DataError, TokenizerError, checkpoint.CheckpointError, trainer.TrainingError,
          ValueError) as e:
    sys.exit(f"error: {e}")
  report(result, config)


def report(result, config) -> None:
  """What the user sees at the end: losses, a few generated samples, where the checkpoint is."""
  import jax    # here, as in main: `--help` stays fast
  from flax_albert_code.training import checkpoint
  from flax_albert_code.training import step as train_step
  if jax.process_index() != 0:
    return
  if result.history:
    first, last = result.history[0], result.history[-1]
    print(f"step {last['step']}: train loss {first['loss']:.3f} -> {last['loss']:.3f}")
  if result.valid:
    shown = {k[6:]: v for k, v in result.valid.items() if k.endswith(("loss", "accuracy"))}
    print("final validation: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    read = {k: result.valid[k] for k in ("input_gap", "copy_gap", "encoder_spread")
            if k in result.valid}
    if read:
      print("reading gauge: " + ", ".join(f"{k} {v:.4f}" for k, v in read.items()))
  n = int(config.train.samples_at_end)
  if n and train_step.objectives(config.train)[0] and result.state is not None:
    _print_samples(result, config, n)
  print(f"checkpoint: {checkpoint.absolute(checkpoint.checkpoint_dir(result.workdir))}"
        f"/{result.step}")


def _print_samples(result, config, n: int) -> None:
  """`n` generated samples, and the source design's example run in the sandbox."""
  import jax
  from flax_albert_code.evaluation import design_example
  from flax_albert_code.inference.generator import CodeGenerator
  from flax_albert_code.retrieval import retriever
  split = "valid" if result.prepared.split_sizes.get("valid") else "train"
  source = result.prepared.source(split)
  examples = [source[i] for i in range(min(n, len(source)))]
  params = jax.device_get(result.state.params["model"])
  gen = CodeGenerator(config, params, result.prepared.tokenizer, prepared=result.prepared)
  strategy = config.sample.strategy if config.sample.strategy in ("greedy", "beam") else "greedy"
  outs = gen.generate([e["description"] for e in examples], strategy=strategy,
                      num_beams=config.sample.num_beams,
                      max_new_tokens=config.sample.max_new_tokens)
  how = f"beam {config.sample.num_beams}" if strategy == "beam" else "greedy"
  print(f"\nGenerated for {len(examples)} {split} descriptions ({how}, config.sample.strategy):")
  for e, cands in zip(examples, outs):
    print(f"\n# {e['description']}")
    for line in retriever.neighbour_lines(cands[0].get("neighbours", [])):
      print(line)
    print(cands[0]["code"])
  print("\nThe source design's example, run in the sandbox:")
  print(design_example.format_results(design_example.run(gen, (strategy,),
                                                         config.sample.num_beams)))
  print()


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
