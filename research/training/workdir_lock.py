"""One run per workdir: an exclusive `fcntl.flock` on `<workdir>/.lock` held for the whole run.

The kernel drops a `flock` when its holder exits in any way (SIGKILL and crashes included), so
a lock file left behind by a dead run is simply taken over by the next one. The lock is
re-entrant within a process: `launch.main` and the run start can both take it.

Usage:

    with workdir_lock.hold(workdir):
      ...  # restore, train, checkpoint, write the report

On a multi-host job each process locks its own file (`.lock.<process index>`), so hosts sharing
one workdir on a network filesystem do not lock each other out. A workdir that is not on a
local filesystem (`gs://...`) cannot be locked: a warning says so and the run goes ahead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from typing import IO

import jax
from absl import logging


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock."""


_held: dict[str, tuple[IO[str], int]] = {}


def lock_path(workdir: str) -> str:
  """The lock file of `workdir` for this process."""
  name = ".lock" if jax.process_count() == 1 else f".lock.{jax.process_index()}"
  return os.path.join(os.path.realpath(workdir), name)


def acquire(workdir: str) -> str | None:
  """Takes the workdir's lock (creating the workdir) and writes this process's pid into it.

  Returns:
    the lock file's path (pass it to `release`); None for a workdir that is not local.

  Raises:
    WorkdirLockedError: at once when another live process holds it.
  """
  if "://" in workdir:
    logging.warning("workdir %s is not local: a second run on it is not prevented", workdir)
    return None
  path = lock_path(workdir)
  if path in _held:
    handle, depth = _held[path]
    _held[path] = (handle, depth + 1)
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run.
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or "unknown"
    handle.close()
    raise WorkdirLockedError(
      f"workdir {os.path.dirname(path)} is in use by another run (pid {holder}): wait for it "
      "to finish or pass another --workdir"
    ) from None
  handle.seek(0)
  handle.truncate()
  handle.write(f"{os.getpid()}\n")
  handle.flush()
  _held[path] = (handle, 1)
  return path


def release(path: str | None) -> None:
  """Releases one `acquire` of the lock file `path`; the last one unlocks it."""
  if path is None:
    return
  handle, depth = _held.pop(path)
  if depth > 1:
    _held[path] = (handle, depth - 1)
    return
  fcntl.flock(handle, fcntl.LOCK_UN)
  handle.close()


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[str | None]:
  """Holds the workdir's lock for the `with` block (see `acquire`); yields the lock file."""
  path = acquire(workdir)
  try:
    yield path
  finally:
    release(path)
