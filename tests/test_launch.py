"""Launch scripts and notebook: shellcheck, the commands `--dry-run` prints, the Colab notebook run
top to bottom on CPU with a tiny config, and gs:// workdir paths (a local fake of GCS)."""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
TPU_VM = os.path.join(LAUNCH, "tpu_vm.sh")
GPU = os.path.join(LAUNCH, "gpu.sh")
BASE = ["--name", "albert", "--zone", "us-central2-b", "--bucket", "gs://my-bucket/"]


def shell_scripts() -> list[str]:
  found = [os.path.join(REPO, ".ci", "run")]
  for pattern in ("launch/*.sh", "launch/*.sbatch", "benchmarks/*.sh", "*.sh"):
    found += glob.glob(os.path.join(REPO, pattern))
  return sorted(set(found))


def test_shellcheck_passes_on_every_script():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (.ci/run installs Debian's package).")
  scripts = shell_scripts()
  assert {os.path.join(LAUNCH, s) for s in ("tpu_vm.sh", "gpu.sh", "slurm.sbatch")} <= set(scripts)
  result = subprocess.run(["shellcheck", "--severity=info", *scripts], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def sh(script: str, *args: str, ok: bool = True, env=None) -> str:
  result = subprocess.run(["bash", script, *args], capture_output=True, text=True, cwd=REPO,
                          env=env)
  assert (result.returncode == 0) == ok, result.stdout + result.stderr
  return result.stdout if ok else result.stderr


def commands(out: str) -> list[list[str]]:
  """The printed commands as argument lists (comment lines dropped)."""
  return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def remote(cmd: list[str]) -> str:
  """The shell command a `gcloud ... ssh --command CMD` line runs on the workers."""
  return cmd[cmd.index("--command") + 1]


def find(cmds: list[list[str]], *prefix: str) -> list[list[str]]:
  return [c for c in cmds if c[:len(prefix)] == list(prefix)]


def test_tpu_vm_dry_run_creates_installs_prepares_and_trains_on_all_workers():
  tricky = "--config.data.sources=stdlib,dir:~/my repo's code"
  out = sh(TPU_VM, "--dry-run", *BASE, "--accelerator-type", "v4-32", "--project", "proj",
           "--", tricky, "--config.train.steps=10")
  assert [line[2:] for line in out.splitlines() if line.startswith("# ") and " " not in line[2:]
          ] == ["create", "install", "prepare", "train"]
  cmds = commands(out)
  where = ["--zone=us-central2-b", "--project=proj"]
  assert find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create") == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "albert", *where,
      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]
  ssh = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  assert len(ssh) == 3 and all(c[5:9] == ["albert", *where, "--worker=all"] for c in ssh)
  install, prep, train = (remote(c) for c in ssh)
  assert find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")[0][-1] == "--worker=all"
  assert "pip install -q -e \".[gcs]\" \"jax[tpu]>=0.10\"" in install
  workdir = "gs://my-bucket/runs/albert"
  # The worker's shell gets back exactly our arguments: overrides survive both quotings.
  assert shlex.split(prep) == [
      "cd", "~/flax_albert_code", "&&", "python3", "-m", "flax_albert_code.prepare",
      "--config", "configs/base.py", tricky, "--config.train.steps=10", "--workdir", workdir]
  assert shlex.split(train) == [
      "cd", "~/flax_albert_code", "&&", "setsid", "nohup", "python3", "-m",
      "flax_albert_code.train", "--config", "configs/base.py", tricky, "--config.train.steps=10",
      "--workdir", workdir, "--multihost", ">", "$HOME/train-albert.log", "2>&1", "<",
      "/dev/null", "&"]
  # What to do next is printed: logs, TensorBoard on the bucket, fetch, delete.
  assert f"tensorboard --logdir {workdir}/tensorboard" in out
  assert "--run albert logs" in out and "--run albert fetch" in out and "delete" in out


def test_tpu_vm_dry_run_queued_spot_logs_fetch_delete_and_watch():
  out = sh(TPU_VM, "--dry-run", *BASE, "--queued", "--spot", "--run", "r1",
           "create", "logs", "status", "fetch", "delete", "watch")
  cmds = commands(out)
  qr = ["gcloud", "compute", "tpus", "queued-resources"]
  assert find(cmds, *qr, "create")[0] == [
      *qr, "create", "albert", "--node-id=albert", "--zone=us-central2-b",
      "--accelerator-type=v4-8", "--runtime-version=tpu-ubuntu2204-base", "--spot"]
  assert [*qr, "describe", "albert", "--zone=us-central2-b", "--format=value(state.state)"] in cmds
  assert find(cmds, *qr, "delete")[0] == [*qr, "delete", "albert", "--zone=us-central2-b",
                                         "--force", "--quiet"]
  ssh = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  assert "tail -n 100 -F $HOME/train-r1.log" in [remote(c) for c in ssh]
  assert ["gcloud", "storage", "cp", "-r", "gs://my-bucket/runs/r1", "runs/"] in cmds
  assert ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
          "albert:.cache/flax_albert_code/data", "runs/r1/", "--zone=us-central2-b",
          "--worker=0"] in cmds
  # watch: one round that finds the VM preempted deletes, recreates, installs, prepares, trains.
  watch = out[out.index("# watch"):]
  assert [c[4] for c in find(commands(watch), *qr) if c[4] in ("create", "delete")] == [
      "delete", "create"]
  assert "flax_albert_code.train" in watch and "flax_albert_code.prepare" in watch


