"""Resume for real: `launch.main` SIGKILLed at several points, restarted, ends bit-identical.

The children run without TensorFlow (`FAULT_NO_TENSORFLOW=1`), so this is also the smoke
experiment of the "no TensorFlow" guarantee.
"""

import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from faults import ROOT, child_env

COMMAND = [
  sys.executable,
  "-m",
  "launch.main",
  f"--config={ROOT}/configs/classification_digits.py:smoke",
  "--config.train.steps=12",
  "--config.train.checkpoint_every=2",
  "--config.train.log_every=2",
]
TIMEOUT_S = 300


class Child:
  """One `launch.main` subprocess and its fault log."""

  def __init__(self, tmp_path: pathlib.Path, workdir: pathlib.Path, name: str, fault: str = ""):
    self.log = tmp_path / f"{name}.faults"
    self.stderr = tmp_path / f"{name}.stderr"
    env = child_env(
      tmp_path, FAULT_LOG=str(self.log), FAULT=fault or "none:0", FAULT_NO_TENSORFLOW="1"
    )
    with open(self.stderr, "w") as err:
      self.proc = subprocess.Popen(
        COMMAND + [f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=err, stderr=err
      )

  def events(self) -> list[str]:
    return self.log.read_text().splitlines() if self.log.exists() else []

  def wait_for(self, event: str) -> None:
    """Blocks until the child logged `event` (fails if it exits or times out first)."""
    deadline = time.monotonic() + TIMEOUT_S
    while event not in self.events():
      assert self.proc.poll() is None, f"child exited: {self.stderr.read_text()[-3000:]}"
      assert time.monotonic() < deadline, f"no {event!r} after {TIMEOUT_S} s: {self.events()}"
      time.sleep(0.05)

  def kill(self) -> None:
    self.proc.send_signal(signal.SIGKILL)
    self.proc.wait()

  def finish(self) -> None:
    assert self.proc.wait(timeout=TIMEOUT_S) == 0, self.stderr.read_text()[-3000:]


def complete_steps(workdir: pathlib.Path) -> list[int]:
  folder = workdir / "train_checkpoints"
  return (
    sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
  )


def final_state(workdir: pathlib.Path) -> dict:
  restored = ocp.PyTreeCheckpointer().restore(workdir / "train_checkpoints" / "12" / "state")
  return jax.tree.map(np.asarray, restored)


def test_sigkilled_run_resumes_from_its_checkpoints_to_identical_parameters(tmp_path):
  reference = Child(tmp_path, tmp_path / "reference", "reference")
  run = tmp_path / "run"

  before_first = Child(tmp_path, run, "before_first", "pause_before_save:2")
  before_first.wait_for("paused 2")
  before_first.kill()
  assert before_first.events()[0] == "restored none" and complete_steps(run) == []

  after_save = Child(tmp_path, run, "after_save", "pause_after_save:4")
  after_save.wait_for("paused 4")
  after_save.kill()
  assert after_save.events()[0] == "restored none" and complete_steps(run) == [2, 4]

  mid_save = Child(tmp_path, run, "mid_save", "stall_async_save:8")
  mid_save.wait_for("stalled 8")
  mid_save.kill()
  assert mid_save.events()[0] == "restored 4"  # resumed: steps 1-4 were not trained again
  assert complete_steps(run) == [2, 4, 6]
  assert (run / "train_checkpoints" / "8.orbax-checkpoint-tmp").is_dir()  # killed mid-save

  last = Child(tmp_path, run, "last")
  last.finish()
  assert last.events() == ["restored 6"]
  assert complete_steps(run) == [8, 10, 12]
  reference.finish()

  expected, got = final_state(tmp_path / "reference"), final_state(run)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(g, e)  # bit-identical, not merely close
