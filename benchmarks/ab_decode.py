"""Decoding A/B at BENCH-A (issue 21): every arm against the current code in one device call.

  python benchmarks/ab_decode.py                       # the default arms; RESULTS.md gets the
                                                       # run first under its section's heading
  python benchmarks/ab_decode.py --arms baseline,layer   # some arms (baseline always)
  python benchmarks/ab_decode.py --small --results ''  # tiny model, CPU smoke run, no file

XLA flags are per process, so each arm is a worker subprocess with its own XLA_FLAGS and code
options. The workers compile (greedy and beam 4 at BENCH-A: 64 descriptions of 64 tokens,
exactly 256 new tokens, bf16, random base-size weights as bench_sampling.py) at the same time,
then time one after the other while the others wait, so no arm is timed while another
compiles; the baseline is timed first and again last (drift check). ms/step =
(time(256 tokens) - time(the same program stopped after 1 token by its traced `limit`)) / 255:
the encoder and cache set-up cancel. Tokens of every arm are compared with the baseline's.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Decoding A/B (issue 21)"
CMDBUF_WHILE = "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  what: str
  prediction: str
  xla_flags: str = ""
  decode_attention: str = "xla"       # config.model.decode_attention
  decode_phase: int | None = None     # None: config.sample.decode_phase
  strategies: tuple[str, ...] = ("greedy", "beam")
  dtype: str = ""                     # config.model.dtype ("": the base config's bfloat16)
  timed: bool = True                  # False: tokens only (an exactness twin too slow to time)
  patch: tuple = ()                   # (attribute of model/fused_decode.py, value): tuning


ARMS = {a.name: a for a in (
    Arm("baseline", "decode_attention='xla': XLA ops a step, beams reading the cache through "
        "their index (what exports and a batch sharded over devices run)",
        "greedy 0.46, beam 1.18 ms (RESULTS.md)"),
    Arm("defaults", "the defaults: decode_attention='auto' (on one GPU the one-token layer as "
        "model/fused_decode.py's kernels, as arm layer)", "greedy 0.36, beam 0.76 ms",
        decode_attention="auto"),
    Arm("defaults_fp32", "the defaults in float32, tokens only", "the fp32 reference's tokens",
        decode_attention="auto", dtype="float32", timed=False),
    Arm("layer", "decode_attention='layer': the one-token decoder layer as twelve Pallas "
        "kernels (model/fused_decode.py: five split-K GEMMs; an epilogue a row for bias, "
        "activation, residual and LayerNorm; Q|K|V and the cross query summed inside the "
        "attention kernels, which write the new K/V into the cache)",
        "greedy 0.36, beam 0.76 ms", decode_attention="layer"),
    Arm("layer_fp32", "layer in float32, tokens only (Triton's exact float32 dot is slow)",
        "the fp32 reference's tokens", decode_attention="layer", dtype="float32", timed=False),
    # Tuning constants of the layer kernels, each against arm layer.
    Arm("layer_block32", "layer, the self-attention's online softmax over blocks of 32 cache "
        "positions (64 by default)", "greedy within +-0.01 ms of layer",
        decode_attention="layer", patch=(("_BLOCK", 32),)),
    Arm("layer_block128", "layer, blocks of 128 cache positions",
        "greedy within +-0.01 ms of layer", decode_attention="layer", patch=(("_BLOCK", 128),)),
    Arm("layer_warps2", "layer, 2 warps a program in the attention kernels (4 by default)",
        "beam -2.5%, greedy the same", decode_attention="layer", patch=(("_WARPS", 2),)),
    Arm("layer_stages2", "layer, 2 Triton pipeline stages in the attention kernels (1 by "
        "default)", "no change", decode_attention="layer", patch=(("_STAGES", 2),)),
    Arm("layer_epilogue8", "layer, 8 warps an epilogue program (4 by default)",
        "greedy within +-0.01 ms", decode_attention="layer",
        patch=(("EPILOGUE_WARPS", 8),)),
    Arm("layer_splits192", "layer, K split until a GEMM has 192 programs (96 by default)",
        "greedy +7%", decode_attention="layer", patch=(("MIN_PROGRAMS", 192),)),
    Arm("layer_splits48", "layer, K split until a GEMM has 48 programs",
        "greedy +0 to +0.02 ms: fewer programs than SMs", decode_attention="layer",
        patch=(("MIN_PROGRAMS", 48),)),
    Arm("cmdbuf_while", f"XLA flag {CMDBUF_WHILE}: the decode while-loops (and their "
        "conditions) inside CUDA graphs, no host round trip for the loop predicate",
        "greedy -0.02 to -0.05 ms, beam the same absolute; no change if 0.11.2 already "
        "records WHILE by default", xla_flags=CMDBUF_WHILE),
    Arm("cmdbuf_while_min1", "as cmdbuf_while plus --xla_gpu_graph_min_graph_size=1 (every "
        "region becomes a graph, however small)", "as cmdbuf_while, within 0.01 ms",
        xla_flags=CMDBUF_WHILE + " --xla_gpu_graph_min_graph_size=1"),
    # Exactness: the same programs in float32 (compute and weights). The bf16 arms are compared
    # with "fp32" row by row: an arm that agrees with it as often as the bf16 baseline does
    # differs from the baseline by rounding, not by a fault.
    Arm("fp32", "the baseline in float32 (compute and weights): the reference for exactness",
        "greedy ~1.5-2x slower than bf16 (twice the bytes)", dtype="float32"),
    Arm("triton_gemm_any", "XLA flag --xla_gpu_triton_gemm_any=true (Triton GEMMs may fuse "
        "bias, residual and LayerNorm producers)", "greedy -0.03 to +0.05 ms (uncertain)",
        xla_flags="--xla_gpu_triton_gemm_any=true"),
    Arm("phase32", "sample.decode_phase=32 instead of 64 (8 loops, each reads a shorter prefix)",
        "greedy within +-0.02 ms (latency-bound)", decode_phase=32),
)}
DEFAULT_ARMS = "baseline,defaults,defaults_fp32,fp32"


# ---------------------------------------------------------------------------------------------
# Worker: one arm, one process.


def _emit(obj) -> None:
  print("@@" + json.dumps(obj), flush=True)


def worker(args) -> None:
  # pylint: disable=import-outside-toplevel
  # (jax is imported here, after the parent has set this process's XLA_FLAGS)
  sys.path.insert(0, REPO)
  t0 = time.perf_counter()
  import jax
  import numpy as np
  from flax_albert_code import config as config_lib
  from flax_albert_code.inference import model_decoding
  from flax_albert_code.model import fused_decode
  import bench_sampling   # this directory: the random-weights set-up of the speed benchmarks

  arm = ARMS[args.arm]
  config = config_lib.load_config("tiny" if args.small else "base")
  if arm.decode_phase is not None:
    config.sample.decode_phase = arm.decode_phase
  config.model.decode_attention = arm.decode_attention
  if arm.dtype:
    config.model.dtype = arm.dtype
  model, cfg, desc, variables = bench_sampling.random_model(config, args.batch, args.desc_len)
  n = args.new_tokens
  for name, value in arm.patch:
    setattr(fused_decode, name, value)

  def run(strategy, limit):
    return model_decoding.generate(
        model, variables, desc, strategy=strategy, max_new_tokens=n, num_beams=args.num_beams,
        num_samples=1, top_p=1.0, decode_phase=config.sample.decode_phase, limit=limit)

  info = {"arm": arm.name, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "tokens": {}, "compile_s": {}}
  for strategy in arm.strategies:
    t = time.perf_counter()
    tokens, _ = run(strategy, n)
    tokens = np.asarray(tokens)
    jax.block_until_ready(run(strategy, 1))
    info["compile_s"][strategy] = round(time.perf_counter() - t, 1)
    assert int((tokens != 0).sum(-1).min()) == n, "not every row decoded all tokens"
    info["tokens"][strategy] = {"sha": hashlib.sha256(tokens.tobytes()).hexdigest()[:16],
                                "rows": [hashlib.sha256(r.tobytes()).hexdigest()[:8]
                                         for r in tokens.reshape(tokens.shape[0], -1)]}
  info["ready_s"] = round(time.perf_counter() - t0, 1)
  _emit({"ready": info})

  for line in sys.stdin:   # the parent says when to time, so no other arm compiles meanwhile
    if line.strip() != "time":
      break
    timed = {}
    for strategy in arm.strategies if arm.timed else ():
      def once(limit, strategy=strategy):
        t = time.perf_counter()
        jax.block_until_ready(run(strategy, limit))
        return time.perf_counter() - t
      once(n), once(1)
      full = statistics.median(once(n) for _ in range(args.repeats))
      one = statistics.median(once(1) for _ in range(args.repeats))
      timed[strategy] = {"ms_step": 1e3 * (full - one) / (n - 1), "total_ms": 1e3 * full,
                         "tok_s": args.batch * n / full, "new_tokens": n}
    _emit({"timed": timed})


# ---------------------------------------------------------------------------------------------
# Parent: launch, order the timing, report.


class _Worker:
  def __init__(self, arm: Arm, args, log_dir: str):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), arm.xla_flags) if f)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"   # several processes share the one GPU
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--arm", arm.name,
           "--batch", str(args.batch), "--desc-len", str(args.desc_len),
           "--new-tokens", str(args.new_tokens), "--num-beams", str(args.num_beams),
           "--repeats", str(args.repeats)] + (["--small"] if args.small else [])
    self.arm, self.log = arm, os.path.join(log_dir, f"{arm.name}.log")
    self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=open(self.log, "w"), text=True, cwd=REPO)
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    self.ready, self.error, self.timings = None, None, []

  def _read(self):
    for line in self.proc.stdout:
      if line.startswith("@@"):
        self.lines.put(json.loads(line[2:]))
    self.lines.put(None)

  def wait(self, key: str, deadline: float):
    try:
      msg = self.lines.get(timeout=max(deadline - time.time(), 0.1))
    except queue.Empty:
      self.error = f"no {key} within the budget"
      return None
    if msg is None:
      self.proc.wait()
      with open(self.log) as f:
        tail = [l.strip() for l in f.read().strip().splitlines()[-3:]]
      self.error = f"exited {self.proc.returncode}: {' | '.join(tail)[-300:]}"
      return None
    return msg[key]

  def stop(self):
    if self.proc.poll() is None and self.ready is None:   # still compiling: it reads no stdin
      self.proc.kill()
    elif self.proc.poll() is None:
      try:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=10)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()


def _fmt(x, digits=3):
  return "" if x is None else f"{x:,.{digits}f}" if digits else f"{x:,.0f}"


def parent(args) -> None:
  start = time.time()
  deadline = start + args.budget_s
  names = [a for a in args.arms.split(",") if a]
  unknown = [a for a in names if a not in ARMS]
  if unknown or "baseline" not in names:
    sys.exit(f"Unknown arm {unknown[0]!r}; arms: {', '.join(ARMS)}." if unknown
             else "The arms must include 'baseline' (every arm is compared with it).")
  log_dir = args.log_dir or os.path.join(REPO, "benchmarks", "runs", "ab_decode")
  os.makedirs(log_dir, exist_ok=True)
  workers = [_Worker(ARMS[a], args, log_dir) for a in names]
  for w in workers:   # all compile at once; each reports when it is ready to be timed
    w.ready = w.wait("ready", deadline - 6 * (len(workers) + 1))   # ~5 s to time an arm
    print(f"[{time.time() - start:5.0f} s] {w.arm.name}: "
          f"{'ready ' + json.dumps(w.ready['compile_s']) if w.ready else w.error}", flush=True)
  order = [w for w in workers if w.ready] + [w for w in workers[:1] if w.ready]
  for w in order:     # one at a time: nothing else runs on the machine while an arm is timed
    if time.time() > deadline:
      w.error = w.error or "not timed: budget spent"
      break
    w.proc.stdin.write("time\n")
    w.proc.stdin.flush()
    t = w.wait("timed", deadline)
    if t is not None:
      w.timings.append(t)
    print(f"[{time.time() - start:5.0f} s] timed {w.arm.name}: {json.dumps(t)}", flush=True)
  for w in workers:
    w.stop()
  rows = _rows(workers)
  table = _table(rows)
  print(table)
  if args.results:
    _write_results(args, workers, table, time.time() - start, log_dir)
  with open(os.path.join(log_dir, "ab_decode.json"), "w") as f:
    json.dump({"args": vars(args), "arms": [{"arm": w.arm.name, "ready": w.ready,
                                             "timings": w.timings, "error": w.error}
                                            for w in workers]}, f, indent=1)


def _differ(w, ref, strategy: str) -> str | None:
  mine = (w.ready or {}).get("tokens", {}).get(strategy)
  theirs = (ref.ready or {}).get("tokens", {}).get(strategy) if ref else None
  if not (mine and theirs):
    return None
  diff = sum(a != b for a, b in zip(mine["rows"], theirs["rows"]))
  return "same" if diff == 0 else f"{diff} rows differ"


def _rows(workers):
  base = workers[0]
  ref = next((w for w in workers if w.arm.name == "fp32"), None)
  rows = []
  for w in workers:
    for i, t in enumerate(w.timings or [None]):
      name = w.arm.name + (" (again, last)" if i else "")
      row = {"arm": name, "prediction": w.arm.prediction, "error": w.error}
      for s in ("greedy", "beam"):
        row[s] = None if t is None or s not in t else t[s]
        row[s + "_same"] = _differ(w, base, s)
        row[s + "_ref"] = None if w is ref else _differ(w, ref, s)
      rows.append(row)
  return rows


def _table(rows) -> str:
  out = ["| arm | prediction | greedy ms/step | beam 4 ms/step | greedy new tok/s | "
         "beam 4 new tok/s | ms per new token, whole call | tokens vs baseline | "
         "tokens vs fp32 reference |",
         "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
  for r in rows:
    g, b = r["greedy"] or {}, r["beam"] or {}
    same, ref = (", ".join(f"{s} {r[s + key]}" for s in ("greedy", "beam") if r.get(s + key))
                 for key in ("_same", "_ref"))
    note = f" (failed: {r['error']})" if r["error"] else ""
    per_token = ", ".join(f"{s} {_fmt(t['total_ms'] / t['new_tokens'])}"
                          for s, t in (("greedy", g), ("beam", b)) if t.get("new_tokens"))
    out.append(f"| {r['arm']}{note} | {r['prediction']} | {_fmt(g.get('ms_step'))} | "
               f"{_fmt(b.get('ms_step'))} | {_fmt(g.get('tok_s'), 0)} | {_fmt(b.get('tok_s'), 0)} "
               f"| {per_token} | {same} | {ref} |")
  return "\n".join(out)


def _write_results(args, workers, table: str, wall_s: float, log_dir: str) -> None:
  info = next((w.ready for w in workers if w.ready), {}) or {}
  def _out(cmd, cwd=None) -> str:
    try:
      return subprocess.run(cmd, cwd=cwd, text=True, capture_output=True, check=False,
                            timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
      return ""
  commit = _out(["git", "rev-parse", "--short", "HEAD"], cwd=REPO)
  smi = _out(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
              "--format=csv,noheader"]).splitlines()
  versions = ""
  try:
    import importlib.metadata as md  # pylint: disable=import-outside-toplevel
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("jax", "jaxlib", "flax"))
  except Exception:  # pylint: disable=broad-except
    versions = f"jax {info.get('jax', '?')}"
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  flags = "; ".join(f"{w.arm.name}: `{w.arm.xla_flags or '(none)'}`" for w in workers)
  heading = (SECTION if args.batch == 64
             else SECTION.replace(" (issue", f" at batch {args.batch} (issue"))
  lines = [f"### Run of {now}", "",
           f"`python benchmarks/ab_decode.py{' --small' if args.small else ''} --arms {args.arms}` "
           f"in one device call, {now}, commit `{commit}`, {wall_s:.0f} s in all. Card: "
           f"{smi[0] if smi else info.get('device', '?')}. Versions: {versions}. "
           f"Workload: {args.batch} descriptions of {args.desc_len} tokens, {args.new_tokens} "
           f"new tokens each (EOS impossible), {'tiny' if args.small else 'base'} sizes, beams "
           f"{args.num_beams}, median of {args.repeats}. Arms compile concurrently and are timed "
           "one at a time; the baseline is timed again last as a drift check. Raw: "
           f"`{os.path.relpath(log_dir, REPO)}/`.", "", table, "",
           "What each arm is: " + "; ".join(f"**{w.arm.name}**: {w.arm.what}" for w in workers)
           + ".", "", f"XLA_FLAGS per arm: {flags}.", ""]
  section = "\n".join(lines)
  path = args.results
  text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
  if heading + "\n" in text:   # the newest run first, under the section's heading
    head, rest = text.split(heading + "\n", 1)
    text = head + heading + "\n\n" + section + rest
  else:
    section = heading + "\n\n" + section
    anchor = "\n## Retrieval-augmented generation"
    i = text.find(anchor)
    text = (text[:i + 1] + section + "\n" + text[i + 1:]) if i >= 0 else text + "\n" + section
  with open(path, "w") as f:
    f.write(text)
  print(f"wrote {heading!r} into {path}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of: {', '.join(ARMS)}")
  p.add_argument("--small", action="store_true", help="tiny model and sizes (a CPU smoke run)")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--desc-len", type=int, default=None)
  p.add_argument("--new-tokens", type=int, default=None)
  p.add_argument("--num-beams", type=int, default=4)
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--budget-s", type=float, default=160.0,
                 help="stop launching/timing arms after this many seconds")
  p.add_argument("--results", default=None,
                 help="markdown file for the section (default: benchmarks/RESULTS.md; "
                      "'' for none; --small writes none unless given)")
  p.add_argument("--log-dir", default="")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--arm", default="baseline", help=argparse.SUPPRESS)
  args = p.parse_args()
  small = dict(batch=4, desc_len=8, new_tokens=12, repeats=1)
  full = dict(batch=64, desc_len=64, new_tokens=256, repeats=5)
  for k, v in (small if args.small else full).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.results is None:
    args.results = "" if args.small else os.path.join(REPO, "benchmarks", "RESULTS.md")
  if args.worker:
    worker(args)
  else:
    parent(args)


if __name__ == "__main__":
  main()