def test_tpu_vm_plain_delete_and_errors_in_one_sentence():
  out = sh(TPU_VM, "--dry-run", "--name=albert", "--zone=z", "delete")
  assert commands(out) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "albert",
                            "--zone=z", "--quiet"]]
  for args, message in [
      (["--zone", "z"], "--name is required"),
      (["--name", "a", "--zone", "z", "train"], "step 'train' needs --bucket gs://BUCKET"),
      (["--name", "a", "--zone", "z", "--bucket", "my-bucket"], "--bucket must be a gs:// URL"),
      (["--name", "a", "--zone", "z", "deploy"], "unknown step 'deploy'"),
      (["--name", "a", "--zone", "z", "--gpus", "1"], "unknown option --gpus")]:
    err = sh(TPU_VM, "--dry-run", *args, ok=False)
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_gpu_dry_run_one_gpu_one_host_and_several_hosts():
  assert commands(sh(GPU, "--dry-run")) == [[
      "python3", "-m", "flax_albert_code.train", "--config", "configs/base.py", "--workdir",
      "runs/base"]]
  assert commands(sh(GPU, "--dry-run", "--gpus", "0", "--config", "configs/large.py", "--",
                     "--config.mesh.fsdp=-1"))[0] == [
      "env", "CUDA_VISIBLE_DEVICES=0", "python3", "-m", "flax_albert_code.train", "--config",
      "configs/large.py", "--workdir", "runs/large", "--config.mesh.fsdp=-1"]
  assert commands(sh(GPU, "--dry-run", "--hosts", "2", "--host-rank", "1", "--coordinator",
                     "10.0.0.1:1234", "--workdir", "/shared/runs/b"))[0] == [
      "env", "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234", "JAX_NUM_PROCESSES=2", "JAX_PROCESS_ID=1",
      "python3", "-m", "flax_albert_code.train", "--config", "configs/base.py", "--workdir",
      "/shared/runs/b", "--multihost"]
  for args, message in [(["--hosts", "2"], "needs --coordinator"),
                        (["--hosts", "2", "--coordinator", "h:1", "--host-rank", "2"],
                         "--host-rank must be 0..1"),
                        (["--gpus", "x"], "--gpus must be")]:
    err = sh(GPU, "--dry-run", *args, ok=False)
    assert err.startswith("error: ") and message in err, err


