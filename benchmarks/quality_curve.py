"""Quality vs compute: valid BLEU, parse and degenerate rates and alignment MRR of every kept
checkpoint of one run, against the GPU-minutes of training that produced it, with a fitted
log-linear trend and what it predicts for one hour of 8 GPUs (on paper).

  python benchmarks/quality_curve.py --metrics RUN/metrics.jsonl --curve OUT/curve --gpus 2 \
      [--results benchmarks/RESULTS.md] [--plot benchmarks/quality_vs_compute.png]

`OUT/curve/step<N>/report.json` are `evaluate` reports of checkpoint N on the valid split
(`QUALITY_STAGES=curve bash benchmarks/run_quality.sh` writes them). Training time is the wall
time between the run's logged steps (evaluation and checkpoint saves inside it included); the
start-up of each call (preparation, compilation) is not, and is reported by the trainer apart.
The first logged interval of each call holds the compilation, so it is counted at that call's
median seconds a step instead.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics

EIGHT_GPU_HOUR = 8 * 60.0
COLUMNS = (("bleu", "greedy BLEU"), ("bleu_plain", "BLEU, no neighbours"),
           ("parse_rate", "parse %"), ("degenerate_rate", "degenerate %"), ("mrr", "alignment MRR"))


def train_seconds(metrics_path: str) -> dict[int, float]:
  """{logged step: cumulative training seconds} from metrics.jsonl's throughput rows. A call
  (a resume) starts a new segment: the trainer's startup row marks it (older logs: a step that
  goes back, or two minutes without a row)."""
  rows, restarted = [], False
  with open(metrics_path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      r = json.loads(line)
      if "startup_first_step_s" in r:
        restarted = True
      if "tokens_per_s" in r:
        rows.append((int(r["step"]), float(r["time"]), restarted))
        restarted = False
  segments, cur = [], []
  for step, t, new in rows:
    if cur and (new or step <= cur[-1][0] or t - cur[-1][1] > 120):
      segments.append(cur)
      cur = []
    cur.append((step, t))
  if cur:
    segments.append(cur)
  out, total, prev_step = {}, 0.0, 0
  for seg in segments:
    per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(seg, seg[1:]) if s1 > s0]
    rate = statistics.median(per_step) if per_step else None
    for i, (step, t) in enumerate(seg):
      if i == 0:
        total += (step - prev_step) * (rate or 0.0)   # holds compilation: counted at the median
      else:
        total += t - seg[i - 1][1]
      out[step] = total
      prev_step = step
  return out


def seconds_at(step: int, table: dict[int, float]) -> float:
  """Cumulative training seconds at `step`, interpolated between logged steps."""
  steps = sorted(table)
  if step in table:
    return table[step]
  before = [s for s in steps if s < step]
  after = [s for s in steps if s > step]
  if before and after:
    a, b = before[-1], after[0]
    return table[a] + (table[b] - table[a]) * (step - a) / (b - a)
  if before:
    a = before[-1]
    rate = table[a] / a if a else 0.0
    return table[a] + rate * (step - a)
  return table[after[0]] * step / after[0] if after else 0.0


def read_report(path: str) -> dict[str, float]:
  with open(path) as f:
    report = json.load(f)
  row = {}
  for r in report["rows"]:
    if r["method"] == "greedy":
      row.update(bleu=r["bleu"], parse_rate=r["parse_rate"],
                 degenerate_rate=r.get("degenerate_rate", float("nan")))
    elif r["method"] == "greedy, no retrieval":
      row["bleu_plain"] = r["bleu"]
    elif r["method"] == "alignment desc→code":
      row["mrr"] = r["mrr"]
  row["examples"] = report.get("num_examples", 0)
  return row


def fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
  """Least squares y = a + b log10(x); None with fewer than two distinct points."""
  pts = [(math.log10(x), y) for x, y in zip(xs, ys) if x > 0 and math.isfinite(y)]
  if len({p[0] for p in pts}) < 2:
    return None
  mx = sum(p[0] for p in pts) / len(pts)
  my = sum(p[1] for p in pts) / len(pts)
  b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)
  return my - b * mx, b


def table_md(points: list[dict], fits: dict[str, tuple[float, float] | None]) -> str:
  head = "| step | GPU-minutes | " + " | ".join(name for _, name in COLUMNS) + " |"
  lines = [head, "|" + "---|" * (2 + len(COLUMNS))]
  for p in points:
    cells = [f"{p.get(k, float('nan')):.3f}" if k == "mrr" else f"{p.get(k, float('nan')):.2f}"
             for k, _ in COLUMNS]
    lines.append(f"| {p['step']} | {p['gpu_minutes']:.1f} | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("Fitted trend y = a + b log10(GPU-minutes), and its value at one hour of 8 GPUs "
               f"({EIGHT_GPU_HOUR:.0f} GPU-minutes; an extrapolation on paper):")
  lines.append("")
  lines.append("| measure | a | b (per 10x compute) | predicted at 480 GPU-minutes |")
  lines.append("|---|---|---|---|")
  for k, name in COLUMNS:
    f = fits.get(k)
    if f is None:
      lines.append(f"| {name} | - | - | - |")
      continue
    a, b = f
    pred = a + b * math.log10(EIGHT_GPU_HOUR)
    if k in ("parse_rate", "degenerate_rate"):
      pred = min(max(pred, 0.0), 100.0)
    lines.append(f"| {name} | {a:.3f} | {b:+.3f} | {pred:.3f} |")
  return "\n".join(lines)


def write_results(path: str, body: str) -> None:
  title = "## Quality vs compute (issue 20)"
  text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
  pattern = re.compile(re.escape(title) + r".*?(?=\n## |\Z)", re.S)
  section = f"{title}\n\n{body}\n"
  text = pattern.sub(lambda _: section, text) if pattern.search(text) else (
      text.rstrip("\n") + "\n\n" + section)
  with open(path, "w") as f:
    f.write(text)


def plot(points: list[dict], fits, path: str) -> str:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return "(no plot: matplotlib is not installed)"
  keys = [("bleu", "greedy BLEU"), ("parse_rate", "parse %"), ("mrr", "alignment MRR")]
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
  xs = [p["gpu_minutes"] for p in points]
  for ax, (k, name) in zip(axes, keys):
    ax.plot(xs, [p.get(k, float("nan")) for p in points], "o-", label="measured")
    if fits.get(k):
      a, b = fits[k]
      grid = [min(xs) * (EIGHT_GPU_HOUR / min(xs)) ** (i / 20) for i in range(21)]
      ax.plot(grid, [a + b * math.log10(g) for g in grid], "--", label="fit")
    ax.set_xscale("log")
    ax.set_xlabel("GPU-minutes of training")
    ax.set_title(name)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return f"![quality vs compute]({os.path.basename(path)})"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--metrics", required=True)
  p.add_argument("--curve", required=True, help="directory of step<N>/report.json")
  p.add_argument("--gpus", type=int, required=True)
  p.add_argument("--results", default="")
  p.add_argument("--plot", default="")
  p.add_argument("--note", default="", help="a line about the run, put above the table")
  args = p.parse_args()
  seconds = train_seconds(args.metrics)
  points = []
  for name in os.listdir(args.curve):
    m = re.fullmatch(r"step(\d+)", name)
    report = os.path.join(args.curve, name, "report.json")
    if m and os.path.isfile(report):
      step = int(m.group(1))
      points.append({"step": step, "gpu_minutes": args.gpus * seconds_at(step, seconds) / 60,
                     **read_report(report)})
  if not points:
    raise SystemExit(f"no step<N>/report.json under {args.curve}")
  points.sort(key=lambda q: q["step"])
  fits = {k: fit([q["gpu_minutes"] for q in points], [q.get(k, float("nan")) for q in points])
          for k, _ in COLUMNS}
  body = table_md(points, fits)
  print(body)
  if args.results:
    figure = plot(points, fits, args.plot) if args.plot else ""
    import jax
    head = (f"Measured {datetime.date.today().isoformat()} on {args.gpus} x "
            f"{jax.devices()[0].device_kind} (jax {jax.__version__}); valid split, "
            f"{points[0]['examples']} examples a checkpoint, greedy with neighbours."
            + (f" {args.note}" if args.note else ""))
    write_results(args.results, "\n\n".join(x for x in (head, body, figure) if x))


if __name__ == "__main__":
  main()
