"""Multi-GPU scaling (issue 10): data parallel, FSDP and tensor parallel on N devices vs one.

  bash benchmarks/run_scaling.sh          # on a host with N GPUs: every part, then RESULTS.md
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python benchmarks/bench_scaling.py --workload tiny --devices 2    # on CPU (CI)

One process; each part is written to --out as soon as it ends, a failing run is recorded and the
next one goes on, and a part that would overrun --time-budget is skipped: a killed run still
leaves its data. The parts, in this order:
  losses      the first K full training steps (generation + InfoNCE) of BENCH-A at global batch
              64 on one device and on N with mesh fsdp=N, data=N, tensor=N: same seed, same
              batches; then each mesh's step is timed at that batch
  memory      (the same runs) per-device bytes of params and optimizer state on device 0, XLA's
              memory estimate of the step, and the device's peak so far (FSDP runs first, so
              its peak is its own; the peak is process-wide, hence also XLA's estimate)
  throughput  data parallel at a fixed per-device batch: 64 on one device vs 64N on N
  checkpoint  the FSDP state saved on N devices (checkpoint.py, as training/loop.py saves),
              restored on one device by a fresh process that sees one device: bitwise equal
  large       ALBERT-large sizes with configs/base.py's settings (bf16, cuDNN, no remat; depth
              scanned): batches doubled on one device until one runs out of memory, then that
              batch on N devices with FSDP (skipped with under 90 s of the budget left)
Tokens/s count description + code tokens of a pipelined run of steps (one sync at the end).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from flax_albert_code.model import albert as model_lib  # noqa: E402
from flax_albert_code.training import optim  # noqa: E402
from flax_albert_code.model import sharding  # noqa: E402
from flax_albert_code import config as config_lib  # noqa: E402
from flax_albert_code.training import step as train_step  # noqa: E402
import bench_model  # noqa: E402  (benchmarks/, beside this file)

WORKLOADS = {
    # name: per-device batch, loss steps, timed steps, the large part's model preset and batch
    # ladder, default time budget (s)
    "bench-a": dict(batch=64, loss_steps=20, timed_steps=20, large="large",
                    ladder=(128, 256, 512, 1024), budget=400),
    "tiny": dict(batch=8, loss_steps=20, timed_steps=3, large="tiny", ladder=(8,), budget=600),
}
# Loss agreement across meshes, relative, by compute dtype. bf16 keeps 8 significant bits (a
# rounding of 2^-9 = 2e-3 relative); another mesh sums matmuls and reductions in another order
# and split, which moves bf16 activations by an ulp or so, and the loss by a few: 2e-2 allows ~5
# ulps. fp32 (the CPU run): sums in another order, ~1e-6 measured; 1e-4. A real sharding bug
# moves a component by more: e.g. InfoNCE over per-device negatives (32 instead of 64) would
# change infonce_loss by ln 2 / ln 64 = 17%.
RTOL = {"bfloat16": 2e-2, "float32": 1e-4}
COMPARED = ("loss", "gen_loss", "infonce_loss")
RECORDED = COMPARED + ("grad_norm",)
# The tiny workload is a smoke run (CI, CPU): XLA compiles it ~2x faster without its backend
# optimisations (tests/model/test_albert.py); set before the first jax call creates the backend.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MESHES = ("fsdp", "data", "tensor")   # N-device meshes, in the order they run
START = time.perf_counter()


def log(msg: str) -> None:
  print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def write_json(res: dict, path: str | None) -> None:
  if path:
    with open(path + ".tmp", "w") as f:
      json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)


def large_config(base, preset: str):
  """The workload's config (configs/base.py: bf16, cuDNN, no remat) at the sizes of `preset`,
  depth scanned (compile time flat in depth)."""
  c = base.copy_and_resolve_references()
  c.model.update(config_lib.MODEL_PRESETS[preset])
  c.model.preset, c.model.scan_layers = preset, True
  return c


def bytes_on(tree, device) -> int:
  """Bytes of the shards of `tree` that live on `device`."""
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


def abstract_bytes_per_device(c, devices, axes: dict) -> int:
  """Per-device bytes of the whole train state under a mesh, from shapes alone (nothing
  allocated)."""
  c = mesh_config(c, axes)
  mesh = sharding.make_mesh(c.mesh, devices)
  model, _ = model_lib.build(c)
  abstract, _ = train_step.abstract_state(model, optim.make(c.train), c, mesh)
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract))


def memory_stats(device) -> dict:
  stats = device.memory_stats() or {}
  return {k: stats.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def xla_memory(compiled) -> dict | None:
  """XLA's per-device buffer sizes of the compiled step (arguments + outputs - donated + temp)."""
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    return dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes, total=total)
  except Exception as e:  # not every backend has it
    return {"error": f"{type(e).__name__}: {e}"}


