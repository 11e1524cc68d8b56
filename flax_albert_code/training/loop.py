"""The training loop: data -> sharded state -> jitted steps -> metrics -> checkpoints.

`run(config, workdir)` resumes from the latest complete checkpoint in `workdir`, saves on
SIGTERM/SIGINT (TPU VM preemption) and stops on a non-finite loss naming the step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from flax_albert_code.training import checkpoint
from flax_albert_code.training import gauge as gauge_lib
from flax_albert_code.training import metrics as metrics_lib
from flax_albert_code.model import albert as model_lib
from flax_albert_code.model import checkpoint_io
from flax_albert_code.model import hf
from flax_albert_code.training import optim
from flax_albert_code.model import sharding
from flax_albert_code.training import step as train_step
from flax_albert_code.retrieval import neighbours as neighbours_lib
from flax_albert_code.data import pipeline
from flax_albert_code.data.prepared import prepare

log = logging.getLogger("flax_albert_code")
# A training loss above this many times its start (the first step's, or ln(vocabulary) if higher)
# has diverged: a healthy run never goes back above its start, a diverging one goes far beyond.
DIVERGED = 10
# (config, params, prepared, mesh) -> the model's aligned vectors of texts, for mining neighbours
# with its own encoder; given by the caller, so that training imports no inference.
Embedder = Callable[[Any, Any, Any, Any], neighbours_lib.Embed]


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, bad warm start); the message says what to do."""


@dataclasses.dataclass
class Result:
  workdir: str
  step: int
  history: list[dict[str, float]]      # per-step training metrics fetched from the device
  valid: dict[str, float]               # last validation metrics
  state: Any = None
  prepared: Any = None


class _Signals:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits cleanly."""
  received = None

  def __enter__(self):
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, _):
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _warm_start(state, config, model_cfg):
  """Initialise from a pretrain checkpoint (all matching params) or an HF ALBERT encoder."""
  path = os.path.expanduser(config.train.init_from)
  if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(
      os.path.join(path, "checkpoints")):
    loaded, _ = hf.load_hf_encoder(path, params=jax.device_get(state.params["model"]))
  else:
    _, loaded, _ = checkpoint_io.load_for_inference(path)
  current = state.params["model"]
  flat_cur, flat_new = dict(_flatten(current)), dict(_flatten(loaded))
  bad = [k for k in flat_new if k in flat_cur and flat_new[k].shape != flat_cur[k].shape]
  if bad:
    raise TrainingError(f"config.train.init_from={path} has parameters of other shapes "
                        f"({'/'.join(bad[0])}: {flat_new[bad[0]].shape} vs "
                        f"{flat_cur[bad[0]].shape}); use the same model config.")
  merged = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.device_put(jnp.asarray(flat_new.get(_key(p), x), x.dtype), x.sharding),
      current)
  log.info("Warm start from %s: %d of %d tensors loaded.", path,
           sum(k in flat_new for k in flat_cur), len(flat_cur))
  return state.replace(params={**state.params, "model": merged})


def _key(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def _flatten(tree):
  return [(_key(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _model_fields(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: batch[k] for k in ("desc_ids", "code_ids", "ctx_ids", "labelled") if k in batch}


def _mines_with_model(config) -> bool:
  """Whether this run mines neighbours with the model's encoder (needs an embedder)."""
  k, rc = train_step.retrieval_k(config), config.retrieval
  return bool(k) and rc.method != "bm25" and bool(rc.refresh_steps or config.train.init_from)


def _neighbours(config, prepared, workdir: str, step: int, params, mesh, *, refresh: bool,
                embedder: Embedder | None):
  """This run's retrieval neighbours at `step` (None without retrieval): loaded when saved, else
  mined (BM25 or the warm-started model before training, the model at a refresh) and saved."""
  k = train_step.retrieval_k(config)
  if not k:
    return None
  nb = None if refresh else neighbours_lib.load(workdir, step, prepared, k)
  if nb is None:
    method = config.retrieval.method if (refresh or config.train.init_from) else "bm25"
    embed = None if method == "bm25" else embedder(config, params, prepared, mesh)
    start = time.perf_counter()
    nb = neighbours_lib.mine(prepared, k, method, embed, step=step)
    if jax.process_index() == 0:
      neighbours_lib.save(workdir, nb)
    log.info("Step %d: neighbours mined by %s in %.1f s.", step, method,
             time.perf_counter() - start)
  return nb


