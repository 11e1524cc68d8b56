"""Two checkouts of the package on one GPU: decoded tokens and decode ms a step at BENCH-A sizes.

  python benchmarks/ab_trees.py TREE OUT.npz     # once per tree, alternating; then compare:
  python benchmarks/ab_trees.py --compare OLD.npz NEW.npz

Each run imports `flax_albert_code` and `bench_sampling.py` from TREE, so a refactor is checked
for the same tokens (greedy and beam 4 from the same random bf16 weights) at the same speed.
"""
import sys

import numpy as np


def run(root: str, out: str) -> None:
  sys.path[:0] = [root, root + "/benchmarks"]
  import bench_sampling  # pylint: disable=import-outside-toplevel
  import flax_albert_code  # pylint: disable=import-outside-toplevel
  from flax_albert_code import config as config_lib  # pylint: disable=import-outside-toplevel
  from flax_albert_code.inference import model_decoding  # pylint: disable=import-outside-toplevel
  assert flax_albert_code.__file__.startswith(root), flax_albert_code.__file__
  config = config_lib.load_config("base")
  model, _, desc, variables = bench_sampling.random_model(config, 64, 64)
  tokens = {}
  for strategy in ("greedy", "beam"):
    def generate(n, strategy=strategy):
      return model_decoding.generate(model, variables, desc, strategy=strategy,
                                     max_new_tokens=n, num_beams=4, num_samples=1, top_p=1.0,
                                     decode_phase=config.sample.decode_phase)
    tokens[strategy] = np.asarray(generate(128)[0])
    full = bench_sampling.timed(lambda: generate(128), 5)
    one = bench_sampling.timed(lambda: generate(1), 5)
    print(f"{root} {strategy} ms/step {1e3 * (full - one) / 127:.4f}", flush=True)
  np.savez(out, **tokens)


def compare(old: str, new: str) -> None:
  a, b = np.load(old), np.load(new)
  for k in a:
    rows = int((a[k] != b[k]).any(-1).sum())
    print(f"{k}: {rows} of {a[k].shape[0]} rows differ")


if __name__ == "__main__":
  if len(sys.argv) < 3 or sys.argv[1].startswith("-h"):
    sys.exit(__doc__)
  if sys.argv[1] == "--compare":
    compare(sys.argv[2], sys.argv[3])
  else:
    run(sys.argv[1], sys.argv[2])
