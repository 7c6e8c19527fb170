"""Orbax checkpoints: save every N steps, resume from the newest readable one of the same run.

A checkpoint holds the train state, a JSON dict of host-side extras (e.g. a selection loop's
bookkeeping) and a JSON description of the run that wrote it: the state's structure (every
leaf's path, shape and dtype) and an optional caller-given fingerprint (a config hash, names).
Restoring tells two failures apart:

* another run's checkpoint (the structure or the fingerprint differs: the optimizer, the model
  or the config changed) raises `CheckpointMismatchError`, which names what changed and how to
  start fresh, instead of silently training from step 0 next to the old checkpoints;
* a corrupted checkpoint (its files cannot be read) is moved into `<directory>/quarantine/`,
  so it no longer holds one of the kept slots, and the one before it is used.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact (the temporary directory is removed when the next
run opens the folder). A save that fails (a full disk) raises `CheckpointSaveError` at the next
save or at `wait_until_finished`, naming the newest complete checkpoint, which stays intact.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

QUARANTINE = "quarantine"
_SCALARS = (str, int, float, bool, type(None))
_MAX_LISTED_CHANGES = 3


class CheckpointMismatchError(ValueError):
  """The checkpoint directory holds another run's checkpoint (structure or fingerprint differ)."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the newest complete checkpoint before it is intact."""


def describe(state: Any, fingerprint: dict | None = None) -> dict:
  """The JSON description of a run saved with each checkpoint.

  Args:
    state: a pytree of arrays (or `jax.ShapeDtypeStruct`s).
    fingerprint: flat dict of str -> JSON scalar naming the run (None for none).

  Returns:
    {"fingerprint": {...}, "structure": {leaf path: [shape list, dtype name]}}.
  """
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  structure = {
    jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)] for path, leaf in leaves
  }
  return {"fingerprint": dict(fingerprint or {}), "structure": structure}


def differences(saved: dict, current: dict) -> list[str]:
  """What differs between a saved run description and the current one (see `describe`)."""
  changes = []
  for kind in ("fingerprint", "structure"):
    old, new = saved.get(kind, {}), current[kind]
    label = "fingerprint " if kind == "fingerprint" else ""
    for key in sorted(set(old) | set(new)):
      if key not in new:
        changes.append(f"{label}{key} is in the checkpoint but not in this run")
      elif key not in old:
        changes.append(f"{label}{key} is in this run but not in the checkpoint")
      elif old[key] != new[key]:
        if kind == "fingerprint":
          changes.append(f"fingerprint {key} was {old[key]!r} and is now {new[key]!r}")
        else:
          (old_shape, old_dtype), (new_shape, new_dtype) = old[key], new[key]
          changes.append(f"{key} was {old_dtype}{old_shape} and is now {new_dtype}{new_shape}")
  return changes


def _check_fingerprint(fingerprint: dict | None) -> dict:
  for key, value in (fingerprint or {}).items():
    if not isinstance(key, str) or not isinstance(value, _SCALARS):
      raise ValueError(
        f"fingerprint[{key!r}]={value!r} is not allowed: keys must be str and values str, "
        "int, float, bool or None"
      )
  return dict(fingerprint or {})


def orbax_directory(directory: epath.PathLike) -> epath.Path:
  """`directory` as Orbax wants it: a local one made absolute, one like `gs://...` left as it is.

  (`epath.Path('gs://b/x').absolute()` would turn it into the local `<cwd>/gs:/b/x`.)
  """
  path = epath.Path(directory)
  return path if "://" in os.fspath(directory) else path.absolute()


@functools.cache
def whole_array_writes_on_cpu() -> bool:
  """On the CPU backend, has Orbax write each replicated array whole from its first replica.

  Orbax's default ("replica-parallel") splits every replicated array into one slice per
  replica so that each accelerator copies its part to the host. On CPU the "devices" already
  live in host memory, so the slices only cost work: each distinct slice shape compiles a small
  XLA program (about a hundred per saved state of a ResNet on 8 devices, seconds per run).
  Called once per process (Orbax's type-handler registry is global); other backends keep
  Orbax's default. The files written are the same either way.

  Returns:
    Whether the CPU setting was applied.
  """
  if jax.default_backend() != "cpu":
    return False
  handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  return True


