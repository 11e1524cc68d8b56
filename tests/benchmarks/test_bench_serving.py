"""benchmarks/bench_serving.py end to end on CPU over the tiny export: both server
configurations, parity with CodeGenerator, its JSON and its RESULTS.md section."""
import importlib.util
import json
import os

import pytest

from export_util import shared_export

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _module():
  spec = importlib.util.spec_from_file_location(
      "bench_serving", os.path.join(REPO, "benchmarks", "bench_serving.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bench_serving_measures_both_servers_and_checks_parity(tmp_path_factory, tmp_path):
  bench = _module()
  _, export_dir = shared_export(tmp_path_factory)
  out, results = tmp_path / "serving.json", tmp_path / "RESULTS.md"
  results.write_text("# Results\n\n## Serving on the GPU (issue 21)\n\nold\n\n## Next\n\nkept\n")
  assert bench.main(["--export", export_dir, "--out", str(out), "--results", str(results),
                     "--new-tokens", "4", "--clients", "1,4", "--seconds", "0.2",
                     "--parity-descriptions", "2"]) == 0
  res = json.loads(out.read_text())
  assert set(res["runs"]) == {"batched", "one_at_a_time"}
  for mode, rows in res["runs"].items():
    assert [r["clients"] for r in rows] == [1, 4]
    for r in rows:
      assert r["requests"] >= r["clients"] and r["requests_per_s"] > 0, (mode, r)
      assert 0 < r["new_tokens_per_request"] <= 4 and r["latency_p99_ms"] >= r["latency_p50_ms"]
  # One text a model call when batching is off; 4 clients share calls when it is on.
  assert all(r["texts_per_model_call"] == 1 for r in res["runs"]["one_at_a_time"])
  assert res["runs"]["batched"][1]["texts_per_model_call"] > 1
  # float32 on CPU: the export decodes as CodeGenerator does, alone or batched.
  assert res["parity"]["all_equal"] and res["parity"]["equal"] == 2
  assert res["same_as_reference"] == res["responses"]
  assert res["goal"]["clients"] == 4 and res["goal"]["speedup_requests_per_s"] > 0
  text = results.read_text()
  assert text.count("## Serving on the GPU (issue 21)") == 1 and "old" not in text
  assert text.endswith("## Next\n\nkept\n") and "| one_at_a_time | 4 |" in text


def test_bench_serving_names_what_is_missing():
  with pytest.raises(SystemExit, match="needs no_such_module_for_bench"):
    _module().need(("json", "no_such_module_for_bench"))


def test_the_export_platform_check_uses_jax_export_names(tmp_path_factory, monkeypatch):
  """jax.default_backend() says "gpu" on CUDA while exports list "cuda": the runtime compares
  jax.export's name of this machine's platform, so a CUDA export loads on a GPU."""
  import jax
  from flax_albert_code.deploy import runtime
  _, export_dir = shared_export(tmp_path_factory)
  assert runtime.load_export(export_dir).manifest["platforms"] == ["cpu", "cuda"]
  monkeypatch.setattr(jax.export, "default_export_platform", lambda: "cuda")
  assert runtime.load_export(export_dir).step == 7          # a GPU machine loads it
  monkeypatch.setattr(jax.export, "default_export_platform", lambda: "tpu")
  with pytest.raises(runtime.ExportError, match="lowered for cpu, cuda, not for this machine's "
                                                "tpu"):
    runtime.load_export(export_dir)
