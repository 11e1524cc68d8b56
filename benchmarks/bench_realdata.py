"""Real-data training throughput (issue 21): the train step on the batches users feed it.

  python3 benchmarks/bench_realdata.py --config configs/quality.py --data DIR --steps 50 \\
      --out realdata.json [--config.train.batch_size=64 ...]

DIR is prepared data (`python -m flax_albert_code.prepare`, or a training workdir, whose data/ it
finds). The batches are the Trainer's: `data/pipeline.make_iterator` over the train split
(shuffled, length-bucketed, padded to each bucket), with the retrieval context when the config
has retrieval (config.retrieval.k > 0). Its neighbours are the newest saved under
--neighbours (a training workdir, default DIR itself: <workdir>/retrieval/neighbours_*.npz), else
BM25 neighbours mined now for the batches this run uses (as the Trainer mines them before
step 0). The state is freshly initialised (the speed does not depend on the weights); the
step is `training/step.py`'s jitted train step, its programs for every code bucket compiled
ahead (`step.precompile`, as configs/quality.py's train.precompile does), then --warmup steps
untimed and --steps timed the way the Trainer runs them: the next batch is read and sent while
the device works, and a step's metrics are fetched after the next step is dispatched.

Reported: tokens fed per second (description + code + context, padding included) and useful
(non-padding) tokens per second; the padding fraction of each field and overall; step time per
code bucket (the interval between consecutive steps' completions, which is the device's time
per step while the input keeps up); time waiting for the input pipeline; model TFLOP/s and MFU
with FLOPs counted by formula (training/metrics.py; XLA's cost analysis counts a loop body
once): encoder over descriptions, encoder over the context, decoder attending to it, and the
code encoder when the config aligns.

Prints a table, writes JSON (--out) and the "## Real-data training throughput (issue 21)"
section of --results (default benchmarks/RESULTS.md; '' for none).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flax_albert_code import config as config_lib  # noqa: E402
from bench_serving import card, replace_section, versions  # noqa: E402

HEADING = "## Real-data training throughput (issue 21)"
FIELDS = ("desc_ids", "code_ids", "ctx_ids")

def _define_flags() -> None:
  """The command's flags, defined when it runs (not on import: a test imports this module next to
  the package's commands, which define --config too)."""
  global _CONFIG, _DATA, _NEIGHBOURS, _STEPS, _WARMUP, _OUT, _RESULTS
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(config_lib.CONFIG_DIR, "quality.py"),
      "Config file, or the name of a shipped one (quality, default, tiny, ...).", lock_config=False)
  _DATA = flags.DEFINE_string("data", None, "prepared data: its directory, a data dir or a workdir")
  _NEIGHBOURS = flags.DEFINE_string(
      "neighbours", None, "training workdir whose retrieval/neighbours_*.npz to use (default: "
      "--data; mined with BM25 when none are saved)")
  _STEPS = flags.DEFINE_integer("steps", 50, "timed steps")
  _WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps after compiling")
  _OUT = flags.DEFINE_string("out", "", "write the results as JSON here")
  _RESULTS = flags.DEFINE_string("results", os.path.join(REPO, "benchmarks", "RESULTS.md"),
                                 "RESULTS.md whose section to write ('' for none)")


# ---------------------------------------------------------------------------------------------
# Data.


def neighbours_for(config, prepared, rows: np.ndarray, workdir: str | None):
  """The newest neighbours saved under `workdir`, else BM25 ones mined for train `rows`."""
  # pylint: disable=import-outside-toplevel
  from flax_albert_code.retrieval import neighbours as neighbours_lib
  from flax_albert_code.retrieval import retriever as retriever_lib
  k = int(config.retrieval.k)
  if workdir:
    nb = neighbours_lib.load(workdir, 10**9, prepared, k)
    if nb is not None:
      return nb, f"saved ({nb.method}, step {nb.step}) in {neighbours_lib.directory(workdir)}"
  t0 = time.perf_counter()
  descs, codes, paths = neighbours_lib.texts(prepared, "train")
  retriever = retriever_lib.Retriever(codes, None, groups=paths,
                                  keys=[retriever_lib.key_text(d, c) for d, c in zip(descs, codes)])
  ids = np.full((len(codes), k), -1, np.int64)
  scores = np.full((len(codes), k), -np.inf, np.float32)
  ids[rows], scores[rows] = retriever.search([descs[i] for i in rows], k, method="bm25",
                                             exclude=[paths[i] for i in rows])
  nb = neighbours_lib.Neighbours({"train": ids}, {"train": scores}, "bm25", 0)
  return nb, (f"BM25, mined now for the {len(rows)} examples used "
              f"({time.perf_counter() - t0:.1f} s)")


# ---------------------------------------------------------------------------------------------
# The run.


