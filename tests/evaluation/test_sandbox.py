"""The sandbox contains what generated code may do wrong, reports it as a failure, and survives.

Every containment case runs with namespaces (when `unshare` works here) and without, since CI may
not allow them. Limits are tight so that the whole file takes a few seconds.
"""
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import pytest

from flax_albert_code.evaluation import sandbox

LIMITS = sandbox.Limits(timeout_s=1.5, cpu_s=1, memory_bytes=256 << 20, file_bytes=1 << 20)
MODES = ["namespaces", "plain"] if sandbox._unshare_prefix() else ["plain"]


@pytest.fixture(params=MODES)
def run(request):
  prefix = sandbox._unshare_prefix() if request.param == "namespaces" else ()
  drop = sandbox._can_drop_privileges()
  return lambda program, limits=LIMITS: sandbox._run(program, limits, drop=drop, prefix=prefix)


@pytest.fixture
def own_tmp(monkeypatch):
  """This test's sandboxes go under a directory of its own, so that sandboxes of tests running at
  the same time in other pytest workers (HumanEval, evaluate) are not taken for leftovers."""
  root = tempfile.mkdtemp(prefix="sandbox-test-")
  os.chmod(root, 0o755)   # the sandbox may run as an unprivileged user
  monkeypatch.setattr(tempfile, "tempdir", root)
  yield root
  shutil.rmtree(root, ignore_errors=True)


def test_passing_and_failing_assertions(run):
  r = run("def f(x):\n    return x * 2\nassert f(2) == 4\nprint('out')")
  assert (r.passed, r.status, r.detail) == (True, "passed", "")
  r = run("assert sorted([3, 1]) == [3, 1], 'not sorted'")
  assert (r.passed, r.status) == (False, "failed") and "not sorted" in r.detail
  r = run("def f(:\n")
  assert (r.passed, r.status) == (False, "error") and "SyntaxError" in r.detail
  r = run("raise ValueError('boom')")
  assert r.status == "error" and "ValueError: boom" in r.detail


def test_exiting_early_is_not_a_pass(run):
  assert run("import sys\nsys.exit(0)\nassert False").status == "error"
  assert run("import os\nos._exit(0)\nassert False").status == "error"


def test_infinite_loop_times_out(run):
  start = time.monotonic()
  r = run("while True:\n    pass", sandbox.Limits(timeout_s=1.0, cpu_s=30))
  assert (r.passed, r.status) == (False, "timeout")
  assert time.monotonic() - start < 5


def test_cpu_limit_stops_a_busy_c_loop(run):
  r = run("sum(range(10 ** 12))", sandbox.Limits(timeout_s=10, cpu_s=1))
  assert (r.passed, r.status) == (False, "timeout") and r.duration_s < 5


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()",
    "import os\nos.system(':(){ :|:& };:')",
    "import subprocess\nsubprocess.Popen(['sh', '-c', ':(){ :|:& };:'])",
    "import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()",
    "import pty\npty.fork()",
])
def test_fork_bomb_is_contained(run, program, own_tmp):
  r = run(program)
  assert not r.passed and r.status == "error" and "not allowed" in r.detail
  assert not _leftovers(own_tmp)


def test_memory_hog_is_stopped(run):
  r = run("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))")
  assert not r.passed and "MemoryError" in r.detail
  r = run("x = bytearray(1 << 40)")
  assert not r.passed and "MemoryError" in r.detail


@pytest.fixture
def open_dir():
  """A directory (with a file) that anyone may write, so that what refuses a sandboxed program's
  write there is the sandbox, not the file permissions that bind a program run as `nobody`."""
  root = tempfile.mkdtemp(prefix="outside-")
  os.chmod(root, 0o777)
  yield pathlib.Path(root)
  shutil.rmtree(root, ignore_errors=True)


def test_writing_outside_the_temp_dir_is_refused(run, open_dir):
  tmp_path = open_dir
  target, victim = tmp_path / "pwned", tmp_path / "victim"
  victim.write_text("keep me")
  victim.chmod(0o666)
  for program in [f"open({str(target)!r}, 'w').write('x')",
                  f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
                  f"import os\nos.remove({str(victim)!r})",
                  f"import os\nos.rename({str(victim)!r}, 'stolen')",
                  f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                  f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('x')",
                  f"import os\nos.chmod({str(victim)!r}, 0o777)",
                  f"open({str(victim)!r}, 'a').write('x')",
                  f"import os\nd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
                  "os.open('pwned', os.O_CREAT | os.O_WRONLY, dir_fd=d)",
                  f"import sqlite3\nsqlite3.connect({str(target)!r}).execute('create table t(x)')"]:
    r = run(program)
    assert not r.passed and "not allowed" in r.detail, program
  assert not target.exists() and victim.read_text() == "keep me"


def test_writing_inside_the_temp_dir_works_and_the_dir_is_removed(run):
  r = run("import os, sys, tempfile\n"
          "open('a.txt', 'w').write('x')\n"
          "with tempfile.NamedTemporaryFile() as f:\n"
          "    f.write(b'y')\n"
          "sys.stderr.write('CWD=' + os.getcwd() + '\\n')\n"
          "assert open('a.txt').read() == 'x' and False")
  assert r.status == "failed"
  cwd = r.detail.split("CWD=")[1].split("\n")[0]
  assert "sandbox-" in cwd and not os.path.exists(cwd)


