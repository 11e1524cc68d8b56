"""Training end to end on the tiny config (CPU, 8 fake devices): 1 vs 8 devices, overfitting,
exact resume, SIGTERM, restore onto another mesh, config errors, the NaN stop, checkpoint policy.

Every run shares one prepared dataset and a persistent compilation cache (both in a temp dir
shared with the other xdist worker): the runs compile the same few programs, and a compile is
most of a short run's time on CPU.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import filelock
import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from flax_albert_code import cli
from flax_albert_code.model import checkpoint_io
from flax_albert_code.training import checkpoint
from flax_albert_code.model import albert as model_lib
from flax_albert_code.training import optim
from flax_albert_code.model import sharding
from flax_albert_code.training import step as train_step
from flax_albert_code.training import loop as trainer
from flax_albert_code.data import pipeline
from flax_albert_code.data.prepared import prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_8 = (2, 2, 2)   # (data, fsdp, tensor)
MESH_1 = (1, 1, 1)
# configs/tiny.py with one code bucket (one compiled shape), batch 8 and a constant LR without
# warmup, so `steps` does not enter the compiled program (the tests' runs share compiles). The
# tiny preset's H=32 with 4 heads of 8 sits on the unigram plateau (loss ~4.1) for over 150
# steps at any LR we tried; H=64 with 2 heads leaves it within ~30 steps, which the overfitting
# test needs.
OVERRIDES = {
    "model.hidden_size": 64, "model.intermediate_size": 128, "model.embedding_size": 32,
    "model.num_attention_heads": 2,
    "data.max_examples": 160, "data.max_desc_len": 32, "data.max_code_len": 64,
    "data.code_buckets": (64,), "data.valid_fraction": 0.1, "data.test_fraction": 0.05,
    "train.batch_size": 8, "train.schedule": "constant", "train.learning_rate": 3e-3,
    "train.warmup_steps": 0, "train.log_every": 1, "train.eval_every": 0,
    "train.checkpoint_every": 1000, "train.samples_at_end": 0,
}


def tiny_config():
  spec = importlib.util.spec_from_file_location(
      "tiny_config", os.path.join(REPO, "flax_albert_code", "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def make_config(data_dir, mesh=MESH_8, **overrides):
  """configs/tiny.py with OVERRIDES and `overrides` ({"section.key": value})."""
  config = tiny_config()
  for path, value in {**OVERRIDES, "data.data_dir": str(data_dir), **overrides}.items():
    section, key = path.split(".")
    config[section][key] = value
  config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return config


def cli_flags(data_dir, mesh=MESH_8, **overrides):
  """The same config as `make_config`, as command-line overrides of configs/tiny.py."""
  values = {**OVERRIDES, "data.data_dir": str(data_dir), **overrides,
            **dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), mesh))}
  return [f"--config.{k}={v}" for k, v in values.items()]


def devices_for(mesh):
  return jax.devices()[:int(np.prod(mesh))]


def run(config, workdir, **kw):
  """trainer.run as the train command runs it (its embedder mines neighbours with the model),
  recording each training batch's example indices (the data order)."""
  seen, real = [], trainer.Trainer._model_batch
  kw.setdefault("embedder", cli.embedder)

  def recording(self, batch):
    seen.append(batch["index"].copy())
    return real(self, batch)
  mesh = tuple(config.mesh[a] for a in sharding.MESH_AXES)
  with mock.patch.object(trainer.Trainer, "_model_batch", recording):
    result = trainer.run(config, str(workdir), progress=False, devices=devices_for(mesh), **kw)
  return result, seen


def losses(result):
  return [h["loss"] for h in result.history]


