"""benchmarks/bench_prepare.py keeps one row per host and settings in its RESULTS.md section."""
import os
import sys

sys.path.append(os.path.join(os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")),
                             "benchmarks"))   # after the installed packages: it hides none
import bench_prepare  # noqa: E402


def test_rows_are_replaced_per_host_and_settings_and_other_sections_kept(tmp_path):
  out = tmp_path / "RESULTS.md"
  out.write_text("# Results\n\n## Before\n\ntext\n\n## After\n\nmore\n")
  row = lambda host, total: [host, "stdlib", "5000", "on", "d", "5", "9", *["1"] * 4, total,  # noqa: E731
                             "1", "2 (k=2)", "v"]
  bench_prepare.update_results(str(out), row("cpu, 2 cores", "10"))
  bench_prepare.update_results(str(out), row("cpu, 16 cores", "20"))
  bench_prepare.update_results(str(out), row("cpu, 2 cores", "30"))
  text = out.read_text()
  assert text.startswith("# Results\n\n## Before\n\ntext\n") and "## After\n\nmore" in text
  section = text.split(bench_prepare.HEADING)[1]
  rows = [line for line in section.splitlines() if line.startswith("| cpu")]
  assert len(rows) == 2 and "| 30 |" in rows[1] and "| 20 |" in rows[0]
  assert sum(line.startswith("| --- ") for line in section.splitlines()) == 1
  assert text.count(bench_prepare.HEADING) == 1