def evaluate(eval_fn, params, config, prepared, mesh, batch_size: int,
             neighbours=None, gauge_fn=None) -> dict[str, float]:
  """Mean validation metrics over the first `eval_batches` batches of the valid split; with
  `gauge_fn` (`gauge.jit_gauge`) also the reading gauge over the first `gauge.BATCHES`."""
  def dataset(own_context):
    return pipeline.make_dataset(config, prepared, "valid", batch_size, shuffle=False,
                                 num_epochs=1, drop_remainder=True, neighbours=neighbours,
                                 own_context=own_context)
  try:
    plain = dataset(False)
    # `own_ctx_ids` (a context per row, built on the host) only for the batches the gauge reads.
    own = plain if gauge_fn is None else dataset(True)
  except (ValueError, pipeline.DataError) as e:
    log.warning("No validation: %s", e)
    return {}
  sums, gauge_sums = {}, {}
  n = min(len(plain), config.train.eval_batches)
  to_global = functools.partial(pipeline.to_global, sharding=sharding.batch_sharding(mesh))
  for i in range(n):
    batch = (own if i < gauge_lib.BATCHES else plain)[i]
    _add(sums, eval_fn(params, to_global(_model_fields(batch))))
    if gauge_fn is not None and i < gauge_lib.BATCHES:
      fields = {**_model_fields(batch), **{k: batch[k] for k in ("own_ctx_ids",) if k in batch}}
      _add(gauge_sums, gauge_fn(params, to_global(fields)))
  out = {f"valid_{k}": v / n for k, v in sums.items()} if n else {}
  return {**out, **(gauge_lib.finish(gauge_sums) if gauge_sums else {})}


def _add(sums: dict[str, float], device_metrics) -> None:
  for k, v in jax.device_get(device_metrics).items():
    sums[k] = sums.get(k, 0.0) + float(v)


def run(config, workdir: str, *, progress: bool = True, max_steps: int | None = None,
        devices: Sequence[Any] | None = None, embedder: Embedder | None = None) -> Result:
  """Train `config` in `workdir`; `max_steps` stops early without saving; `devices` (default
  all) make the mesh; `embedder` is needed when the config mines neighbours with the model."""
  return Trainer(config, workdir, progress=progress, devices=devices,
                 embedder=embedder).train(max_steps)