def test_slurm_script_prepares_once_then_trains_every_task(tmp_path):
  """launch/slurm.sbatch with a stand-in `srun` that records its arguments."""
  log = tmp_path / "srun.log"
  srun = tmp_path / "srun"
  srun.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {shlex.quote(str(log))}\n')
  srun.chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", PYTHON="py")
  sh(os.path.join(LAUNCH, "slurm.sbatch"), "configs/large.py", "/shared/l",
     "--config.mesh.fsdp=-1", env=env)
  assert log.read_text().splitlines() == [
      "--nodes=1 --ntasks=1 py -m flax_albert_code.prepare --config configs/large.py --workdir "
      "/shared/l --config.mesh.fsdp=-1",
      "py -m flax_albert_code.train --config configs/large.py --workdir /shared/l --multihost "
      "--config.mesh.fsdp=-1"]


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom_on_cpu_with_a_tiny_config(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(os.path.join(LAUNCH, "colab_tpu.ipynb"), as_version=4)
  at = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(at) == 1
  workdir, export_dir = tmp_path / "run", tmp_path / "export"
  params = {
      "CONFIG": os.path.join(REPO, "flax_albert_code", "configs", "tiny.py"),
      "OVERRIDES": {"train.steps": 4, "train.eval_every": 0, "train.samples_at_end": 0,
                    "data.max_examples": 200, "data.test_fraction": 0.1},
      "WORKDIR": str(workdir), "EXPORT_DIR": str(export_dir), "EVAL_EXAMPLES": 4,
      "EVAL_ARGS": ["--no-baselines", "--max-candidates", "8"],
      "EXPORT_ARGS": ["--strategies", "greedy", "--buckets", "1", "--platforms", "cpu",
                      "--no-hf-encoder"],
  }
  injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(at[0] + 1, injected)
  # The kernel is `python` on PATH: make it this interpreter (and its packages).
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": LAUNCH}})
  client.execute()

  def text(i: int) -> str:
    return "".join(o.get("text", "") for o in nb.cells[i].outputs)

  code = {c.source.split("\n", 1)[0]: i for i, c in enumerate(nb.cells) if c.cell_type == "code"}
  devices = text(code["import logging"])
  assert "8 cpu device(s)" in devices and "No TPU: running on cpu" in devices
  assert f"flax_albert_code at {REPO}" in text(code["import glob"])
  trained = code["from flax_albert_code.training import loop as trainer"]
  assert "step 4: train loss" in text(trained)
  assert (workdir / "checkpoints" / "4").is_dir()
  generator_cell = code["from flax_albert_code.inference.generator import CodeGenerator"]
  assert text(generator_cell).count("\n# ") >= 2
  assert json.loads(next(workdir.rglob("report.json")).read_text())["rows"]
  assert json.loads((export_dir / "manifest.json").read_text())["step"] == 4


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs:// served by a local directory through fsspec, as etils.epath reaches GCS (gcsfs)."""
  registry = pytest.importorskip("fsspec.registry")
  from fsspec.implementations.dirfs import DirFileSystem
  from fsspec.implementations.local import LocalFileSystem
  root = tmp_path / "gcs"
  root.mkdir()

  class FakeGCS(DirFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, *args, **kwargs):
      del args, kwargs
      super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

  from etils.epath import backend
  cached = backend._FileSystemSpecBackend._get_filesystem  # pylint: disable=protected-access
  for name in ("gs", "gcs"):
    monkeypatch.setitem(registry._registry, name, FakeGCS)  # pylint: disable=protected-access
  cached.cache_clear()
  monkeypatch.chdir(tmp_path)
  yield root
  cached.cache_clear()


def test_metrics_on_a_gs_workdir_go_to_the_bucket(fake_gcs, tmp_path):
  from flax_albert_code.training import metrics
  for steps in ([1, 2], [3]):   # a resumed run keeps the earlier lines
    writer = metrics.Writer("gs://bucket/runs/r", tensorboard=False)
    for s in steps:
      writer.write(s, {"loss": 1.0 / s})
    writer.close()
  lines = (fake_gcs / "bucket" / "runs" / "r" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
  assert not (tmp_path / "gs:").exists()


def test_gs_workdir_prepares_data_on_local_disk(tmp_path, monkeypatch):
  from flax_albert_code.training import checkpoint
  from flax_albert_code import config as config_lib
  from flax_albert_code.data import prepared
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  config = config_lib.get_config("tiny")
  assert prepared.data_root(config, "gs://b/runs/r") == str(
      tmp_path / "home" / ".cache" / "flax_albert_code" / "data")
  assert prepared.data_root(config, "runs/r") == os.path.abspath("runs/r/data")  # the default
  assert str(checkpoint.checkpoint_dir("gs://b/runs/r")) == "gs://b/runs/r/checkpoints"
  config.data.data_dir = "gs://b/data"
  with pytest.raises(prepared.DataError, match=r"data_dir=gs://b/data is not a local path"):
    prepared.data_root(config, "runs/r")
