"""Orbax checkpoints: train state + data iterator + config, kept as the last K plus the best.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}`. Orbax writes each step into a
temporary directory and renames it when complete, so a half-written checkpoint is never listed.
Restores take target shardings from the current mesh, so a checkpoint written on 8 devices
restores on 1 (and the other way round).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

# A resumed run must train the same model on the same data: these sections must match.
MUST_MATCH = ("model", "data")


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete, corrupt or belongs to another config."""


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


class _DataHandler(grain.checkpoint.CheckpointHandler):
  """grain's iterator handler (one `process_<i>-of-<n>.json` per process) that also restores on
  another process count: our iterator's state is the global batch index, the same on every
  host (data/pipeline.py), so any process's file holds it."""

  def restore(self, directory: epath.Path, item=None, args=None):
    item, directory = item or args.item, epath.Path(directory)
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    files = [own] if own.exists() else sorted(directory.glob("process_*-of-*.json"))
    if not files:
      raise ValueError(f"{directory} holds no data iterator state (process_*-of-*.json).")
    item.set_state(json.loads(files[0].read_text()))
    item.start_prefetch()  # as grain's handler does
    return item


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  item: Any


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with our items and policies."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=max(int(keep), 1)),
        pp.BestN(get_metric_fn=lambda m: m["valid_loss"], reverse=True, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter=None, config=None, metrics=None,
           force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = _DataSave(data_iter)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config.to_dict())
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """Restore the state (resharded onto `abstract_state`'s shardings) and the iterator."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No complete checkpoint in {self.directory}.")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = _DataRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for unreadable files
      raise CheckpointError(f"Checkpoint {self.directory / str(step)} could not be restored "
                            f"({type(e).__name__}: {str(e)[:300]}); delete that step directory "
                            "to fall back to an earlier one.") from e
    return restored["state"], step

  def saved_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    step = self.latest_step() if step is None else step
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"Checkpoint {self.directory / str(step)} has no readable config "
                            f"({type(e).__name__}).") from e
    return ml_collections.ConfigDict(restored["config"])

  def check_compatible(self, config) -> None:
    """Refuse to resume a workdir written by another model or data config."""
    if self.latest_step() is None:
      return
    saved = self.saved_config()
    for section in MUST_MATCH:
      a, b = saved.get(section), config.get(section)
      a = a.to_dict() if a is not None else None
      b = _jsonable(b.to_dict()) if b is not None else None
      if a != b:
        diff = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k))
        raise CheckpointError(
            f"The workdir {self.directory.parent} holds checkpoints of another config "
            f"(config.{section} differs in {diff}); use a new --workdir or the same config.")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _jsonable(d):
  return json.loads(json.dumps(d))


def resolve(path: str) -> tuple[epath.Path, int]:
  """A training workdir (-> its latest checkpoint) or one checkpoint step directory."""
  p = epath.Path(os.path.expanduser(str(path)))
  if not p.exists():
    raise CheckpointError(f"Checkpoint path {p} does not exist; pass a training workdir or a "
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


def load_for_inference(path: str) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, model params, step) from a workdir or checkpoint dir, on the default device."""
  directory, step = resolve(path)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_names=("state", "data", "config"))
  try:
    config = ml_collections.ConfigDict(
        manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
    meta = manager.item_metadata(step)["state"]
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
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
  return config, state["params"]["model"], step
