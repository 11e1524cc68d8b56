"""Shipped configs, found by name from any directory: `--config NAME`, `--config configs/NAME.py`.

  default  the `small` model on the stdlib corpus, minutes on a CPU (what the bare command runs)
  tiny     smoke runs and tests
  albert   ALBERT's published sizes on GPUs/TPUs: `albert.py:base`, `albert.py:large`
  quality  the measured one-GPU quality recipe
  common   parse_arg and the blocks the files share (not a config)
"""

# Names that stand for a variant of a file (`--config large` is `--config configs/albert.py:large`).
VARIANTS = {"base": "albert.py:base", "large": "albert.py:large"}
