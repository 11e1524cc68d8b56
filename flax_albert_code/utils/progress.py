"""Progress of long work: a tqdm bar, or where none can be drawn (stderr is a log file or a
pipe) a plain line now and then with what the bar shows, and no carriage returns."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


def bar(total: int, desc: str, unit: str, progress: bool | str, **kw):
  """A tqdm bar on stderr for `progress` True, `Lines` for "lines", else a silent bar."""
  if progress == "lines":
    return Lines(total, desc, unit)
  return tqdm(total=total, desc=desc, unit=unit, disable=progress is not True, leave=False,
              dynamic_ncols=True, **kw)


class Lines:
  """tqdm's update, close and `with`, as a line on stderr at most every `every_s` seconds."""

  def __init__(self, total: int, desc: str, unit: str, every_s: float = 10.0, file=None):
    self.total, self.desc, self.unit, self.every_s, self.file = total, desc, unit, every_s, file
    self.n = 0
    self.start = self._shown = time.monotonic()   # _shown: when the last line was written
    self._show(self.start)

  def update(self, n: int = 1) -> None:
    self.n += n
    now = time.monotonic()
    if now - self._shown >= self.every_s or self.n >= self.total:
      self._show(now)

  def _show(self, now: float) -> None:
    elapsed = now - self.start
    line = f"{self.desc}: {self.n}/{self.total} {self.unit}"
    if self.total:
      line += f" ({100 * self.n / self.total:.0f}%)"
    line += f", {_clock(elapsed)} elapsed"
    if 0 < self.n < self.total:
      line += f", ~{_clock(elapsed / self.n * (self.total - self.n))} left"
    print(line, file=self.file or sys.stderr, flush=True)
    self._shown = now

  def close(self) -> None:
    pass

  def __enter__(self) -> Lines:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _clock(seconds: float) -> str:
  """m:ss, or h:mm:ss from an hour."""
  s = int(round(seconds))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