def tree_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """(data_dir, cache_dir, tokenizer path), shared by both xdist workers; the first one here
  compiles the steps of both meshes while the other waits, rather than both at once."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  data_dir, cache_dir = root / "train_data", root / "train_jax_cache"
  old = {k: getattr(jax.config, k) for k in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", str(cache_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  with filelock.FileLock(str(root / "train_warm.lock")):
    prepared = prepare(make_config(data_dir), str(root / "unused"))
    if not (root / "train_warm").exists():
      for mesh in (MESH_8, MESH_1):
        run(make_config(data_dir, mesh=mesh, **{"train.steps": 1}),
            root / f"train_warm_{np.prod(mesh)}")
      (root / "train_warm").touch()
  yield data_dir, cache_dir, os.path.join(prepared.data_dir, "spm.model")
  for k, v in old.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def test_one_and_eight_devices_give_the_same_losses(shared, tmp_path):
  config = dict(data_dir=shared[0], **{"train.steps": 6})
  eight, eight_batches = run(make_config(mesh=MESH_8, **config), tmp_path / "8", max_steps=2)
  one, one_batches = run(make_config(mesh=MESH_1, **config), tmp_path / "1", max_steps=2)
  assert [h["step"] for h in one.history] == [h["step"] for h in eight.history] == [1, 2]
  np.testing.assert_array_equal(np.stack(one_batches), np.stack(eight_batches))
  for k in ("loss", "gen_loss", "infonce_loss", "grad_norm", "param_norm"):
    # Measured: relative differences up to ~4e-7 (float32 sums in another order).
    np.testing.assert_allclose([h[k] for h in one.history], [h[k] for h in eight.history],
                               rtol=1e-5, err_msg=k)


def test_precompiled_steps_equal_the_jitted_ones(shared, tmp_path):
  """train.precompile: every bucket's train and eval programs compiled in the background, the
  first batch's first, and used, with the same losses, validation and final state as the
  lazily jitted steps."""
  config = dict(data_dir=shared[0], **{"train.steps": 4, "train.eval_every": 2,
                                       "data.code_buckets": (32, 64)})
  made = []
  real = train_step.precompile_async

  def recording(*args, **kw):
    made.append((kw.get("first"), real(*args, **kw)))
    return made[-1][1]
  lazy, _ = run(make_config(**config), tmp_path / "lazy")
  with mock.patch.object(train_step, "precompile_async", recording):
    eager, _ = run(make_config(**config, **{"train.precompile": True}), tmp_path / "eager")
  first, futures = made[0]
  assert sorted(k[:2] for k in futures) == [("eval", 32), ("eval", 64), ("train", 32),
                                             ("train", 64)]
  assert first[0] == "train" and all(f.result(timeout=300) for f in futures.values())
  assert eager.history == lazy.history and eager.valid == lazy.valid and eager.valid
  assert tree_equal(eager.state, lazy.state)


def test_resume_equals_uninterrupted_bitwise(shared, tmp_path):
  # Metrics are fetched a step late between logs (log_every=4); checkpoints every 3 steps.
  config = make_config(shared[0], **{"train.steps": 6, "train.checkpoint_every": 3,
                                     "train.log_every": 4})
  full, full_batches = run(config, tmp_path / "full")
  first, first_batches = run(config, tmp_path / "cut", max_steps=3)
  assert first.step == 3 and checkpoint.Checkpointer(str(tmp_path / "cut")).latest_step() == 3
  second, second_batches = run(config, tmp_path / "cut")
  assert [h["step"] for h in first.history + second.history] == [1, 2, 3, 4, 5, 6]
  assert first.history + second.history == full.history      # every metric, exactly
  np.testing.assert_array_equal(np.stack(first_batches + second_batches), np.stack(full_batches))
  assert tree_equal(second.state, full.state)


def test_checkpoint_from_eight_devices_restores_on_one(shared, tmp_path):
  config = make_config(shared[0], **{"train.steps": 2})
  result, _ = run(config, tmp_path)
  assert len(result.state.params["model"]["decoder"]["logits_bias"].sharding.device_set) == 8
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  model, _ = model_lib.build(config)
  abstract, _ = train_step.abstract_state(model, optim.make(config.train), config, mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  state, step = ckpt.restore(abstract)
  ckpt.close()
  assert step == 2
  assert {len(x.sharding.device_set) for x in jax.tree.leaves(state)} == {1}
  assert tree_equal(state, result.state)


def test_other_config_refuses_to_resume(shared, tmp_path):
  run(make_config(shared[0], **{"train.steps": 1}), tmp_path)
  other = make_config(shared[0], **{"model.hidden_size": 32, "train.steps": 2})
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"holds checkpoints of another config \(config\.model differs in "
                           r"\['hidden_size'\]\); use a new --workdir or the same config\."):
    trainer.run(other, str(tmp_path), progress=False, devices=devices_for(MESH_8))
  assert checkpoint.Checkpointer(str(tmp_path), read_only=True).latest_step() == 1


def tree_state(root) -> dict[str, tuple]:
  """Every path under `root`: a file's size, mtime and sha256, a directory's presence."""
  out = {}
  for d, dirs, names in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), root)] = ("dir",)
    for name in names:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(path, root)] = (os.path.getsize(path), os.stat(path).st_mtime_ns,
                                          digest)
  return out


def test_a_refused_command_changes_nothing_in_the_workdir(shared, tmp_path):
  """train and prepare with other data, into a trained workdir holding its own data (the default
  layout): one error line, before anything is prepared, cached or pointed at (CURRENT): the
  workdir is byte-identical, and its checkpoint still finds its own tokenizer."""
  workdir = tmp_path / "w"
  shutil.copytree(shared[0], workdir / "data")   # the run's data (reused, not mined again)
  run(make_config("", **{"train.steps": 1}), workdir)
  before = tree_state(workdir)
  other = cli_flags("", **{"data.max_examples": 150, "train.steps": 2})
  for command in ("train", "prepare"):
    proc = subprocess.run([sys.executable, "-m", f"flax_albert_code.{command}", "--config",
                           "configs/tiny.py", "--workdir", str(workdir), *other],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"error: The workdir {workdir} holds checkpoints of another config (config.data differs "
        "in ['max_examples']); use a new --workdir or the same config."], proc.stderr
    assert tree_state(workdir) == before, command


def test_overfits_a_tiny_set(shared, tmp_path):
  # 8 examples (one batch), same tokenizer, so the same compiled step as the 1-device run above.
  config = make_config(tmp_path / "data", mesh=MESH_1, **{
      "data.max_examples": 8, "data.valid_fraction": 0.0, "data.test_fraction": 0.0,
      "data.tokenizer_path": shared[2], "train.steps": 200, "train.log_every": 50})
  result, seen = run(config, tmp_path / "work")
  assert len(np.unique(np.stack(seen))) == 8
  first, last = result.history[0], result.history[-1]
  tail = {k: np.mean([h[k] for h in result.history[-20:]])
          for k in ("infonce_loss", "retrieval_accuracy")}
  # Measured at step 200 before the copy head: gen_loss 6.24 -> 0.25 (the unigram plateau is
  # ~4.1), token accuracy 0.97; over the last 20 steps infonce 0.014 (ln 8 = 2.08 at the start),
  # retrieval 1.0. The copy head starts at 5.88 (ln 512 = 6.24): its mass on the description's
  # own tokens.
  assert first["gen_loss"] > 5.5
  assert last["gen_loss"] < 1.0, [round(h["gen_loss"], 2) for h in result.history[::10]]
  assert last["token_accuracy"] > 0.8
  assert tail["infonce_loss"] < 0.25 and tail["retrieval_accuracy"] >= 0.9, tail
  # Search after this short training run: each description finds its own function first.
  from flax_albert_code.retrieval import index as search
  from flax_albert_code.inference.generator import CodeGenerator
  gen = CodeGenerator(config, jax.device_get(result.state.params["model"]),
                      result.prepared.tokenizer, prepared=result.prepared)
  examples = list(result.prepared.source("train"))
  index = search.load_or_build(gen, examples, "overfit-set", str(tmp_path / "index"))
  hits = search.query(gen, index, [e["description"] for e in examples], top_k=1)
  own_first = [h[0]["name"] == e["name"] and h[0]["path"] == e["path"]
               for h, e in zip(hits, examples)]
  assert sum(own_first) >= 7, own_first   # measured: 8 of 8


def test_sigterm_saves_a_checkpoint_and_resume_finishes(shared, tmp_path):
  data_dir, cache_dir, _ = shared
  workdir = tmp_path / "w"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.Popen(
      [sys.executable, "-m", "flax_albert_code.train", "--config", "configs/tiny.py",
       "--workdir", str(workdir), *cli_flags(data_dir, **{"train.steps": 100000})],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics_file, deadline = workdir / "metrics.jsonl", time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:   # wait for a few training steps
      if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 6:
        break
      time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, out
  # Not a terminal: no bar, whose carriage returns would land between the log's lines, but a
  # line every config.train.log_every (1) steps.
  assert "\r" not in out and re.search(r"step 3/100000: loss \d+\.\d{4}\n", out), out
  saved = int(re.search(r"Received SIGTERM at step (\d+): checkpoint saved", out).group(1))
  assert 3 <= saved < 100000
  ckpt_dir = checkpoint.checkpoint_dir(str(workdir))
  assert sorted(p.name for p in ckpt_dir.iterdir()) == [str(saved)]   # complete, nothing tmp
  assert {p.name for p in (ckpt_dir / str(saved)).iterdir()} >= {"state", "data", "config"}
  assert f"checkpoint: {ckpt_dir}/{saved}" in out

  config = make_config(data_dir, **{"train.steps": saved + 2})
  result, seen = run(config, workdir)
  assert [h["step"] for h in result.history] == [saved + 1, saved + 2]
  assert checkpoint.Checkpointer(str(workdir), read_only=True).latest_step() == saved + 2
  # The data iterator resumed where it stopped: batches saved and saved+1 of a fresh iterator.
  prepared = prepare(config, str(workdir))
  fresh = pipeline.make_iterator(config, prepared, "train", 8, shuffle=True, num_epochs=None)
  expected = [next(fresh)["index"] for _ in range(saved + 2)][saved:]
  np.testing.assert_array_equal(np.stack(seen), np.stack(expected))


def _train_cli(tmp_path, *flags):
  return subprocess.run([sys.executable, "-m", "flax_albert_code.train", "--config",
                         "configs/tiny.py", "--workdir", str(tmp_path / "w"), *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


def test_config_typo_and_bad_value_fail_at_once(tmp_path):
  typo = _train_cli(tmp_path, "--config.train.stepz=3")
  assert typo.returncode != 0 and "Traceback" not in typo.stderr
  assert typo.stderr.strip() == typo.stderr.strip().splitlines()[0]       # one line
  assert "--config.train.stepz: config.train has no field 'stepz'" in typo.stderr
  assert "stage, steps, unlabelled_schedule" in typo.stderr               # the valid fields
  section = _train_cli(tmp_path, "--config.trian.steps=3")
  assert section.returncode != 0 and "config has no field 'trian'" in section.stderr
  assert "model, name, retrieval, sample, seed, train" in section.stderr
  bad = _train_cli(tmp_path, "--config.train.steps=abc")
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  assert "--config.train.steps=abc: invalid literal for int()" in bad.stderr
  assert not (tmp_path / "w").exists()       # nothing was started


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(shared, tmp_path):
  # LR 1e30 (optax's schedule gives LR 0 to step 1): step 2's update blows the parameters up.
  config = make_config(shared[0], mesh=MESH_1, **{
      "train.learning_rate": 1e30, "train.steps": 6, "train.checkpoint_every": 1,
      "train.log_every": 100})
  ckpt_dir = checkpoint.checkpoint_dir(str(tmp_path))
  with pytest.raises(trainer.TrainingError, match=r"Training diverged at step (\d+) \(non-finite "
                     rf"param_norm (nan|inf)\); the last good checkpoint is {ckpt_dir}/1, where "
                     r"the next run resumes; lower config.train.learning_rate "
                     r"\(now 1e\+30\)") as err:
    run(config, tmp_path)
  bad_step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
  assert bad_step == 2
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1"]    # complete, no tmp dir left
  _, params, step = checkpoint_io.load_for_inference(str(tmp_path))
  assert step == 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_a_diverging_run_stops_and_the_next_resumes_from_the_last_good_checkpoint(shared, tmp_path):
  # Learning rate 1 (optax's schedule gives 0 to step 1): step 2's update takes the loss from ~6
  # to ~650, finite, at step 3; the state checkpointed at step 2 is that diverged one.
  config = make_config(shared[0], mesh=MESH_1, **{
      "train.learning_rate": 1.0, "train.steps": 6, "train.checkpoint_every": 1,
      "train.log_every": 100})
  with pytest.raises(trainer.TrainingError) as err:
    run(config, tmp_path)
  ckpt_dir = checkpoint.checkpoint_dir(str(tmp_path))
  assert re.fullmatch(
      r"Training diverged at step 3 \(loss [\d.]+, over 10x its start [\d.]+\); the last good "
      rf"checkpoint is {ckpt_dir}/1, where the next run resumes \(step 2 moved to "
      rf"{tmp_path}/checkpoints_diverged\); lower config.train.learning_rate \(now 1\) or check "
      r"the data\.", str(err.value)), str(err.value)
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1"]   # never a diverged state
  # The next start (a sane learning rate) resumes from step 1 and trains on.
  resumed, _ = run(make_config(shared[0], mesh=MESH_1, **{"train.steps": 3}), tmp_path)
  assert [h["step"] for h in resumed.history] == [2, 3]
  assert all(h["loss"] < 10 for h in resumed.history), resumed.history
  assert checkpoint.Checkpointer(str(tmp_path), read_only=True).latest_step() == 3


def test_checkpoint_policy_keeps_last_k_and_the_best(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  valid_loss = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.2, 6: None}
  for step, loss in valid_loss.items():
    ckpt.save(step, {"w": np.full((2,), step, np.float32)},
              metrics=None if loss is None else {"valid_loss": loss})
  ckpt.close()
  # The last two (5, 6) and the lowest validation loss (2).
  kept = checkpoint.checkpoint_dir(str(tmp_path)).iterdir()
  assert sorted(int(p.name) for p in kept) == [2, 5, 6]
