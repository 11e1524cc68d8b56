"""GPU kernel time from a `jax.profiler` trace (perfetto JSON), by kernel name and by kind.

  totals, counts = gpu_kernels.from_trace(DIR)  # ms and launches per kernel name, whole trace
  gpu_kernels.print_table(totals, counts, per=256)  # per decode step / train step

Used by bench_model.py (--profile: the train step) and bench_sampling.py (--profile: a decode
call, per new token), so a profile says how many kernels a step launches and where its time
goes without opening the trace. (Not `kernels.py`: that would hide the PyPI package `kernels`,
which transformers imports, wherever this directory is on sys.path.)
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os

KINDS = ("gemm", "attention", "reduction fusion", "elementwise fusion", "copy", "other")


def kind(name: str) -> str:
  """A kernel's kind from its name: cuBLAS (nvjet) and XLA/Triton GEMMs, cuDNN attention and
  our Pallas kernels (model/fused_decode.py names them *_kernel), XLA's fusions."""
  low = name.lower()
  if low.startswith("nvjet") or "gemm" in low or "cublas" in low or "cutlass" in low:
    return "gemm"
  if "sdpa" in low or "cudnn" in low or "attention" in low or low.endswith("_kernel"):
    return "attention"
  if "reduce" in low:
    return "reduction fusion"
  if "fusion" in low or low.startswith("loop_") or low.startswith("wrapped_"):
    return "elementwise fusion"
  if "memcpy" in low or "memset" in low or "copy" in low:
    return "copy"
  return "other"


def from_trace(trace_dir: str) -> tuple[dict[str, float], dict[str, int]]:
  """(ms, launches) per kernel name over the newest trace under `trace_dir`."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"No *.trace.json.gz under {trace_dir}: was the trace written?")
  trace = json.load(gzip.open(paths[-1]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  gpu = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
         and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
  totals: dict[str, float] = collections.defaultdict(float)
  counts: dict[str, int] = collections.defaultdict(int)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu:
      totals[e["name"]] += e.get("dur", 0) / 1e3
      counts[e["name"]] += 1
  return dict(totals), dict(counts)


def by_kind(totals: dict[str, float], counts: dict[str, int]) -> dict[str, tuple[float, int]]:
  out = {k: [0.0, 0] for k in KINDS}
  for name, ms in totals.items():
    out[kind(name)][0] += ms
    out[kind(name)][1] += counts.get(name, 0)
  return {k: (ms, n) for k, (ms, n) in out.items() if n}


def print_table(totals: dict[str, float], counts: dict[str, int], per: int = 1,
                top: int = 25, unit: str = "step") -> None:
  """Time and launches per `unit` (the trace divided by `per`), by kind and the top names."""
  total = sum(totals.values())
  if not total:
    print("no GPU kernels in the trace")
    return
  print(f"GPU kernel time per {unit}: {total / per:.3f} ms in {sum(counts.values()) / per:.1f} "
        f"launches")
  for k, (ms, n) in sorted(by_kind(totals, counts).items(), key=lambda kv: -kv[1][0]):
    print(f"  {k:<20} {ms / per:8.3f} ms {ms / total:6.1%} {n / per:7.1f} launches")
  print("top kernels:")
  for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
    print(f"  {ms / per:8.3f} ms {ms / total:6.1%} {counts[name] / per:6.1f}x  {name[:100]}")
