"""One run per workdir: an exclusive `fcntl.flock` on a lock file held for the whole run.

The kernel drops a `flock` when its holder exits in any way (SIGKILL and crashes included), so
a lock file left behind by a dead run is simply taken over by the next one. The lock is
re-entrant within a process: `launch.main` and the run start can both take it.

Usage:

    with workdir_lock.hold(workdir):
      ...  # restore, train, checkpoint, write the report

The lock file of a local workdir is `<workdir>/.lock`. On a multi-host job each process locks
its own file (`.lock.<process index>`), so hosts sharing one workdir on a network filesystem do
not lock each other out.

A workdir that is not on a local filesystem (`gs://...`) cannot hold a `flock`: an object store
has no locks, and a lock object written there would outlive a killed run. Its lock file is a
local one instead, named by a hash of the workdir's path in this machine's temporary folder
(`lock_path`): two runs of one user on one machine (the usual mistake: the same command started
twice on a TPU VM) still exclude each other, while a run on another machine is not prevented,
which a warning says.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

import jax
from absl import logging
from etils import epath

from research.training.tensorboard import is_local

# The folder of one user's lock files of workdirs that are not local, in the temporary folder.
REMOTE_LOCKS = f"research_workdir_locks_{os.getuid()}"


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock."""


_held: dict[str, tuple[IO[str], int]] = {}


def lock_path(workdir: epath.PathLike) -> str:
  """The lock file of `workdir` for this process (always a local file).

  `<workdir>/.lock` for a local workdir; for one that is not local (`gs://...`),
  `<temporary folder>/research_workdir_locks_<uid>/<hash of the workdir>.lock`.
  """
  name = ".lock" if jax.process_count() == 1 else f".lock.{jax.process_index()}"
  if is_local(workdir):
    return os.path.join(os.path.realpath(workdir), name)
  digest = hashlib.sha256(os.fspath(epath.Path(workdir)).encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), REMOTE_LOCKS, digest + name)


def acquire(workdir: epath.PathLike) -> str:
  """Takes the workdir's lock (creating a local workdir) and writes this process's pid into it.

  Returns:
    the lock file's path (pass it to `release`).

  Raises:
    WorkdirLockedError: at once when another live process holds it.
  """
  path = lock_path(workdir)
  if path in _held:
    handle, depth = _held[path]
    _held[path] = (handle, depth + 1)
    return path
  if not is_local(workdir):
    logging.warning(
      "workdir %s is not local: it is locked on this machine only (%s); a run on another "
      "machine is not prevented",
      os.fspath(workdir),
      path,
    )
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run.
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or "unknown"
    handle.close()
    shown = os.path.dirname(path) if is_local(workdir) else os.fspath(workdir)
    raise WorkdirLockedError(
      f"workdir {shown} is in use by another run (pid {holder}): wait for it "
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
def hold(workdir: epath.PathLike) -> Iterator[str]:
  """Holds the workdir's lock for the `with` block (see `acquire`); yields the lock file."""
  path = acquire(workdir)
  try:
    yield path
  finally:
    release(path)
