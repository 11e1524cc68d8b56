"""A tiny checkpoint (random weights, a real sentencepiece tokenizer) and its export, built once
per test session and shared by the pytest-xdist workers through a file lock."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import filelock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESCRIPTIONS = ["add two numbers", "reverse a string", "read a file and count its lines",
                "sort a list of numbers", "merge two dictionaries", "parse a date string"]
CODES = ["def add(a, b):\n  return a + b\n", "def rev(s):\n  return s[::-1]\n",
         "def count(p):\n  with open(p) as f:\n    return len(f.readlines())\n",
         "def srt(x):\n  return sorted(x)\n", "def merge(a, b):\n  return {**a, **b}\n",
         "import datetime\n\ndef parse(s):\n  return datetime.date.fromisoformat(s)\n"]


def tiny_config():
  from flax_albert_code import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.get_config("tiny")
  config.model.initializer_range = 0.2
  config.data.max_desc_len = 24
  config.data.code_buckets = (16, 32)
  config.sample.max_new_tokens = 12
  config.sample.batch_buckets = (1, 4)
  config.sample.num_beams = 2
  return config


def make_checkpoint(workdir: str) -> str:
  """A training workdir with one checkpoint (step 7) of random tiny weights, a tokenizer named by
  config.data.tokenizer_path and a metrics.jsonl holding validation metrics."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax_albert_code import tokenizer  # pylint: disable=import-outside-toplevel
  from flax_albert_code.training import checkpoint  # pylint: disable=import-outside-toplevel
  from flax_albert_code.model import albert as model_lib  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from weights_util import random_variables  # pylint: disable=import-outside-toplevel
  os.makedirs(workdir, exist_ok=True)
  texts = [f"{d} {i}" for i in range(40) for d in DESCRIPTIONS] + CODES * 20
  spm = os.path.join(workdir, "spm.model")
  tok = tokenizer.train_tokenizer(texts, spm, vocab_size=400, num_threads=1)
  config = tiny_config()
  config.model.vocab_size = tok.vocab_size   # as training sets it
  config.data.tokenizer_path = spm
  model = model_lib.build(config)[0]
  ids = jnp.ones((1, 8), jnp.int32)
  params = random_variables(model, ids, ids)["params"]
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(7, {"step": 7, "params": {"model": params}}, config=config, force=True)
  ckpt.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 5, "valid_loss": 3.5, "valid_acc": 0.25}) + "\n")
  return workdir


def shared_export(tmp_path_factory) -> tuple[str, str]:
  """(workdir, export dir) of the tiny run, built by the first worker that asks (all xdist
  workers of a session share it)."""
  from flax_albert_code.deploy import writer as export  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.getbasetemp()
  root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
  out, workdir = os.path.join(root, "tiny_export"), os.path.join(root, "tiny_run")
  with filelock.FileLock(os.path.join(root, "tiny_export.lock")):
    if not os.path.isfile(os.path.join(out, "manifest.json")):
      make_checkpoint(workdir)
      export.export(workdir, out)
  return workdir, out


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def subprocess_env(export_dir: str) -> dict[str, str]:
  """The environment of a child process that runs the export: one CPU device, as a server has,
  and JAX's persistent compilation cache shared by the session's children."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "JAX_COMPILATION_CACHE_DIR": os.path.join(os.path.dirname(export_dir), "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env.pop("XLA_FLAGS", None)
  return env


class Server:
  """`python -m flax_albert_code.serve` in a subprocess on a free loopback port."""

  def __init__(self, export_dir: str, *args: str, log_path: str, timeout: float = 90.0):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    env = subprocess_env(export_dir)
    self.log = open(log_path, "wb")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "flax_albert_code.serve", "--export", export_dir,
         "--host", "127.0.0.1", "--port", str(self.port), *args],
        stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.time() + timeout
    while True:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()[-3000:]}")
      try:
        with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      if time.time() > deadline:
        self.stop()
        raise RuntimeError(f"server did not start in {timeout} s: {self.output()[-3000:]}")
      time.sleep(0.2)

  def output(self) -> str:
    self.log.flush()
    with open(self.log.name, "rb") as f:
      return f.read().decode("utf-8", "replace")

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=15)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()


def request(url: str, body=None, *, method: str | None = None, headers=None,
            timeout: float = 60.0) -> tuple[int, bytes, dict]:
  """(status, body, headers) of one HTTP request; `body` is bytes or JSON-able."""
  import urllib.error  # pylint: disable=import-outside-toplevel
  data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                               headers={"Content-Type": "application/json", **(headers or {})})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, r.read(), dict(r.headers)
  except urllib.error.HTTPError as e:
    return e.code, e.read(), dict(e.headers)
