"""Runs untrusted generated code in a separate, limited process; never in the evaluating process.

Each program runs in a fresh `python -I -B -S` interpreter (standard library only, no PYTHON*
variables) in its own session and a fresh temporary working directory (removed afterwards), with
only PATH, HOME, TMPDIR and LANG set and stdout/stderr to files. Before the program, a bootstrap
in the child (not `preexec_fn`, unsafe with `run_many`'s threads):
  * sets soft == hard RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_CORE = 0 and, unless root,
    RLIMIT_NPROC (the user's processes plus `Limits.extra_processes`);
  * as root, when `nobody` can run the interpreter, drops to uid/gid 65534;
  * installs an audit hook (PEP 578) refusing: process creation, signals, sockets and network
    clients, ctypes, `_posixsubprocess` and C dbm imports, resource limits, GC introspection, and
    writing, creating, deleting, renaming, linking, chmod/chown or opening as a directory any
    path outside the working directory (sqlite databases included).
Where `unshare` works, it also runs in new network and PID namespaces (only a down loopback; every
process it starts dies with it); elsewhere the hook is the only network barrier. On timeout the
process group is killed (SIGKILL). Output goes to files capped by RLIMIT_FSIZE, never our memory.

It contains accidents of generated code, not an attacker: it does not stop reading files the user
can read, writing through inherited descriptors (only stdio and one report pipe), escapes from the
audit hook (not a security boundary: path-check races, reaching the bootstrap's frame), network
access or (as root) fork bombs the hook misses without `unshare` (setsid escapes the group kill),
kernel exploits, or starving the machine within the limits (there is no cgroup).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

NOBODY = 65534
PYTHON = sys.executable  # the interpreter that runs programs (any Python >= 3.8 with audit hooks)


@dataclasses.dataclass(frozen=True)
class Limits:
  timeout_s: float = 5.0          # wall clock
  cpu_s: int = 0                  # CPU seconds; 0 -> ceil(timeout_s)
  memory_bytes: int = 1 << 30     # address space
  file_bytes: int = 16 << 20      # largest file the program (or its stdout) may write
  extra_processes: int = 0        # processes allowed beyond those the user already runs


@dataclasses.dataclass(frozen=True)
class Result:
  passed: bool
  status: str  # "passed" | "failed" (an assertion failed) | "timeout" | "error"
  detail: str = ""
  duration_s: float = 0.0


# Runs inside the child interpreter. argv: [nonce-fd, cpu_s, memory, fsize, extra_procs, drop].
_BOOTSTRAP = r'''
import os, sys, resource, signal, traceback
def _boot():
  report_fd, cpu, mem, fsize, nproc, drop = (int(a) for a in sys.argv[1:7])
  nonce = sys.stdin.readline().strip()
  with open("program.py", encoding="utf-8") as f:
    source = f.read()
  if drop and os.getuid() == 0:
    os.setgroups([]); os.setgid(%(nobody)d); os.setuid(%(nobody)d)
  uid = os.getuid()
  def lim(r, v):
    soft, hard = resource.getrlimit(r)
    v = v if hard == resource.RLIM_INFINITY else min(v, hard)
    resource.setrlimit(r, (v, v))
  lim(resource.RLIMIT_CPU, cpu); lim(resource.RLIMIT_AS, mem)
  lim(resource.RLIMIT_FSIZE, fsize); lim(resource.RLIMIT_CORE, 0)
  if uid != 0:
    mine = 0
    for p in os.listdir("/proc"):
      try:
        mine += p.isdigit() and os.stat("/proc/" + p).st_uid == uid
      except OSError:
        pass
    lim(resource.RLIMIT_NPROC, mine + nproc)
  def status(word, rc):
    os.write(report_fd, (word + "\n").encode())
    os._exit(rc)
  signal.signal(signal.SIGXCPU, lambda *_: status("cpu", 124))
  work = os.path.realpath(os.getcwd()) + os.sep
  real = os.path.realpath
  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
  deny = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
          "os.forkpty", "os.system", "os.kill", "os.killpg", "os.startfile", "pty.", "ctypes.",
          "resource.", "sys._current_frames", "gc.get_", "urllib.", "http.",
          "ftplib.", "smtplib.", "imaplib.", "poplib.", "nntplib.", "telnetlib.", "webbrowser.",
          "signal.pthread_kill", "os.setuid", "os.setgid", "sys.settrace", "sys.setprofile")
  deny_import = {"ctypes", "_ctypes", "_posixsubprocess", "_socket", "socket", "ssl", "_ssl",
                 "_dbm", "_gdbm"}
  path_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
                 "os.truncate": 1, "os.utime": 1, "os.chflags": 1, "os.lchflags": 1,
                 "os.setxattr": 1, "os.removexattr": 1, "os.mkfifo": 1, "os.mknod": 1,
                 "os.rename": 2, "os.link": 2, "os.symlink": 2, "shutil.rmtree": 1,
                 "shutil.move": 2, "shutil.copyfile": 2, "shutil.copytree": 2,
                 "sqlite3.connect": 1}
  def inside(p):
    return not isinstance(p, int) and (real(os.fsdecode(p)) + os.sep).startswith(work)
  def refuse(event):
    os.write(report_fd, ("blocked: %%s\n" %% event).encode())
    raise PermissionError("sandbox: %%s is not allowed" %% event)
  def hook(event, args):
    if event == "open":
      path, mode, flags = args
      writes = (isinstance(flags, int) and flags & write_flags) or (
          isinstance(mode, str) and any(c in mode for c in "wax+"))
      if not isinstance(path, int) and not inside(path):
        if writes:
          refuse("open(%%r) for writing" %% (path,))
        if os.path.isdir(path):  # a directory fd would let dir_fd= write outside
          refuse("open(%%r), a directory" %% (path,))
    elif event == "import":
      if args[0].split(".")[0] in deny_import:
        refuse("import " + args[0])
    elif event in path_events:
      for p in args[:path_events[event]]:
        if not inside(p):
          refuse("%%s(%%r)" %% (event, p))
    elif event.startswith(deny):
      refuse(event)
  sys.addaudithook(hook)
  try:
    code = compile(source, "program.py", "exec")
  except BaseException:
    traceback.print_exc(limit=0); status("syntax", 3)
  try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
  except AssertionError:
    traceback.print_exc(); status("assert", 1)
  except SystemExit as e:
    sys.stderr.write("program exited with SystemExit(%%r) before finishing\n" %% (e.code,))
    status("exit", 2)
  except BaseException:
    traceback.print_exc(); status("exception", 2)
  try:
    sys.stdout.flush(); sys.stderr.flush()
  except BaseException:
    pass
  status("ok " + nonce, 0)
_boot()
''' % {"nobody": NOBODY}


_WORDS = {"cpu", "syntax", "assert", "exit", "exception"}


@functools.lru_cache(maxsize=None)
def _unshare_prefix() -> tuple[str, ...]:
  """New network + PID namespaces when `unshare` works here, else nothing."""
  exe = shutil.which("unshare")
  if exe is None:
    return ()
  prefix = [exe, "--net", "--pid", "--fork", "--kill-child"]
  if os.getuid() != 0:
    prefix[1:1] = ["--user", "--map-root-user"]
  try:
    ok = subprocess.run(prefix + [PYTHON, "-I", "-S", "-c", "pass"], capture_output=True,
                        timeout=10, env={}).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    ok = False
  return tuple(prefix) if ok else ()


@functools.lru_cache(maxsize=None)
def _can_drop_privileges() -> bool:
  """Whether, as root, a child can drop to `nobody` and still run the standard library."""
  if os.getuid() != 0:
    return False
  probe = "import json, math, re, typing, collections, itertools, functools, heapq, string"
  return _run(probe, Limits(timeout_s=10), drop=True, prefix=()).passed


def capabilities() -> dict:
  """What this machine's sandbox does: the report quotes it."""
  return {"namespaces": bool(_unshare_prefix()), "drop_privileges": _can_drop_privileges(),
          "root": os.getuid() == 0}