def test_file_size_limit(run):
  r = run("open('big', 'wb').write(b'x' * (2 << 20))")
  assert not r.passed and "File too large" in r.detail
  r = run("while True:\n    print('x' * 1000)")  # stdout goes to a capped file, not our memory
  assert not r.passed and r.status in ("error", "timeout")


def test_network_is_refused(run):
  for program in ["import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
                  "import _socket\n_socket.socket()",
                  "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)",
                  "import http.client\n"
                  "http.client.HTTPConnection('example.com').request('GET', '/')"]:
    r = run(program)
    assert not r.passed and "not allowed" in r.detail, program


def test_environment_is_stripped_and_signals_refused(run, monkeypatch):
  monkeypatch.setenv("SECRET_TOKEN", "hunter2")
  assert run("import os\nassert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_CTYPE'}"
             ", sorted(os.environ)").passed
  r = run(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)")
  assert not r.passed and "not allowed" in r.detail
  r = run("import ctypes")
  assert not r.passed and "not allowed" in r.detail
  r = run("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
  assert not r.passed and "not allowed" in r.detail


def test_timeout_kills_the_whole_process_group():
  # The mechanism behind "killed with its children": children and grandchildren share the group,
  # and _kill_group returns once they are dead (not merely signalled), however loaded the
  # machine: the sandbox directory they work in is removed next.
  proc = subprocess.Popen(["sh", "-c", "sleep 60 & (sleep 60 &) ; sleep 60"],
                          start_new_session=True)
  deadline = time.monotonic() + 30
  while len(members := [p for p in _pids() if _pgid(p) == proc.pid]) < 3:
    assert time.monotonic() < deadline, members   # the shell starts its sleeps
    time.sleep(0.05)
  sandbox._kill_group(proc.pid)
  assert not [p for p in members if _alive(p)]
  assert not sandbox._group_alive(proc.pid)
  proc.wait()


def test_run_many_keeps_order_and_the_evaluator_survives(own_tmp):
  programs = ["assert True", "while True: pass", "assert False", "import os\nos.fork()",
              "x = bytearray(1 << 40)", "assert 1 + 1 == 2"]
  results = sandbox.run_many(programs, sandbox.Limits(timeout_s=1.0, memory_bytes=256 << 20),
                             workers=2)
  assert [r.status for r in results] == ["passed", "timeout", "failed", "error", "error", "passed"]
  assert not _leftovers(own_tmp)
  assert sandbox.capabilities()["root"] == (os.getuid() == 0)


def _pids():
  return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _pgid(pid):
  try:
    return os.getpgid(pid)
  except ProcessLookupError:
    return None


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _leftovers(root: str = ""):
  """Live processes still working in a (removed) sandbox directory (under `root` if given)."""
  out = []
  for p in _pids():
    try:
      cwd = os.readlink(f"/proc/{p}/cwd")
    except OSError:
      continue
    if "/sandbox-" in cwd and cwd.startswith(root) and _alive(p):
      out.append((p, cwd))
  return out


@pytest.mark.skipif(os.getuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
                    reason="needs root and a system Python that `nobody` can run")
def test_root_drops_to_nobody_when_the_interpreter_allows(monkeypatch, tmp_path):
  monkeypatch.setattr(sandbox, "PYTHON", "/usr/bin/python3")
  sandbox._can_drop_privileges.cache_clear()
  try:
    if not sandbox._can_drop_privileges():
      pytest.skip("/usr/bin/python3 cannot run as nobody here")
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0o600)
    r = sandbox.run(f"import os\nassert os.getuid() == {sandbox.NOBODY}\n"
                    f"assert not os.access({str(secret)!r}, os.R_OK)\n"
                    "open('mine', 'w').write('ok')",
                    LIMITS)
    assert r.passed, r.detail
  finally:
    sandbox._can_drop_privileges.cache_clear()


@pytest.mark.parametrize("code, status, reason", [
    ("def f(a, b):\n    return a + b\n", "passed", ""),
    ("def f(a, b):\n    return a - b\n", "failed", "failed: f(2, 3) returned -1"),
    ("def f(a, b):\n    return x\n", "error", "NameError at line 2: name 'x' is not defined"),
    ("def f(a, b:\n    return a\n", "error", "SyntaxError at line 1: "),
    ("defdefdefdef\n", "error", "no top-level function to call"),
    ("def f(a, b):\n    while True:\n        pass\n", "timeout", "timeout"),
    ("import os\ndef f(a, b):\n    os.system('ls')\n", "error",
     "PermissionError at line 3: sandbox: os.system is not allowed"),
])
def test_the_design_example_says_which_error(code, status, reason):
  """The source design's example reports what went wrong, not just "error"."""
  from flax_albert_code.evaluation import design_example  # pylint: disable=import-outside-toplevel
  result = design_example.check(code, sandbox.Limits(timeout_s=1.5, cpu_s=1))
  assert result.status == status and sandbox.describe(result).startswith(reason), result
  line = design_example.format_results([{"strategy": "greedy", "code": code, "neighbours": [],
                                         "passed": result.passed, "status": result.status,
                                         "reason": sandbox.describe(result)}]).splitlines()[1]
  assert line == "## greedy: f(2, 3) == 5 " + (
      "passes" if status == "passed" else f"does not pass ({sandbox.describe(result)})")