def state_hashes(tree) -> dict[str, str]:
  """dtype, shape and sha256 of every array, by its path: equal hashes = bitwise equal."""
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {jax.tree_util.keystr(p): f"{x.dtype}{list(x.shape)}:"
          f"{hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()}" for p, x in flat}


def is_oom(message: str) -> bool:
  return "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()


def mesh_config(c, axes: dict, batch: int | None = None):
  c = c.copy_and_resolve_references()
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.mesh.update(axes)
  c.train.stage, c.train.align_losses = "joint", "infonce"   # the full step
  if batch:
    c.train.batch_size = batch
  return c


def run_mesh(c, devices, axes: dict, batch: int, *, loss_steps: int = 0, warmup: int = 2,
             timed_steps: int = 0, save_to: str | None = None) -> dict:
  """Train `loss_steps` steps on fixed random batches recording their metrics, then time
  `timed_steps` more; optionally checkpoint the state. Sizes and memory of device 0."""
  c = mesh_config(c, axes, batch)
  mesh = sharding.make_mesh(c.mesh, devices)
  if batch % sharding.batch_divisor(mesh):
    raise ValueError(f"batch {batch} is not a multiple of data x fsdp = "
                     f"{sharding.batch_divisor(mesh)}")
  dev0 = mesh.devices.flat[0]
  model, _ = model_lib.build(c)
  tx = optim.make(c.train)
  state, shardings = train_step.create_state(model, tx, c, mesh, jax.random.PRNGKey(c.seed))
  r = dict(mesh={a: int(mesh.shape[a]) for a in sharding.MESH_AXES}, devices=len(devices),
           batch=batch, per_device_batch=batch // sharding.batch_divisor(mesh),
           params_bytes=bytes_on(state.params, dev0), opt_bytes=bytes_on(state.opt_state, dev0),
           state_bytes_total=sum(x.nbytes for x in jax.tree.leaves(state)),
           after_init=memory_stats(dev0))
  rng = np.random.RandomState(0)
  bsh = sharding.batch_sharding(mesh)
  batches = [jax.device_put(bench_model.random_batch(c, rng, batch), bsh)
             for _ in range(max(loss_steps, 2))]
  with jax.set_mesh(mesh):
    train_fn, _ = train_step.jit_steps(model, tx, c, mesh, shardings)
    t0 = time.perf_counter()
    compiled = train_fn.lower(state, batches[0]).compile()
    r["compile_s"] = time.perf_counter() - t0
    r["xla_memory"] = xla_memory(compiled)
    history = []
    for i in range(loss_steps):
      state, m = compiled(state, batches[i])
      m = jax.device_get(m)
      history.append({k: float(m[k]) for k in RECORDED if k in m})
    r["history"] = history
    if timed_steps:
      for i in range(warmup):
        state, m = compiled(state, batches[i % len(batches)])
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      for i in range(timed_steps):
        state, m = compiled(state, batches[i % len(batches)])
      jax.block_until_ready((state, m))
      step_s = (time.perf_counter() - t0) / timed_steps
      r.update(step_ms=step_s * 1e3, timed_steps=timed_steps,
               tokens_per_s=batch * (c.data.max_desc_len + c.data.max_code_len) / step_s,
               last_loss=float(m["loss"]))
  r["after_steps"] = memory_stats(dev0)
  if save_to:
    try:
      r["checkpoint"] = save_checkpoint(state, c, save_to)
    except Exception as e:  # the run's measurements stand without it
      r["checkpoint"] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
  return r


def save_checkpoint(state, c, workdir: str) -> dict:
  """Save as training/loop.py does (no data iterator here) and keep the state's hashes beside it."""
  from flax_albert_code.training import checkpoint   # orbax and grain: only this part needs them
  t0 = time.perf_counter()
  ckpt = checkpoint.Checkpointer(workdir, keep=1, async_save=True)
  step = int(state.step)
  ckpt.save(step, state, None, c, force=True)
  ckpt.close()
  hashes = state_hashes(state)
  with open(os.path.join(workdir, "saved_hashes.json"), "w") as f:
    json.dump(hashes, f)
  shards = {len(x.sharding.device_set) for x in jax.tree.leaves(state)}
  return dict(workdir=workdir, step=step, arrays=len(hashes), save_s=time.perf_counter() - t0,
              devices_per_array=sorted(shards))