def run(program: str, limits: Limits = Limits()) -> Result:
  """Runs `program` (Python source) in a sandboxed child process; see the module docstring."""
  return _run(program, limits, drop=_can_drop_privileges(), prefix=_unshare_prefix())


def run_many(programs: Sequence[str], limits: Limits = Limits(),
             workers: int | None = None, progress: bool = False) -> list[Result]:
  """`run` over many programs, `workers` (default: CPU count) at a time; results in order."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  workers = workers or os.cpu_count() or 1
  capabilities()  # probe once, outside the pool
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(tqdm(pool.map(lambda p: run(p, limits), programs), total=len(programs),
                     desc="sandbox", unit="program", disable=not progress, leave=False,
                     dynamic_ncols=True))


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)):? ?(.*)$")
_PROGRAM_LINE = re.compile(r'File "program\.py", line (\d+)')


def describe(result: Result, width: int = 120) -> str:
  """What went wrong, in a few words, from the program's stderr: "" for a pass, "timeout",
  "failed: <the assertion's message>", or "<Exception> at line N: <message>" (N of the program)."""
  if result.passed:
    return ""
  if result.status == "timeout":
    return "timeout"
  lines = [line for line in result.detail.splitlines() if not line.startswith("blocked: ")]
  error = next((m for m in map(_ERROR_LINE.match, reversed(lines)) if m), None)
  if result.status == "failed":
    text = "failed" + (f": {error.group(2)}" if error and error.group(2) else "")
  elif error is None:
    text = next((line.strip() for line in lines if line.strip()), result.status)
  else:
    where = _PROGRAM_LINE.findall(result.detail)
    text = error.group(1) + (f" at line {where[-1]}" if where else "") + (
        f": {error.group(2)}" if error.group(2) else "")
  return text if len(text) <= width else text[:width - 3] + "..."


def _tail(path: str, n: int = 2000) -> str:
  with open(path, "rb") as f:
    f.seek(max(0, os.path.getsize(path) - n))
    return f.read().decode("utf-8", "replace")


def _kill_group(pgid: int, wait_s: float = 5.0) -> None:
  """SIGKILL to process group `pgid`, then wait (at most `wait_s`) until none is alive: a killed
  process runs on a moment before it is a zombie, and its sandbox directory is removed next."""
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    return
  deadline = time.monotonic() + wait_s
  while _group_alive(pgid) and time.monotonic() < deadline:
    time.sleep(0.005)


def _group_alive(pgid: int) -> bool:
  """Whether a process of group `pgid` is alive (not a zombie); False without Linux's /proc."""
  try:
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
  except OSError:
    return False
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat", "rb") as f:
        state, _, group = f.read().rpartition(b")")[2].split()[:3]
    except (OSError, ValueError):
      continue
    if int(group) == pgid and state not in (b"Z", b"X"):
      return True
  return False


