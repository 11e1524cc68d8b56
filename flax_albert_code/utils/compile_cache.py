"""JAX's persistent compilation cache (`config.train.compilation_cache`), so a resumed run loads
its step programs instead of compiling them; set once per process by train.py."""
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
  """Points JAX's persistent cache at `cache_dir(setting, workdir)`; returns it ("" if off)."""
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
