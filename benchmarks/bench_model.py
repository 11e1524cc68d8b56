"""BENCH-A (../shared/BENCH.md): training step and generation speed of our model.

  python benchmarks/bench_model.py --mode all                    # on a GPU: BENCH-A
  python benchmarks/bench_model.py --mode all --workload tiny    # on CPU (CI): a tiny smoke run
  python benchmarks/bench_model.py --mode generate --set sample.decode_phase=0   # A/B a switch

`--set` values are JSON for non-string fields (`model.fused_qkv=false`, not `False`).

Random weights, random token data (never zeros), warm-up first, device synchronised around the
timed region. FLOPs are counted by formula (metrics.py): XLA's cost analysis counts the scanned
shared block once. Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # gpu_kernels.py
from flax_albert_code import config as config_lib  # noqa: E402
from flax_albert_code.training import metrics  # noqa: E402
from flax_albert_code.model import albert as model_lib  # noqa: E402
from flax_albert_code.training import optim  # noqa: E402
from flax_albert_code.model import sharding  # noqa: E402
from flax_albert_code.inference import model_decoding  # noqa: E402
from flax_albert_code.inference.generator import inference_params  # noqa: E402
from flax_albert_code.training import step as train_step  # noqa: E402
from flax_albert_code.config import EOS_ID  # noqa: E402

WORKLOADS = {
    # name: (preset, batch, desc_len, code_len, timed steps, timed generations)
    "bench-a": ("base", 64, 64, 256, 20, 3),
    "tiny": ("tiny", 8, 16, 32, 3, 1),
}


def make_config(workload: str, overrides: list[str]):
  """configs/base.py (what users train) at BENCH-A shapes, or the tiny preset for CI."""
  preset, batch, ld, lc, _, _ = WORKLOADS[workload]
  if workload == "bench-a":
    c = config_lib.load_config("base")
    c.model.vocab_size = 32000
  else:
    c = config_lib.get_config(preset)
  c.train.batch_size = batch
  c.data.max_desc_len, c.data.max_code_len, c.data.code_buckets = ld, lc, (lc,)
  c.mesh.data = -1
  for o in overrides:
    key, value = o.split("=", 1)
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(json.loads(value)) if not isinstance(node[leaf], str) else value
  return c


def random_batch(c, rng: np.random.RandomState, batch: int | None = None):
  b = batch or c.train.batch_size
  v = c.model.vocab_size
  return {"desc_ids": rng.randint(6, v, (b, c.data.max_desc_len)).astype(np.int32),
          "code_ids": rng.randint(6, v, (b, c.data.max_code_len)).astype(np.int32)}


def _sync(tree):
  jax.block_until_ready(tree)


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _train_setup(c, align: bool, num_batches: int):
  """(config, model config, mesh, state, jitted train step, device batches) for one step kind:
  the generation step alone, or the full step with InfoNCE."""
  c = c.copy_and_resolve_references()
  c.train.stage = "joint" if align else "finetune"
  c.train.align_losses = "infonce" if align else ""
  mesh = sharding.make_mesh(c.mesh)
  model, mc = model_lib.build(c)
  tx = optim.make(c.train)
  state, shardings = train_step.create_state(model, tx, c, mesh, jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  batches = [jax.device_put(random_batch(c, rng), sharding.batch_sharding(mesh))
             for _ in range(num_batches)]
  with jax.set_mesh(mesh):
    train_fn, _ = train_step.jit_steps(model, tx, c, mesh, shardings)
  return c, mc, mesh, state, train_fn, batches


def bench_train(c, *, align: bool, steps: int, warmup: int = 3) -> dict:
  c, mc, mesh, state, train_fn, batches = _train_setup(c, align, 4)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = train_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
      state, m = compiled(state, batches[i % 4])
    _sync(state)
    times = []
    for i in range(steps):
      t0 = time.perf_counter()
      state, m = compiled(state, batches[i % 4])
      _sync(m)
      times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(steps):
      state, m = compiled(state, batches[i % 4])
    _sync(state)
    pipelined = (time.perf_counter() - t0) / steps
  b, ld, lc = c.train.batch_size, c.data.max_desc_len, c.data.max_code_len
  flops = b * metrics.train_flops_per_example(mc, ld, lc, generation=True, align=align)
  step_s = min(statistics.median(times), pipelined)
  peak = metrics.peak_flops_per_device()
  return dict(step_ms=step_s * 1e3, step_ms_synced_median=statistics.median(times) * 1e3,
              tokens_per_s=b * (ld + lc) / step_s, model_tflops=flops / step_s / 1e12,
              mfu=(flops / step_s / (peak * jax.device_count())) if peak else None,
              flops_per_step=flops, compile_s=compile_s, peak_bytes=_peak_bytes(),
              loss=float(m["loss"]), params=model_lib.param_count(state.params["model"]))


def profile_train(c, out_dir: str, *, align: bool, steps: int = 3) -> list[tuple[str, float]]:
  """Trace a few steps (perfetto JSON); GPU kernel ms per step by kernel name, largest first."""
  import gpu_kernels   # this directory
  _, _, mesh, state, train_fn, (batch,) = _train_setup(c, align, 1)
  with jax.set_mesh(mesh):
    for _ in range(3):
      state, m = train_fn(state, batch)
    _sync(state)
    jax.profiler.start_trace(out_dir, create_perfetto_trace=True)
    for _ in range(steps):
      state, m = train_fn(state, batch)
    _sync(state)
    jax.profiler.stop_trace()
  totals, counts = gpu_kernels.from_trace(out_dir)
  gpu_kernels.print_table(totals, counts, per=steps)
  return sorted(((k, v / steps) for k, v in totals.items()), key=lambda kv: -kv[1])


def bench_generate(c, *, strategy: str, num_beams: int, reps: int) -> dict:
  model, mc = model_lib.build(c)
  ld, lc, b = c.data.max_desc_len, c.data.max_code_len, c.train.batch_size
  rng = np.random.RandomState(1)
  desc = jnp.asarray(rng.randint(6, mc.vocab_size, (b, ld)).astype(np.int32))
  # The weights as CodeGenerator (what users call) holds them: matrices in the compute dtype.
  params = inference_params(jax.jit(model.init)(jax.random.PRNGKey(0), desc[:2], desc[:2]),
                            mc.compute_dtype)
  # "EOS ignored": the benchmark bans EOS so every sequence decodes exactly `lc` new tokens.
  bias = params["params"]["decoder"]["logits_bias"]
  params["params"]["decoder"]["logits_bias"] = bias.at[EOS_ID].set(-1e9)
  kw = dict(strategy=strategy, max_new_tokens=lc, num_beams=num_beams,
            decode_phase=c.sample.decode_phase)
  t0 = time.perf_counter()
  tokens, scores = model_decoding.generate(model, params, desc, **kw)
  _sync(tokens)
  first_s = time.perf_counter() - t0
  times = []
  for r in range(reps):
    t0 = time.perf_counter()
    tokens, scores = model_decoding.generate(model, params, desc, rng=r, **kw)
    _sync(tokens)
    times.append(time.perf_counter() - t0)
  tokens = np.asarray(tokens)
  new = int((tokens[:, 0] != 0).sum(-1).mean())
  dt = statistics.median(times)
  return dict(gen_s=dt, new_tokens=new, tokens_per_s=b * new / dt, ms_per_step=dt / lc * 1e3,
              compile_and_first_s=first_s, peak_bytes=_peak_bytes())


def max_batch(c, sizes=(128, 256, 512, 1024)) -> dict:
  fits = {}
  for bs in sizes:
    c2 = c.copy_and_resolve_references()
    c2.train.batch_size = bs
    try:
      r = bench_train(c2, align=True, steps=2, warmup=1)
      fits[bs] = dict(ok=True, tokens_per_s=r["tokens_per_s"], peak_bytes=r["peak_bytes"])
    except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED
      fits[bs] = dict(ok=False, error=f"{type(e).__name__}: {str(e)[:120]}")
      break
  return fits


def versions() -> dict:
  import flax
  import optax
  dev = jax.devices()[0]
  return dict(jax=jax.__version__, flax=flax.__version__, optax=optax.__version__,
              device=dev.device_kind, platform=dev.platform, devices=jax.device_count(),
              date=time.strftime("%Y-%m-%d"))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--mode", default="all",
                  choices=["all", "train", "gen_step", "generate", "maxbatch"])
  ap.add_argument("--workload", default="bench-a", choices=sorted(WORKLOADS))
  ap.add_argument("--out", default=None, help="write the results as JSON here")
  ap.add_argument("--profile", default=None, metavar="DIR",
                  help="also trace the generation step and print GPU time by kernel")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override, e.g. model.attention_impl=xla, model.fused_qkv=false, "
                       "sample.decode_phase=0, train.logits_dtype=bfloat16")
  ap.add_argument("--max-batch", default="128,256,512,1024",
                  help="batch sizes the largest-batch search tries, in order, until one fails")
  args = ap.parse_args()
  c = make_config(args.workload, args.set)
  _, _, _, _, steps, reps = WORKLOADS[args.workload]
  res = {"versions": versions(), "workload": args.workload, "overrides": args.set}
  rows = []
  if args.mode in ("all", "train", "gen_step"):
    variants = (("train_generation_step", False), ("train_full_step", True))
    for name, align in variants[:1] if args.mode == "gen_step" else variants:
      r = res[name] = bench_train(c, align=align, steps=steps)
      rows.append((name, f"{r['tokens_per_s']:,.0f} tok/s", f"{r['step_ms']:.2f} ms",
                   f"{r['model_tflops']:.1f} TFLOP/s",
                   f"MFU {r['mfu']:.1%}" if r["mfu"] else "MFU n/a",
                   f"compile {r['compile_s']:.1f} s",
                   f"peak {r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] else ""))
      print(json.dumps({name: r}), flush=True)
  if args.profile:
    res["profile_generation_step_ms"] = profile_train(c, args.profile, align=False)
  if args.mode in ("all", "generate"):
    for name, strategy, beams in (("generate_greedy", "greedy", 1), ("generate_beam4", "beam", 4)):
      r = res[name] = bench_generate(c, strategy=strategy, num_beams=beams, reps=reps)
      rows.append((name, f"{r['tokens_per_s']:,.0f} new tok/s", f"{r['ms_per_step']:.3f} ms/step",
                   f"first call {r['compile_and_first_s']:.1f} s", "", "", ""))
      print(json.dumps({name: r}), flush=True)
  if args.mode in ("all", "maxbatch") and args.workload == "bench-a":
    res["max_batch"] = max_batch(c, [int(b) for b in args.max_batch.split(",") if b.strip()])
    print(json.dumps({"max_batch": res["max_batch"]}), flush=True)
  print()
  for row in rows:
    print(" | ".join(f"{x:>22}" for x in row))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
