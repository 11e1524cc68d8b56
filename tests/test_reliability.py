"""Hostile conditions (issue 12): SIGKILL storms during async checkpoint writes, corrupt
checkpoints, a full disk, fuzzed inputs. Training runs through the real CLI in subprocesses on one
CPU device, sharing one prepared dataset and a persistent compilation cache.

Covered elsewhere, not repeated here: tokenizer round trips of arbitrary Unicode incl. U+2581
(tests/test_tokenizer.py), damaged exports refused by checksum (tests/deploy/test_export.py),
another config's workdir refused in-process (tests/test_train.py; here through the CLI).
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import filelock
import jax
import numpy as np
import pytest

from flax_albert_code.model import checkpoint_io
from flax_albert_code.training import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
KILLS = 12
# configs/tiny.py, one code bucket, constant LR without warmup (so `steps` is not in the compiled
# program), every step logged and checkpointed (async, the default).
FLAGS = {
    "data.max_examples": 160, "data.max_desc_len": 32, "data.max_code_len": 64,
    "data.code_buckets": "(64,)", "data.valid_fraction": 0.1, "data.test_fraction": 0.05,
    "train.batch_size": 8, "train.schedule": "constant", "train.learning_rate": 3e-3,
    "train.warmup_steps": 0, "train.log_every": 1, "train.eval_every": 0,
    "train.checkpoint_every": 1, "train.keep_checkpoints": 3, "train.samples_at_end": 0,
}
# Runs train.py with every write of a checkpoint step >= FAIL_FROM_STEP failing with ENOSPC (the
# JSON items; the arrays are written by tensorstore, out of Python's reach).
ENOSPC_DRIVER = r"""
import errno, os, re, runpy, sys
from etils import epath
fail_from = int(os.environ["FAIL_FROM_STEP"])
cls = type(epath.Path("/"))
real = cls.write_text
def write_text(self, *a, **k):
  m = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(self))
  if m and int(m.group(1)) >= fail_from:
    raise OSError(errno.ENOSPC, "No space left on device", str(self))
  return real(self, *a, **k)
