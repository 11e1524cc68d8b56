"""A training checkpoint, read only (training, inference and export share this reader): its
path resolved, its files checked, its config upgraded, its model parameters on one device.
Writing and resuming are training/checkpoint.py's.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from flax_albert_code import config as config_lib
from flax_albert_code.utils import files

MANIFEST = "sha256_manifest.json"   # each step's file sizes and sha256 (training/checkpoint.py)

log = logging.getLogger("flax_albert_code")


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete, corrupt or belongs to another config."""


def verify_step(path: epath.Path) -> str | None:
  """None if step directory `path` matches its manifest (or has none), else what is wrong."""
  manifest = path / MANIFEST
  if not manifest.exists():
    return None
  try:
    listed = json.loads(manifest.read_text())["files"]
  except Exception as e:
    return f"its manifest {manifest} is unreadable ({type(e).__name__})"
  bad = files.check(path, listed)
  if bad is None:
    return None
  return {"missing": f"{bad.path} is missing",
          "size": f"{bad.path} has {bad.size} bytes instead of {bad.want} (truncated?)",
          "sha256": f"{bad.path} does not match its sha256 (altered on disk)"}[bad.kind]


def resolve(path: str) -> tuple[epath.Path, int]:
  """(absolute directory, step) of a workdir's latest checkpoint or of a step directory."""
  path = os.path.expanduser(os.fspath(path))
  p = epath.Path(path if "://" in path else os.path.abspath(path))
  if not p.exists():
    raise CheckpointError(f"Checkpoint path {p} does not exist; pass a training workdir or a "
                          "checkpoint step directory.")
  if not p.is_dir():
    raise CheckpointError(f"Checkpoint path {p} is a file; pass a training workdir or a "
                          "checkpoint step directory.")
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  if (p / "state").is_dir() and p.name.isdigit():
    return p.parent, int(p.name)
  steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / "state").is_dir())
  if not steps:
    raise CheckpointError(f"{p} holds no flax_albert_code checkpoint (no <step>/state); pass a "
                          "training workdir or a checkpoint step directory.")
  return p, steps[-1]


@contextlib.contextmanager
def quiet_orbax():
  """Without orbax's absl warnings about read-only, partial restores; its errors still show."""
  def drop(record: logging.LogRecord) -> bool:
    return record.levelno > logging.WARNING
  absl = logging.getLogger("absl")
  absl.addFilter(drop)
  try:
    yield
  finally:
    absl.removeFilter(drop)


def _manager(directory: epath.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_names=("state", "data", "config"))


def _saved_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])


@quiet_orbax()
def read_config(path: str) -> ml_collections.ConfigDict:
  """The config saved with checkpoint `path`, without reading its parameters."""
  directory, step = resolve(path)
  manager = _manager(directory)
  try:
    return config_lib.upgrade(_saved_config(manager, step))[0]
  except Exception as e:
    raise CheckpointError(f"Checkpoint {directory / str(step)} has no readable config "
                          f"({type(e).__name__}); pass another checkpoint.") from e
  finally:
    manager.close()


@quiet_orbax()
def load_for_inference(path: str) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, model params, step) from a workdir or checkpoint dir, on the default device."""
  directory, step = resolve(path)
  problem = verify_step(directory / str(step))
  if problem:
    raise CheckpointError(f"Checkpoint {directory / str(step)} is corrupt ({problem}); pass an "
                          "earlier step directory.")
  manager = _manager(directory)
  try:
    config = _saved_config(manager, step)
    meta = manager.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            meta)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f"Checkpoint {directory / str(step)} could not be read "
                          f"({type(e).__name__}: {str(e)[:300]}).") from e
  finally:
    manager.close()
  config, changes = config_lib.upgrade(config)
  if changes:
    log.info("Checkpoint %s was written by an older version: it runs with its config upgraded "
             "(%s).", directory / str(step), ", ".join(changes))
  return config, state["params"]["model"], step