def restore_check(workdir: str, devices=None) -> dict:
  """Restore the checkpoint in `workdir` onto a one-device mesh, as training/loop.py restores, and
  compare every array with the hashes taken when it was saved."""
  from flax_albert_code.training import checkpoint
  devices = list(devices or jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  config = ckpt.saved_config()
  config.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(config.mesh, devices)
  model, _ = model_lib.build(config)
  abstract, _ = train_step.abstract_state(model, optim.make(config.train), config, mesh)
  state, step = ckpt.restore(abstract)
  ckpt.close()
  with open(os.path.join(workdir, "saved_hashes.json")) as f:
    want = json.load(f)
  got = state_hashes(state)
  bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  return dict(step=step, visible_devices=jax.device_count(), platform=devices[0].platform,
              devices_per_array=sorted({len(x.sharding.device_set)
                                        for x in jax.tree.leaves(state)}),
              arrays=len(got), mismatched=bad[:5], bitwise_equal=not bad)


def restore_in_subprocess(workdir: str, platform: str) -> dict:
  """restore_check in a fresh process that sees one device (one GPU, or one fake CPU device)."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # this process holds the GPUs
  if platform == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=1".strip()
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--restore", workdir],
                        env=env, capture_output=True, text=True, timeout=120)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    raise RuntimeError(f"the restoring process exited {proc.returncode}: {proc.stderr[-1500:]}")
  return json.loads(lines[-1])


def compare_losses(runs: dict, dtype: str) -> dict:
  """Max abs / rel difference of each recorded metric vs the one-device run, step by step."""
  ref = runs.get("single", {}).get("history")
  rtol = RTOL.get(dtype, 2e-2)
  out = {"rtol": rtol, "compared": list(COMPARED)}
  if not ref:
    return out
  for name in MESHES:
    hist = runs.get(name, {}).get("history")
    if not hist:
      continue
    d = {}
    for k in RECORDED:
      a = np.array([h[k] for h in ref if k in h])
      b = np.array([h[k] for h in hist if k in h])
      if len(a) and len(a) == len(b):
        diff = np.abs(a - b)
        d[k] = dict(max_abs=float(diff.max()), max_rel=float((diff / np.abs(a)).max()))
    d["ok"] = all(d[k]["max_rel"] <= rtol for k in COMPARED if k in d)
    out[name] = d
  return out


class Budget:
  def __init__(self, seconds: float):
    self.end = START + seconds

  def left(self) -> float:
    return self.end - time.perf_counter()


def guarded(res: dict, key: str, out: str | None, fn, *args, **kw):
  """res[key] = fn(...), or the error; all results so far written to `out` either way."""
  t0 = time.perf_counter()
  try:
    res[key] = fn(*args, **kw)
    log(f"{key}: done in {time.perf_counter() - t0:.1f} s")
  except Exception as e:  # one failing run must not lose the others
    res[key] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
    log(f"{key}: FAILED ({type(e).__name__}: {str(e)[:300]})")
  gc.collect()
  write_json(_ROOT, out)
  return res[key]


_ROOT: dict = {}   # every result of this run, written after each run and part


def guarded_run(res: dict, key: str, out: str | None, c, devices, *args, **kw) -> dict:
  """guarded run_mesh; if it fails with cuDNN attention on several devices (cuDNN attention's
  partitioning has had bugs: jax issue 25986), once more with XLA's, marked so."""
  r = guarded(res, key, out, run_mesh, c, devices, *args, **kw)
  if ("error" in r and not is_oom(r["error"]) and c.model.attention_impl == "cudnn"
      and len(devices) > 1):
    log(f"  {key}: once more with XLA attention")
    first = r["error"]
    c = c.copy_and_resolve_references()
    c.model.attention_impl = "xla"
    r = guarded(res, key, out, run_mesh, c, devices, *args, **kw)
    r.update(attention_impl="xla", cudnn_error=first)
    write_json(_ROOT, out)
  return r


def part_losses(c, devices, w, workdir, out) -> dict:
  """One device and each N-device mesh at the same global batch: losses, memory, speed."""
  n = len(devices)
  runs = _ROOT.setdefault("runs", {})
  plan = [(axis, devices, {axis: n}) for axis in MESHES] + [("single", devices[:1], {})]
  for name, devs, axes in plan:
    log(f"run {name}: mesh {axes or {'data': 1}} on {len(devs)} device(s), batch {w['batch']}")
    r = guarded_run(runs, name, out, c, devs, axes, w["batch"], loss_steps=w["loss_steps"],
                    timed_steps=w["timed_steps"], save_to=workdir if name == "fsdp" else None)
    if "tokens_per_s" in r:
      log(f"  {r['tokens_per_s']:,.0f} tok/s, step {r['step_ms']:.1f} ms, compile "
          f"{r['compile_s']:.1f} s, losses {r['history'][0]['loss']:.4f} -> "
          f"{r['history'][-1]['loss']:.4f}, state on device 0 "
          f"{(r['params_bytes'] + r['opt_bytes']) / 2**20:.1f} MiB")
  cmp = compare_losses(runs, c.model.dtype)
  for name in MESHES:
    if name in cmp:
      log(f"  {name} vs one device: " + ", ".join(
          f"{k} max rel {cmp[name][k]['max_rel']:.2e}" for k in COMPARED if k in cmp[name])
          + f" -> {'OK' if cmp[name]['ok'] else 'OUTSIDE'} rtol {cmp['rtol']}")
  return cmp


def part_throughput(c, devices, w, out) -> dict:
  n = len(devices)
  runs = _ROOT.setdefault("runs", {})
  log(f"run data_scaled: mesh data={n}, batch {w['batch'] * n} ({w['batch']} per device)")
  r = guarded_run(runs, "data_scaled", out, c, devices, {"data": n}, w["batch"] * n,
                  timed_steps=w["timed_steps"])
  one = runs.get("single", {})
  res = {"devices": n}
  if "tokens_per_s" in r and "tokens_per_s" in one:
    res.update(one_device_tokens_per_s=one["tokens_per_s"], tokens_per_s=r["tokens_per_s"],
               efficiency=r["tokens_per_s"] / (n * one["tokens_per_s"]))
    log(f"  data parallel x{n}: {r['tokens_per_s']:,.0f} tok/s vs {one['tokens_per_s']:,.0f} on "
        f"one device: scaling efficiency {res['efficiency']:.1%}")
  return res


def part_checkpoint(workdir: str, platform: str) -> dict:
  res = {"saved": _ROOT.get("runs", {}).get("fsdp", {}).get("checkpoint")}
  if not res["saved"] or "error" in res["saved"]:
    raise RuntimeError(f"the FSDP run saved no checkpoint ({res['saved']})")
  for key, fn in (("subprocess", lambda: restore_in_subprocess(workdir, platform)),
                  ("in_process", lambda: restore_check(workdir, jax.devices()[:1]))):
    try:
      res[key] = fn()
      log(f"  restore on one device ({key}): bitwise equal = {res[key]['bitwise_equal']} "
          f"({res[key]['arrays']} arrays, step {res[key]['step']})")
    except Exception as e:
      res[key] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
      log(f"  restore ({key}) FAILED: {res[key]['error'][:300]}")
  return res


def part_large(base, devices, w, budget: Budget, out) -> dict:
  """Double the batch on one device until it runs out of memory (or time), then run the
  smallest batch that did not fit on N devices with FSDP."""
  n = len(devices)
  c = large_config(base, w["large"])
  res = _ROOT["large"] = {"ladder": {}, "model": {
      k: c.model[k] for k in ("preset", "dtype", "attention_impl", "remat", "scan_layers")}}
  res["state_bytes_per_device"] = {
      name: abstract_bytes_per_device(c, devices[:1] if name == "single" else devices, axes)
      for name, axes in (("single", {}), ("data", {"data": n}), ("fsdp", {"fsdp": n}))}
  # Seconds for a run at batch b, from the last rung's (a guess before the first: the scanned
  # large step compiles in ~20 s on an H100 host).
  cost = lambda prev, b: (prev["compile_s"] + 2 * prev["step_ms"] / 1e3 * b / prev["batch"]
                          if prev else 45.0)
  prev, oom_at = None, None
  for b in w["ladder"]:
    if budget.left() < 2 * cost(prev, b) + 15:
      res["stopped"] = f"time: {budget.left():.0f} s left before batch {b}"
      log(f"  large: {res['stopped']}")
      break
    log(f"run large_single: batch {b} on one device")
    try:
      r = run_mesh(c, devices[:1], {}, b, warmup=0, timed_steps=1)
      res["ladder"][b] = dict(ok=True, tokens_per_s=r["tokens_per_s"], step_ms=r["step_ms"],
                              compile_s=r["compile_s"], peak=r["after_steps"]["peak_bytes_in_use"],
                              xla_memory=r["xla_memory"])
      prev = dict(r, batch=b)
      log(f"  fits: {r['tokens_per_s']:,.0f} tok/s, step {r['step_ms']:.0f} ms")
    except Exception as e:
      msg = f"{type(e).__name__}: {str(e)[:600]}"
      res["ladder"][b] = dict(ok=False, oom=is_oom(msg), error=msg)
      log(f"  batch {b} on one device: {'OUT OF MEMORY' if is_oom(msg) else msg[:300]}")
      if is_oom(msg):
        oom_at = b
      break
    finally:
      gc.collect()
      write_json(_ROOT, out)
  fitted = [b for b, r in res["ladder"].items() if r["ok"]]
  batch = oom_at or (2 * max(fitted) if fitted else None)
  if batch is None or n < 2:
    return res
  res["fsdp_batch_exceeds_one_device"] = oom_at is not None
  if budget.left() < cost(prev, batch // n) + 10:
    res["fsdp"] = {"skipped": f"time: {budget.left():.0f} s left"}
    return res
  log(f"run large_fsdp: batch {batch} on {n} devices (fsdp={n})")
  r = guarded_run(res, "fsdp", out, c, devices, {"fsdp": n}, batch, warmup=1, timed_steps=2)
  if "tokens_per_s" in r:
    log(f"  {r['tokens_per_s']:,.0f} tok/s, step {r['step_ms']:.0f} ms")
  return res


def run_all(args) -> dict:
  w = dict(WORKLOADS[args.workload])
  budget = Budget(args.time_budget or w["budget"])
  c = bench_model.make_config(args.workload, args.set)
  devices = jax.devices()[:args.devices or jax.device_count()]
  if len(devices) < 2:
    raise SystemExit(f"needs at least 2 devices, {len(devices)} visible; on CPU set XLA_FLAGS="
                     "--xla_force_host_platform_device_count=8.")
  parts = set(args.parts.split(","))
  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_scaling_")
  _ROOT.update(versions=bench_model.versions(), workload=args.workload, overrides=args.set,
               devices=len(devices), budget_s=args.time_budget or w["budget"],
               model={k: c.model[k] for k in ("preset", "dtype", "attention_impl", "scan_layers",
                                              "remat")},
               shapes=dict(batch_per_device=w["batch"], desc=c.data.max_desc_len,
                           code=c.data.max_code_len, loss_steps=w["loss_steps"]),
               skipped={})
  log(f"{len(devices)} x {devices[0].device_kind}, workload {args.workload}, "
      f"budget {budget.left():.0f} s")
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))   # `timeout`: clean up, keep the JSON
  try:
    if "losses" in parts:
      guarded(_ROOT, "losses", args.out, part_losses, c, devices, w, workdir, args.out)
    for part, need, fn in (
        ("throughput", 45, lambda: part_throughput(c, devices, w, args.out)),
        ("checkpoint", 30, lambda: part_checkpoint(workdir, devices[0].platform)),
        ("large", 90, lambda: part_large(c, devices, w, budget, args.out))):
      if part not in parts:
        continue
      if budget.left() < need:
        _ROOT["skipped"][part] = f"{budget.left():.0f} s of the budget left, {need} s needed"
        log(f"{part}: skipped ({_ROOT['skipped'][part]})")
        write_json(_ROOT, args.out)
        continue
      log(f"part {part} ({budget.left():.0f} s left)")
      guarded(_ROOT, part, args.out, fn)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  _ROOT["wall_s"] = time.perf_counter() - START
  write_json(_ROOT, args.out)
  return _ROOT


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workload", default="bench-a", choices=sorted(WORKLOADS))
  ap.add_argument("--devices", type=int, default=0, help="N (default: every visible device)")
  ap.add_argument("--parts", default="losses,throughput,checkpoint,large")
  ap.add_argument("--time-budget", type=float, default=0,
                  help="seconds from the start; parts that would overrun it are skipped "
                       "(default: bench-a 400, tiny 600)")
  ap.add_argument("--out", default=None, help="write the results as JSON here (after each part)")
  ap.add_argument("--workdir", default=None, help="checkpoint directory (default: a temporary one)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override, e.g. model.dtype=float32")
  ap.add_argument("--restore", default=None, metavar="WORKDIR", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.restore:   # the one-device process of the checkpoint part
    print(json.dumps(restore_check(args.restore)), flush=True)
    return
  if args.workload == "tiny" and "xla_backend_optimization_level" not in os.environ.get(
      "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
  res = run_all(args)
  log(f"done; skipped: {res['skipped'] or 'nothing'}" + (f"; results in {args.out}"
                                                         if args.out else ""))


if __name__ == "__main__":
  main()
