"""The peer's decoding at any batch (issue 21: batch 1, one interactive user): HF generate.

  python3 benchmarks/peer_decode.py --batch 1 [--beams 1,4] [--out peer_decode.json]

Runs `peer_torch.py` (copied beside this file from ../shared/bench, as run_gpu.sh does) with its
batch set to --batch: its model, its bf16 autocast and its `gen_bench` (exactly 256 new tokens,
min_new_tokens = max_new_tokens, KV cache). Reports ms per new token of the whole call (encoder
included), which is what one user waits, next to ours from `ab_decode.py --batch 1`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--beams", default="1,4", help="comma-separated beam counts (1: greedy)")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--out", default="")
  args = p.parse_args()
  sys.path.insert(0, HERE)
  try:
    import peer_torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    sys.exit(f"benchmarks/peer_torch.py is missing ({e}): copy ../shared/bench/peer_torch.py there")
  peer_torch.B = args.batch    # gen_bench reads the module's batch size
  model = peer_torch.build()
  res = {"batch": args.batch, "gpu": peer_torch.torch.cuda.get_device_name(0),
         "torch": peer_torch.torch.__version__}
  for beams in (int(b) for b in args.beams.split(",")):
    r = peer_torch.gen_bench(model, reps=args.reps if beams == 1 else 1, beams=beams)
    r["ms_per_new_token"] = 1e3 * r["gen_s"] / r["new_tokens"]
    res["greedy" if beams == 1 else f"beam{beams}"] = r
    print(json.dumps(res), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
