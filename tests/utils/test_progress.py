"""Progress on stderr: plain lines where no bar can be drawn (a log, a pipe), and our warnings
written above a bar on a terminal instead of into it."""
import io
import logging
import sys

from tqdm import tqdm

from flax_albert_code import cli
from flax_albert_code.utils import progress


def test_lines_show_where_the_work_is_without_carriage_returns():
  out = io.StringIO()
  lines = progress.Lines(10, "greedy", "desc", every_s=3600, file=out)   # the start: a line
  lines.update(3)      # within the interval: none
  lines.every_s = 0
  lines.update(3)      # past it: a line
  lines.every_s = 3600
  lines.update(4)      # the end: always
  lines.close()
  shown = out.getvalue().splitlines()
  assert len(shown) == 3 and "\r" not in out.getvalue()
  assert shown[0] == "greedy: 0/10 desc (0%), 0:00 elapsed"
  assert shown[1].startswith("greedy: 6/10 desc (60%), 0:00 elapsed, ~0:00 left")
  assert shown[2] == "greedy: 10/10 desc (100%), 0:00 elapsed"
  assert isinstance(progress.bar(5, "x", "y", "lines"), progress.Lines)
  assert progress.bar(5, "x", "y", False).disable and not progress.bar(5, "x", "y", True).disable


def test_a_warning_goes_above_the_bar_not_into_it(monkeypatch):
  err = io.StringIO()
  monkeypatch.setattr(sys, "stderr", err)
  cli.quiet_logs()
  bar = tqdm(total=10, desc="greedy", file=sys.stderr)
  bar.update(3)
  logging.getLogger("flax_albert_code.evaluation").warning("2 descriptions were cut")
  bar.update(1)
  bar.close()
  # The bar is cleared, the warning gets a line of its own, the bar is drawn again below it.
  assert "\rwarning: 2 descriptions were cut\n\rgreedy:  30%" in err.getvalue(), err.getvalue()