def run(config, data: str, steps: int, warmup: int, neighbours_dir: str | None) -> dict:
  """The timed run and its figures."""
  # pylint: disable=import-outside-toplevel
  import jax
  from flax_albert_code.data import pipeline
  from flax_albert_code.data.prepared import load_prepared
  from flax_albert_code.model import albert as model_lib
  from flax_albert_code.model import sharding
  from flax_albert_code.training import metrics
  from flax_albert_code.training import optim
  from flax_albert_code.training import step as train_step

  t_start = time.perf_counter()
  prepared = load_prepared(data)
  config.model.vocab_size = prepared.tokenizer.vocab_size      # as the Trainer sets it
  config_lib.validate(config)
  tc, d = config.train, config.data
  B = int(tc.batch_size)
  gen, align = train_step.objectives(tc)
  k = train_step.retrieval_k(config)
  buckets = tuple(sorted(b for b in d.code_buckets if b <= d.max_code_len)) or (d.max_code_len,)
  total = warmup + steps
  nb, nb_note = None, "none (the config has no retrieval)"
  if k:
    plain = pipeline.make_dataset(config, prepared, "train", B, shuffle=True, num_epochs=None)
    rows = np.unique(np.concatenate([plain[i]["index"] for i in range(total)]))
    nb, nb_note = neighbours_for(config, prepared, rows[rows >= 0], neighbours_dir or data)
  it = pipeline.make_iterator(config, prepared, "train", B, shuffle=True, num_epochs=None,
                              neighbours=nb)

  mesh = sharding.make_mesh(config.mesh)
  model, mc = model_lib.build(config)
  tx = optim.make(tc)
  state, shardings = train_step.create_state(model, tx, config, mesh,
                                             jax.random.PRNGKey(config.seed))
  batch_sharding = sharding.batch_sharding(mesh)
  widths = {"desc_ids": int(d.max_desc_len), "code_ids": int(buckets[-1]),
            "ctx_ids": int(config.retrieval.max_ctx_len)}
  setup_s = time.perf_counter() - t_start
  with jax.set_mesh(mesh):
    train_fn, _ = train_step.jit_steps(model, tx, config, mesh, shardings)
    t0 = time.perf_counter()
    compiled = train_step.precompile(train_fn, None, state, config, mesh, buckets)
    compile_s = time.perf_counter() - t0

    def step(state, batch):
      fn = compiled.get(train_step.program_key("train", batch), train_fn)
      return fn(state, batch)

    def feed():
      t = time.perf_counter()
      batch = next(it)
      model_batch = {f: batch[f] for f in FIELDS if f in batch}
      return model_batch, pipeline.to_global(model_batch, batch_sharding), time.perf_counter() - t

    for _ in range(warmup):
      state, m = step(state, feed()[1])
    jax.block_until_ready(state)

    lengths = {f: [] for f in FIELDS}
    per_step, pending, wait_s, step_flops = [], None, 0.0, []
    t_first = time.perf_counter()
    last_done = t_first
    for i in range(steps):
      host, dev, waited = feed()
      wait_s += waited
      state, m = step(state, dev)
      for f in FIELDS:
        if f in host:
          lengths[f].append((host[f] != 0).sum(axis=1))
      step_flops.append(metrics.batch_flops(mc, host, generation=gen, align=bool(align)))
      width = host["code_ids"].shape[1]
      if pending is not None:
        loss = float(jax.device_get(pending[1]["loss"]))   # the step before: a step late
        now = time.perf_counter()
        per_step.append((pending[0], now - last_done, loss))
        last_done = now
      pending = (width, m)
    loss = float(jax.device_get(pending[1]["loss"]))
    now = time.perf_counter()
    per_step.append((pending[0], now - last_done, loss))
    wall = now - t_first

  lengths = {f: np.concatenate(v) for f, v in lengths.items() if v}
  fed = {f: 0 for f in lengths}
  for i, (w, _, _) in enumerate(per_step):
    for f in fed:
      fed[f] += B * (w if f == "code_ids" else widths[f])
  useful = {f: int(v.sum()) for f, v in lengths.items()}
  flops = sum(step_flops)
  by_bucket = {}
  for w in buckets:
    times = [t for bw, t, _ in per_step if bw == w]
    if times:
      by_bucket[str(w)] = {"steps": len(times), "median_ms": float(np.median(times) * 1e3),
                           "mean_ms": float(np.mean(times) * 1e3)}
  peak = metrics.peak_flops_per_device()
  fed_total, useful_total = sum(fed.values()), sum(useful.values())
  return {
      "config": config.get("name", ""), "data": prepared.data_dir,
      "train_examples": int(prepared.split_sizes.get("train", 0)), "batch_size": B,
      "devices": jax.device_count(), "code_buckets": list(buckets), "widths": widths,
      "retrieval_k": k, "neighbours": nb_note, "objectives": {"generation": bool(gen),
                                                              "align": list(align)},
      "params": model_lib.param_count(state.params["model"]),
      "steps": steps, "warmup": warmup, "setup_s": setup_s, "compile_s": compile_s,
      "wall_s": wall, "step_ms_mean": wall / steps * 1e3,
      "input_wait_s": wait_s, "input_wait_fraction": wait_s / wall,
      "tokens_fed": fed, "tokens_useful": useful,
      "tokens_fed_per_s": fed_total / wall, "tokens_useful_per_s": useful_total / wall,
      "trainer_tokens_per_s": sum(fed[f] for f in ("desc_ids", "code_ids")) / wall,
      "padding_per_field": {f: 1 - useful[f] / fed[f] for f in fed},
      "padding": 1 - useful_total / fed_total,
      "step_ms_by_bucket": by_bucket,
      "steps_per_bucket": {str(w): sum(1 for bw, _, _ in per_step if bw == w) for w in buckets},
      "model_tflops": flops / wall / 1e12, "flops": flops,
      "mfu": flops / wall / (peak * jax.device_count()) if peak else None,
      "loss_first_last": [per_step[0][2], per_step[-1][2]],
  }


