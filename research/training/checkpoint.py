"""Orbax checkpoints: save every N steps, resume from the newest readable one.

A checkpoint holds the train state plus a JSON dict of host-side extras (e.g. a selection
loop's bookkeeping). Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact; a checkpoint that is
complete but unreadable (a corrupted file) is skipped with a warning and the one before is used.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves and restores `(state, extras)` pairs under `directory`.

  Args:
    directory: where step folders are written (created if missing).
    max_to_keep: newest checkpoints kept (>= 2 so that a corrupted newest one has a fallback).
  """

  def __init__(self, directory: str, max_to_keep: int = 3):
    if max_to_keep < 2:
      raise ValueError(f"max_to_keep={max_to_keep} is not allowed: it must be >= 2")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def save(self, step: int, state: Any, extras: dict | None = None) -> None:
    """Starts saving (asynchronously) the state and JSON extras of `step`."""
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(extras or {})
      ),
    )

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def restore_latest(self, template: Any) -> tuple[Any, dict, int] | None:
    """The newest readable checkpoint as `(state, extras, step)`, or None when there is none.

    Args:
      template: a state pytree with the right structure, shapes and shardings.
    """
    self._manager.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extras=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one.
        logging.warning("checkpoint of step %d is unreadable (%s); trying an older one", step, e)
        continue
      return restored.state, dict(restored.extras or {}), step
    return None

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
