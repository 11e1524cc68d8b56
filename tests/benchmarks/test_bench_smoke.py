"""benchmarks/bench_model.py runs end to end on CPU (its tiny workload) and writes its JSON;
bench_realdata.py, check_generation.py and ab_decode.py on tiny runs; gpu_kernels.py on a
synthetic trace; no benchmark module hides an installed one."""
import glob
import importlib.machinery
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BENCHMARKS = os.path.join(REPO, "benchmarks")


def test_no_benchmark_module_hides_an_installed_one():
  """benchmarks/ lands on sys.path (its scripts import each other, tests import them): a module
  there named like an installed one (benchmarks/kernels.py and the PyPI `kernels` that
  transformers probes for) breaks every later import of it in that process."""
  elsewhere = [p for p in sys.path
               if os.path.realpath(p or os.getcwd()) not in (os.path.realpath(BENCHMARKS),
                                                             os.path.realpath(REPO))]
  names = [os.path.basename(f)[:-3] for f in glob.glob(os.path.join(BENCHMARKS, "*.py"))]
  hidden = {n: spec.origin for n in names
            if (spec := importlib.machinery.PathFinder.find_spec(n, elsewhere)) is not None}
  assert not hidden, f"rename these benchmarks, they hide installed modules: {hidden}"


def test_bench_model_tiny_writes_positive_rates(tmp_path):
  out = tmp_path / "bench.json"
  # One device; XLA:CPU without its backend optimisations compiles ~2x faster here (a smoke
  # test: the rates only have to exist, not be fast).
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                       "--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
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


def test_bench_realdata_tiny_with_retrieval_writes_its_figures(tmp_path):
  from flax_albert_code import config as config_lib
  from flax_albert_code.data.prepared import prepare
  config = config_lib.load_config("tiny")
  config.data.max_examples = 120
  prepare(config, str(tmp_path / "run"), progress=False)
  out, results = tmp_path / "realdata.json", tmp_path / "RESULTS.md"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                       "--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  proc = subprocess.run(
      [sys.executable, "benchmarks/bench_realdata.py", "--config", "configs/tiny.py",
       "--data", str(tmp_path / "run"), "--steps", "3", "--warmup", "1", "--out", str(out),
       "--results", str(results), "--config.data.max_examples=120",
       "--config.data.code_buckets=(64,)", "--config.train.batch_size=8",
       "--config.retrieval.k=2", "--config.retrieval.max_ctx_len=64"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["steps"] == 3 and res["retrieval_k"] == 2 and "BM25" in res["neighbours"]
  assert set(res["tokens_fed"]) == {"desc_ids", "code_ids", "ctx_ids"}
  assert res["tokens_fed"]["code_ids"] == 3 * 8 * 64 and res["tokens_fed"]["ctx_ids"] == 3 * 8 * 64
  assert 0 < res["tokens_useful_per_s"] < res["tokens_fed_per_s"]
  assert all(0 <= p < 1 for p in res["padding_per_field"].values()) and 0 < res["padding"] < 1
  assert res["step_ms_by_bucket"]["64"]["steps"] == 3 and res["flops"] > 0
  assert math.isfinite(res["loss_first_last"][1])
  text = results.read_text()
  assert text.startswith("## Real-data training throughput (issue 21)")
  assert "| useful (non-padding) tokens per second |" in text


def test_check_generation_reports_conditioning_and_self_consistency(tmp_path):
  """On the tiny fixture checkpoint (no retrieval): every input row, greedy equal to the
  decoder's own argmax, the float32 reference equal to the model on CPU."""
  import importlib.util
  import shutil
  spec = importlib.util.spec_from_file_location(
      "check_generation", os.path.join(REPO, "benchmarks", "check_generation.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  run = tmp_path / "run"
  shutil.copytree(os.path.join(REPO, "tests", "fixtures", "old_run", "run"), run)
  out = tmp_path / "check.json"
  assert module.main(["--checkpoint", str(run), "--n", "8", "--reference",
                      "--json", str(out)]) == 0
  res = json.loads(out.read_text())
  rows = res["rows"]
  assert set(rows) == {"as generated", "description alone", "shuffled input",
                       "as generated, XLA float32"}
  assert rows["as generated"] == rows["description alone"]   # no retrieval: the same input
  assert math.isclose(rows["as generated"]["nll"], rows["as generated, XLA float32"]["nll"],
                      rel_tol=1e-5)
  assert res["examples"] >= 2 and res["self_consistency_mismatch"] == 0.0   # the fixture has 5
  g = res["greedy"]
  assert 0 <= g["bp"] <= 1 and len(g["precisions"]) == 4 and g["mean_tokens"] > 0


def test_kernel_table_from_a_trace(tmp_path, capsys):
  """benchmarks/gpu_kernels.py: GPU kernels of a perfetto trace by name and kind, per step."""
  import gzip
  sys.path.append(BENCHMARKS)   # after the installed packages: it hides none of them
  import gpu_kernels as kernels  # pylint: disable=import-outside-toplevel
  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
  for step in range(2):
    for name, dur in (("nvjet_sm90_tst_128x128", 40), ("input_add_reduce_fusion_3", 20),
                      ("cross_kernel", 10), ("loop_convert_fusion", 10)):
      events.append({"ph": "X", "pid": 1, "name": name, "dur": dur, "ts": step})
    events.append({"ph": "X", "pid": 2, "name": "host_thing", "dur": 999, "ts": step})
  (tmp_path / "run").mkdir()
  with gzip.open(tmp_path / "run" / "h.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  totals, counts = kernels.from_trace(str(tmp_path))
  assert "host_thing" not in totals and counts["cross_kernel"] == 2
  assert totals["nvjet_sm90_tst_128x128"] == pytest.approx(0.08)
  kinds = kernels.by_kind(totals, counts)
  assert kinds["gemm"] == (pytest.approx(0.08), 2) and kinds["attention"][1] == 2
  assert kinds["reduction fusion"][1] == 2 and kinds["elementwise fusion"][1] == 2
  kernels.print_table(totals, counts, per=2)
  out = capsys.readouterr().out
  assert "0.080 ms in 4.0 launches" in out and "gemm" in out
  with pytest.raises(FileNotFoundError, match="No \\*.trace.json.gz"):
    kernels.from_trace(str(tmp_path / "run" / "missing"))


def test_ab_decode_tiny_arms_agree_and_a_run_goes_above_the_last(tmp_path):
  # The layer kernels (Pallas' interpreter on CPU), one with a patched tuning constant, give
  # the baseline's tokens; the run goes first under the section's heading, and the earlier run
  # and the section after it survive.
  heading = "## Decoding A/B at batch 4 (issue 21)"
  results = tmp_path / "RESULTS.md"
  results.write_text(f"# Benchmark results\n\n{heading}\n\n### Run of earlier\n\nold\n\n"
                     "## Retrieval-augmented generation\n\nkept\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "benchmarks/ab_decode.py", "--small", "--arms",
                         "baseline,layer,layer_block32", "--results", str(results),
                         "--log-dir", str(tmp_path / "logs"), "--budget-s", "240"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  text = results.read_text()
  assert text.count(heading) == 1 and "old" in text and "kept" in text
  runs = [line for line in text.splitlines() if line.startswith("### Run of")]
  assert len(runs) == 2 and runs[1] == "### Run of earlier"
  rows = {line.split(" | ")[0][2:]: line for line in text.splitlines()
          if line.startswith("| layer")}
  assert set(rows) == {"layer", "layer_block32"}
  assert all("greedy same, beam same" in r and "failed" not in r for r in rows.values())
