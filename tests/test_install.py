"""A non-editable install works: a wheel built from this tree, installed into a fresh venv, trains
from a directory outside the repository and finds its shipped configs (the default one, and
`--config configs/tiny.py` / `--config tiny`).

Nothing is downloaded: the wheel is built with the installed setuptools (`--no-build-isolation`)
and installed with `--no-deps --no-index`; the venv sees the dependencies where this interpreter
has them (`venv_util.make`: `--system-site-packages`, and the site-packages of the virtualenv the
tests run in, if any). Its interpreter runs with `-I` (no PYTHONPATH, no script directory on
sys.path), and the test checks that `flax_albert_code` comes from the venv, not from this checkout
or an editable install.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

import venv_util

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
# configs/tiny.py's model on the default config, 40 functions, one code bucket, 2 steps.
TINY_MODEL = {
    "model.embedding_size": 16, "model.hidden_size": 32, "model.num_attention_heads": 4,
    "model.intermediate_size": 64, "model.num_hidden_layers": 2, "model.decoder_layers": 2,
    "model.max_position_embeddings": 128, "model.align_dim": 16,
}
FAST = {
    "data.max_examples": 0, "data.tokenizer_vocab_size": 400, "data.max_desc_len": 32,
    "data.max_code_len": 64, "data.code_buckets": "(64,)", "train.steps": 2,
    "train.batch_size": 8, "train.warmup_steps": 0, "train.log_every": 1, "train.eval_every": 0,
    "train.samples_at_end": 0,
}


def _can_build_wheels() -> bool:
  """setuptools builds wheels itself from 70.1; before that it needs `wheel` (a test extra)."""
  import setuptools  # pylint: disable=import-outside-toplevel
  major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
  return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _env(tmp_path) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _run(cmd, cwd, env, timeout=600) -> subprocess.CompletedProcess:
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


def _write_sources(root) -> None:
  root.mkdir()
  for f in range(10):
    (root / f"m{f}.py").write_text("".join(
        f'def f{f}_{g}(x):\n    """Scale x by {g} and add {f} to it."""\n'
        f'    return x * {g} + {f}\n\n'
        for g in range(4)))


def test_a_venv_made_inside_a_virtualenv_sees_its_packages(tmp_path):
  """What the wheel's venv below relies on, from inside a virtualenv holding a package the base
  Python lacks (a README install in `python3 -m venv v`): a plain `--system-site-packages` venv
  made there would not see it."""
  import venv as venv_lib  # pylint: disable=import-outside-toplevel
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  venv_lib.create(tmp_path / "outer", with_pip=False)   # its own site-packages only
  outer = str(tmp_path / "outer" / "bin" / "python")
  purelib = _run([outer, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                 tmp_path, env).stdout.strip()
  with open(os.path.join(purelib, "only_in_the_outer_venv.py"), "w", encoding="utf-8") as f:
    f.write("WHERE = 'outer-venv'\n")
  make = (f"import sys; sys.path.insert(0, {TESTS!r}); import venv_util; "
          f"print(venv_util.make({str(tmp_path / 'inner')!r}))")
  inner = _run([outer, "-I", "-c", make], tmp_path, env).stdout.strip()
  assert inner == str(tmp_path / "inner" / "bin" / "python")
  probe = "import only_in_the_outer_venv as m, sys; print(m.WHERE, sys.prefix)"
  where, prefix = _run([inner, "-I", "-c", probe], tmp_path, env).stdout.split()
  assert where == "outer-venv" and prefix == str(tmp_path / "inner")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  """(venv python, environment, a directory outside the repository) with the wheel installed."""
  if not _can_build_wheels():
    pytest.skip("setuptools < 70.1 without `wheel` cannot build a wheel; pip install -e '.[test]'.")
  tmp = tmp_path_factory.mktemp("install")
  env = _env(tmp)
  src = tmp / "src"   # what the wheel is built from: this working tree, without build litter
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  shutil.copytree(os.path.join(REPO, "flax_albert_code"), src / "flax_albert_code",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", str(tmp / "dist"), str(src)], tmp, env)
  wheels = glob.glob(str(tmp / "dist" / "flax_albert_code-*.whl"))
  assert len(wheels) == 1, wheels
  python = venv_util.make(str(tmp / "venv"), env)
  # The pip this interpreter sees, run by the venv's interpreter, installs into the venv.
  _run([python, "-I", "-m", "pip", "install", "--no-deps", "--no-index", wheels[0]], tmp, env)
  outside = tmp / "elsewhere"
  outside.mkdir()
  _write_sources(tmp / "sources")
  return python, env, outside, tmp


def test_the_wheel_ships_configs_and_static_files(venv):
  python, env, outside, _ = venv
  probe = ("import json, os, flax_albert_code as p; d = os.path.dirname(p.__file__); "
           "print(json.dumps([p.__file__, os.listdir(os.path.join(d, 'configs')), "
           "os.listdir(os.path.join(d, 'static'))]))")
  where, configs, static = json.loads(_run([python, "-I", "-c", probe], outside, env).stdout)
  where = os.path.realpath(where)
  assert where.startswith(os.path.realpath(os.path.dirname(os.path.dirname(python))) + os.sep)
  assert not where.startswith(os.path.realpath(REPO) + os.sep)   # nor /work/main's editable one
  assert os.sep + "site-packages" + os.sep in where
  assert {"default.py", "tiny.py", "albert.py", "quality.py", "common.py"} <= set(configs)
  assert "playground.html" in static


@pytest.mark.parametrize("config", [None, "configs/tiny.py", "tiny"])
def test_train_from_outside_the_repository(venv, config):
  python, env, outside, tmp = venv
  overrides = {**FAST, "data.sources": f"dir:{tmp / 'sources'}",
               "data.data_dir": str(tmp / "data")}   # prepared once, by the first run
  if config is None:   # the bare command: the default config, found inside the package
    overrides.update(TINY_MODEL)
  name = config or "default"
  workdir = outside / f"run_{name.replace('/', '_')}"
  cmd = [python, "-I", "-m", "flax_albert_code.train", *(["--config", config] if config else []),
         "--workdir", str(workdir), *[f"--config.{k}={v}" for k, v in overrides.items()]]
  out = _run(cmd, outside, env).stdout
  assert f"Training config '{'small' if config is None else 'tiny'}'" in out, out
  assert "step 2: train loss" in out
  ckpt = workdir / "checkpoints" / "2"
  assert f"checkpoint: {ckpt}" in out
  assert {p.name for p in ckpt.iterdir()} >= {"state", "data", "config"}
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
           if "loss" in json.loads(line)]
  assert steps == [1, 2]
