"""Training curve from a run's metrics.jsonl: loss, gen_loss, infonce_loss (train) and the
valid_* losses vs step, written as a small PNG.

  python benchmarks/plot_curve.py RUN/metrics.jsonl benchmarks/quality_curve.png [--title T] [--batch B]

Needs matplotlib (a benchmark-only dependency: `pip install matplotlib`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

TRAIN = ("loss", "gen_loss", "infonce_loss")
VALID = ("valid_loss", "valid_gen_loss", "valid_infonce_loss")


def read(path: str) -> dict[str, list[tuple[int, float]]]:
  """{metric: [(step, value), ...]} for the metrics above; rows without them are skipped."""
  series: dict[str, list[tuple[int, float]]] = {k: [] for k in TRAIN + VALID}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      row = json.loads(line)
      step = row.get("step")
      if step is None:
        continue
      for k in series:
        v = row.get(k)
        if isinstance(v, (int, float)) and math.isfinite(v):
          series[k].append((int(step), float(v)))
  return series


def plot(series, out: str, title: str | None = None, batch: int | None = None) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=80)
  panels = (("total loss", "loss", "valid_loss"),
            ("generation loss", "gen_loss", "valid_gen_loss"),
            ("InfoNCE loss", "infonce_loss", "valid_infonce_loss"))
  for ax, (name, tr, va) in zip(axes, panels):
    for key, style, label in ((tr, "-o", "train"), (va, "--s", "valid")):
      pts = series.get(key) or []
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, style, markersize=3, linewidth=1.2, label=f"{label} ({key})")
    if batch and tr == "infonce_loss":   # a constant embedding scores ln(batch)
      ax.axhline(math.log(batch), color="grey", linestyle=":", linewidth=1,
                 label=f"chance ln({batch}) = {math.log(batch):.4f}")
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("metrics")
  p.add_argument("out")
  p.add_argument("--title", default=None)
  p.add_argument("--batch", type=int, default=None,
                 help="draw the InfoNCE chance level ln(batch) (in-batch negatives)")
  a = p.parse_args(argv)
  series = read(a.metrics)
  if not any(series.values()):
    print(f"no loss metrics in {a.metrics}", file=sys.stderr)
    return 1
  plot(series, a.out, a.title, a.batch)
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
