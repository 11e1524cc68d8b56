"""Real multi-process training: 2 processes x 4 CPU devices, coordinated by
`jax.distributed.initialize` on loopback (CPU collectives via gloo), against 1 process x 8 devices.

Every run is a command users launch: the 2-process run is `launch/gpu.sh --hosts 2` twice (it
exports JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID and runs
`python -m flax_albert_code.train --multihost`), the others `python -m flax_albert_code.train`;
all on the tiny config over a (data 2, fsdp 2, tensor 2) mesh. Losses come from metrics.jsonl,
which only process 0 writes.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "flax_albert_code", "configs", "tiny.py")
# configs/tiny.py, one code bucket, batch 8 (4 rows a process), a constant LR (so train.steps
# does not change the step), a metric every step, no evaluation or samples.
OVERRIDES = {
    "data.max_examples": 160, "data.max_desc_len": 32, "data.max_code_len": 64,
    "data.code_buckets": (64,), "data.valid_fraction": 0.1, "data.test_fraction": 0.05,
    "train.batch_size": 8, "train.schedule": "constant", "train.learning_rate": 3e-3,
    "train.warmup_steps": 1, "train.log_every": 1, "train.eval_every": 0,
    "train.checkpoint_every": 1000, "train.samples_at_end": 0,
    "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
}
TIMEOUT = 240


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def overrides(data_dir, steps: int) -> list[str]:
  values = {**OVERRIDES, "data.data_dir": str(data_dir), "train.steps": steps}
  return [f"--config.{k}={v}" for k, v in values.items()]


def environment(cache_dir, local_devices: int, **extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM",
                              "TPU_WORKER"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
             JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
             **extra)
  return env


def launch(commands: list[list[str]], envs: list[dict[str, str]], log_dir) -> list[str]:
  """Runs the commands at once (output to files: a full pipe must not stall a process that the
  others wait for in a collective); returns their outputs, failing on any non-zero exit."""
  logs = [os.path.join(log_dir, f"process-{i}.log") for i in range(len(commands))]
  procs = []
  try:
    for cmd, env, log in zip(commands, envs, logs):
      with open(log, "w") as f:
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f,
                                      stderr=subprocess.STDOUT))
    for p in procs:
      p.wait(timeout=TIMEOUT)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = []
  for i, (p, log) in enumerate(zip(procs, logs)):
    with open(log, errors="replace") as f:
      outs.append(f.read())
    assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{outs[-1][-4000:]}"
  return outs


def train_one_process(workdir, data_dir, cache_dir, steps: int) -> str:
  cmd = [sys.executable, "-m", "flax_albert_code.train", "--config", TINY, "--workdir",
         str(workdir), "--nomultihost", *overrides(data_dir, steps)]
  return launch([cmd], [environment(cache_dir, 8)], cache_dir.parent)[0]


def train_two_processes(workdir, data_dir, cache_dir, steps: int) -> list[str]:
  """launch/gpu.sh --hosts 2 on one machine: it exports JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID and runs train.py --multihost."""
  port = free_port()
  cmds = [["bash", os.path.join(REPO, "launch", "gpu.sh"), "--hosts", "2", "--host-rank", str(i),
           "--coordinator", f"127.0.0.1:{port}", "--config", TINY, "--workdir", str(workdir),
           "--", *overrides(data_dir, steps)] for i in range(2)]
  env = environment(cache_dir, 4, PYTHON=sys.executable,
                    JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
  return launch(cmds, [env, env], cache_dir.parent)


def history(workdir) -> dict[int, dict[str, float]]:
  """Per-step training metrics from metrics.jsonl (the last record of a step wins)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "loss" in rec:
        out[rec["step"]] = rec
  return out


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(tmp_path):
  data_dir, cache_dir = tmp_path / "data", tmp_path / "jax_cache"
  one, two = tmp_path / "one", tmp_path / "two"
  # Reference: 1 process x 8 devices, 3 steps (prepares the data the other runs reuse).
  train_one_process(one, data_dir, cache_dir, steps=3)
  # 2 processes x 4 devices, 2 steps, checkpoint at step 2 (the last step).
  outs = train_two_processes(two, data_dir, cache_dir, steps=2)
  assert "on 8 cpu device(s) in 2 process(es)" in outs[0], outs[0][-2000:]
  assert "Training config" not in outs[1] and "train loss" not in outs[1], outs[1][-2000:]
  ref, multi = history(one), history(two)
  assert sorted(ref) == [1, 2, 3] and sorted(multi) == [1, 2]
  for k in ("loss", "gen_loss", "infonce_loss", "grad_norm", "param_norm"):
    # float32 reductions over another device/process layout: differences ~1e-7 relative.
    np.testing.assert_allclose([multi[s][k] for s in (1, 2)], [ref[s][k] for s in (1, 2)],
                               rtol=1e-5, err_msg=k)
  step_dir = two / "checkpoints" / "2"
  assert sorted(p.name for p in (step_dir / "data").glob("process_*")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  # The 2-process checkpoint resumes in 1 process x 8 devices: state and data position, so its
  # step 3 is the uninterrupted run's step 3.
  out = train_one_process(two, data_dir, cache_dir, steps=3)
  assert "Resumed from step 2" in out and "step 3: train loss" in out, out[-2000:]
  resumed = history(two)
  assert sorted(resumed) == [1, 2, 3]
  for k in ("loss", "gen_loss", "infonce_loss", "grad_norm", "param_norm"):
    np.testing.assert_allclose(resumed[3][k], ref[3][k], rtol=1e-5, err_msg=k)
