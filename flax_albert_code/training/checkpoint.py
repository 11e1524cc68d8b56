"""Orbax checkpoints: train state + data iterator + config, kept as the last K plus the best.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}`; restores reshard onto the current
mesh. Orbax checksums no array data, so each step also holds `sha256_manifest.json` (every file
but orbax's `_CHECKPOINT_METADATA`, which it rewrites at the commit), written before the rename
that commits an async save, right after a sync one. A step without one is trusted on orbax's
commit. `restore()` falls back from a step whose files fail the manifest or do not restore, with
a warning, and moves it to `<workdir>/checkpoints_corrupt/` once an earlier step restored. A
failed save raises CheckpointError at the next save or at close(), naming the intact steps.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
from typing import Any, Sequence

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from flax_albert_code import config as config_lib
from flax_albert_code.model.checkpoint_io import MANIFEST, CheckpointError, quiet_orbax, verify_step
from flax_albert_code.utils import files

# A resumed run must train the same model on the same data: these sections must match.
MUST_MATCH = ("model", "data")
# Set by training from the prepared data (the tokenizer's size): not compared before it is.
DERIVED = ("model.vocab_size",)
DIVERGED_DIR = "checkpoints_diverged"   # where a diverged run's checkpoints go (set_aside)
_UNHASHED = ("_CHECKPOINT_METADATA",)   # orbax rewrites its step metadata at the commit
_TMP_SUFFIX = ".orbax-checkpoint-tmp"   # orbax's uncommitted step directories: <step><suffix>[-*]

log = logging.getLogger("flax_albert_code")


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def absolute(workdir) -> str:
  """`workdir` as an absolute path (orbax wants them), a URL as given."""
  workdir = str(workdir)
  return workdir if "://" in workdir else os.path.abspath(os.path.expanduser(workdir))


class _DataHandler(grain.checkpoint.CheckpointHandler):
  """grain's iterator handler that also restores on another process count: the iterator's
  state (the global batch index) is the same in every `process_<i>-of-<n>.json`."""

  def restore(self, directory: epath.Path, item=None, args=None):
    item, directory = item or args.item, epath.Path(directory)
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    found = [own] if own.exists() else sorted(directory.glob("process_*-of-*.json"))
    if not found:
      raise ValueError(f"{directory} holds no data iterator state (process_*-of-*.json).")
    item.set_state(json.loads(found[0].read_text()))
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
  """Thin wrapper over `ocp.CheckpointManager` with our items, policies and integrity checks."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    self.read_only = read_only
    self._saving: int | None = None         # the step whose (async) save is in flight
    self._problems: dict[int, str | None] = {}   # verify() results
    self._save_failed = False
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=max(int(keep), 1)),
        pp.BestN(get_metric_fn=lambda m: m["valid_loss"], reverse=True, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._manifest_before_commit)
        if async_save else None)
    self.async_save = async_save
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
    self.wait()                  # the previous save, so that `_saving` names this one
    self._saving = step
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                force=force)
    except Exception as e:  # disk full, permissions: orbax and tensorstore raise many types
      raise self._failure(step, e) from e
    if saved and not self.async_save:
      self._write_manifest(self.directory / str(step), atomic=True)
    return saved

  def _manifest_before_commit(self) -> None:
    """Orbax's post-finalization callback, between the step's last file and its commit."""
    step = self._saving
    if step is None or jax.process_index() != 0:
      return
    tmp = sorted(self.directory.glob(f"{step}{_TMP_SUFFIX}*"))
    self._write_manifest(tmp[-1] if tmp else self.directory / str(step), atomic=not tmp)

  def _write_manifest(self, path: epath.Path, atomic: bool) -> None:
    try:
      files.write_manifest(path, MANIFEST, skip=_UNHASHED, atomic=atomic)
    except Exception as e:  # the step itself is complete: it stays unverified
      log.warning("Could not write the checksum manifest of %s (%s: %s); that checkpoint will "
                  "be restored unverified.", path, type(e).__name__, e)

  def verify(self, step: int) -> str | None:
    """None if step's files match its manifest (or it has none); else what is wrong, by file."""
    if step not in self._problems:
      self._problems[step] = verify_step(self.directory / str(step))
    return self._problems[step]

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """(state resharded onto `abstract_state`'s shardings, step); restores `data_iter` too.
    Without `step`: the latest step whose files verify and restore (module docstring)."""
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"No complete checkpoint in {self.directory}.")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = _DataRestore(data_iter)
    bad = []
    for i, s in enumerate(steps):
      problem = self.verify(s)
      if problem is None:
        try:
          restored = self.manager.restore(s, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for unreadable files
          problem = f"{type(e).__name__}: {str(e)[:300]}"
      if problem is None:
        for b, _ in bad:
          self._move_aside(b)
        return restored["state"], s
      bad.append((s, problem))
      if i + 1 < len(steps):
        log.warning("Checkpoint step %d is unusable (%s); falling back to step %d.", s, problem,
                    steps[i + 1])
    s, problem = bad[0]
    raise CheckpointError(
        f"Checkpoint {self.directory / str(s)} could not be restored ({problem})"
        + (f", nor could any earlier one ({len(bad) - 1} tried)" if len(bad) > 1 else "")
        + "; delete the bad step directories to start from an earlier one, or use a new "
        "--workdir.")

  def set_aside(self, first: int) -> list[int]:
    """Moves the steps from `first` on (a diverged run's) to `<workdir>/checkpoints_diverged/`
    after the save in flight, so that the next run resumes before them; returns them."""
    self.wait()
    self.manager.reload()
    moved = [s for s in sorted(self.manager.all_steps()) if s >= first]
    if jax.process_index() == 0:
      for step in moved:
        self._move_aside(step, DIVERGED_DIR, "diverged")
    return moved

  def _move_aside(self, step: int, folder: str = "checkpoints_corrupt",
                  what: str = "corrupt") -> None:
    """Move a corrupt (or diverged) step out of orbax's sight, so that it can be saved again."""
    if self.read_only:
      return
    src = self.directory / str(step)
    dest = self.directory.parent / folder / str(step)
    n = 1
    while dest.exists():
      dest, n = dest.parent / f"{step}.{n}", n + 1
    try:
      dest.parent.mkdir(parents=True, exist_ok=True)
      src.rename(dest)
    except Exception as e:
      raise CheckpointError(f"Checkpoint {src} is {what} and could not be moved aside "
                            f"({type(e).__name__}: {e}); delete it and run again.") from e
    log.warning("Moved the %s checkpoint step %d to %s.", what, step, dest)
    self._problems.pop(step, None)
    self.manager.reload()

  def saved_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    step = self.latest_step() if step is None else step
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"Checkpoint {self.directory / str(step)} has no readable config "
                            f"({type(e).__name__}).") from e
    return config_lib.upgrade(ml_collections.ConfigDict(restored["config"]))[0]

  def check_compatible(self, config, sections: Sequence[str] = MUST_MATCH,
                       ignore: Sequence[str] = ()) -> None:
    """CheckpointError naming the fields of `sections` where the saved config differs."""
    saved = None
    for step in sorted(self.manager.all_steps(), reverse=True):   # the newest intact config
      if self.verify(step) is None:
        try:
          saved = self.saved_config(step)
          break
        except CheckpointError:
          pass
    if saved is None:   # nothing to compare with: restore() says what is wrong
      return
    for section in sections:
      a, b = saved.get(section), config.get(section)
      a = a.to_dict() if a is not None else None
      b = json.loads(json.dumps(b.to_dict())) if b is not None else None
      for path in ignore:
        if path.startswith(section + "."):
          for d in (a, b):
            (d or {}).pop(path[len(section) + 1:], None)
      if a != b:
        a, b = a or {}, b or {}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise CheckpointError(
            f"The workdir {self.directory.parent} holds checkpoints of another config "
            f"(config.{section} differs in {diff}); use a new --workdir or the same config.")

  def wait(self) -> None:
    """Wait for the save in flight; CheckpointError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._failure(self._saving, e) from e

  def _failure(self, step, e: Exception) -> CheckpointError:
    self._save_failed = True
    full = (getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)
            or "os_error_code='28'" in str(e))
    self.manager.reload()
    kept = sorted(self.manager.all_steps())
    return CheckpointError(
        f"Saving checkpoint step {step} in {self.directory} failed: "
        + ("the disk is full (no space left on device)" if full
           else f"{type(e).__name__}: {str(e)[:300]}")
        + (f". The earlier checkpoint{'s' * (len(kept) > 1)} (step{'s' * (len(kept) > 1)} "
           f"{', '.join(map(str, kept))}) {'are' if len(kept) > 1 else 'is'} intact"
           if kept else ". No earlier checkpoint was saved")
        + ("; free disk space or use a --workdir on a larger disk, then run the same command "
           "to resume." if full else "; fix the cause, then run the same command to resume."))

  def close(self) -> None:
    """Wait for the save in flight and close; a failed save not yet reported raises here."""
    already_reported, error = self._save_failed, None
    try:
      self.wait()
    except CheckpointError as e:
      error = e
    try:
      self.manager.close()
    except Exception as e:  # orbax raises a failed save's error again
      error = error or self._failure(self._saving, e)
    if error is not None and not already_reported:
      raise error


def check_workdir(workdir: str, config, sections: Sequence[str] = MUST_MATCH) -> None:
  """CheckpointError if `workdir` holds checkpoints of another config; reads only."""
  workdir = absolute(workdir)
  if not checkpoint_dir(workdir).is_dir():
    return
  with quiet_orbax():
    ckpt = Checkpointer(workdir, read_only=True)
    try:
      ckpt.check_compatible(config, sections, ignore=DERIVED)
    finally:
      ckpt.manager.close()