# ---------------------------------------------------------------------------------------------
# Report.


def _pct(x: float) -> str:
  return f"{100 * x:.1f}%"


def markdown(res: dict) -> str:
  v = res["versions"]
  names = {"desc_ids": "description", "code_ids": "code", "ctx_ids": "context"}
  fields = list(res["tokens_fed"])
  lines = [
      HEADING, "",
      f"`python3 benchmarks/bench_realdata.py --config {res['config_arg']} --data DIR --steps "
      f"{res['steps']}` on {res['card']}, {res['date']}; jax {v['jax']}, flax {v['flax']}, "
      f"Python {v['python']}.", "",
      f"Config {res['config']!r}: batch {res['batch_size']} on {res['devices']} device(s), "
      f"code buckets {res['code_buckets']}, descriptions {res['widths']['desc_ids']} tokens"
      + (f", retrieval k = {res['retrieval_k']} with contexts of {res['widths']['ctx_ids']} "
         f"tokens (neighbours: {res['neighbours']})" if res["retrieval_k"] else "")
      + f"; objectives: generation {res['objectives']['generation']}, alignment "
      f"{','.join(res['objectives']['align']) or 'none'}; {res['params']:,} parameters. Data: "
      f"{res['train_examples']:,} train examples of {res['data']}. {res['steps']} timed steps "
      f"after {res['warmup']} untimed ones; compile {res['compile_s']:.1f} s (all buckets, "
      f"ahead), set-up {res['setup_s']:.1f} s.", "",
      "| figure | value |", "| --- | ---: |",
      f"| tokens fed per second ({' + '.join(names[f] for f in fields)}, padding included) | "
      f"{res['tokens_fed_per_s']:,.0f} |",
      f"| useful (non-padding) tokens per second | {res['tokens_useful_per_s']:,.0f} |",
      f"| tokens per second as the Trainer logs them (description + code, padded) | "
      f"{res['trainer_tokens_per_s']:,.0f} |",
      f"| mean step | {res['step_ms_mean']:.1f} ms |",
      f"| model TFLOP/s (by formula, padded shapes) | {res['model_tflops']:.1f}"
      + (f" (MFU {_pct(res['mfu'])})" if res["mfu"] else "") + " |",
      f"| waiting for the input pipeline | {_pct(res['input_wait_fraction'])} of the time |",
      f"| padding overall | {_pct(res['padding'])} |",
      *[f"| padding of the {names[f]} | {_pct(res['padding_per_field'][f])} |" for f in fields],
      "",
      "| code bucket | steps | median step ms | mean step ms |", "| ---: | ---: | ---: | ---: |",
      *[f"| {w} | {b['steps']} | {b['median_ms']:.1f} | {b['mean_ms']:.1f} |"
        for w, b in res["step_ms_by_bucket"].items()], ""]
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  from flax_albert_code.data.prepared import DataError  # pylint: disable=import-outside-toplevel
  from flax_albert_code import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_logs()
  if not _DATA.value:
    sys.exit("error: pass --data, prepared data (python -m flax_albert_code.prepare --config "
             "CONFIG --workdir DIR) or a training workdir.")
  try:
    res = run(_CONFIG.value, _DATA.value, _STEPS.value, _WARMUP.value, _NEIGHBOURS.value)
  except (DataError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  res.update(card=card(), versions=versions(), config_arg=next(
      (a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
      sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else "quality"),
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
  text = markdown(res)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(res, f, indent=1)
  if _RESULTS.value:
    replace_section(_RESULTS.value, HEADING, text)
    print(f"wrote the section {HEADING!r} of {_RESULTS.value}")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=lambda argv: app.parse_flags_with_usage(
      config_lib.with_shipped_configs(argv)))
