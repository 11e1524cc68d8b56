"""benchmarks/quality_curve.py: training seconds across calls, the table, the fit, RESULTS.md."""
import json
import os
import sys

# Appended, after the installed packages, so that nothing in benchmarks/ can hide one of them.
sys.path.append(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import quality_curve  # noqa: E402


def _metrics(path, calls):
  """Throughput rows every 10 steps at 1 s a step; each call starts 30 s after its process
  began (compilation) and 1,000 s after the previous call ended."""
  t = 0.0
  with open(path, "w") as f:
    for first, last in calls:
      t += 1000 + 30
      for step in range(first, last + 1, 10):
        f.write(json.dumps({"step": step, "time": t, "tokens_per_s": 1.0}) + "\n")
        t += 10


def _report(d, step, bleu, mrr):
  os.makedirs(d / f"step{step}")
  rows = [{"method": "greedy", "bleu": bleu, "parse_rate": 90.0, "degenerate_rate": 1.0},
          {"method": "greedy, no retrieval", "bleu": bleu / 2},
          {"method": "alignment desc→code", "mrr": mrr}]
  (d / f"step{step}" / "report.json").write_text(json.dumps({"rows": rows, "num_examples": 7}))


def test_seconds_span_calls_without_their_start_up(tmp_path):
  m = tmp_path / "metrics.jsonl"
  _metrics(m, [(10, 100), (110, 200)])     # two calls: steps 1-100, then resumed at 100
  s = quality_curve.train_seconds(str(m))
  assert s[10] == 10 and s[100] == 100      # the first interval counted at 1 s a step
  assert s[200] == 200                      # the gap between the calls is not training
  assert quality_curve.seconds_at(150, s) == 150


def test_table_fit_and_results_section(tmp_path, capsys, monkeypatch):
  m = tmp_path / "metrics.jsonl"
  _metrics(m, [(10, 600)])
  curve = tmp_path / "curve"
  for step, bleu in ((60, 1.0), (600, 2.0)):
    _report(curve, step, bleu, bleu / 10)
  results = tmp_path / "RESULTS.md"
  results.write_text("# Benchmark results\n\n## Quality vs compute (issue 20)\n\nold\n\n## Next\n")
  monkeypatch.setattr(sys, "argv", ["quality_curve.py", "--metrics", str(m), "--curve",
                                    str(curve), "--gpus", "2", "--results", str(results)])
  quality_curve.main()
  out = capsys.readouterr().out
  assert "| 60 | 2.0 | 1.00 | 0.50 | 90.00 | 1.00 | 0.100 |" in out
  assert "| 600 | 20.0 | 2.00 |" in out
  a, b = quality_curve.fit([2.0, 20.0], [1.0, 2.0])
  assert abs(b - 1.0) < 1e-9 and abs(a + b * 0.30103 - 1.0) < 1e-4
  text = results.read_text()
  assert "old" not in text and text.count("## Quality vs compute") == 1 and "## Next" in text


def test_a_startup_row_starts_a_call_even_after_a_short_gap(tmp_path):
  m = tmp_path / "metrics.jsonl"
  rows = [{"step": 1, "time": 0.0, "startup_first_step_s": 30.0}]
  rows += [{"step": s, "time": 30.0 + s, "tokens_per_s": 1.0} for s in (10, 20, 30)]
  rows += [{"step": 31, "time": 100.0, "startup_first_step_s": 20.0}]   # resumed 40 s later
  rows += [{"step": s, "time": 100.0 + (s - 30), "tokens_per_s": 1.0} for s in (40, 50)]
  m.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  s = quality_curve.train_seconds(str(m))
  assert s[30] == 30 and s[40] == 40 and s[50] == 50