cls.write_text = write_text
sys.argv[0] = "train"
runpy.run_module("flax_albert_code.train", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """(root shared by the xdist workers, subprocess environment)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  root = root / "reliability"
  root.mkdir(exist_ok=True)
  return root, dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
                    JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def train_cmd(root, workdir, driver=None, **overrides):
  flags = {**FLAGS, "data.data_dir": str(root / "data"), "train.steps": STEPS, **overrides}
  head = [sys.executable, "-c", driver] if driver else [sys.executable, "-m",
                                                        "flax_albert_code.train"]
  return head + ["--config", "configs/tiny.py", "--workdir", str(workdir),
                 *[f"--config.{k}={v}" for k, v in flags.items()]]


def train(env, workdir, driver=None, extra_env=None, **overrides):
  root, environ = env
  return subprocess.run(train_cmd(root, workdir, driver, **overrides), cwd=REPO,
                        env={**environ, **(extra_env or {})}, capture_output=True, text=True,
                        timeout=300)


def step_losses(workdir) -> dict[int, list[float]]:
  """Every loss metrics.jsonl holds, by step (a step redone after a kill appears twice; a line
  cut by a kill is skipped)."""
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if "loss" in rec:
      out.setdefault(rec["step"], []).append(rec["loss"])
  return out


def params(workdir):
  _, p, step = checkpoint_io.load_for_inference(str(workdir))
  return step, jax.device_get(p)


def assert_same_params(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(env):
  """An uninterrupted run (it also prepares the data and fills the compilation cache)."""
  root, _ = env
  workdir = root / "reference"
  with filelock.FileLock(str(root / "reference.lock")):   # one run for both xdist workers
    if not (root / "reference.done").exists():
      proc = train(env, workdir)
      assert proc.returncode == 0, proc.stderr[-3000:]
      (root / "reference.done").touch()
  losses = step_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert all(len(v) == 1 for v in losses.values())
  return workdir, {s: v[0] for s, v in losses.items()}, params(workdir)


def committed_steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  try:
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())
  except FileNotFoundError:
    return []


def saving(ckpt_dir, since: float) -> bool:
  """An uncommitted step directory created after `since` exists (not one left by an earlier
  kill, which the next run removes)."""
  try:
    return any(".orbax-checkpoint-tmp" in p.name and p.stat().st_ctime >= since
               for p in ckpt_dir.iterdir())
  except FileNotFoundError:    # the directory, or an entry committed meanwhile
    return False


def test_kill_storm_resumes_from_the_latest_complete_checkpoint_bitwise(env, reference):
  root, environ = env
  ref_dir, ref_losses, (ref_step, ref_params) = reference
  workdir = root / "storm"
  ckpt_dir = workdir / "checkpoints"
  rng = random.Random(12)
  kills, log = 0, []
  while True:
    expected = committed_steps(workdir)
    out_path = root / f"storm_{len(log)}.log"
    with open(out_path, "w") as out:
      proc = subprocess.Popen(train_cmd(root, workdir), cwd=REPO, env=environ, stdout=out,
                              stderr=subprocess.STDOUT)
      mode = "none" if kills == KILLS else rng.choice(["in_save", "in_save", "random"])
      started, t0 = (expected[-1] if expected else 0), time.time()
      if mode == "in_save":
        # Kill the moment an async save of the (k+1)-th new step is in flight.
        k = rng.randrange(0, 3)
        while proc.poll() is None:
          steps_now = committed_steps(workdir)
          if saving(ckpt_dir, t0) and (steps_now[-1] if steps_now else 0) >= started + k:
            break
          time.sleep(0.002)
      elif mode == "random":
        # Anywhere from start-up (imports, restore, compile) to a few steps in.
        deadline = t0 + rng.uniform(2.0, 9.0)
        while proc.poll() is None and time.time() < deadline:
          time.sleep(0.01)
      if mode != "none" and proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
      rc = proc.wait(timeout=300)
    text = out_path.read_text()
    # It resumed from the latest committed step, and that step was complete.
    if expected:
      if mode == "none" or "Resumed from step" in text:
        assert f"Resumed from step {expected[-1]} in" in text, text[-3000:]
      else:   # killed during start-up, before it restored: it cannot have committed anything
        assert committed_steps(workdir) == expected, text[-3000:]
    else:
      assert "Resumed from" not in text
    assert "unusable" not in text and "Traceback" not in text, text[-3000:]
    in_flight = saving(ckpt_dir, t0)
    latest = committed_steps(workdir)
    if latest:
      latest_dir = checkpoint.checkpoint_dir(str(workdir)) / str(latest[-1])
      assert checkpoint.verify_step(latest_dir) is None
      assert (ckpt_dir / str(latest[-1]) / checkpoint.MANIFEST).exists()
    log.append((mode, rc, started, latest[-1] if latest else None, bool(in_flight)))
    if rc == 0:
      break
    assert rc == -signal.SIGKILL, text[-3000:]
    kills += 1
    assert kills <= KILLS + 1
  print("kill storm (mode, rc, resumed at, latest after, killed mid-save):", *log, sep="\n  ")
  assert kills == KILLS, log
  assert sum(1 for m in log if m[4]) >= 5, log    # many kills landed in an async save
  losses = step_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  for step, values in losses.items():     # a step redone after a kill gives the same loss
    assert values == [ref_losses[step]] * len(values), (step, values, ref_losses[step])
  step, final = params(workdir)
  assert step == ref_step == STEPS
  assert_same_params(final, ref_params)
  data = "data/process_0-of-1.json"
  assert (ckpt_dir / str(STEPS) / data).read_text() == (
      ref_dir / "checkpoints" / str(STEPS) / data).read_text()


def _flip_a_bit(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


def _truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _largest_array_file(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", [_flip_a_bit, _truncate])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(env, reference, damage):
  """The cut run resumes from step STEPS-1, says which step and file, and ends bitwise equal to
  the uninterrupted run."""
  root, _ = env
  ref_dir, ref_losses, (_, ref_params) = reference
  workdir = root / f"corrupt_{damage.__name__}"
  shutil.copytree(ref_dir, workdir)
  ckpt_dir = pathlib.Path(checkpoint.checkpoint_dir(str(workdir)))
  bad = _largest_array_file(ckpt_dir / str(STEPS))
  damage(bad)
  proc = train(env, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(rf"Checkpoint step {STEPS} is unusable \({re.escape(str(bad))} "
                   r"(does not match its sha256|has \d+ bytes instead of \d+)", proc.stderr), \
      proc.stderr[-3000:]
  assert f"falling back to step {STEPS - 1}." in proc.stderr
  assert f"Resumed from step {STEPS - 1} in" in proc.stderr
  assert (ckpt_dir.parent / "checkpoints_corrupt" / str(STEPS)).is_dir()   # kept for a look
  assert step_losses(workdir)[STEPS][-1] == ref_losses[STEPS]
  step, final = params(workdir)
  assert step == STEPS
  assert_same_params(final, ref_params)


def test_another_configs_workdir_is_refused_in_one_sentence(env, reference):
  root, _ = env
  workdir = root / "other_config"
  shutil.copytree(reference[0], workdir)
  proc = train(env, workdir, **{"model.hidden_size": 64})
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: The workdir {workdir} holds checkpoints of another config (config.model "
      "differs in ['hidden_size']); use a new --workdir or the same config.")
  assert committed_steps(workdir) == committed_steps(reference[0])


def test_full_disk_stops_with_a_clear_message_and_keeps_earlier_checkpoints(env, reference):
  root, _ = env
  ref_dir, ref_losses, (_, ref_params) = reference
  workdir = root / "full_disk"
  fail = 5
  proc = train(env, workdir, driver=ENOSPC_DRIVER, extra_env={"FAIL_FROM_STEP": str(fail)})
  assert proc.returncode == 1, proc.stderr[-3000:]
  # The last word is ours, no traceback escaped (orbax logs the failed write, and leaves an
  # un-awaited coroutine that Python warns about at exit).
  assert "CheckpointError:" not in proc.stderr
  lines = proc.stderr.splitlines()
  [at] = [i for i, line in enumerate(lines) if line.startswith("error:")]
  last = lines[at]
  assert not [line for line in lines[at + 1:] if "Error" in line], lines[at + 1:]
  assert re.fullmatch(
      rf"error: Saving checkpoint step {fail} in {re.escape(str(workdir))}/checkpoints failed: "
      rf"the disk is full \(no space left on device\)\. The earlier checkpoints \(steps 2, 3, "
      rf"{fail - 1}\) are intact; free disk space or use a --workdir on a larger disk, then run "
      r"the same command to resume\.", last), last
  assert committed_steps(workdir) == [2, 3, fail - 1]
  # Space is back: the same command resumes from the last intact step and finishes as if
  # nothing had happened.
  proc = train(env, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Resumed from step {fail - 1} in" in proc.stderr
  losses = step_losses(workdir)
  assert all(v == [ref_losses[s]] * len(v) for s, v in losses.items())
  assert_same_params(params(workdir)[1], ref_params)



def _small_checkpoints(workdir, steps=(1, 2, 3), async_save=True):
  ckpt = checkpoint.Checkpointer(str(workdir), keep=5, async_save=async_save)
  for step in steps:
    ckpt.save(step, {"w": np.full((1000,), step, np.float32)})
  ckpt.close()
  return pathlib.Path(checkpoint.checkpoint_dir(str(workdir)))


def _restore(workdir):
  ckpt = checkpoint.Checkpointer(str(workdir))
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"w": jax.ShapeDtypeStruct((1000,), np.float32, sharding=one_device)}
  try:
    state, step = ckpt.restore(abstract)
  finally:
    ckpt.close()
  return float(state["w"][0]), step


@pytest.mark.parametrize("async_save", [True, False])
@pytest.mark.parametrize("damage, words", [
    (lambda d: _flip_a_bit(_largest_array_file(d)), "does not match its sha256"),
    (lambda d: _truncate(_largest_array_file(d)), "bytes instead of"),
    (lambda d: _largest_array_file(d).unlink(), "is missing"),
    (lambda d: (d / checkpoint.MANIFEST).write_text("{"), "manifest .* is unreadable"),
    # No manifest to check against: orbax's own failure to read the step is the signal.
    (lambda d: ((d / checkpoint.MANIFEST).unlink(), shutil.rmtree(d / "state")), "FileNotFound|"
     "ValueError|Error"),
])
def test_checkpointer_falls_back_past_a_damaged_step(tmp_path, caplog, async_save, damage, words):
  ckpt_dir = _small_checkpoints(tmp_path, async_save=async_save)
  assert all((ckpt_dir / str(s) / checkpoint.MANIFEST).exists() for s in (1, 2, 3))
  damage(ckpt_dir / "3")
  with caplog.at_level("WARNING", logger="flax_albert_code"):
    assert _restore(tmp_path) == (2.0, 2)
  assert re.search(rf"Checkpoint step 3 is unusable \(.*({words}).*\); falling back to step 2",
                   caplog.text), caplog.text
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2"]
  assert (tmp_path / "checkpoints_corrupt" / "3").is_dir()
  # Step 3 can be saved again (orbax would skip a step <= a listed one).
  _small_checkpoints(tmp_path, steps=(3,))
  assert _restore(tmp_path) == (3.0, 3)


def test_every_step_damaged_is_one_error_and_nothing_moves(tmp_path):
  ckpt_dir = _small_checkpoints(tmp_path, steps=(1, 2))
  for s in ("1", "2"):
    _flip_a_bit(_largest_array_file(ckpt_dir / s))
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/2 could not be restored "
                     r"\(.* does not match its sha256 .*\), nor could any earlier one \(1 "
                     r"tried\); delete the bad step directories"):
    _restore(tmp_path)
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2"]
  with pytest.raises(checkpoint.CheckpointError, match=r"is corrupt \(.*sha256.*\); pass an "
                     r"earlier step directory\."):
    checkpoint_io.load_for_inference(str(tmp_path))

# ---- Fuzzing: nothing a user can feed in ends in a traceback. ----

import collections  # noqa: E402
import gzip  # noqa: E402
import tempfile  # noqa: E402

import hypothesis  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flax_albert_code.data import mining, sources  # noqa: E402

FUZZ = hypothesis.settings(max_examples=150, deadline=None,
                           suppress_health_check=[hypothesis.HealthCheck.too_slow])
FILTERS = mining.Filters()
# Pieces of Python, some broken, to put together in any order.
PYTHONISH = st.lists(st.one_of(st.sampled_from([
    "def f(x):", "async def g(a, *b, **c):", "class C:", "class D(C):", "@dec", "@dec(1)\n",
    '"""Return the thing for the caller."""', "'''doc\n\nmore'''", '"""', "'''", "r'''x'''",
    "return x", "pass", "    ", "\t", "\n", "\r\n", "\r", "\x0c", "\\\n", "#", " # note\n",
    "lambda: 0", "(", ")", "[", "]", "{", "}", ":", "=", "if x:", "else:", "try:", "except E:",
    "finally:", "match x:", "case 1:", "while True:", "with a as b:", "yield", "await x",
    "\u2028", "\u2581", "\ufeff", "é", "𝔘", "\x00", "'", '"', "f'{x}'", "b'\\xff'", "0x", "1e",
]), st.text(max_size=4)), max_size=60).map("".join)


