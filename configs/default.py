"""Default run: the `small` model on the built-in standard-library corpus; what the bare command runs.

  python -m flax_albert_code.train                      # same as --config configs/default.py
  python -m flax_albert_code.train --config configs/default.py --workdir runs/small \
      --config.train.steps=500                          # a shorter local variant
"""
from flax_albert_code import config_lib


def get_config():
  return config_lib.get_config("small")
