"""Imports run one way: the layers of the import-linter contract in pyproject.toml hold (commands
> cli > deploy, evaluation > training, inference > retrieval > model, data > tokenizer > config,
utils)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In a subprocess, with this checkout first on the path: the package analysed is the one tested,
# and import-linter's cache stays out of the tree.
LINT = ("import sys; from importlinter import cli; "
        "sys.exit(cli.lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")


def test_lint_imports_keeps_the_layers():
  pytest.importorskip("importlinter",
                      reason="import-linter is not installed (pip install -e '.[test]' has it)")
  path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
  out = subprocess.run([sys.executable, "-c", LINT], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": path}, timeout=300, check=False)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "1 kept, 0 broken" in out.stdout, out.stdout