def _units_of(path, spec):
  skipped = collections.Counter()
  pairs = [p for u in sources.units(spec) for p in u.read(FILTERS, skipped)]
  return pairs, skipped


def _check_pairs(pairs, skipped, mined=True):
  for p in pairs:
    assert isinstance(p, mining.Pair) and FILTERS.reason_to_skip(p.description, p.code) is None
    assert p.code.endswith("\n") or not mined       # jsonl code is taken as it is
  assert all(isinstance(n, int) and n > 0 for n in skipped.values())


@FUZZ
@hypothesis.given(st.binary(max_size=2000))
def test_fuzz_miner_on_random_bytes(data):
  with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "m.py"), "wb") as f:
      f.write(data)
    _check_pairs(*_units_of(d, f"dir:{d}"))


@FUZZ
@hypothesis.given(PYTHONISH)
@hypothesis.example('def f(x):\n    """Return the thing for the caller."""\n    return x\n')
@hypothesis.example("def f():\n  '''Doc string of f here.'''; x = 1\n  return x\n")
@hypothesis.example("class C:\n def f(s):\n  '''A method with a docstring.'''\n  return s\n" * 3)
def test_fuzz_miner_on_python_ish_text(text):
  skipped = collections.Counter()
  pairs = mining.mine_text(text, "t.py", "dir:t", FILTERS, skipped)
  _check_pairs(pairs, skipped)
  with tempfile.TemporaryDirectory() as d:     # the same text through the file reader
    with open(os.path.join(d, "m.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
      f.write(text)
    _check_pairs(*_units_of(d, f"dir:{d}"))


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3), max_leaves=6)
FIELDS = ["description", "docstring", "code", "original_string", "path", "partition", "split",
          "repo", "func_name", "name", "lineno", "url"]