class Checkpointer:
  """Saves and restores `(state, extras)` pairs under `directory`.

  Args:
    directory: where step folders are written (created if missing; any `etils.epath` location).
    max_to_keep: newest checkpoints kept (>= 2 so that a corrupted newest one has a fallback).
    fingerprint: flat dict of str -> JSON scalar (str, int, float, bool, None) naming the run,
      e.g. `{"config_hash": "9f2c...", "experiment": "long_tail", "phase": "train"}`; saved with
      each checkpoint and compared on restore. None: only the structure is compared.
  """

  def __init__(self, directory: str, max_to_keep: int = 3, fingerprint: dict | None = None):
    if max_to_keep < 2:
      raise ValueError(f"max_to_keep={max_to_keep} is not allowed: it must be >= 2")
    self.directory = str(orbax_directory(directory))
    whole_array_writes_on_cpu()
    self.fingerprint = _check_fingerprint(fingerprint)
    self._pending: int | None = None
    self._failed = False
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
      ),
    )

  def save(self, step: int, state: Any, extras: dict | None = None) -> None:
    """Starts saving (asynchronously) the state and JSON extras of `step`.

    Raises:
      CheckpointSaveError: when the previous save failed (it is checked before this one starts).
    """
    self._finish_pending()
    self._pending = step
    try:
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          extras=ocp.args.JsonSave(extras or {}),
          run=ocp.args.JsonSave(describe(state, self.fingerprint)),
        ),
      )
    except Exception as e:  # noqa: BLE001 - any failure to start a save stops the run.
      self._raise_save_error(e)

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def restore_latest(self, template: Any) -> tuple[Any, dict, int] | None:
    """The newest readable checkpoint as `(state, extras, step)`, or None when there is none.

    Unreadable checkpoints are moved into `<directory>/quarantine/` and the one before is tried.

    Args:
      template: a state pytree with the right structure, shapes and shardings.

    Raises:
      CheckpointMismatchError: when the newest readable checkpoint was written by another run
        (different structure, shapes, dtypes or fingerprint).
    """
    self._finish_pending()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    current = describe(abstract, self.fingerprint)
    for step in reversed(self.all_steps()):
      try:
        saved = self._manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))
        changes = differences(dict(saved.run), current)
        if not changes:
          restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract), extras=ocp.args.JsonRestore()
            ),
          )
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one.
        self._quarantine(step, e)
        continue
      if changes:
        shown = "; ".join(changes[:_MAX_LISTED_CHANGES])
        more = len(changes) - _MAX_LISTED_CHANGES
        raise CheckpointMismatchError(
          f"the checkpoint of step {step} in {self.directory} was written by another run "
          f"({shown}{f'; and {more} more' if more > 0 else ''}): to start fresh, rerun with "
          "--restart (launch.main) or use a new workdir"
        )
      return restored.state, dict(restored.extras or {}), step
    return None

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous saves are on disk.

    Raises:
      CheckpointSaveError: when the pending save failed.
    """
    self._finish_pending()

  def close(self) -> None:
    """Finishes pending saves and releases the manager.

    Raises:
      CheckpointSaveError: when the pending save failed (a failure already raised is not
        raised again, so closing in a `finally` block keeps the first error).
    """
    if self._failed:  # Reported already: Orbax would raise the same background error again.
      with contextlib.suppress(Exception):
        self._manager.close()
      return
    self._finish_pending()
    self._manager.close()

  def _finish_pending(self) -> None:
    """Waits for the pending save and checks that its step is complete on disk."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - a failed background save stops the run.
      self._raise_save_error(e)
    if self._pending is not None:
      self._manager.reload()
      if self._pending not in self._manager.all_steps():
        self._raise_save_error(None)
      self._pending = None

  def _raise_save_error(self, error: Exception | None) -> None:
    step, self._pending, self._failed = self._pending, None, True
    self._manager.reload()
    kept = self.all_steps()
    intact = (
      f"the newest complete checkpoint, step {kept[-1]}, is intact"
      if kept
      else ("no complete checkpoint exists")
    )
    cause = f" ({type(error).__name__}: {error})" if error is not None else ""
    raise CheckpointSaveError(
      f"saving the checkpoint of step {step} to {self.directory} failed{cause}; the run stopped "
      f"and {intact}"
    ) from error

  def _quarantine(self, step: int, error: Exception) -> None:
    """Moves an unreadable step folder into `<directory>/quarantine/` (primary host only)."""
    target = epath.Path(self.directory) / QUARANTINE / str(step)
    logging.warning(
      "checkpoint of step %d is unreadable (%s: %s); it is moved to %s and an older one is tried",
      step,
      type(error).__name__,
      error,
      target,
    )
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target.rmtree()
      (epath.Path(self.directory) / str(step)).rename(target)
    self._manager.reload()


def clear_checkpoints(workdir: str) -> list[str]:
  """Deletes every checkpoint directory under `workdir` (what `--restart` does).

  A checkpoint directory is a folder below `workdir` holding an Orbax step folder (a folder
  with a `_CHECKPOINT_METADATA` file, complete or temporary) or a `quarantine` folder.

  Returns:
    the deleted directories.
  """
  root = epath.Path(workdir)
  removed = []
  for dirpath, dirnames, _ in root.walk():
    if dirpath == root:
      continue
    is_checkpoints = QUARANTINE in dirnames or any(
      (dirpath / d / "_CHECKPOINT_METADATA").exists() for d in dirnames
    )
    if is_checkpoints:
      dirpath.rmtree()
      removed.append(str(dirpath))
      dirnames.clear()
  return sorted(removed)