def _run(program: str, limits: Limits, drop: bool, prefix: Sequence[str]) -> Result:
  cpu = limits.cpu_s or max(1, int(-(-limits.timeout_s // 1)))
  outer = tempfile.mkdtemp(prefix="sandbox-")
  work = os.path.join(outer, "work")
  os.mkdir(work)
  nonce = secrets.token_hex(16)
  read_fd, write_fd = os.pipe()
  start = time.monotonic()
  try:
    with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
      f.write(program)
    if drop:
      os.chown(work, NOBODY, NOBODY)
      os.chmod(os.path.join(work, "program.py"), 0o644)
      # `nobody` must pass through to its working directory by name (TMPDIR, tempfile, absolute
      # paths), not list what is beside it.
      os.chmod(outer, 0o711)
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
    args = [str(write_fd), str(cpu), str(limits.memory_bytes), str(limits.file_bytes),
            str(limits.extra_processes), str(int(drop))]
    with open(os.path.join(outer, "stdout"), "wb") as out, \
         open(os.path.join(outer, "stderr"), "wb") as err:
      proc = subprocess.Popen([*prefix, PYTHON, "-I", "-B", "-S", "-c", _BOOTSTRAP, *args],
                              cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                              pass_fds=(write_fd,), start_new_session=True)
      os.close(write_fd)
      write_fd = -1
      timed_out = False
      try:
        proc.communicate((nonce + "\n").encode(), timeout=limits.timeout_s)
      except subprocess.TimeoutExpired:
        timed_out = True
      finally:
        _kill_group(proc.pid)  # children left behind, on timeout or not
        proc.wait()
    os.set_blocking(read_fd, False)
    try:
      report = os.read(read_fd, 1 << 16).decode("utf-8", "replace")
    except BlockingIOError:
      report = ""
    duration = time.monotonic() - start
    stderr = _tail(os.path.join(outer, "stderr"))
    blocked = "".join(l + "\n" for l in report.splitlines() if l.startswith("blocked: "))
    rc = proc.returncode
    lines = report.splitlines()
    if timed_out:
      return Result(False, "timeout", f"killed after {limits.timeout_s:g}s wall clock\n" + blocked,
                    duration)
    if rc == 0 and f"ok {nonce}" in lines:
      return Result(True, "passed", blocked, duration)
    # Killed by a signal: through `unshare` the exit status is not the child's, so a death that
    # reported nothing after at least the CPU limit of wall time is taken for the CPU limit.
    if "cpu" in lines or (not set(lines) & _WORDS and rc != 0 and duration >= cpu):
      return Result(False, "timeout", f"stopped at the {cpu}s CPU limit (rc {rc})\n" + blocked,
                    duration)
    if "assert" in lines:
      return Result(False, "failed", blocked + stderr, duration)
    if not set(lines) & _WORDS:
      stderr = f"program ended without finishing (rc {rc})\n" + stderr
    return Result(False, "error", blocked + stderr, duration)
  finally:
    os.close(read_fd)
    if write_fd >= 0:
      os.close(write_fd)
    shutil.rmtree(outer, ignore_errors=True)
