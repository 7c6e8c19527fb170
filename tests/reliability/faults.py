"""Fault injection for subprocess tests, installed at interpreter start by a `sitecustomize`.

`child_env` writes a `sitecustomize.py` that calls `install()` into a folder it puts first on
the child's `PYTHONPATH`. `install` reads:

* `FAULT_LOG`: a file that gets one line per event (`restored N|none`, `paused N`,
  `stalled N`), so the test knows where the child is;
* `FAULT`: `pause_before_save:N` (stop and wait, before checkpoint N starts),
  `pause_after_save:N` (wait after checkpoint N is complete on disk) or `stall_async_save:N`
  (the background write of checkpoint N hangs, so the child is mid-save);
* `FAULT_NO_TENSORFLOW=1`: importing `tensorflow` raises ModuleNotFoundError and
  `importlib.util.find_spec("tensorflow")` is None, as on a machine without it.

A paused or stalled child sleeps until the test SIGKILLs it.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


def child_env(tmp_path: pathlib.Path, **extra: str) -> dict:
  """Environment of a child process with `install()` run at its start-up.

  Args:
    tmp_path: a folder for the `sitecustomize.py` and the JAX compilation cache (shared by the
      children of one test, so only the first compiles).
    **extra: more variables (`FAULT`, `FAULT_LOG`, `FAULT_NO_TENSORFLOW`).
  """
  site = tmp_path / "site"
  site.mkdir(exist_ok=True)
  (site / "sitecustomize.py").write_text("import faults\nfaults.install()\n")
  if extra.get("FAULT_NO_TENSORFLOW") == "1":
    # A stand-in TensorFlow for the blocker to hide where the real one is not installed (a
    # blocker that hid nothing would let the test pass vacuously).
    (site / "tensorflow").mkdir(exist_ok=True)
    (site / "tensorflow" / "__init__.py").write_text("")
  return {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), str(ROOT / "tests" / "reliability")]),
    "XLA_FLAGS": "",
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    **extra,
  }


def _log(line: str) -> None:
  with open(os.environ["FAULT_LOG"], "a") as f:
    f.write(line + "\n")


def _wait_for_kill(line: str) -> None:
  _log(line)
  while True:
    time.sleep(1)


class _WithoutTensorflow:
  """Wraps an import finder so that it never finds `tensorflow` (nor its submodules)."""

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] == "tensorflow":
      return None
    return self._finder.find_spec(name, path, target)

  def __getattr__(self, attr):
    return getattr(self._finder, attr)


def _patch_checkpointer(kind: str, at: int) -> None:
  from etils import epath

  from research.training import checkpoint

  restore_latest = checkpoint.Checkpointer.restore_latest
  save = checkpoint.Checkpointer.save

  def logged_restore_latest(self, template):
    restored = restore_latest(self, template)
    _log(f"restored {restored[2] if restored else 'none'}")
    return restored

  def faulty_save(self, step, state, extras=None):
    if kind == "pause_before_save" and step == at:
      _wait_for_kill(f"paused {step}")
    save(self, step, state, extras)
    if kind == "pause_after_save" and step == at:
      self.wait_until_finished()
      _wait_for_kill(f"paused {step}")

  write_text = epath.Path.write_text

  def stalling_write_text(path, *args, **kwargs):
    if kind == "stall_async_save" and f"/{at}.orbax-checkpoint-tmp/" in str(path):
      _wait_for_kill(f"stalled {at}")
    return write_text(path, *args, **kwargs)

  checkpoint.Checkpointer.restore_latest = logged_restore_latest
  checkpoint.Checkpointer.save = faulty_save
  epath.Path.write_text = stalling_write_text


def install() -> None:
  """Installs the faults named by the environment (module docstring)."""
  if os.environ.get("FAULT_NO_TENSORFLOW") == "1":
    sys.meta_path[:] = [_WithoutTensorflow(finder) for finder in sys.meta_path]
  if "FAULT_LOG" in os.environ:
    kind, _, at = os.environ.get("FAULT", "none:0").partition(":")
    _patch_checkpointer(kind, int(at))
