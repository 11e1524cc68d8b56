"""JAX's persistent compilation cache, kept in the run's workdir by default.

A resumed run (after a preemption, or the next call of a long run) loads its step programs from
`<workdir>/jax_cache` instead of compiling them again: on an H200 the quality recipe's six step
programs took ~110 s to compile cold. `config.train.compilation_cache`: "auto" (the workdir's
jax_cache; for a gs:// workdir a local ~/.cache directory), a directory, or "" (off). A
JAX_COMPILATION_CACHE_DIR in the environment wins over "auto". Set once per process, before the
first compilation: the command (train.py) calls it, not the library.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("flax_albert_code")
REMOTE_WORKDIR_CACHE = os.path.join("~", ".cache", "flax_albert_code", "jax_cache")


def cache_dir(setting: str, workdir: str) -> str:
  """The directory `setting` names for `workdir` ("" when the cache is off)."""
  if not setting:
    return ""
  if setting != "auto":
    return os.path.abspath(os.path.expanduser(setting))
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if "://" in str(workdir):
    return os.path.abspath(os.path.expanduser(REMOTE_WORKDIR_CACHE))
  return os.path.join(os.path.abspath(os.path.expanduser(str(workdir))), "jax_cache")


def enable(setting: str, workdir: str) -> str:
  """Points JAX's persistent cache at `cache_dir(setting, workdir)`; returns it ("" if off).
  Programs that compile in under a second are not written (JAX's default threshold)."""
  path = cache_dir(setting, workdir)
  if not path:
    return ""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    log.warning("No compilation cache (%s: %s); set config.train.compilation_cache to a writable "
                "directory or ''.", path, e)
    return ""
  jax.config.update("jax_compilation_cache_dir", path)
  return path