RECORD = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUE | st.sampled_from([
    "Return the thing for the caller now.", "def f(x):\n    '''Doc.'''\n    return x\n",
    "def f(x):\n    return x\n", "print 'py2'", "train", "test", "x#L12", "x#L" + "9" * 5000]),
    max_size=8)
LINE = st.one_of(RECORD.map(lambda r: json.dumps(r).encode()),
                 JSON_VALUE.map(lambda v: json.dumps(v).encode()),
                 st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.binary(max_size=40))


@FUZZ
@hypothesis.given(st.lists(LINE, max_size=12), st.sampled_from(["jsonl", "csn"]),
                  st.sampled_from(["plain", "gzip", "cut gzip"]))
@hypothesis.example([json.dumps({"docstring": "Return the thing for the caller now.",
                                 "code": "def f(x):\n    return x\n",
                                 "url": "x#L" + "9" * 5000}).encode()], "jsonl", "plain")
@hypothesis.example([b"0\n0", b"0\n0"], "jsonl", "plain")   # lines with line breaks (a CI run)
def test_fuzz_jsonl_and_codesearchnet_readers_on_malformed_lines(lines, kind, packing):
  data = b"\n".join(lines) + b"\n"
  # A generated line may itself hold line breaks: bound by the physical lines of the file.
  rows = max(len(data.splitlines()), len(data.decode("utf-8", "replace").splitlines()))
  with tempfile.TemporaryDirectory() as d:
    name = os.path.join(d, "rows.jsonl" + ("" if packing == "plain" else ".gz"))
    if packing != "plain":
      data = gzip.compress(data)
      data = data[:len(data) // 2] if packing == "cut gzip" else data
    with open(name, "wb") as f:
      f.write(data)
    pairs, skipped = _units_of(d, f"{kind}:{d}")
  _check_pairs(pairs, skipped, mined=kind == "csn")
  assert len(pairs) + sum(skipped.values()) <= rows + 1


# Wrong-typed or out-of-range overrides: (flag, what the error names).
BAD_OVERRIDES = [
    ("train.steps=abc", "--config.train.steps=abc: invalid literal for int()"),
    ("train.steps=1.5", "--config.train.steps=1.5: invalid literal for int()"),
    ("train.steps=", "--config.train.steps=: invalid literal for int()"),
    ("train.steps=-3", "config.train.steps=-3 must be at least 1."),
    ("train.batch_size=0", "config.train.batch_size=0 must be at least 1."),
    ("train.learning_rate=fast", "--config.train.learning_rate=fast: could not convert"),
    ("train.learning_rate=1e400", "config.train.learning_rate=inf is not a finite number"),
    ("train.learning_rate=-1", "config.train.learning_rate=-1.0 must be positive."),
    ("train.precompile=maybe", "--config.train.precompile=maybe: "),
    ("data.code_buckets=abc", "config.data.code_buckets=('abc',) is not a tuple of positive ints"),
    ("data.code_buckets=(64,-1)", "config.data.code_buckets=(64, -1) is not a tuple of positive"),
    ("data.code_buckets=(1,", "--config.data.code_buckets=(1,: "),
    ("model.hidden_size=\U0001f642", "--config.model.hidden_size=\U0001f642: invalid literal"),
    ("mesh.data=--1", "--config.mesh.data=--1: invalid literal for int()"),
]


def test_fuzz_wrong_typed_config_overrides_end_in_one_sentence(tmp_path):
  """Each bad override, through the train CLI: exit 1, one line naming the field and the
  problem, no traceback, nothing started (overrides are parsed before jax is imported)."""
  cmds = [[sys.executable, "-m", "flax_albert_code.train", "--config", "configs/tiny.py",
           "--workdir", str(tmp_path / str(i)), f"--config.{flag}"]
          for i, (flag, _) in enumerate(BAD_OVERRIDES)]
  procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")) for c in cmds]
  for (flag, words), proc in zip(BAD_OVERRIDES, procs):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (flag, out, err)
    assert "Traceback" not in err and "Training config" not in out, (flag, err)
    first = err.strip().splitlines()[0]      # ours, or absl's one-line parse error
    assert first.startswith(("error: ", "FATAL Flags parsing error: ")), (flag, err)
    assert words in first, (flag, err)
  assert not any((tmp_path / str(i)).exists() for i in range(len(BAD_OVERRIDES)))
