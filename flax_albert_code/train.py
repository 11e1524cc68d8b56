"""Train: `python -m flax_albert_code.train [--config configs/X.py] [--workdir DIR] [--config.a.b=v]`.

With no arguments: the `small` config on the built-in stdlib corpus, into ./runs/<config name>.
The same command resumes from the latest checkpoint in the workdir. Intentionally short: the
loop lives in trainer.py.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                                                "default.py"))
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (configs/).",
                                          lock_config=True)
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


def main(argv: list[str]) -> None:
  del argv
  import jax
  if _want_distributed():
    jax.distributed.initialize()
  from flax_albert_code import checkpoint, trainer
  from flax_albert_code.data.prepared import DataError
  from flax_albert_code.tokenizer import TokenizerError
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "jax", "orbax", "grain", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", config.name)
  print(f"Training config {config.name!r} on {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s) into {os.path.abspath(workdir)}", flush=True)
  try:
    result = trainer.run(config, workdir)
  except (DataError, TokenizerError, checkpoint.CheckpointError, trainer.TrainingError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  trainer.report(result, config)


if __name__ == "__main__":
  app.run(main)
