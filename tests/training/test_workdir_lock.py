"""The workdir lock: one run per workdir; a dead holder's lock is taken over."""

import os
import signal
import subprocess
import sys

import pytest

from research.training import workdir_lock

HOLD = (
  "import sys, time; from research.training import workdir_lock; "
  "workdir_lock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(600)"
)


def _holder(workdir):
  """A child process holding the lock of `workdir` (returns once it holds it)."""
  child = subprocess.Popen(
    [sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True
  )
  assert child.stdout.readline().strip() == "locked"
  return child


def test_second_run_fails_at_once_naming_workdir_and_pid(tmp_path):
  child = _holder(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError) as err:
      workdir_lock.acquire(str(tmp_path))
  finally:
    child.kill()
    child.wait()
  assert str(err.value) == (
    f"workdir {tmp_path} is in use by another run (pid {child.pid}): wait for it to finish or "
    "pass another --workdir"
  )


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
  child = _holder(tmp_path)
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert (tmp_path / ".lock").read_text().strip() == str(child.pid)  # left behind
  with workdir_lock.hold(str(tmp_path)):
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def test_lock_is_reentrant_within_a_process_and_released_after(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    with workdir_lock.hold(str(tmp_path)):  # launch.main and the run start both take it
      pass
    probe = subprocess.run(
      [sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(tmp_path)],
      capture_output=True,
      text=True,
    )
    assert "is in use by another run" in probe.stderr  # still held after the inner release
  released = subprocess.run(
    [sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(tmp_path)],
    capture_output=True,
    text=True,
  )
  assert released.stdout.strip() == "locked", released.stderr