class Trainer:
  """One run, resumed from the workdir's latest checkpoint; `train()` calls `do_step` until the
  end. A step's metrics are fetched while the next step runs: the device never waits."""

  def __init__(self, config, workdir: str, *, progress: bool = True,
               devices: Sequence[Any] | None = None, embedder: Embedder | None = None):
    tc = self.tc = config.train
    self.config = config
    if embedder is None and _mines_with_model(config):
      raise TrainingError(f"config.retrieval.method={config.retrieval.method!r} mines neighbours "
                          "with the model's encoder, and no embedder was given; pass one "
                          "(python -m flax_albert_code.train does) or use method 'bm25'.")
    self.embedder = embedder
    self.startup = {"before_trainer": process_seconds()}   # seconds, logged at the first step
    t = time.perf_counter()
    self.is_main = jax.process_index() == 0
    self.progress = progress
    workdir = self.workdir = checkpoint.absolute(workdir)   # orbax wants absolute paths
    checkpoint.check_workdir(workdir, config)   # refused before anything is written
    self.prepared = prepare(config, workdir, progress=progress and self.is_main)
    self.startup["prepare"], t = time.perf_counter() - t, time.perf_counter()
    if config.model.vocab_size != self.prepared.tokenizer.vocab_size:
      log.info("model.vocab_size set to the tokenizer's %d", self.prepared.tokenizer.vocab_size)
      with config.unlocked():
        config.model.vocab_size = self.prepared.tokenizer.vocab_size
    self.gen, self.align = train_step.objectives(tc)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    divisor = sharding.batch_divisor(self.mesh) * max(int(tc.microbatches), 1)
    if tc.batch_size % divisor:
      raise ValueError(f"config.train.batch_size={tc.batch_size} must be a multiple of "
                       f"{divisor} (data x fsdp mesh axes x microbatches).")
    self.model, self.model_cfg = model_lib.build(config)
    self.tx = optim.make(tc)
    self.ckpt = checkpoint.Checkpointer(workdir, keep=tc.keep_checkpoints, async_save=True)
    self.ckpt.check_compatible(config)
    self.train_iter = _train_iterator(config, self.prepared)
    abstract, self.shardings = train_step.abstract_state(self.model, self.tx, config, self.mesh)
    if self.ckpt.latest_step() is not None:
      self.state, self.start = self.ckpt.restore(abstract, self.train_iter)
      log.info("Resumed from step %d in %s", self.start, self.ckpt.directory)
    else:
      self.state, _ = train_step.create_state(self.model, self.tx, config, self.mesh,
                                              jax.random.PRNGKey(config.seed))
      if tc.init_from:
        self.state = _warm_start(self.state, config, self.model_cfg)
      self.start = 0
    self.startup["state"], t = time.perf_counter() - t, time.perf_counter()
    self.neighbours = _neighbours(config, self.prepared, workdir, self.start,
                                  self.state.params["model"], self.mesh, refresh=False,
                                  embedder=embedder)
    self.startup["neighbours"] = time.perf_counter() - t
    if self.neighbours is not None:
      self.train_iter = _with_neighbours(self.train_iter, config, self.prepared, self.neighbours)
    self.writer = metrics_lib.Writer(workdir)
    self.peak = metrics_lib.peak_flops_per_device()
    self.history: list[dict[str, float]] = []
    self.valid: dict[str, float] = {}
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.train_fn = self.eval_fn = self.gauge_fn = self.bar = None   # made by train()
    self._gauge_warned = False
    self._pending: tuple[int, Any] | None = None   # the last step's metrics, not yet checked
    self._first_batch = None   # taken from the iterator early to compile its program first

  def train(self, max_steps: int | None = None) -> Result:
    """Steps to `config.train.steps` (or `max_steps`); SIGTERM/SIGINT save and stop."""
    tc = self.tc
    end = tc.steps if max_steps is None else min(tc.steps, max_steps)
    step = self.start
    # Closing the checkpointer waits for in-flight async saves, also when training stops with an
    # error: the last good checkpoint is then complete on disk.
    with contextlib.closing(self.ckpt), contextlib.closing(self.writer), \
         jax.set_mesh(self.mesh), _Signals() as signals:
      t = time.perf_counter()
      self.train_fn, self.eval_fn = train_step.jit_steps(self.model, self.tx, self.config,
                                                         self.mesh, self.shardings)
      if self.gen:
        self.gauge_fn = gauge_lib.jit_gauge(self.model, self.config, self.mesh,
                                            self.shardings.params)
      if tc.precompile and step < end:
        # The first batch's program is traced first; the others follow in the background.
        self._first_batch = self._model_batch(next(self.train_iter))
        first = train_step.program_key("train", self._first_batch)
        compiled = train_step.precompile_async(
            self.train_fn, self.eval_fn if tc.eval_every else None, self.state, self.config,
            self.mesh, tuple(self.config.data.code_buckets), first=first)
        compiled[first].result()   # the others go on compiling while the first steps run
        self.train_fn = _dispatch(compiled, "train", self.train_fn)
        self.eval_fn = _dispatch(compiled, "eval", self.eval_fn)
      self.startup["compile"] = time.perf_counter() - t
      self.bar = tqdm(total=tc.steps, initial=step,
                      disable=not (self.progress and self.is_main), dynamic_ncols=True,
                      desc="train")
      # Throughput since the last log.
      self._t_last, self._tokens_since, self._flops_since = time.perf_counter(), 0, 0.0
      while step < end:
        step += 1
        self.do_step(step)
        if step == self.start + 1:
          self._log_startup(step)
        if step % tc.log_every == 0 or step == end:
          self._log_throughput(step)
        if self.neighbours is not None and step in tuple(self.config.retrieval.refresh_steps):
          self._refresh_neighbours(step)
        if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
          self._evaluate(step)
        stop = signals.received or (self.ckpt.manager.reached_preemption(step) and "preemption")
        if step % tc.checkpoint_every == 0 or step == tc.steps or stop:
          self._save(step, force=bool(stop) or step == tc.steps)
        if stop:
          log.warning("Received %s at step %d: checkpoint saved, exiting.", stop, step)
          break
      self._flush()
      self.bar.close()
    return Result(self.workdir, step, self.history, self.valid, self.state, self.prepared)

  def do_step(self, step: int) -> None:
    """Runs step `step` (1-based) on the next batch, then checks step - 1's metrics."""
    batch = self._first_batch or self._model_batch(next(self.train_iter))
    self._first_batch = None
    self.state, metrics = self.train_fn(self.state,
                                        pipeline.to_global(batch, self.batch_sharding))
    self._tokens_since += self.tc.batch_size * (batch["desc_ids"].shape[1]
                                                + batch["code_ids"].shape[1])
    self._flush()
    self._flops_since += metrics_lib.batch_flops(self.model_cfg, batch, generation=self.gen,
                                                 align=bool(self.align))
    self._pending = (step, metrics)

  def _model_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fields of a training batch the step reads (tests record the batches here)."""
    return _model_fields(batch)

  def _log_startup(self, step: int) -> None:
    """Time to the first step, by phase (a restart after preemption is judged by it)."""
    jax.block_until_ready(self._pending[1])
    self.startup["first_step"] = process_seconds()
    self.startup = {k: round(v, 1) for k, v in self.startup.items()}
    log.info("Step %d done %.1f s after the process started (%s).", step,
             self.startup["first_step"],
             ", ".join(f"{k} {v} s" for k, v in self.startup.items() if k != "first_step"))
    self.writer.write(step, {f"startup_{k}_s": v for k, v in self.startup.items()})

  def _flush(self) -> None:
    """Fetch and check the pending step's metrics, if any."""
    if self._pending is not None:
      self._process_metrics(*self._pending)
      self._pending = None

  def _process_metrics(self, step: int, device_metrics) -> None:
    """Host copy of one step's metrics, into the history; a diverged run (non-finite loss,
    gradient or parameter norm, or a loss DIVERGED times its start) stops here."""
    m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    # The loss and gradient are those of the parameters before this step's update, the
    # parameter norm that of the state about to be checkpointed.
    before = [f"non-finite {k} {m[k]}" for k in ("loss", "grad_norm")
              if k in m and not np.isfinite(m[k])]
    start = max(self.history[0]["loss"] if self.history else m.get("loss", 0.0),
                math.log(max(int(self.config.model.vocab_size), 2)))   # ~ an untrained loss
    if not before and m.get("loss", 0.0) > DIVERGED * start:
      before = [f"loss {m['loss']:.4g}, over {DIVERGED}x its start {start:.3g}"]
    after = ([f"non-finite param_norm {m['param_norm']}"]
             if "param_norm" in m and not np.isfinite(m["param_norm"]) else [])
    if before or after:
      self._diverged(step, ", ".join(before + after), step - 1 if before else step)
    self.history.append({"step": step, **m})
    if step % self.tc.log_every == 0:
      self.writer.write(step, m)
      if self.bar.disable and self.is_main:   # no bar (stderr is a log or a pipe): a line
        log.info("step %d/%d: loss %.4f", step, self.tc.steps, m.get("loss", float("nan")))
    self.bar.update(step - self.bar.n)

  def _diverged(self, step: int, what: str, first_bad: int) -> None:
    """TrainingError naming the last good checkpoint; the steps from `first_bad` moved aside."""
    moved = self.ckpt.set_aside(first_bad)
    last, where = self.ckpt.latest_step(), checkpoint.checkpoint_dir(self.workdir)
    kept = (f"the last good checkpoint is {where / str(last)}, where the next run resumes"
            if last is not None else "no checkpoint before it was kept: the next run starts "
            "afresh")
    if moved:
      kept += (f" (step{'s' * (len(moved) > 1)} {', '.join(map(str, moved))} moved to "
               f"{where.parent / checkpoint.DIVERGED_DIR})")
    raise TrainingError(f"Training diverged at step {step} ({what}); {kept}; lower "
                        f"config.train.learning_rate (now {self.tc.learning_rate:g}) or check "
                        "the data.")

  def _log_throughput(self, step: int) -> None:
    """This step's metrics now, then tokens/s, model TFLOP/s and MFU since the last log."""
    self._flush()
    dt = time.perf_counter() - self._t_last
    rate = {"tokens_per_s": self._tokens_since / dt, "model_tflops": self._flops_since / dt / 1e12}
    if self.peak:
      rate["mfu"] = self._flops_since / dt / (self.peak * self.mesh.devices.size)
    self.writer.write(step, rate)
    shown = dict(loss=f"{self.history[-1]['loss']:.3f}", tok_s=f"{rate['tokens_per_s']:.0f}")
    if "input_gap" in self.valid:   # the reading gauge at the last validation
      shown["input_gap"] = f"{self.valid['input_gap']:.3f}"
    self.bar.set_postfix(**shown)
    self._t_last, self._tokens_since, self._flops_since = time.perf_counter(), 0, 0.0

  def _refresh_neighbours(self, step: int) -> None:
    """Re-mines every split's neighbours with the model's own encoder."""
    self.neighbours = _neighbours(self.config, self.prepared, self.workdir, step,
                                  self.state.params["model"], self.mesh, refresh=True,
                                  embedder=self.embedder)
    self.train_iter = _with_neighbours(self.train_iter, self.config, self.prepared,
                                       self.neighbours)

  def _evaluate(self, step: int) -> None:
    self.valid = evaluate(self.eval_fn, self.state.params, self.config, self.prepared, self.mesh,
                          self.tc.batch_size, self.neighbours, self.gauge_fn)
    if self.valid:
      self.writer.write(step, self.valid)
      log.info("step %d: %s", step, {k: round(v, 4) for k, v in self.valid.items()})
      problem = gauge_lib.problem(self.valid, step, int(self.tc.warmup_steps))
      if problem and not self._gauge_warned:
        log.warning("%s", problem)
        self._gauge_warned = True

  def _save(self, step: int, force: bool) -> None:
    self._flush()   # never checkpoint a state whose loss was not checked
    self.ckpt.save(step, self.state, self.train_iter, self.config,
                   metrics={"valid_loss": self.valid["valid_loss"]} if self.valid else None,
                   force=force)


def _train_iterator(config, prepared, nb=None):
  """The endless, shuffled train iterator (with unlabelled code by its schedule)."""
  return pipeline.make_iterator(config, prepared, "train", config.train.batch_size, shuffle=True,
                                num_epochs=None, neighbours=nb,
                                unlabelled_schedule=config.train.unlabelled_schedule)


def _with_neighbours(train_iter, config, prepared, nb):
  """A train iterator reading `nb`, at the position of `train_iter`."""
  it = _train_iterator(config, prepared, nb)
  it.set_state(train_iter.get_state())
  return it


def _dispatch(compiled, kind: str, fallback):
  """A step running the precompiled program (or Future) for its batch (else `fallback`)."""
  def step(state_or_params, batch):
    fn = compiled.get(train_step.program_key(kind, batch), fallback)
    if hasattr(fn, "result"):
      fn = fn.result()
    return fn(state_or_params, batch)
  return step


def process_seconds() -> float:
  """Seconds since this process started (Linux /proc; elsewhere since this module's import)."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = int(f.read().rpartition(")")[2].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()
