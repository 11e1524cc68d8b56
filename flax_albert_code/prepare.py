"""Prepares the data: mine the sources, split, train the tokenizer, write TFDS array_record.

  python -m flax_albert_code.prepare --config configs/default.py --workdir runs/small
  python -m flax_albert_code.prepare --workdir /tmp/d --config.data.sources=stdlib,dir:~/src/repo

Re-running with the same sources and options reuses the prepared data (data/prepared.py).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from flax_albert_code import config as config_lib
from flax_albert_code.data.prepared import (DataError, Prepared, load_prepared,  # noqa: F401
                                            prepare, summary)
from flax_albert_code import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(config_lib.CONFIG_DIR, "default.py"),
    "Config file, or the name of a shipped one (default, quality, base, large, tiny).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "Run directory; data goes to <workdir>/data unless "
                               "config.data.data_dir is set.")


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  # Here, not at the top: orbax would make `--help` slow.
  from flax_albert_code.training import checkpoint  # pylint: disable=import-outside-toplevel
  try:
    config_lib.validate(config)
    # A run's data is what its checkpoints were trained on: other data would move its CURRENT
    # (and its tokenizer) from under it.
    checkpoint.check_workdir(_WORKDIR.value, config, sections=("data",))
    prepared = prepare(config, _WORKDIR.value, progress=True)
  except (ValueError, checkpoint.CheckpointError) as e:   # DataError and TokenizerError too
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(summary(prepared, config.data))


if __name__ == "__main__":
  app.run(main, argv=cli.config_argv(sys.argv))
