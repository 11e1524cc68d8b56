"""A venv that sees the packages of the interpreter that makes it, also when that interpreter
runs in a virtualenv itself (tests/test_install.py installs a wheel into one).

`venv --system-site-packages` made from inside a virtualenv sees the *base* Python's packages,
not the outer virtualenv's, where a README install put them; so the outer virtualenv's
site-packages are added to the new venv by a `.pth` file of plain paths, after the venv's own
(the outer venv's own .pth files, such as an editable install of this repository, stay inactive).
Standard library only: tests run it from a bare virtualenv.
"""
from __future__ import annotations

import os
import site
import subprocess
import sys

PTH = "_outer_venv.pth"


def outer_site_packages() -> list[str]:
  """The site-packages of the virtualenv this interpreter runs in (none outside one)."""
  if sys.prefix == sys.base_prefix:
    return []
  prefix = os.path.realpath(sys.prefix) + os.sep
  return [p for p in site.getsitepackages() if os.path.realpath(p).startswith(prefix)]


def make(path: str, env: dict[str, str] | None = None) -> str:
  """A `--system-site-packages` venv without pip at `path` that also sees this interpreter's
  virtualenv packages; its python's path."""
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                  str(path)], env=env, check=True, capture_output=True)
  python = os.path.join(str(path), "bin", "python")
  paths = outer_site_packages()
  if paths:
    purelib = subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        env=env, check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, PTH), "w", encoding="utf-8") as f:
      f.write("".join(p + "\n" for p in paths))
  return python
