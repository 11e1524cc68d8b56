"""benchmarks/bench_model.py runs end to end on CPU (its tiny workload) and writes its JSON."""
import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_model_tiny_writes_positive_rates(tmp_path):
  out = tmp_path / "bench.json"
  # One device; XLA:CPU without its backend optimisations compiles ~2x faster here (a smoke
  # test: the rates only have to exist, not be fast).
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                       "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  proc = subprocess.run([sys.executable, "benchmarks/bench_model.py", "--workload", "tiny",
                         "--mode", "all", "--out", str(out)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["workload"] == "tiny" and res["versions"]["devices"] == 1
  for name in ("train_generation_step", "train_full_step"):
    r = res[name]
    assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["flops_per_step"] > 0, name
    assert math.isfinite(r["loss"]) and r["params"] > 0, name
  for name in ("generate_greedy", "generate_beam4"):
    r = res[name]
    assert r["tokens_per_s"] > 0 and r["new_tokens"] > 0 and r["gen_s"] > 0, name
